"""Does a text generator use its captions? Each named emoji's codes scored under every caption of the list.

    python scripts/caption_nll.py --generator emoji-text --names "red heart" rocket pizza

Prints the mean next-code negative log-likelihood (nats per code, teacher-forced, no guidance) of each image's
codes (rows; the bundled emoji's train image of that name, its caption or its Unicode name, encoded by the
generator's tokenizer) under each name as the caption (columns). A generator that reads its captions scores an
image best under its own name, by a margin; equal columns mean the caption is ignored (docs/RESULTS.md, "Why the
text prompts stay unrecognisable").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from image_data.emoji import find_emoji, load_emoji  # noqa: E402
from image_data.transforms import to_model_range  # noqa: E402
from pipelines.text import TextEncoder  # noqa: E402
from simvq_common.errors import ConfigError  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402


@torch.no_grad()
def caption_nll(generator: Generator, tokenizer: Tokenizer, names: list[str], split: str = "train") -> torch.Tensor:
    """(n, n): entry (i, j) is image i's mean NLL per code under caption j."""
    images = load_emoji(split, generator.config.grid[0] * tokenizer.downsample_factor)
    try:
        pixels = torch.stack([images.images[find_emoji(name, split)] for name in names])
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    codes = tokenizer.encode(to_model_range(pixels)).flatten(1)
    captions = torch.from_numpy(TextEncoder(generator.config.text_encoder).encode(names).features).float()
    table = torch.empty(len(names), len(names))
    for j in range(len(names)):
        logits = generator.logits(codes, captions[j:j + 1].expand(len(names), -1))
        table[:, j] = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view(
            len(names), -1).mean(1)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default="emoji-text", help="a text generator (pooled captions)")
    parser.add_argument("--names", nargs="+", required=True, help="emoji names (their captions)")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    args = parser.parse_args()
    generator = Generator.from_pretrained(args.generator).eval()
    if generator.config.conditioning != "text" or generator.config.text_features != "pooled":
        raise SystemExit(f"{args.generator} is not a text generator over pooled captions")
    tokenizer = Tokenizer.from_pretrained(generator.config.tokenizer_path).eval()
    table = caption_nll(generator, tokenizer, args.names, args.split)
    width = max(len(name) for name in args.names)
    print(f"mean NLL per code (nats); rows: image, columns: caption; {args.generator}")
    print(" " * width, *(f"{i:>7d}" for i in range(len(args.names))))
    for i, name in enumerate(args.names):
        own = table[i, i].item()
        others = torch.cat([table[i, :i], table[i, i + 1:]])
        print(f"{name:>{width}}", *(f"{v:7.2f}" for v in table[i].tolist()),
              f"  own {own:.2f}, best other {others.min().item():.2f}")


if __name__ == "__main__":
    main()
