"""`simvq`: one subcommand per job. This module only parses arguments and calls the stages."""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
from typing import Callable

from rich.markup import escape

from simvq_common.config import load_config
from simvq_common.console import console
from simvq_common.errors import Preempted, UserError
from simvq_common.preemption import REQUEUE_EXIT
from simvq_common.schema_keys import keys_help

# A key=value override: a dotted key (list items as key[0]), then '=' and the value (a path has no '=' there).
OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]]*=")
OVERRIDES_HELP = "config overrides as key=value (dotted keys for nested fields, e.g. autoencoder.ch=64)"


def _collapse_study(cfg) -> None:
    from studies.collapse import run_collapse_study

    run_collapse_study(cfg)
    console.print(f"[green]done[/]: results in {cfg.out_dir}/results.md"
                  + (f" and {cfg.results_md}" if cfg.results_md else ""))


def _quality_study(cfg) -> None:
    from pipelines.quality_study import run_quality_study

    result = run_quality_study(cfg)
    console.print(f"[green]done[/]: {len(result['rows'])} rows in {cfg.out_dir or cfg.run_dir + '/quality_study'}"
                  + (f" and {cfg.results_md}" if cfg.results_md else ""))


def _train_tokenizer(cfg) -> None:
    from stage1_tokenizer.train import train_tokenizer

    out = train_tokenizer(cfg)
    console.print(f"[green]done[/]: tokenizer (EMA weights) in {out}")


def _eval_tokenizer(cfg) -> None:
    from stage1_tokenizer.evaluate import evaluate_tokenizer, result_table

    console.print(result_table(evaluate_tokenizer(cfg)))


def _compare_tokenizers(cfg) -> None:
    from studies.tokenizer_comparison import run_comparison

    run_comparison(cfg)
    console.print(f"[green]done[/]: {cfg.out_dir}/results.json" + (f" and {cfg.results_md}" if cfg.results_md else ""))


def _generation_study(cfg) -> None:
    from pipelines.generation_study import run_generation_study

    result = run_generation_study(cfg)
    console.print(f"[green]done[/]: {len(result['rows'])} tokenizers in {cfg.out_dir}/results.json"
                  + (f" and {cfg.results_md}" if cfg.results_md else ""))


def _pretokenize(cfg) -> None:
    from pipelines.pretokenize import pretokenize
    from simvq_common.distributed import rank

    out = pretokenize(cfg)
    if rank() == 0:
        console.print(f"[green]done[/]: check it with `simvq verify-cache {out}`")


def _pack_data(cfg) -> None:
    from image_data.datasets import pack_data

    for folder in pack_data(cfg):
        console.print(f"[green]done[/]: {folder}")


def _draw_shapes(cfg) -> None:
    from image_data.shapes import draw_shapes

    console.print(f"[green]done[/]: {draw_shapes(cfg)} (use it as data={cfg.out})")


def _train_generator(cfg) -> None:
    from simvq_common.distributed import rank
    from stage2_generator.train import train_generator

    out = train_generator(cfg)
    if rank() == 0:
        console.print(f"[green]done[/]: generator (consolidated fp32 weights + config) in {out}")


def _sample(cfg) -> None:
    from pipelines.sample import sample
    from simvq_common.distributed import rank

    s = sample(cfg)
    if rank() == 0:
        console.print(f"[green]done[/]: {s['num_samples']} samples in {s['out']} (generator "
                      f"{s['generator_fingerprint']}, tokenizer {s['tokenizer_fingerprint']})")


def _serve(cfg) -> None:
    from pipelines.serve import serve

    serve(cfg)


def _evaluate(cfg) -> None:
    from pipelines.evaluate import evaluate, result_table

    console.print(result_table(evaluate(cfg)))


def _train_classifier(cfg) -> None:
    from evaluation.classifier import train_classifier

    out = train_classifier(cfg)
    console.print(f"[green]done[/]: classifier in {out} (val accuracy in {out}/eval.json)")


def _run(cfg) -> None:
    from pipelines.run import run_pipeline

    run_pipeline(cfg)


def _verify_cache(cfg) -> None:
    from pipelines.verify import verify_cache

    s = verify_cache(cfg)
    console.print(f"[green]cache OK[/]: {s['shards']} shards, {s['sequences']:,} sequences, {s['tokens']:,} tokens, "
                  f"K = {s['codebook_size']:,} ({s['utilisation']:.1%} of the codes used), fingerprint "
                  f"{s['fingerprint']}" + (f"; decoded sequences in {s['grid']}" if s["grid"] else ""))


