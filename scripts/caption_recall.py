"""Does a text generator draw the emoji a train caption names? One sample per caption, matched to the train set.

    python scripts/caption_recall.py --generator emoji-text --out runs/caption_recall

Samples one image for each of --num train captions of the bundled emoji (drawn at random by --seed) at the
generator's recommended settings (its sampling.yaml; --sampling KEY=VALUE ... sets others over them), and counts
the captions whose sample lies nearest, in pixels, to a train image of that caption. A caption names one train
image (18 names caption six skin tones each: the facing-right figures), so this is how many of its (caption,
image) pairs the generator has learned (docs/RESULTS.md, "The ready-made text generator draws its prompts").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluation.memorisation import nearest, pixels  # noqa: E402
from image_data.emoji import ImageSet, load_emoji  # noqa: E402
from pipelines.config import SampleConfig, sampling_with  # noqa: E402
from pipelines.sample import sample  # noqa: E402
from simvq_common.hub import resolve_model_dir  # noqa: E402
from stage2_generator.config import SamplingConfig, recommended_sampling  # noqa: E402


def nearest_captions(drawn: torch.Tensor, train: ImageSet) -> list[str]:
    """The caption of the train image nearest (L2 in pixels) to each drawn image (N, H, W, 3) uint8."""
    _, index = nearest(pixels(drawn.permute(0, 3, 1, 2)), pixels(train.images))
    return [train.captions[int(i)] for i in index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default="emoji-text", help="a text generator over the bundled emoji")
    parser.add_argument("--out", required=True, help="where the samples go (a `simvq sample` directory)")
    parser.add_argument("--num", type=int, default=128, help="train captions, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="which captions")
    parser.add_argument("--sampling", nargs="*", default=[], metavar="KEY=VALUE",
                        help="sampler settings over the generator's recommended ones (e.g. temperature=0.5 top_k=100)")
    args = parser.parse_args()
    captions = load_emoji("train", 1).captions
    picked = torch.randperm(len(captions), generator=torch.Generator().manual_seed(args.seed))[:args.num].tolist()
    recommended = recommended_sampling(SamplingConfig(), resolve_model_dir(args.generator))
    sample(SampleConfig(generator=args.generator, out=args.out, prompts=[captions[i] for i in picked], per_prompt=1,
                        sampling=sampling_with(recommended, " ".join(args.sampling)), sampling_preset="none"))
    with np.load(Path(args.out) / "samples.npz") as data:
        drawn, prompts = torch.from_numpy(data["arr_0"]), [str(p) for p in data["prompts"]]  # each sample's prompt
    train = load_emoji("train", drawn.shape[1])  # at the generator's resolution
    hits = sum(found == wanted for found, wanted in zip(nearest_captions(drawn, train), prompts))
    print(f"{args.generator}: {hits} of {len(prompts)} train captions ({hits / len(prompts):.1%}) drawn nearest "
          f"to their own train image")


if __name__ == "__main__":
    main()
