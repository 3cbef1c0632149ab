"""`simvq pretokenize`: images -> a code cache (stage 2's input, written once by stage 1's tokenizer).

The images [0, N) are cut into shards of `images_per_shard` consecutive indices, fixed by N alone. A shard's
images are encoded in batches that start at the shard's first image, so a shard's bytes depend on neither
the number of processes nor which process wrote it, nor on where an interrupted run stopped. Rank 0
prepares the folder (refusing another cache), then every rank takes its share of the shards still missing,
and rank 0 writes the manifest once all are complete. Resuming = running the same command again.

A source with its own shards (WebDataset tars) gets one cache shard per tar, so a process reads only the tars
of the shards it writes. Captions travel with the images (DataLoader workers read them); with text features
on, captions the source lacks are skipped and counted like unreadable images.

While the model encodes, DataLoader workers decode the next images and one writer thread serialises,
hashes and writes the finished shard (and encodes its captions), so the I/O hides behind the model.
"""
from __future__ import annotations

import datetime
import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.config import PretokenizeConfig
from pipelines.text import TextEncoder
from simvq_common import distributed
from simvq_common.console import console, progress
from simvq_common.run_lock import holding_run_dir
from simvq_common.errors import UserError
from simvq_common.hub import model_location, model_source_exists, resolve_model_dir
from simvq_common.io import write_json_atomic
from simvq_common.provenance import command_line, environment
from image_data.datasets import build_image_dataset
from image_data.emoji import EMOJI_NATIVE_RESOLUTION
from stage1_tokenizer.tokenizer import Tokenizer
from image_data.transforms import center_crop_offset
from stage2_generator.cache_format import (AUGMENTATION_VIEWS, PROVENANCE_FILE, code_dtype, manifest_header,
                                           sharding_image_range)
from stage2_generator.cache_writer import CacheWriter, ShardContent, caption_table

TENCROP_SCALE = 1.1  # ten-crop takes crops of `resolution` from the image resized to 1.1x (as LlamaGen)


# ------------------------------------------------------------------------------------------------
# Views: the augmentations, applied to the centre-cropped image at the base resolution
# ------------------------------------------------------------------------------------------------

def base_resolution(aug: str, resolution: int) -> int:
    """The size of the centre-cropped image the views are cut from."""
    return int(resolution * TENCROP_SCALE) if aug == "tencrop" else resolution


def make_views(image: torch.Tensor, aug: str, resolution: int) -> torch.Tensor:
    """(3, b, b) -> (views, 3, resolution, resolution), in the order docs/CACHE_FORMAT.md gives.

    none: the image. flip: the image, its mirror. tencrop: the top-left, top-right, bottom-left, bottom-right
    and centre crops, then the mirror of each (view v + 5 = mirror of view v).
    """
    if aug == "none":
        return image[None]
    if aug == "flip":
        return torch.stack([image, image.flip(-1)])
    far = image.shape[-1] - resolution
    centre_left, centre_top = center_crop_offset(image.shape[-1], image.shape[-2], resolution)
    corners = [(0, 0), (0, far), (far, 0), (far, far), (centre_top, centre_left)]  # (top, left)
    crops = torch.stack([image[:, top:top + resolution, left:left + resolution] for top, left in corners])
    return torch.cat([crops, crops.flip(-1)])


class _ImageViews(Dataset):
    """Item i -> (i, its views or None if the file is unreadable (or its caption missing), its label, caption)."""

    def __init__(self, dataset: Dataset, aug: str, resolution: int) -> None:
        self.dataset, self.aug, self.resolution = dataset, aug, resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, int, str]:
        item = self.dataset[index]
        if item is None:
            return index, None, -1, ""
        image, label = item
        return index, make_views(image, self.aug, self.resolution), label, self.dataset.caption(index) or ""


class ViewBatch(NamedTuple):
    indices: list[int]  # the readable images of the batch, in order
    images: torch.Tensor | None  # (len(indices) * views, 3, R, R), image-major; None if all were unreadable
    labels: list[int]
    captions: list[str]
    skipped: list[int]  # the unreadable images of the batch


