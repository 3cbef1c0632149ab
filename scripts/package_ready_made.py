"""Package trained models (a `simvq run` output, or model directories) as the repository's ready-made models
(simvq_common/ready_made.py).

    python scripts/package_ready_made.py --run runs/emoji32_showcase --classifier runs/classifier_emoji32 \
        --class-sampling guidance_scale=2.0 --text-sampling guidance_scale=2.0 [--storage fp16 emoji-class=int8]

Each model becomes a model directory under --out: the weights in their storage (fp32, fp16 or int8:
simvq_common/weight_storage.py; they load as fp32, and the fingerprint is that of the weights a model loads),
config.yaml, kind.txt, fingerprint.txt and a README.md model card with its numbers and the command that retrains
it. --tokenizer / --class-generator / --text-generator take a model directory instead of the run's (a generator
must have been trained over the packaged tokenizer's codes: its recorded fingerprint is checked). The
generators' configs name the tokenizer by its ready-made name (so they find it in any clone) and record the
fingerprint of the packaged tokenizer; each carries sampling.yaml, the sampler settings `simvq sample` and
`simvq serve` start from. Refuses, leaving --out as it was, when they would take more than --max-mib together
(the repository's budget).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.classifier import ImageClassifier  # noqa: E402
from simvq_common.config import load_config, to_yaml  # noqa: E402
from simvq_common.io import write_text_atomic  # noqa: E402
from simvq_common.pretrained import save_pretrained  # noqa: E402
from simvq_common.ready_made import READY_MADE  # noqa: E402
from simvq_common.weight_storage import STORAGES, decode, encode  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from stage2_generator.config import RECOMMENDED_SAMPLING, GeneratorConfig, SamplingConfig  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402

RETRAIN = {
    "emoji-tokenizer": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its tokenizer/ stage",
    "emoji-class": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its generator-class stage",
    "emoji-text": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its generator-text stage",
    "emoji-classifier": "simvq train-classifier data=emoji resolution=32 out=runs/classifier_emoji32 epochs=20",
}


def per_name(option: str, values: list[str]) -> dict[str, list[str]]:
    """`NAME=TEXT` values of `option` -> {NAME: [TEXT, ...]}, NAME a ready-made name."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or name not in READY_MADE:
            raise SystemExit(f"{option} {value!r}: give NAME=VALUE with NAME one of {', '.join(READY_MADE)}")
        out.setdefault(name, []).append(text)
    return out


def storages(values: list[str]) -> dict[str, str]:
    """`fp16 emoji-class=int8` -> each ready-made name's storage: a bare value sets the default (fp32), in any
    order; NAME=STORAGE sets one."""
    bare = [value for value in values if "=" not in value]
    named = per_name("--storage", [value for value in values if "=" in value])
    chosen = {name: bare[-1] if bare else "fp32" for name in READY_MADE}
    chosen.update({name: given[-1] for name, given in named.items()})
    for storage in chosen.values():
        if storage not in STORAGES:
            raise SystemExit(f"--storage {storage!r}: give a storage ({', '.join(STORAGES)}), or NAME=STORAGE")
    return chosen