def _dataset_info(_) -> None:
    from rich.table import Table

    from image_data.emoji import load_emoji

    table = Table(title="bundled emoji (Noto, Apache-2.0)")
    for column in ("class", "name", "train", "val"):
        table.add_column(column, justify="right" if column in ("class", "train", "val") else "left")
    train, val = load_emoji("train"), load_emoji("val")
    for index, name in enumerate(train.class_names):
        table.add_row(str(index), name, str(int((train.labels == index).sum())), str(int((val.labels == index).sum())))
    table.add_row("", "total", str(len(train)), str(len(val)))
    console.print(table)
    console.print(f"source: {train.source}")


def _push_to_hub(cfg) -> None:
    from pipelines.hub_upload import push_to_hub

    s = push_to_hub(cfg)
    where = f"staged in {s['staged']} (nothing uploaded)" if s["url"] is None else f"pushed: {s['url']}"
    console.print(f"[green]done[/]: {s['kind']} {s['fingerprint']} -> {s['repo']}, {where}")


COMMANDS: dict[str, tuple[Callable[[object], None], str]] = {
    # name: (function of the command's config, help)
    "collapse-study": (_collapse_study,
                       "train a small autoencoder with plain VQ, EMA VQ and SimVQ at several codebook sizes on the "
                       "bundled emoji (same budget each) and tabulate codebook utilisation, perplexity, MSE and PSNR"),
    "quality-study": (_quality_study,
                      "measure what limits the samples of a finished `simvq run`: FID, sFID, FID / rFID and class "
                      "agreement of its class generator at every kept checkpoint, over sampler settings and seeds, "
                      "and memorisation of the best (e.g. run_dir=runs/emoji32_showcase results_md=docs/RESULTS.md)"),
    "train-tokenizer": (_train_tokenizer,
                        "train a SimVQ tokenizer (stage 1); resumes from the run directory's last checkpoint; "
                        "run under torchrun for several processes"),
    "eval-tokenizer": (_eval_tokenizer,
                       "rFID, PSNR, SSIM, LPIPS, codebook utilisation and perplexity of a tokenizer over a "
                       "validation split, written to eval.json with their provenance (e.g. tokenizer=DIR resolution=32)"),
    "compare-tokenizers": (_compare_tokenizers,
                           "train and evaluate one tokenizer per (quantizer kind, codebook size) under the same "
                           "budget and tabulate rFID, PSNR, SSIM, LPIPS and utilisation"),
    "generation-study": (_generation_study,
                         "train the same class generator over each tokenizer of a tokenizer comparison (plain VQ "
                         "and SimVQ at several K, several seeds) and tabulate generation FID against rFID, the "
                         "generator's bits per image, codebook use and speed (e.g. -c configs/study/generation_emoji.yaml)"),
    "pretokenize": (_pretokenize,
                    "encode a dataset with a tokenizer into a code cache (shards + manifest.json) for stage 2; "
                    "resumes an interrupted run; run under torchrun for several processes "
                    "(e.g. --tokenizer DIR --data emoji --out CACHE --aug flip resolution=32)"),
    "train-generator": (_train_generator,
                        "train an autoregressive generator (stage 2) on a code cache with DeepSpeed (ZeRO stage from "
                        "run.deepspeed); resumes from the run's latest checkpoint; run under the deepspeed launcher "
                        "or torchrun for several processes or nodes"),
    "sample": (_sample,
               "draw samples from a generator (class ids or names, text prompts, or an image prefix) and decode "
               "them with its tokenizer into samples.npz, grid.png and sampling.json; seeds follow each sample's "
               "global index; run under torchrun for several processes (e.g. --generator DIR --out DIR "
               "num_samples=64 sampling.guidance_scale=2)"),
    "serve": (_serve,
              "a page in the browser that samples a generator interactively (class or prompt, guidance, "
              "temperature, top-k/p, seed, image completion) and offers each request's files as `sample` writes "
              "them; binds to 127.0.0.1 (--host 0.0.0.0: the network), --port 0 = a free port (e.g. --generator DIR)"),
    "evaluate": (_evaluate,
                 "FID, IS, KID and precision/recall of samples (a `simvq sample` directory) against a reference "
                 "(reference=emoji, an image folder, or saved statistics .npz), written to metrics.json with "
                 "the suite, Inception weights hash, resize, counts and reference; also class agreement "
                 "(metrics=[agreement] classifier=DIR), memorisation (nearest train images) and FID / rFID "
                 "(tokenizer_rfid=)"),
    "train-classifier": (_train_classifier,
                         "train the small image classifier that measures class agreement (`simvq evaluate "
                         "metrics=[agreement] classifier=DIR`) on a labelled train split, with its val accuracy "
                         "(e.g. data=emoji resolution=32 out=runs/classifier)"),
    "run": (_run,
            "the whole system from one config: tokenizer, pre-tokenization, generators, samples, FID against "
            "the val split beside a unigram baseline and the tokenizer's rFID, and report.md; a stage whose "
            "inputs are unchanged is skipped, an interrupted one resumed (e.g. -c configs/pipeline/emoji32_demo.yaml)"),
    "verify-cache": (_verify_cache,
                     "check a code cache (checksums, counts, codes < K) and decode a few sequences into a PNG grid "
                     "with the tokenizer it records"),
    "dataset-info": (_dataset_info, "show the bundled emoji dataset: classes and split sizes"),
    "pack-data": (_pack_data,
                  "write a data source's splits as captioned files: WebDataset tars (layout=webdataset), PNGs with a "
                  "metadata.jsonl (jsonl) or with .txt sidecars (sidecar), e.g. --data emoji --out runs/emoji_wds "
                  "resolution=32"),
    "draw-shapes": (_draw_shapes,
                    "draw a labelled image folder of shapes (circle, ring, square, ... at random positions, sizes "
                    "and colours): data nobody tuned the recipe on (e.g. out=runs/shapes32)"),
    "push-to-hub": (_push_to_hub,
                    "upload a tokenizer or generator directory to the Hugging Face Hub with a generated model card "
                    "(architecture, fingerprint, metrics, sample grid, provenance, how to load it); a generator "
                    "names its tokenizer's Hub id (--tokenizer-repo); --dry-run stages the folder into out=DIR only "
                    "(e.g. simvq push-to-hub runs/r/tokenizer org/tok --private)"),
}
# The config schema of each command that takes one ("module:class", imported when the command runs).
SCHEMAS: dict[str, str] = {
    "collapse-study": "studies.config:CollapseStudyConfig",
    "quality-study": "pipelines.config:QualityStudyConfig",
    "train-tokenizer": "stage1_tokenizer.config:TokenizerTrainConfig",
    "eval-tokenizer": "stage1_tokenizer.config:TokenizerEvalConfig",
    "compare-tokenizers": "studies.config:TokenizerComparisonConfig",
    "generation-study": "pipelines.config:GenerationStudyConfig",
    "pretokenize": "pipelines.config:PretokenizeConfig",
    "train-generator": "stage2_generator.config:GeneratorTrainConfig",
    "sample": "pipelines.config:SampleConfig",
    "serve": "pipelines.config:ServeConfig",
    "evaluate": "pipelines.config:EvaluateConfig",
    "train-classifier": "evaluation.classifier:ClassifierTrainConfig",
    "run": "pipelines.config:PipelineConfig",
    "verify-cache": "pipelines.config:VerifyCacheConfig",
    "pack-data": "image_data.config:PackDataConfig",
    "draw-shapes": "image_data.config:DrawShapesConfig",
    "push-to-hub": "pipelines.hub_upload:PushToHubConfig",
}
# Config keys a command also takes as flags (`--aug flip` is `aug=flip`; key=value overrides given after
# them win), and the key its positional argument sets.
FLAG_KEYS: dict[str, tuple[str, ...]] = {"pretokenize": ("tokenizer", "data", "out", "aug"),
                                         "verify-cache": ("tokenizer",), "evaluate": ("reference",),
                                         "sample": ("generator", "tokenizer", "out"), "pack-data": ("data", "out"),
                                         "serve": ("generator", "host", "port")}
