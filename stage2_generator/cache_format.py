"""The code cache's layout (docs/CACHE_FORMAT.md): file names, shard ranges, code dtypes and the manifest.

Stage 2 knows nothing of the tokenizer that made the codes (it never imports stage 1).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simvq_common.errors import UserError
from simvq_common.io import write_json_atomic

FORMAT_NAME = "simvq-code-cache"
FORMAT_VERSION = 1
MANIFEST_FILE, PROVENANCE_FILE, SHARD_DIR = "manifest.json", "provenance.json", "shards"
VERIFY_GRID_FILE = "verify.png"  # the decoded grid `simvq verify-cache` writes by default
# Keys of the manifest filled in as the cache is written; everything else is the cache's identity, which a
# resumed run must match.
PROGRESS_KEYS = ("complete", "shards", "totals")
AUGMENTATION_VIEWS = {"none": 1, "flip": 2, "tencrop": 10}
# safetensors dtype names -> numpy (the format is little-endian), for the dtypes a shard uses
SAFETENSORS_DTYPES = {"U8": np.dtype("u1"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
                      "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


class CacheError(UserError, ValueError):
    """A cache that is missing, incomplete, corrupt, or not the one the caller asked for."""


def code_dtype(codebook_size: int) -> np.dtype:
    """uint16 holds codes of up to 65,536 entries; larger codebooks take int32."""
    if not 1 <= codebook_size <= 2**31:
        raise ValueError(f"codebook size {codebook_size} is out of range")
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.int32)


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.safetensors"


def shard_record_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / shard_name(index).replace(".safetensors", ".json")


def num_shards(num_images: int, images_per_shard: int) -> int:
    return math.ceil(num_images / images_per_shard)


def shard_image_range(index: int, num_images: int, images_per_shard: int,
                      boundaries: Sequence[int] | None = None) -> tuple[int, int]:
    """Shard `index` holds the images [begin, end): fixed by the image count alone (or by the source's own
    shards, `boundaries` = their cumulative image counts: one cache shard per WebDataset tar), never by the
    process count."""
    if boundaries is not None:
        return int(boundaries[index]), int(boundaries[index + 1])
    begin = index * images_per_shard
    return begin, min(begin + images_per_shard, num_images)


def sharding_image_range(manifest: dict, index: int) -> tuple[int, int]:
    """shard_image_range of shard `index` of the cache `manifest` describes."""
    sharding = manifest["sharding"]
    return shard_image_range(index, manifest["dataset"]["num_images"], sharding["images_per_shard"],
                             sharding.get("boundaries"))


TEXT_ENCODER_IDENTITY = ("name", "features", "dim", "max_tokens", "weights_sha256")  # what makes features alike


def text_encoder_differences(a: dict, b: dict) -> str:
    """'key: A vs B; ...' over the keys where two text encoder records differ ('' when they are the same)."""
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in TEXT_ENCODER_IDENTITY if a.get(k) != b.get(k))


def text_encoder_info(manifest: dict) -> dict | None:
    """The manifest's text encoder record, with the keys caches written before token features lacked filled in
    (their embeddings are pooled)."""
    info = manifest["text_encoder"]
    return None if info is None else {"features": "pooled", "max_tokens": 0, **info}


def manifest_header(*, tokenizer_fingerprint: str, tokenizer_path: str, downsample_factor: int, codebook_size: int,
                    grid: Sequence[int], resolution: int, augmentation: str, base_resolution: int, dataset: dict,
                    text_encoder: dict | None, images_per_shard: int, batch_size: int,
                    shard_boundaries: Sequence[int] | None = None) -> dict:
    """The manifest of a cache not yet written: its identity, no shards (`complete` false).

    `dataset` holds source, split, max_images, num_images, class_names and caption_source. `shard_boundaries`
    (a WebDataset source's cumulative images per tar) makes one cache shard per tar.
    """
    if augmentation not in AUGMENTATION_VIEWS:
        raise ValueError(f"unknown augmentation '{augmentation}': expected one of {sorted(AUGMENTATION_VIEWS)}")
    if dataset["num_images"] < 1:
        raise ValueError("a cache needs at least one image")
    sharding = {"images_per_shard": images_per_shard, "batch_size": batch_size,
                "num_shards": num_shards(dataset["num_images"], images_per_shard)}
    if shard_boundaries is not None:
        bounds = [int(b) for b in shard_boundaries]
        falling = any(later < earlier for earlier, later in zip(bounds, bounds[1:]))
        if bounds[0] != 0 or bounds[-1] != dataset["num_images"] or falling:
            raise ValueError(f"shard boundaries {bounds[:5]}... must rise from 0 to the image count")
        sharding.update(num_shards=len(bounds) - 1, boundaries=bounds)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "tokenizer": {"fingerprint": tokenizer_fingerprint, "path": tokenizer_path,
                      "downsample_factor": downsample_factor},
        "codebook_size": codebook_size,
        "grid": list(grid),
        "sequence_length": int(np.prod(grid)),
        "dtype": code_dtype(codebook_size).name,
        "resolution": resolution,
        "augmentation": {"mode": augmentation, "views": AUGMENTATION_VIEWS[augmentation],
                         "base_resolution": base_resolution},
        "dataset": dataset,
        "text_encoder": text_encoder,
        "sharding": sharding,
        "shards": [],
        "totals": None,
    }


def finish_manifest(header: dict, records: list[dict]) -> dict:
    """The complete manifest: the header plus every shard's record, in shard order, and the totals."""
    expected = list(range(header["sharding"]["num_shards"]))
    if [r["index"] for r in records] != expected:
        raise CacheError(f"cannot finish the manifest: shard records {[r['index'] for r in records]} are not "
                         f"the expected {expected}")
    totals = {"images": sum(r["images"] for r in records), "skipped": sum(len(r["skipped"]) for r in records),
              "sequences": sum(r["sequences"] for r in records)}
    totals["tokens"] = totals["sequences"] * header["sequence_length"]
    return {**header, "complete": True, "shards": records, "totals": totals}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_differences(existing: dict, wanted: dict) -> list[str]:
    """Where two manifests disagree on what the cache is ('key: cache has X, this run has Y'), progress ignored."""
    a, b = _flatten(existing), _flatten(wanted)
    # the tokenizer's path is no part of the identity (a moved tokenizer is the same one): its fingerprint is
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[0] not in PROGRESS_KEYS and k != "tokenizer.path")
    return [f"{k}: the cache has {a.get(k)!r}, this run has {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a code cache: {MANIFEST_FILE} is missing (make one with "
                         f"`simvq pretokenize`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is not a {FORMAT_NAME} manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format version {manifest.get('format_version')}; this code reads version "
                         f"{FORMAT_VERSION}: re-run `simvq pretokenize` with this version")
    return manifest


def write_manifest(cache_dir: str | Path, manifest: dict) -> Path:
    return write_json_atomic(Path(cache_dir) / MANIFEST_FILE, manifest)
