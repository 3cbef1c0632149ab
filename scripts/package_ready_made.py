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
`simvq serve` start from. Fails (after writing) when they take more than --max-mib together (the repository's
budget).
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

import torch  # noqa: E402

from evaluation.classifier import ImageClassifier  # noqa: E402
from simvq_common.config import load_config, to_yaml  # noqa: E402
from simvq_common.io import write_text_atomic  # noqa: E402
from simvq_common.pretrained import save_pretrained  # noqa: E402
from simvq_common.ready_made import READY_MADE  # noqa: E402
from simvq_common.weight_storage import STORAGES, decode, encode  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from stage2_generator.config import RECOMMENDED_SAMPLING, SamplingConfig  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402

RETRAIN = {
    "emoji-tokenizer": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its tokenizer/ stage",
    "emoji-class": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its generator-class stage",
    "emoji-text": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its generator-text stage",
    "emoji-classifier": "simvq train-classifier data=emoji resolution=32 out=runs/classifier_emoji32 epochs=20",
}


def storages(values: list[str]) -> dict[str, str]:
    """`fp16 emoji-class=int8` -> each ready-made name's storage (a bare value sets the default, fp32)."""
    chosen = {name: "fp32" for name in READY_MADE}
    for value in values:
        name, _, storage = value.rpartition("=")
        if (name and name not in READY_MADE) or storage not in STORAGES:
            raise SystemExit(f"--storage {value!r}: give a storage ({', '.join(STORAGES)}), or NAME=STORAGE with "
                             f"NAME one of {', '.join(READY_MADE)}")
        chosen.update({name: storage} if name else {n: storage for n in chosen})
    return chosen


