"""Writing a cache: `CacheWriter` prepares the folder, writes shards (resumably) and finishes the manifest."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simvq_common.artifacts import KIND_FILE, write_kind
from simvq_common.run_lock import LOCK_NAME
from simvq_common.io import atomic_write, write_json_atomic

from .cache_format import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, PROVENANCE_FILE, SAFETENSORS_DTYPES, SHARD_DIR,
                           VERIFY_GRID_FILE, CacheError, code_dtype, finish_manifest, identity_differences,
                           read_manifest, shard_name, shard_record_path, write_manifest)

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass
class ShardContent:
    """One shard's sequences, in row order (image-major, view-minor).

    Captions are stored once per distinct caption in the shard (a shard-local table, which also holds
    their text features); rows point into it with `caption_ids`. Pooled embeddings are stored as they are;
    token features (with `text_mask`) only at their tokens, as float16 (docs/CACHE_FORMAT.md).
    """

    codes: np.ndarray  # (n, h, w) integer codes
    labels: np.ndarray  # (n,) class ids
    image_index: np.ndarray  # (n,) the source image of each row (its index in the dataset)
    view: np.ndarray  # (n,) the augmentation view of each row (0 when there is one view)
    caption_ids: np.ndarray  # (n,) row -> caption table entry
    captions: list[str]  # the caption table
    text_embeddings: np.ndarray | None  # (len(captions), dim) pooled, or (len(captions), T, dim) tokens; or None
    image_range: tuple[int, int]
    skipped: list[int] = field(default_factory=list)  # unreadable image indices in image_range
    text_mask: np.ndarray | None = None  # (len(captions), T) bool with token features: True where a token is
    # (left-padded: a caption's tokens last, as the generator reads them)


FLOAT16_MAX = float(np.finfo(np.float16).max)


def token_feature_tensors(features: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Token features (n, T, dim) with a left-padded mask (n, T) -> the tokens only, (sum of lengths, dim)
    float16, and each caption's offsets (n + 1,) into them."""
    lengths = mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] >= mask.shape[1] - lengths[:, None]):
        raise ValueError("text token masks must be left-padded (padding first, then a caption's tokens)")
    if len(lengths) and lengths.min() < 1:
        raise ValueError("every caption needs at least one text token")
    tokens = features[mask]
    if len(tokens) and np.abs(tokens).max() > FLOAT16_MAX:
        raise ValueError(f"text token features reach {np.abs(tokens).max():.3g}, beyond float16's range "
                         f"({FLOAT16_MAX:.0f}): this encoder's features cannot be cached as float16")
    return {"text_token_features": np.ascontiguousarray(tokens, dtype=np.float16),
            "text_token_offsets": np.cumsum([0, *lengths], dtype=np.int64)}


def caption_table(captions: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-row captions -> (row ids into the table, the distinct captions in order of first appearance)."""
    table: dict[str, int] = {}
    ids = np.array([table.setdefault(c, len(table)) for c in captions], dtype=np.int32)
    return ids, list(table)


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of `tensors`, byte for byte a function of its arguments (docs/CACHE_FORMAT.md).

    Written by hand: the safetensors package orders its metadata differently from one process to the next.
    """
    names = sorted(tensors, key=lambda name: -tensors[name].dtype.itemsize)  # stable: ties keep the given order
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensors[name].dtype.newbyteorder("<")],
                        "shape": list(tensors[name].shape), "data_offsets": [offset, offset + tensors[name].nbytes]}
        offset += tensors[name].nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = [np.ascontiguousarray(tensors[name], dtype=tensors[name].dtype.newbyteorder("<")).tobytes()
            for name in names]
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def read_shard_record(cache_dir: Path, index: int) -> dict | None:
    """The record of shard `index` if the shard is complete (record written, file of the recorded size)."""
    record_path, shard_path = shard_record_path(cache_dir, index), cache_dir / shard_name(index)
    if not record_path.is_file() or not shard_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    return record if shard_path.stat().st_size == record["bytes"] else None


