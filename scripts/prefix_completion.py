"""Has a generator learned a train image? It is given the top rows of a named emoji's codes and draws the rest.

    python scripts/prefix_completion.py --generator emoji-text --name rocket --out runs/rocket_completion.png

Row r of the grid (r = 0 .. --max-rows) keeps the image's top r rows of codes and samples the others, under the
image's own name as the caption (a text generator) or its category (a class generator). A generator that has
learned the image finishes it from a few rows; one that has learned only what emoji look like in general draws
another emoji from the same start (docs/RESULTS.md, "Why the text prompts stay unrecognisable").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from image_data.emoji import find_emoji, load_emoji  # noqa: E402
from image_data.transforms import to_model_range, to_uint8  # noqa: E402
from pipelines.conditions import generator_text_encoder  # noqa: E402
from simvq_common.errors import ConfigError  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from stage2_generator.config import SamplingConfig  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402
from stage2_generator.sampling import generate  # noqa: E402


@torch.no_grad()
def complete(generator: Generator, tokenizer: Tokenizer, name: str, max_rows: int, per_row: int,
             sampling: SamplingConfig, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The named image's codes (1, L) and the completions' (max_rows + 1, per_row, L): row r keeps its top r rows."""
    rows, cols = generator.config.grid
    if not 0 <= max_rows <= rows:
        raise SystemExit(f"--max-rows must lie in [0, {rows}] (the generator's grid has {rows} rows), got {max_rows}")
    images = load_emoji(split, cols * tokenizer.downsample_factor)
    try:
        index = find_emoji(name, split)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    codes = tokenizer.encode(to_model_range(images.images[index][None])).flatten(1)
    if generator.config.conditioning == "text":
        if generator.config.text_features not in ("", "pooled"):
            raise SystemExit("a text generator over token features: give one over pooled captions")
        # the name as given is the caption: a Unicode name reaches its image, and the caption is what was typed
        encoder = generator_text_encoder(generator.config, torch.device("cpu"))
        condition = torch.from_numpy(encoder.encode([name]).features).float()
    elif generator.config.conditioning == "class":
        condition = images.labels[index][None]
    else:
        raise SystemExit(f"a {generator.config.conditioning} generator: give a text or class generator")
    condition = condition.expand(per_row, *condition.shape[1:])
    out = []
    for kept in range(max_rows + 1):
        prefix = codes[:, :kept * cols].expand(per_row, -1)
        out.append(generate(generator, condition, torch.arange(per_row), sampling, prefix_codes=prefix))
    return codes, torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default="emoji-text", help="a text or class generator over the emoji")
    parser.add_argument("--name", required=True, help="an emoji name (its caption)")
    parser.add_argument("--out", required=True, help="the grid, a PNG")
    parser.add_argument("--max-rows", type=int, default=4, help="the most rows of codes kept")
    parser.add_argument("--per-row", type=int, default=8, help="samples per number of kept rows")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = Generator.from_pretrained(args.generator).eval()
    tokenizer = Tokenizer.from_pretrained(generator.config.tokenizer_path).eval()
    sampling = SamplingConfig(guidance_scale=1.0, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    _, drawn = complete(generator, tokenizer, args.name, args.max_rows, args.per_row, sampling)
    with torch.no_grad():
        images = to_uint8(tokenizer.decode(drawn.flatten(0, 1).view(-1, *generator.config.grid)))
    rows = images.view(*drawn.shape[:2], *images.shape[1:])
    picture = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1).permute(1, 2, 0).numpy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(args.out)
    print(f"{args.out}: rows keep 0 .. {args.max_rows} rows of {args.name!r}'s codes, {args.per_row} samples each")


if __name__ == "__main__":
    main()