POSITIONAL_KEYS: dict[str, tuple[str, ...]] = {"verify-cache": ("cache",), "evaluate": ("samples",),
                                               "push-to-hub": ("model", "repo")}
# Keys a command takes as on/off switches (`--dry-run` is `dry_run=true`); a flag's dashes are the key's underscores.
SWITCH_KEYS: dict[str, tuple[str, ...]] = {"push-to-hub": ("dry_run", "private")}
SWITCH_OPTIONS = {"--" + key.replace("_", "-") for keys in SWITCH_KEYS.values() for key in keys}
FLAG_KEYS["push-to-hub"] = ("tokenizer_repo", "metrics", "grid", "revision", "out")


def command_overrides(args: argparse.Namespace) -> list[str]:
    """key=value overrides from the command's positional argument and flags, then its explicit overrides."""
    given = [f"{key}={getattr(args, key)}" for key in args.positional_keys]
    given += [f"{key}={getattr(args, 'flag_' + key)}" for key in args.flag_keys
              if getattr(args, "flag_" + key) is not None]
    return given + args.overrides


def config_of(args: argparse.Namespace):
    """The command's config: its schema's defaults <- the -c file <- flags and key=value overrides."""
    if args.command not in SCHEMAS:
        return None
    return load_config(schema_of(args.command), args.config, command_overrides(args))