def as_stored(model, storage: str):
    """`model` with the weights it will load from `storage` (its fingerprint is then the packaged one)."""
    model.load_state_dict(decode(encode(model.state_dict(), storage)))
    return model


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
    out = Path(args.out)
    run = Path(args.run) if args.run else None
    storage = storages(args.storage)
    retrain = {**RETRAIN, **dict(value.split("=", 1) for value in args.retrain)}
    notes: dict[str, list[str]] = {}
    for value in args.card_note:
        name, _, text = value.partition("=")
        notes.setdefault(name, []).append(f"- {text}")
    written = {}

    tokenizer_dir = Path(args.tokenizer or run / "tokenizer" / "tokenizer")
    packaged_dir = out / READY_MADE["emoji-tokenizer"]
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    source_fingerprint = tokenizer.fingerprint()
    if tokenizer_dir.resolve() != packaged_dir.resolve():  # (the packaged one is kept as it is, card and all)
        save_pretrained(packaged_dir, "tokenizer", tokenizer.config, tokenizer.state_dict(),
                        storage["emoji-tokenizer"])
        as_stored(tokenizer, storage["emoji-tokenizer"])  # the weights the generators will record
        eval_path = tokenizer_dir / "eval.json"
        evaluation = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
        write_text_atomic(packaged_dir / "README.md", card(
            "emoji-tokenizer", tokenizer, "A SimVQ image tokenizer: 32 px emoji <-> 8 x 8 codes of K = "
            f"{tokenizer.codebook_size:,}.",
            [f"- rFID {evaluation['rfid']:.2f}, PSNR {evaluation['psnr']:.2f} dB on the emoji val split "
             f"(`{eval_path}`)"] if "rfid" in evaluation else [],
            [f"- weights stored in {storage['emoji-tokenizer']}", *notes.get("emoji-tokenizer", [])],
            retrain["emoji-tokenizer"]))
        written["emoji-tokenizer"] = packaged_dir

    for name, stage in (("emoji-class", "class"), ("emoji-text", "text")):
        given = getattr(args, f"{stage}_generator")
        source = Path(given) if given else run / f"generator_{stage}" / "generator" if run else None
        if source is None or not source.is_dir():
            continue
        generator = Generator.from_pretrained(source)
        if generator.config.tokenizer_fingerprint not in (source_fingerprint, tokenizer.fingerprint()):
            raise SystemExit(f"{source} was trained over tokenizer {generator.config.tokenizer_fingerprint}, not "
                             f"the packaged one ({source_fingerprint}): package the tokenizer it was trained with")
        config = replace(generator.config, tokenizer_path="emoji-tokenizer",
                         tokenizer_fingerprint=tokenizer.fingerprint())
        model = Generator(config)
        model.load_state_dict(generator.state_dict())
        directory = save_pretrained(out / READY_MADE[name], "generator", config, model.state_dict(), storage[name])
        as_stored(model, storage[name])  # for the card's fingerprint
        sampling = load_config(SamplingConfig, None, getattr(args, f"{stage}_sampling"))
        write_text_atomic(directory / RECOMMENDED_SAMPLING, to_yaml(sampling))
        given_metrics = getattr(args, f"{stage}_metrics")
        metrics_path = Path(given_metrics) if given_metrics else run / f"samples_{stage}" / "metrics.json" if run \
            else Path("-")
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        numbers = [f"- FID {metrics['fid']:.2f} against the emoji val split ({metrics_path}; the sampler settings "
                   f"of that evaluation and the study's are in docs/RESULTS.md)"] if "fid" in metrics else []
        write_text_atomic(directory / "README.md", card(
            name, model, f"A {stage}-conditional GPT-{config.size} over the codes of `emoji-tokenizer`.", numbers,
            [f"- recommended sampler settings (`{RECOMMENDED_SAMPLING}`, where `simvq sample` and `simvq serve` "
             f"start): {json.dumps(asdict(sampling))}", f"- weights stored in {storage[name]}", *notes.get(name, [])],
            retrain[name]))
        written[name] = directory

    if args.classifier:
        classifier = as_stored(ImageClassifier.from_pretrained(args.classifier), storage["emoji-classifier"])
        directory = save_pretrained(out / READY_MADE["emoji-classifier"], "classifier", classifier.config,
                                    ImageClassifier.from_pretrained(args.classifier).state_dict(),
                                    storage["emoji-classifier"])
        shutil.copy(Path(args.classifier) / "eval.json", directory / "eval.json")
        accuracy = json.loads((directory / "eval.json").read_text())["val"]["accuracy"]
        write_text_atomic(directory / "README.md", card(
            "emoji-classifier", classifier, "The class-agreement classifier of the 9 emoji categories "
            "(evaluation/classifier.py).", [f"- val accuracy {accuracy:.3f} (eval.json, of the fp32 weights)"],
            notes.get("emoji-classifier", []), retrain["emoji-classifier"]))
        written["emoji-classifier"] = directory

    folders = [out / folder for folder in READY_MADE.values() if (out / folder).is_dir()]
    total = sum(f.stat().st_size for d in folders for f in d.iterdir())
    if total > args.max_mib * 2**20:
        raise SystemExit(f"the models take {total / 2**20:.1f} MiB, over the {args.max_mib} MiB budget: "
                         f"try --storage fp16 (or NAME=int8), or smaller models")
    for name, directory in written.items():
        print(f"{name}: {directory} ({sum(f.stat().st_size for f in directory.iterdir()) / 2**20:.2f} MiB, "
              f"{storage[name]})")
    print(f"total {total / 2**20:.2f} MiB (every ready-made folder in {out})")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a `simvq run` output directory (tokenizer/, generator_*/, samples_*/)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the run's)")
    parser.add_argument("--class-generator", help="a class generator directory (default: the run's)")
    parser.add_argument("--text-generator", help="a text generator directory (default: the run's)")
    parser.add_argument("--class-metrics", help="the class generator's evaluation JSON for its card")
    parser.add_argument("--text-metrics", help="the text generator's evaluation JSON for its card")
    parser.add_argument("--classifier", help="a `simvq train-classifier` output directory")
    parser.add_argument("--class-sampling", nargs="*", default=[], help="sampler settings key=value (SamplingConfig)")
    parser.add_argument("--text-sampling", nargs="*", default=[], help="sampler settings key=value (SamplingConfig)")
    parser.add_argument("--storage", nargs="*", default=[], help=f"the weights' storage ({', '.join(STORAGES)}) "
                        "for all, then NAME=STORAGE for one (default fp32)")
    parser.add_argument("--retrain", nargs="*", default=[], help="NAME=COMMAND: the card's retraining command")
    parser.add_argument("--card-note", nargs="*", default=[], help="NAME=TEXT: a line added to NAME's card")
    parser.add_argument("--out", default=str(REPO / "models"), help="where the model folders go")
    parser.add_argument("--max-mib", type=float, default=16.0, help="refuse to write more than this")
    args = parser.parse_args()
    if not (args.run or args.tokenizer):
        parser.error("give --run, or --tokenizer (with the generators' directories)")
    package(args)

if __name__ == "__main__":
    main()