def collate_views(items: list) -> ViewBatch:
    kept = [item for item in items if item[1] is not None]
    return ViewBatch(indices=[i for i, _, _, _ in kept],
                     images=torch.cat([views for _, views, _, _ in kept]) if kept else None,
                     labels=[label for _, _, label, _ in kept], captions=[caption for *_, caption in kept],
                     skipped=[item[0] for item in items if item[1] is None])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _check(cfg: PretokenizeConfig) -> None:
    if not cfg.tokenizer:
        raise UserError("set tokenizer=DIR (a directory written by train-tokenizer or save_pretrained)")
    if not cfg.out:
        raise UserError("set out=DIR, the cache directory to write")
    if cfg.resolution <= 0:
        raise UserError("set resolution=N, the image size to encode at (e.g. 128 for the ImageNet-128 configs)")
    if cfg.aug not in AUGMENTATION_VIEWS:
        raise UserError(f"unknown aug '{cfg.aug}': expected one of {sorted(AUGMENTATION_VIEWS)}")
    if cfg.images_per_shard < 1 or cfg.batch_size < 1 or cfg.max_images < 0 or cfg.num_workers < 0:
        raise UserError("images_per_shard and batch_size must be >= 1, max_images and num_workers >= 0")
    base = base_resolution(cfg.aug, cfg.resolution)
    if cfg.data == "emoji" and base > EMOJI_NATIVE_RESOLUTION:
        raise UserError(f"aug={cfg.aug} at {cfg.resolution} px needs the images at {base} px; the bundled emoji "
                        f"are {EMOJI_NATIVE_RESOLUTION} px (use resolution <= "
                        f"{int(EMOJI_NATIVE_RESOLUTION / TENCROP_SCALE)})")


def _load_tokenizer(source: str, device: torch.device) -> tuple[Tokenizer, str]:
    """The tokenizer of a directory or a Hub id, and where the manifest says it is (simvq_common.hub)."""
    if not model_source_exists(source):
        raise UserError(f"tokenizer directory {source} does not exist: pass a tokenizer directory, a Hub id or a "
                        f"ready-made tokenizer's name")
    directory = resolve_model_dir(source)
    return Tokenizer.from_pretrained(directory).to(device), model_location(directory)


class _ShardParts:
    """The encoded batches of one shard, until it is complete."""

    def __init__(self, image_range: tuple[int, int]) -> None:
        self.image_range, self.codes, self.indices, self.labels = image_range, [], [], []
        self.captions, self.skipped = [], []

    def add(self, batch: ViewBatch, codes: np.ndarray | None) -> None:
        self.skipped += batch.skipped
        if codes is not None:
            self.codes.append(codes)
            self.indices += batch.indices
            self.labels += batch.labels
            self.captions += batch.captions

    def content(self, views: int, grid: tuple[int, int], dtype: np.dtype, encoder: TextEncoder | None
                ) -> ShardContent:
        image_index = np.repeat(np.array(self.indices, dtype=np.int64), views)
        caption_ids, table = caption_table([c for c in self.captions for _ in range(views)])
        text = encoder.encode(table) if encoder is not None else None
        return ShardContent(
            codes=np.concatenate(self.codes) if self.codes else np.zeros((0, *grid), dtype),
            labels=np.repeat(np.array(self.labels, dtype=np.int32), views), image_index=image_index,
            view=np.tile(np.arange(views, dtype=np.uint8), len(self.indices)), caption_ids=caption_ids,
            captions=table, text_embeddings=text.features if text else None, text_mask=text.mask if text else None,
            image_range=self.image_range, skipped=self.skipped)


def pretokenize(cfg: PretokenizeConfig) -> Path:
    """Encode every image of `cfg.data` into the cache `cfg.out` (resuming what is there, which it holds alone);
    returns its path."""
    _check(cfg)
    distributed.setup()
    with holding_run_dir(cfg.out, "pretokenize"):
        return _pretokenize(cfg)