def schema_of(command: str) -> type:
    module, name = SCHEMAS[command].split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(keys_for: str | None = None) -> argparse.ArgumentParser:
    """The parser; `keys_for` names the command whose --help also lists its config keys (its schema is only
    imported then: the CLI starts without torch)."""
    parser = argparse.ArgumentParser(
        prog="simvq",
        description="simvq-gen: SimVQ tokenizers, code caches, autoregressive generators and FID pipelines.",
        epilog="Every run writes its merged config, metrics.jsonl and outputs into its run directory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (function, help_text) in COMMANDS.items():
        if name == keys_for and name in SCHEMAS:
            command = sub.add_parser(name, help=help_text, description=textwrap.fill(help_text, 100),
                                     epilog=keys_help(schema_of(name)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        else:
            command = sub.add_parser(name, help=help_text, description=help_text)
        for key in POSITIONAL_KEYS.get(name, ()):
            command.add_argument(key, help=f"sets {key}")
        for key in FLAG_KEYS.get(name, ()):
            command.add_argument("--" + key.replace("_", "-"), dest=f"flag_{key}", metavar=key.upper(),
                                 help=f"same as {key}=...")
        for key in SWITCH_KEYS.get(name, ()):
            command.add_argument("--" + key.replace("_", "-"), dest=f"flag_{key}", action="store_const", const="true",
                                 help=f"same as {key}=true")
        if name in SCHEMAS:
            command.add_argument("-c", "--config", help="YAML config (schema defaults are used for absent keys)")
            command.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
        command.set_defaults(function=function, flag_keys=FLAG_KEYS.get(name, ()) + SWITCH_KEYS.get(name, ()),
                             positional_keys=POSITIONAL_KEYS.get(name, ()))
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other words, the key=value overrides) of a command line, overrides taken from anywhere: argparse
    alone would give one that comes first to the positional argument, and refuse those after a flag. The word
    after an option is that option's value even when it holds a '='."""
    rest, overrides = [], []
    for index, word in enumerate(argv):
        previous = argv[index - 1] if index else ""
        is_option_value = (previous.startswith("-") and "=" not in previous
                           and previous not in ("-h", "--help", *SWITCH_OPTIONS))
        (overrides if OVERRIDE.match(word) and not is_option_value else rest).append(word)
    return rest, overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with key=value overrides before, between or after the flags and positionals."""
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    asks_help = {"-h", "--help"} & set(rest)
    parser = build_parser(keys_for=next((word for word in rest if word in COMMANDS), None) if asks_help else None)
    args = parser.parse_args(rest)
    if overrides and args.command not in SCHEMAS:
        parser.error(f"{args.command} takes no key=value overrides: {' '.join(overrides)}")
    # Words argparse put where the overrides go are not key=value: often a value the shell split at a space.
    if getattr(args, "overrides", None):
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)} (overrides are key=value; quote one "
                     "whose value holds spaces or shell characters as a whole, e.g. 'classes=[Animals & Nature]')")
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.function(config_of(args))
    except Preempted as err:  # checkpointed: the scheduler may requeue the same command
        console.print(f"[yellow]{escape(str(err))}[/]", soft_wrap=True)
        return REQUEUE_EXIT
    except UserError as err:  # the project's own: the message says what to fix; anything else is a bug
        # one line, however long; escaped, as a message may quote [a, b] values (rich markup otherwise)
        console.print(f"[red]error[/]: {escape(str(err))}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
