"""Package a `simvq run` output (and a classifier) as the repository's ready-made models (simvq_common/ready_made.py).

    python scripts/package_ready_made.py --run runs/emoji32_showcase --classifier runs/classifier_emoji32 \
        --class-sampling guidance_scale=2.0 --text-sampling guidance_scale=2.0 [--fp16] [--out models]

Each model becomes a model directory under --out: the weights (fp16 with --fp16: they load as fp32, and the
fingerprint is that of the fp32 weights a model loads, so it is the same either way), config.yaml, kind.txt,
fingerprint.txt and a README.md model card with its numbers and the command that retrains it. The generators'
configs name the tokenizer by its ready-made name (so they find it in any clone) and record the fingerprint of
the packaged tokenizer; each carries sampling.yaml, the sampler settings `simvq sample` and `simvq serve` start
from. Fails (after writing) when they take more than --max-mib together (the repository's budget).
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
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from stage2_generator.config import RECOMMENDED_SAMPLING, SamplingConfig  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402

RETRAIN = {
    "emoji-tokenizer": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its tokenizer/ stage",
    "emoji-class": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its generator-class stage",
    "emoji-text": "simvq run -c configs/pipeline/emoji32_showcase.yaml   # its generator-text stage",
    "emoji-classifier": "simvq train-classifier data=emoji resolution=32 out=runs/classifier_emoji32 epochs=20",
}


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def card(name: str, model, what: str, numbers: list[str], extra: list[str]) -> str:
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
        "```", "", "Retrain it:", "", "```", RETRAIN[name], "```", "",
        "How it was trained and measured: docs/RESULTS.md, \"Images a person recognises\".", ""])


def package(args) -> dict:
    out = Path(args.out)
    run = Path(args.run)
    convert = half if args.fp16 else (lambda state: state)
    written = {}

    tokenizer = Tokenizer.from_pretrained(run / "tokenizer" / "tokenizer")
    state = convert(tokenizer.state_dict())
    tokenizer.load_state_dict(state)  # the weights as they will load: the generators record this fingerprint
    tok_dir = save_pretrained(out / READY_MADE["emoji-tokenizer"], "tokenizer", tokenizer.config, state)
    evaluation = json.loads((run / "tokenizer" / "tokenizer" / "eval.json").read_text())
    write_text_atomic(tok_dir / "README.md", card(
        "emoji-tokenizer", tokenizer, "A SimVQ image tokenizer: 32 px emoji <-> 8 x 8 codes of K = "
        f"{tokenizer.codebook_size:,}.",
        [f"- rFID {evaluation['rfid']:.2f}, PSNR {evaluation['psnr']:.2f} dB on the emoji val split "
         f"(of the fp32 weights, `{run}/tokenizer/tokenizer/eval.json`)"], []))
    written["emoji-tokenizer"] = tok_dir

    for name, stage in (("emoji-class", "class"), ("emoji-text", "text")):
        source = run / f"generator_{stage}" / "generator"
        if not source.is_dir():
            continue
        generator = Generator.from_pretrained(source)
        config = replace(generator.config, tokenizer_path="emoji-tokenizer",
                         tokenizer_fingerprint=tokenizer.fingerprint())
        model = Generator(config)
        model.load_state_dict(convert(generator.state_dict()))
        directory = save_pretrained(out / READY_MADE[name], "generator", config, convert(model.state_dict()))
        sampling = load_config(SamplingConfig, None, getattr(args, f"{stage}_sampling"))
        write_text_atomic(directory / RECOMMENDED_SAMPLING, to_yaml(sampling))
        metrics_path = run / f"samples_{stage}" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        numbers = [f"- FID {metrics['fid']:.2f} against the emoji val split ({metrics_path}, the run's own sampler "
                   f"settings; the study's are in docs/RESULTS.md)"] if "fid" in metrics else []
        write_text_atomic(directory / "README.md", card(
            name, model, f"A {stage}-conditional GPT-{config.size} over the codes of `emoji-tokenizer`.", numbers,
            [f"- recommended sampler settings (`{RECOMMENDED_SAMPLING}`, where `simvq sample` and `simvq serve` "
             f"start): {json.dumps(asdict(sampling))}"]))
        written[name] = directory

    if args.classifier:
        classifier = ImageClassifier.from_pretrained(args.classifier)
        state = convert(classifier.state_dict())
        classifier.load_state_dict(state)  # the weights as they will load, for the card's fingerprint
        directory = save_pretrained(out / READY_MADE["emoji-classifier"], "classifier", classifier.config, state)
        shutil.copy(Path(args.classifier) / "eval.json", directory / "eval.json")
        accuracy = json.loads((directory / "eval.json").read_text())["val"]["accuracy"]
        write_text_atomic(directory / "README.md", card(
            "emoji-classifier", classifier, "The class-agreement classifier of the 9 emoji categories "
            "(evaluation/classifier.py).", [f"- val accuracy {accuracy:.3f} (eval.json, of the fp32 weights)"], []))
        written["emoji-classifier"] = directory

    total = sum(f.stat().st_size for d in written.values() for f in d.iterdir())
    if total > args.max_mib * 2**20:
        raise SystemExit(f"the models take {total / 2**20:.1f} MiB, over the {args.max_mib} MiB budget: "
                         f"try --fp16, or smaller models")
    for name, directory in written.items():
        print(f"{name}: {directory} ({sum(f.stat().st_size for f in directory.iterdir()) / 2**20:.2f} MiB)")
    print(f"total {total / 2**20:.2f} MiB")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a `simvq run` output directory (tokenizer/, generator_*/)")
    parser.add_argument("--classifier", help="a `simvq train-classifier` output directory")
    parser.add_argument("--class-sampling", nargs="*", default=[], help="sampler settings key=value (SamplingConfig)")
    parser.add_argument("--text-sampling", nargs="*", default=[], help="sampler settings key=value (SamplingConfig)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in half precision")
    parser.add_argument("--out", default=str(REPO / "models"), help="where the model folders go")
    parser.add_argument("--max-mib", type=float, default=16.0, help="refuse to write more than this")
    package(parser.parse_args())


if __name__ == "__main__":
    main()