def as_stored(model, storage: str) -> tuple[dict, object]:
    """(`model`'s weights as they are, to write; `model` now holding the weights it will load from `storage`, whose
    fingerprint is the packaged one). Weights `storage` cannot hold are refused here, before anything is written."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(decode(encode(state, storage)))
    return state, model


def card(name: str, model, what: str, numbers: list[str], extra: list[str], retrain: str) -> str:
    folder = READY_MADE[name]
    return "\n".join([
        f"# {name} (`models/{folder}`)", "", what, "",
        f"- fingerprint `{model.fingerprint()}` (sha256 of config.yaml and the fp32 weights it loads as; "
        f"`fingerprint.txt`)", f"- {sum(p.numel() for p in model.parameters()):,} parameters", *numbers, *extra, "",
        "Load it by name, offline, in any clone:", "", "```",
        *({"emoji-tokenizer": ["simvq eval-tokenizer tokenizer=emoji-tokenizer resolution=32"],
           "emoji-class": ["simvq sample --generator emoji-class --out runs/s per_class=8"],
           "emoji-text": ['simvq sample --generator emoji-text --out runs/t "prompts=[red heart, rocket, pizza]"'],
           "emoji-classifier": ["simvq evaluate runs/s metrics=[agreement] classifier=emoji-classifier"]}[name]),
        "```", "", "Retrain it:", "", "```", retrain, "```", "",
        "How it was trained and measured: docs/RESULTS.md, \"Images a person recognises\".", ""])


def package(args) -> dict:
    """Load, encode and check every model, then write into a staging folder inside --out and move the folders into
    place only once the budget holds: a refusal leaves --out as it was."""
    out, run = Path(args.out), Path(args.run) if args.run else None
    storage = storages(args.storage)
    retrain = {**RETRAIN, **{name: "\n".join(texts) for name, texts in per_name("--retrain", args.retrain).items()}}
    notes = {name: [f"- {text}" for text in texts] for name, texts in per_name("--card-note", args.card_note).items()}

    # what goes where, and the tokenizer fingerprint every generator must record
    tokenizer_dir = Path(args.tokenizer or run / "tokenizer" / "tokenizer")
    packaged_tokenizer = out / READY_MADE["emoji-tokenizer"]
    keep_tokenizer = packaged_tokenizer.is_dir() and tokenizer_dir.resolve() == packaged_tokenizer.resolve()
    if keep_tokenizer and "emoji-tokenizer" in per_name("--storage", [v for v in args.storage if "=" in v]):
        raise SystemExit(f"{tokenizer_dir} is the packaged tokenizer, kept as it is: drop its --storage")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    trained_over = tokenizer.fingerprint()
    if not keep_tokenizer:
        tokenizer_state, tokenizer = as_stored(tokenizer, storage["emoji-tokenizer"])
    generators = {}
    for name, stage in (("emoji-class", "class"), ("emoji-text", "text")):
        given = getattr(args, f"{stage}_generator")
        if given and not Path(given).is_dir():
            raise SystemExit(f"--{stage}-generator {given}: no such model directory")
        source = Path(given) if given else run / f"generator_{stage}" / "generator" if run else None
        if source is not None and source.is_dir():
            generators[name] = (stage, source, Generator.from_pretrained(source))
    for stage in ("class", "text"):
        given = getattr(args, f"{stage}_metrics")
        if given and not Path(given).is_file():
            raise SystemExit(f"--{stage}-metrics {given}: no such file")
    classifier = None
    if args.classifier:
        classifier_state, classifier = as_stored(ImageClassifier.from_pretrained(args.classifier),
                                                 storage["emoji-classifier"])
        if not (Path(args.classifier) / "eval.json").is_file():
            raise SystemExit(f"{args.classifier} has no eval.json (`simvq train-classifier` writes it)")
    for name, (stage, source, generator) in generators.items():
        if generator.config.tokenizer_fingerprint not in (trained_over, tokenizer.fingerprint()):
            raise SystemExit(f"{source} was trained over tokenizer {generator.config.tokenizer_fingerprint}, not "
                             f"{tokenizer_dir} ({trained_over}): package the tokenizer it was trained with")
        model = Generator(replace(generator.config, tokenizer_path="emoji-tokenizer",
                                  tokenizer_fingerprint=tokenizer.fingerprint()))
        model.load_state_dict(generator.state_dict())
        generators[name] = (stage, source, *as_stored(model, storage[name]))
    for name in ("emoji-class", "emoji-text"):  # a packaged generator left in place must fit the packaged tokenizer
        config_path = out / READY_MADE[name] / "config.yaml"
        if name not in generators and config_path.is_file():
            recorded = load_config(GeneratorConfig, config_path).tokenizer_fingerprint
            if recorded != tokenizer.fingerprint():
                raise SystemExit(f"{out / READY_MADE[name]} records tokenizer {recorded}, not the one packaged now "
                                 f"({tokenizer.fingerprint()}): re-package it too (--{name[6:]}-generator)")

    staging = out / ".packaging"
    recover(out, staging)
    try:
        written = {}
        if not keep_tokenizer:
            staged_tokenizer = staging / READY_MADE["emoji-tokenizer"]
            save_pretrained(staged_tokenizer, "tokenizer", tokenizer.config, tokenizer_state,
                            storage["emoji-tokenizer"])
            eval_path = tokenizer_dir / "eval.json"
            evaluation = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
            write_text_atomic(staged_tokenizer / "README.md", card(
                "emoji-tokenizer", tokenizer, "A SimVQ image tokenizer: 32 px emoji <-> 8 x 8 codes of K = "
                f"{tokenizer.codebook_size:,}.",
                [f"- rFID {evaluation['rfid']:.2f}, PSNR {evaluation['psnr']:.2f} dB on the emoji val split "
                 f"(`{eval_path}`, of the weights before storage)"] if "rfid" in evaluation else [],
                [f"- weights stored in {storage['emoji-tokenizer']}", *notes.get("emoji-tokenizer", [])],
                retrain["emoji-tokenizer"]))
            written["emoji-tokenizer"] = staged_tokenizer

        for name, (stage, source, state, model) in generators.items():
            config = model.config
            directory = save_pretrained(staging / READY_MADE[name], "generator", config, state, storage[name])
            # the given settings over the source's own sampling.yaml (re-packaging in place keeps them)
            recommended = source / RECOMMENDED_SAMPLING
            sampling = load_config(SamplingConfig, recommended if recommended.is_file() else None,
                                   getattr(args, f"{stage}_sampling"))
            write_text_atomic(directory / RECOMMENDED_SAMPLING, to_yaml(sampling))
            given_metrics = getattr(args, f"{stage}_metrics")
            metrics_path = Path(given_metrics) if given_metrics else run / f"samples_{stage}" / "metrics.json" if run \
                else None
            metrics = json.loads(metrics_path.read_text()) if metrics_path and metrics_path.is_file() else {}
            numbers = [f"- FID {metrics['fid']:.2f} against the emoji val split ({metrics_path}; the sampler settings "
                       f"of that evaluation and the study's are in docs/RESULTS.md)"] if "fid" in metrics else []
            write_text_atomic(directory / "README.md", card(
                name, model, f"A {stage}-conditional GPT-{config.size} over the codes of `emoji-tokenizer`.", numbers,
                [f"- recommended sampler settings (`{RECOMMENDED_SAMPLING}`, where `simvq sample` and `simvq serve` "
                 f"start): {json.dumps(asdict(sampling))}", f"- weights stored in {storage[name]}",
                 *notes.get(name, [])],
                retrain[name]))
            written[name] = directory

        if classifier is not None:
            directory = save_pretrained(staging / READY_MADE["emoji-classifier"], "classifier", classifier.config,
                                        classifier_state, storage["emoji-classifier"])
            shutil.copy(Path(args.classifier) / "eval.json", directory / "eval.json")
            accuracy = json.loads((directory / "eval.json").read_text())["val"]["accuracy"]
            write_text_atomic(directory / "README.md", card(
                "emoji-classifier", classifier, "The class-agreement classifier of the 9 emoji categories "
                "(evaluation/classifier.py).", [f"- val accuracy {accuracy:.3f} (eval.json, of the fp32 weights)"],
                [f"- weights stored in {storage['emoji-classifier']}", *notes.get("emoji-classifier", [])],
                retrain["emoji-classifier"]))
            written["emoji-classifier"] = directory

        replaced = {staged.name for staged in written.values()}
        kept = [out / folder for folder in READY_MADE.values() if folder not in replaced and (out / folder).is_dir()]
        total = sum(f.stat().st_size for d in [*written.values(), *kept] for f in d.iterdir())
        if total > args.max_mib * 2**20:
            raise SystemExit(f"the models take {total / 2**20:.1f} MiB, over the {args.max_mib} MiB budget: "
                             f"try --storage fp16 (or NAME=int8), or smaller models")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name, staged in written.items():  # each folder swapped whole: the old one aside, the new one in
        directory, old = out / staged.name, staging / f"{staged.name}.old"
        if directory.is_dir():
            directory.rename(old)
        staged.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        written[name] = directory
    shutil.rmtree(staging, ignore_errors=True)
    for name, directory in written.items():
        print(f"{name}: {directory} ({sum(f.stat().st_size for f in directory.iterdir()) / 2**20:.2f} MiB, "
              f"{storage[name]})")
    print(f"total {total / 2**20:.2f} MiB (every ready-made folder in {out})")
    return written


def recover(out: Path, staging: Path) -> None:
    """Undo what a packaging killed mid-way left: a folder set aside (NAME.old) whose replacement never arrived goes
    back; the rest of the staging folder is dropped."""
    for old in staging.glob("*.old"):
        if not (out / old.name[:-4]).exists():
            old.rename(out / old.name[:-4])
    shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a `simvq run` output directory (tokenizer/, generator_*/, samples_*/)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the run's)")
    parser.add_argument("--class-generator", help="a class generator directory (default: the run's)")
    parser.add_argument("--text-generator", help="a text generator directory (default: the run's)")
    parser.add_argument("--class-metrics", help="the class generator's evaluation JSON for its card")
    parser.add_argument("--text-metrics", help="the text generator's evaluation JSON for its card")
    parser.add_argument("--classifier", help="a `simvq train-classifier` output directory")
    parser.add_argument("--class-sampling", nargs="*", action="extend", default=[],
                        help="sampler settings key=value (SamplingConfig), over the source's sampling.yaml")
    parser.add_argument("--text-sampling", nargs="*", action="extend", default=[],
                        help="sampler settings key=value (SamplingConfig), over the source's sampling.yaml")
    parser.add_argument("--storage", nargs="*", action="extend", default=[],
                        help=f"the weights' storage ({', '.join(STORAGES)}) for all, then NAME=STORAGE for one "
                        "(default fp32)")
    parser.add_argument("--retrain", nargs="*", action="extend", default=[],
                        help="NAME=COMMAND: the card's retraining command (one line each; several for NAME give "
                        "several lines)")
    parser.add_argument("--card-note", nargs="*", action="extend", default=[],
                        help="NAME=TEXT: a line added to NAME's card")
    parser.add_argument("--out", default=str(REPO / "models"), help="where the model folders go")
    parser.add_argument("--max-mib", type=float, default=16.0, help="refuse to write more than this")
    args = parser.parse_args()
    if not (args.run or args.tokenizer):
        parser.error("give --run, or --tokenizer (with the generators' directories)")
    package(args)


if __name__ == "__main__":
    main()