class CacheWriter:
    """Writes the cache `header` (cache_format.manifest_header) describes into `path`.

    Under several processes one calls `prepare` and `finish` (rank 0) and any may write any shard: a
    shard's bytes do not depend on who writes it.
    """

    def __init__(self, path: str | Path, header: dict, overwrite: bool = False) -> None:
        self.path, self.header, self.overwrite = Path(path), header, overwrite

    def prepare(self) -> list[int]:
        """Make the folder ready: new, resumed (same identity) or replaced (overwrite); returns the shards to write.

        Refuses a folder that holds a different cache (naming every difference) or files that are not a cache,
        unless `overwrite`, which removes only the cache's own files. Leftover temporary files of a killed run
        are removed.
        """
        cache_dir = self.path
        if cache_dir.exists() and not cache_dir.is_dir():
            raise CacheError(f"output {cache_dir} exists and is not a directory")
        problem = None
        if (cache_dir / MANIFEST_FILE).is_file():
            try:
                differences = identity_differences(read_manifest(cache_dir), self.header)
            except CacheError as err:
                differences = [str(err)]
            if differences:
                problem = f"{cache_dir} holds another cache:\n  " + "\n  ".join(differences)
        elif cache_dir.is_dir() and any(p.name != LOCK_NAME for p in cache_dir.iterdir()):  # the lock: pretokenize's
            problem = f"{cache_dir} is not empty and holds no cache manifest"
        if problem and not self.overwrite:
            raise CacheError(problem + "\nchoose another output folder, or pass overwrite=true to replace it")
        if problem:
            for name in (MANIFEST_FILE, PROVENANCE_FILE, SHARD_DIR, VERIFY_GRID_FILE, KIND_FILE):
                ours = cache_dir / name
                shutil.rmtree(ours) if ours.is_dir() else ours.unlink(missing_ok=True)
        (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        write_kind(cache_dir, "code-cache")
        for stale in (cache_dir / SHARD_DIR).glob(".*.tmp"):  # a write interrupted before its rename
            stale.unlink()
        if not (cache_dir / MANIFEST_FILE).is_file():
            write_manifest(cache_dir, self.header)
        return [s for s in range(self.header["sharding"]["num_shards"]) if read_shard_record(cache_dir, s) is None]

    def write_shard(self, index: int, content: ShardContent) -> dict:
        """Write shard `index` (atomically, then its record) and return the record the manifest lists."""
        n, codebook_size = len(content.codes), self.header["codebook_size"]
        if not all(len(a) == n for a in (content.labels, content.image_index, content.view, content.caption_ids)):
            raise ValueError("shard arrays disagree on the number of rows")
        if n and (int(content.codes.min()) < 0 or int(content.codes.max()) >= codebook_size):
            raise ValueError(f"shard {index}: codes outside [0, {codebook_size})")
        encoded = [c.encode("utf-8") for c in content.captions]
        tensors = {
            "codes": np.ascontiguousarray(content.codes, dtype=code_dtype(codebook_size)),
            "labels": np.asarray(content.labels, dtype=np.int32),
            "image_index": np.asarray(content.image_index, dtype=np.int64),
            "view": np.asarray(content.view, dtype=np.uint8),
            "caption_ids": np.asarray(content.caption_ids, dtype=np.int32),
            "caption_offsets": np.cumsum([0, *map(len, encoded)], dtype=np.int64),
            "caption_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        }
        if content.text_mask is not None:
            tensors.update(token_feature_tensors(content.text_embeddings, content.text_mask))
        elif content.text_embeddings is not None:
            tensors["text_embeddings"] = np.ascontiguousarray(content.text_embeddings, dtype=np.float32)
        data = _safetensors_bytes(tensors, {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                            "shard": str(index)})
        atomic_write(self.path / shard_name(index), lambda tmp: tmp.write_bytes(data))
        record = {
            "index": index, "file": shard_name(index), "image_range": list(content.image_range),
            "images": len(np.unique(content.image_index)), "skipped": sorted(content.skipped), "sequences": n,
            "captions": len(content.captions), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        }
        write_json_atomic(shard_record_path(self.path, index), record)  # last: it marks the shard complete
        return record

    def finish(self) -> dict:
        """Write the complete manifest from every shard's record on disk (all must be complete); returns it."""
        records = [read_shard_record(self.path, s) for s in range(self.header["sharding"]["num_shards"])]
        manifest = finish_manifest(self.header, [r for r in records if r is not None])
        write_manifest(self.path, manifest)
        return manifest
