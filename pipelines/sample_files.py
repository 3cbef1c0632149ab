"""What a `simvq sample` directory holds, and how it is written: samples.npz (arr_0: the images, uint8 NHWC, the key
the ADM evaluation suite reads; labels, indices, prompts, codes), grid.png (a row per condition), png/, and
sampling.json last (a directory holding it is complete). Under torchrun the ranks' parts come together through
the disk (RankParts), never through one process's memory."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from image_data.visualize import grid_image
from simvq_common import distributed
from simvq_common.artifacts import write_kind
from simvq_common.io import atomic_write, write_json_atomic, write_npy_atomic, write_npz_atomic

GRID_MAX_ROWS, GRID_MAX_COLS = 16, 8  # grid.png with several conditions: this many conditions x samples each
GRID_MAX_SQUARE = 64  # grid.png with one condition (or none): the first this many samples


class RankParts:
    """The samples of all ranks in position order, read lazily from their parts (memory-mapped on disk).

    Rank r drew the positions r, r + world, ..., so position p is row p // world of part p % world.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts, self.world = parts, len(parts)
        self.shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, position: int) -> np.ndarray:
        return self.parts[position % self.world][position // self.world]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) as one array."""
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        for r in range(self.world):
            first = start + (r - start) % self.world  # the first position >= start that rank r drew
            last = (stop - r + self.world - 1) // self.world  # one past rank r's last row before stop
            out[first - start::self.world] = self.parts[r][first // self.world:last]
        return out


def parts_through_disk(out: Path, **arrays: np.ndarray) -> dict[str, RankParts] | None:
    """Ranks > 0 write their parts under out/parts; rank 0 gets all of them back, its own from memory and the
    others memory-mapped (None on the others).

    Through the disk, not a gather: 50,000 images at 256 px are ~10 GB, which would pass through one
    process's memory as pickles (and, under nccl, through one GPU's).
    """
    parts, rank = out / "parts", distributed.rank()
    if rank != 0:  # rank 0's own part stays in its memory
        for name, array in arrays.items():
            write_npy_atomic(parts / f"{name}.rank{rank:05d}.npy", array)
    distributed.barrier()
    if rank != 0:
        return None
    world = distributed.world_size()
    return {name: RankParts([array, *(np.load(parts / f"{name}.rank{r:05d}.npy", mmap_mode="r")
                                      for r in range(1, world))]) for name, array in arrays.items()}


def grid_rows(labels: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Each sample's row in grid.png: its condition (label, prompt), numbered by label, then first appearance."""
    first_seen: dict[tuple[int, str], int] = {}
    keys = list(zip(labels.tolist(), prompts))
    for key in keys:
        first_seen.setdefault(key, len(first_seen))
    number = {key: i for i, key in enumerate(sorted(first_seen, key=lambda k: (k[0], first_seen[k])))}
    return np.array([number[key] for key in keys], np.int64)


def grid_layout(rows: np.ndarray) -> list[list[int]]:
    """Positions shown in grid.png, row by row: a row per condition when there are a few, else a square."""
    num_rows = int(rows.max()) + 1 if len(rows) else 0
    if 1 < num_rows <= GRID_MAX_ROWS:
        return [np.flatnonzero(rows == r)[:GRID_MAX_COLS].tolist() for r in range(num_rows)]
    shown = min(len(rows), GRID_MAX_SQUARE)
    cols = math.ceil(math.sqrt(shown))
    return [list(range(start, min(start + cols, shown))) for start in range(0, shown, cols)]


def write_png(path: Path, pixels: np.ndarray) -> None:
    # format given explicitly: the atomic temporary file's name does not end in .png
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def write_samples(out: str | Path, images: np.ndarray | torch.Tensor, *, labels, indices, codes, prompts: list[str],
                  meta: dict) -> Path:
    """Write samples.npz, grid.png and, last, sampling.json (= meta) into `out` (PNGs: write_pngs).

    images: uint8, numpy (N, H, W, 3), torch (N, 3, H, W) (to_uint8's layout) or RankParts; labels: class ids
    (-1 = none); indices: global sample indices; codes: (N, h*w); prompts: N strings ("" = none).
    sampling.json comes last, so a directory holding it is complete.
    """
    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    labels, indices = np.asarray(labels, np.int64), np.asarray(indices, np.int64)
    codes = codes if isinstance(codes, RankParts) else np.asarray(codes).astype(np.int32)
    prompts = list(prompts)
    if images.dtype != np.uint8 or not len(images) == len(labels) == len(indices) == len(codes) == len(prompts):
        raise ValueError(f"write_samples needs uint8 images and one label, index, code row and prompt per image; "
                         f"got {images.dtype} x {len(images)}, {len(labels)}, {len(indices)}, {len(codes)}, "
                         f"{len(prompts)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_kind(out, "samples")
    # arr_0: the name the ADM suite (guided-diffusion's evaluator.py) reads the images under
    write_npz_atomic(out / "samples.npz", arr_0=images, labels=labels, indices=indices,
                     prompts=np.array(prompts, str), codes=codes)
    if len(images):
        write_png(out / "grid.png", grid_image(images, grid_layout(grid_rows(labels, prompts))))
    write_json_atomic(out / "sampling.json", meta)
    return out


def write_pngs(out: Path, indices: np.ndarray, images: np.ndarray) -> None:
    for index, pixels in zip(indices.tolist(), images):
        write_png(out / "png" / f"{index:06d}.png", pixels)