def _pretokenize(cfg: PretokenizeConfig) -> Path:
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    device = distributed.setup()
    rank, world = distributed.rank(), distributed.world_size()
    tokenizer, tokenizer_path = _load_tokenizer(cfg.tokenizer, device)
    if cfg.resolution % tokenizer.downsample_factor:
        raise UserError(f"resolution {cfg.resolution} is not a multiple of the tokenizer's downsampling "
                        f"{tokenizer.downsample_factor}")
    base = base_resolution(cfg.aug, cfg.resolution)
    dataset = build_image_dataset(cfg.data, cfg.split, base, random_crop=False, require_captions=cfg.text_embeddings,
                                  share=distributed.work_share())
    n = min(len(dataset), cfg.max_images) if cfg.max_images else len(dataset)
    boundaries = None
    if dataset.shard_boundaries is not None:  # one cache shard per tar (the last cut at max_images)
        boundaries = [b for b in dataset.shard_boundaries if b < n] + [n]
    text_encoder = None
    if cfg.text_embeddings:
        text = cfg.text
        text_encoder = TextEncoder(text.name, device, text.features, text.max_tokens, text.batch_size)
    grid = (tokenizer.grid_size(cfg.resolution),) * 2
    header = manifest_header(
        tokenizer_fingerprint=tokenizer.fingerprint(), tokenizer_path=tokenizer_path,
        downsample_factor=tokenizer.downsample_factor, codebook_size=tokenizer.codebook_size, grid=grid,
        resolution=cfg.resolution, augmentation=cfg.aug, base_resolution=base,
        dataset={"source": cfg.data if cfg.data == "emoji" else str(Path(cfg.data).resolve()), "split": cfg.split,
                 "max_images": cfg.max_images, "num_images": n, "class_names": list(dataset.class_names),
                 "caption_source": dataset.caption_source},
        text_encoder=text_encoder.info if text_encoder else None, images_per_shard=cfg.images_per_shard,
        batch_size=cfg.batch_size, shard_boundaries=boundaries)
    out, total = Path(cfg.out), header["sharding"]["num_shards"]
    writer = CacheWriter(out, header, cfg.overwrite)
    missing = distributed.rank0_decides(writer.prepare)
    mine = missing[rank::world]  # any rank may write any shard: its bytes do not depend on who writes it
    if rank == 0 and len(missing) < total:
        console.print(f"resuming {out}: {total - len(missing)} of {total} shards already complete")
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # same algorithms every run
        _encode_shards(mine, tokenizer, dataset, text_encoder, writer, cfg, device)

    def finish() -> dict:
        manifest = writer.finish()
        written_now = set(missing)
        done = [r for r in manifest["shards"] if r["index"] in written_now]
        seconds = time.perf_counter() - start
        run = {"command": command_line(), "world_size": world,
               "started": started.isoformat(timespec="seconds"),
               "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "seconds": seconds, "shards_written": len(done), "shards_already_complete": total - len(done),
               "images_per_s": sum(r["images"] + len(r["skipped"]) for r in done) / seconds,
               "config": asdict(cfg), "environment": environment()}
        # every run that finished, oldest first (a killed run leaves none: the next counts its shards as complete)
        earlier = json.loads((out / PROVENANCE_FILE).read_text())["runs"] if (out / PROVENANCE_FILE).is_file() else []
        write_json_atomic(out / PROVENANCE_FILE, {"runs": [*earlier, run]})
        return manifest["totals"]

    distributed.barrier()  # every rank's shards are on disk before rank 0 lists them
    totals = distributed.rank0_decides(finish)
    if rank == 0:
        console.print(f"cache {out}: {totals['sequences']:,} sequences ({totals['tokens']:,} tokens) from "
                      f"{totals['images']:,} images" + (f"; {totals['skipped']:,} unreadable images skipped (listed "
                                                         f"per shard in manifest.json)" if totals["skipped"] else ""))
    return out


@torch.no_grad()
def _encode_shards(shards: list[int], tokenizer: Tokenizer, dataset: Dataset, text_encoder: TextEncoder | None,
                   cache_writer: CacheWriter, cfg: PretokenizeConfig, device: torch.device) -> None:
    """Encode and write `shards` (this rank's share), one writer thread overlapping the next shard's encoding."""
    header = cache_writer.header
    views = header["augmentation"]["views"]
    grid, dtype = tuple(header["grid"]), code_dtype(header["codebook_size"])
    ranges = {s: sharding_image_range(header, s) for s in shards}
    # batches never cross a shard boundary and always start at its first image: the same batches, hence the
    # same floating-point results, whatever the process count or resume point
    batches = [list(range(b, min(b + cfg.batch_size, end))) for begin, end in ranges.values()
               for b in range(begin, end, cfg.batch_size)]
    if not batches:
        return
    loader = DataLoader(_ImageViews(dataset, cfg.aug, cfg.resolution), batch_sampler=batches,
                        num_workers=cfg.num_workers, collate_fn=collate_views, pin_memory=device.type == "cuda")
    batch_iter = iter(loader)

    def write(s: int, parts: _ShardParts) -> None:
        cache_writer.write_shard(s, parts.content(views, grid, dtype, text_encoder))

    with progress() as bar, ThreadPoolExecutor(max_workers=1) as writer:
        task = bar.add_task("pretokenize", total=sum(end - begin for begin, end in ranges.values()), status="",
                            visible=distributed.rank() == 0)
        in_flight: Future | None = None
        for s, (begin, end) in ranges.items():
            parts = _ShardParts((begin, end))
            for _ in range(math.ceil((end - begin) / cfg.batch_size)):
                batch = next(batch_iter)
                codes = None
                if batch.images is not None:
                    codes = tokenizer.encode(batch.images.to(device, non_blocking=True)).cpu().numpy().astype(dtype)
                parts.add(batch, codes)
                bar.advance(task, len(batch.indices) + len(batch.skipped))
            if in_flight is not None:
                in_flight.result()  # at most one shard waits for the disk: bounded memory, errors surface here
            in_flight = writer.submit(write, s, parts)
            bar.update(task, status=f"shard {s}")
        in_flight.result()
