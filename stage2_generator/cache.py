"""The code cache: stage 2's input, written once by pre-tokenization (pipelines/pretokenize.py).

A cache is a directory (format documented in docs/CACHE_FORMAT.md):

    manifest.json             what the cache holds: format version, tokenizer fingerprint, codebook size,
                              grid, dtype, augmentation, dataset, and every shard with its counts and sha256.
                              A pure function of the inputs (no times, no machine), so its sha256 is the
                              cache's fingerprint and a resumed or multi-process run writes the same bytes.
    provenance.json           how and when it was made (each finished run: command, processes, environment,
                              times): not hashed.
    shards/00000.safetensors  the code sequences of a fixed range of image indices (safetensors, uncompressed,
                              memory-mapped by the reader).
    shards/00000.json         the shard's record (counts, bytes, sha256), written after the shard itself:
                              a shard is complete once its record exists.

This module owns the format: the manifest's layout, writing a shard, the memory-mapped reader
(`CodeCache`), the training loader (`CacheLoader`) and the format-level checks (`check_cache`). It knows
nothing of the tokenizer that made the codes (stage 2 never imports stage 1).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from simvq_common import distributed
from simvq_common.errors import UserError
from simvq_common.io import atomic_write, write_json_atomic

FORMAT_NAME = "simvq-code-cache"
FORMAT_VERSION = 1
MANIFEST_FILE, PROVENANCE_FILE, SHARD_DIR = "manifest.json", "provenance.json", "shards"
VERIFY_GRID_FILE = "verify.png"  # the decoded grid `simvq verify-cache` writes by default
# Keys of the manifest filled in as the cache is written; everything else is the cache's identity, which a
# resumed run must match.
PROGRESS_KEYS = ("complete", "shards", "totals")
AUGMENTATION_VIEWS = {"none": 1, "flip": 2, "tencrop": 10}
# safetensors dtype names -> numpy (the format is little-endian), for the dtypes a shard uses
_ST_DTYPES = {"U8": np.dtype("u1"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
              "F32": np.dtype("<f4")}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


class CacheError(UserError, ValueError):
    """A cache that is missing, incomplete, corrupt, or not the one the caller asked for."""


def code_dtype(codebook_size: int) -> np.dtype:
    """uint16 holds codes of up to 65,536 entries; larger codebooks take int32."""
    if not 1 <= codebook_size <= 2**31:
        raise ValueError(f"codebook size {codebook_size} is out of range")
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.int32)


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.safetensors"


def num_shards(num_images: int, images_per_shard: int) -> int:
    return math.ceil(num_images / images_per_shard)


def shard_image_range(index: int, num_images: int, images_per_shard: int) -> tuple[int, int]:
    """Shard `index` holds the images [begin, end): fixed by the image count alone, not by the process count."""
    begin = index * images_per_shard
    return begin, min(begin + images_per_shard, num_images)


# ------------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------------

def manifest_header(*, tokenizer_fingerprint: str, tokenizer_path: str, downsample_factor: int, codebook_size: int,
                    grid: Sequence[int], resolution: int, augmentation: str, base_resolution: int, dataset: dict,
                    text_encoder: dict | None, images_per_shard: int, batch_size: int) -> dict:
    """The manifest of a cache not yet written: its identity, no shards (`complete` false).

    `dataset` holds source, split, max_images, num_images, class_names and caption_source.
    """
    if augmentation not in AUGMENTATION_VIEWS:
        raise ValueError(f"unknown augmentation '{augmentation}': expected one of {sorted(AUGMENTATION_VIEWS)}")
    if dataset["num_images"] < 1:
        raise ValueError("a cache needs at least one image")
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
        "sharding": {"images_per_shard": images_per_shard, "batch_size": batch_size,
                     "num_shards": num_shards(dataset["num_images"], images_per_shard)},
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


def prepare_cache_dir(cache_dir: str | Path, header: dict, overwrite: bool) -> None:
    """Make `cache_dir` ready for `header`'s cache: new, resumed (same identity) or replaced (overwrite).

    Refuses a folder that holds a different cache (naming every difference) or files that are not a cache,
    unless `overwrite`; overwriting removes only the cache's own files. Leftover temporary files of a killed
    run are removed. Call it in one process only (rank 0), before any shard is written.
    """
    cache_dir = Path(cache_dir)
    ours = [cache_dir / name for name in (MANIFEST_FILE, PROVENANCE_FILE, SHARD_DIR, VERIFY_GRID_FILE)]
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"output {cache_dir} exists and is not a directory")
    problem = None
    if (cache_dir / MANIFEST_FILE).is_file():
        try:
            differences = identity_differences(read_manifest(cache_dir), header)
        except CacheError as err:
            differences = [str(err)]
        if differences:
            problem = f"{cache_dir} holds another cache:\n  " + "\n  ".join(differences)
    elif cache_dir.is_dir() and any(cache_dir.iterdir()):
        problem = f"{cache_dir} is not empty and holds no cache manifest"
    if problem and not overwrite:
        raise CacheError(problem + "\nchoose another output folder, or pass overwrite=true to replace it")
    if problem:
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (cache_dir / SHARD_DIR).glob(".*.tmp"):  # a write interrupted before its rename
        stale.unlink()
    if not (cache_dir / MANIFEST_FILE).is_file():
        write_manifest(cache_dir, header)


# ------------------------------------------------------------------------------------------------
# Writing shards
# ------------------------------------------------------------------------------------------------

@dataclass
class ShardContent:
    """One shard's sequences, in row order (image-major, view-minor).

    Captions are stored once per distinct caption in the shard (a shard-local table, which also holds
    their text embeddings); rows point into it with `caption_ids`.
    """

    codes: np.ndarray  # (n, h, w) integer codes
    labels: np.ndarray  # (n,) class ids
    image_index: np.ndarray  # (n,) the source image of each row (its index in the dataset)
    view: np.ndarray  # (n,) the augmentation view of each row (0 when there is one view)
    caption_ids: np.ndarray  # (n,) row -> caption table entry
    captions: list[str]  # the caption table
    text_embeddings: np.ndarray | None  # (len(captions), dim) float32, or None
    image_range: tuple[int, int]
    skipped: list[int] = field(default_factory=list)  # unreadable image indices in image_range


def caption_table(captions: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-row captions -> (row ids into the table, the distinct captions in order of first appearance)."""
    table: dict[str, int] = {}
    ids = np.array([table.setdefault(c, len(table)) for c in captions], dtype=np.int32)
    return ids, list(table)


def shard_record_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / shard_name(index).replace(".safetensors", ".json")


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of `tensors`, byte for byte a function of its arguments.

    (The safetensors package writes its metadata from a hash map, in an order that changes between
    processes: a resumed cache would not be byte-identical.) Layout: u64 header size, the JSON header padded
    with spaces to a multiple of 8, the tensors' little-endian bytes in the header's order; wider dtypes
    first, so every tensor starts aligned to its item size.
    """
    names = sorted(tensors, key=lambda name: -tensors[name].dtype.itemsize)  # stable: ties keep the given order
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        header[name] = {"dtype": _ST_NAMES[tensors[name].dtype.newbyteorder("<")], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + tensors[name].nbytes]}
        offset += tensors[name].nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = [np.ascontiguousarray(tensors[name], dtype=tensors[name].dtype.newbyteorder("<")).tobytes()
            for name in names]
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def write_shard(cache_dir: str | Path, index: int, content: ShardContent, codebook_size: int) -> dict:
    """Write shard `index` (atomically, then its record) and return the record the manifest lists."""
    cache_dir = Path(cache_dir)
    n = len(content.codes)
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
    if content.text_embeddings is not None:
        tensors["text_embeddings"] = np.ascontiguousarray(content.text_embeddings, dtype=np.float32)
    data = _safetensors_bytes(tensors, {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                        "shard": str(index)})
    atomic_write(cache_dir / shard_name(index), lambda tmp: tmp.write_bytes(data))
    record = {
        "index": index, "file": shard_name(index), "image_range": list(content.image_range),
        "images": len(np.unique(content.image_index)), "skipped": sorted(content.skipped), "sequences": n,
        "captions": len(content.captions), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json_atomic(shard_record_path(cache_dir, index), record)  # last: it marks the shard complete
    return record


def read_shard_record(cache_dir: str | Path, index: int) -> dict | None:
    """The record of shard `index` if the shard is complete (record written, file of the recorded size)."""
    cache_dir = Path(cache_dir)
    record_path, shard_path = shard_record_path(cache_dir, index), cache_dir / shard_name(index)
    if not record_path.is_file() or not shard_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    return record if shard_path.stat().st_size == record["bytes"] else None


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def open_shard(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a shard as a read-only memory map (the safetensors layout: u64 header size, JSON
    header, then the raw little-endian tensors at the header's offsets)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CacheError(f"{path}: truncated (no safetensors header)")
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            raise CacheError(f"{path}: header size {header_size} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheError(f"{path}: unreadable safetensors header ({err})") from None
    arrays = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _ST_DTYPES[spec["dtype"]], tuple(spec["shape"]), spec["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + header_size + end > size:
            raise CacheError(f"{path}: tensor '{name}' does not fit its declared shape {shape} or the file")
        if begin == end:  # mmap cannot map zero bytes
            arrays[name] = np.zeros(shape, dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=shape)
    return arrays


class CodeBatch(NamedTuple):
    codes: torch.Tensor  # int64 (B, L): the code sequences, row-major over the grid
    labels: torch.Tensor  # int64 (B,)
    index: torch.Tensor  # int64 (B,): the sequences' indices in the cache
    text_embeddings: torch.Tensor | None  # float32 (B, dim), when asked for and present


class CodeCache:
    """A complete cache, memory-mapped: random access to any sequence by its global index.

    Sequence i lives in the shard whose cumulative range contains it; the order is shard order, then
    row order (image-major, view-minor). `expect_codebook_size` / `expect_tokenizer` refuse a cache made
    by another tokenizer, naming both values. Opening checks the manifest and every shard's size and
    shapes, not the checksums (that is `check_cache`, i.e. `simvq verify-cache`).
    """

    def __init__(self, path: str | Path, *, expect_codebook_size: int | None = None,
                 expect_tokenizer: str | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise CacheError(f"cache {self.path} is incomplete (pre-tokenization was interrupted): re-run the same "
                             f"`simvq pretokenize` command to finish it")
        m = self.manifest
        if expect_codebook_size is not None and expect_codebook_size != m["codebook_size"]:
            raise CacheError(f"cache {self.path} holds codes of a codebook of size {m['codebook_size']:,}; the caller "
                             f"expects codebook size {expect_codebook_size:,}")
        if expect_tokenizer is not None and expect_tokenizer != m["tokenizer"]["fingerprint"]:
            raise CacheError(f"cache {self.path} was made by tokenizer {m['tokenizer']['fingerprint']}; the caller "
                             f"expects tokenizer {expect_tokenizer}")
        self.codebook_size, self.grid = m["codebook_size"], tuple(m["grid"])
        self.sequence_length = m["sequence_length"]
        self.class_names: list[str] = m["dataset"]["class_names"]
        self.has_text = m["text_encoder"] is not None
        self.shards = [self._open(record) for record in m["shards"]]
        counts = [record["sequences"] for record in m["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.fingerprint = hashlib.sha256((self.path / MANIFEST_FILE).read_bytes()).hexdigest()[:16]

    def _open(self, record: dict) -> dict[str, np.ndarray]:
        path = self.path / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise CacheError(f"shard {path} is {found}; the manifest records {record['bytes']} bytes: run "
                             f"`simvq verify-cache {self.path}`")
        arrays = open_shard(path)
        if arrays["codes"].shape != (record["sequences"], *self.grid):
            raise CacheError(f"shard {path}: codes of shape {arrays['codes'].shape}, the manifest records "
                             f"{record['sequences']} sequences of {self.grid}")
        arrays["codes"] = arrays["codes"].reshape(record["sequences"], self.sequence_length)
        return arrays

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _gather(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` (global) of tensor `name`, gathered shard by shard in sorted order (page locality)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sequence index out of range for a cache of {len(self)} sequences")
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        bounds = np.searchsorted(ordered, self._starts)
        first = self.shards[0][name]  # a cache has at least one shard
        out = np.empty((len(indices), *first.shape[1:]), dtype=first.dtype)
        for s, shard in enumerate(self.shards):
            lo, hi = bounds[s], bounds[s + 1]
            if lo < hi:
                out[order[lo:hi]] = shard[name][ordered[lo:hi] - self._starts[s]]
        return out

    def codes(self, indices) -> np.ndarray:
        """(len(indices), sequence_length) in the stored dtype."""
        return self._gather("codes", indices)

    def labels(self, indices) -> np.ndarray:
        return self._gather("labels", indices)

    def image_index(self, indices) -> np.ndarray:
        return self._gather("image_index", indices)

    def view(self, indices) -> np.ndarray:
        return self._gather("view", indices)

    def caption(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence index {i} out of range for a cache of {len(self)} sequences")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard = self.shards[s]
        entry = int(shard["caption_ids"][i - self._starts[s]])
        begin, end = shard["caption_offsets"][entry], shard["caption_offsets"][entry + 1]
        return bytes(shard["caption_bytes"][begin:end]).decode("utf-8")

    def text_embeddings(self, indices) -> np.ndarray:
        """(len(indices), dim) float32: the sentence embedding of each sequence's caption."""
        if not self.has_text:
            raise CacheError(f"cache {self.path} holds no text embeddings (pretokenize with text_embeddings=true)")
        indices = np.asarray(indices, dtype=np.int64)
        ids = self._gather("caption_ids", indices)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        dim = self.manifest["text_encoder"]["dim"]
        out = np.empty((len(indices), dim), dtype=np.float32)
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self.shards[s]["text_embeddings"][ids[mask]]
        return out

    def batch(self, indices, text: bool = False) -> CodeBatch:
        indices = np.asarray(indices, dtype=np.int64)
        return CodeBatch(codes=torch.from_numpy(self.codes(indices).astype(np.int64)),
                         labels=torch.from_numpy(self.labels(indices).astype(np.int64)),
                         index=torch.from_numpy(indices.copy()),
                         text_embeddings=torch.from_numpy(self.text_embeddings(indices)) if text else None)

    def __repr__(self) -> str:
        return (f"CodeCache({str(self.path)!r}, {len(self):,} sequences of {self.grid[0]}x{self.grid[1]}, "
                f"K={self.codebook_size:,}, tokenizer {self.manifest['tokenizer']['fingerprint']})")


class CacheLoader:
    """Batches of a cache for training: a deterministic order per (seed, epoch), sharded over ranks, resumable.

    The epoch's order is a permutation of all sequences drawn from (seed, epoch) alone (shuffle=False: the
    identity). It is padded by repeating its head to a multiple of world_size (drop_last=True truncates
    instead), and rank r takes positions r, r + world_size, ...: the ranks' lists partition the epoch. Each
    yielded batch advances `position` (sequences of this rank consumed this epoch), so `state_dict()` taken
    after a batch resumes exactly after it: `load_state_dict` then iterating yields the tail of the epoch.
    The position counts sequences, not batches, so the batch size may change across a resume. The last
    batch of an epoch may be short.
    """

    def __init__(self, cache: CodeCache, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 text: bool = False) -> None:
        world_size = distributed.world_size() if world_size is None else world_size
        rank = distributed.rank() if rank is None else rank
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"bad loader arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"seed={seed}")
        if text and not cache.has_text:
            raise CacheError(f"cache {cache.path} holds no text embeddings (pretokenize with text_embeddings=true)")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.text = rank, world_size, drop_last, text
        n = len(cache)
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if epoch < 0 or not 0 <= position <= self.per_rank:
            raise ValueError(f"epoch {epoch} / position {position} outside [0, {self.per_rank}] (this rank's "
                             f"sequences per epoch)")
        self.epoch, self.position = int(epoch), int(position)

    def epoch_order(self) -> np.ndarray:
        """The epoch's global order before sharding, padded or truncated to per_rank * world_size."""
        n = len(self.cache)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return np.resize(order, self.per_rank * self.world_size)  # repeats the head cyclically when padding

    def rank_indices(self) -> np.ndarray:
        """This rank's sequences for the current epoch, in order, ignoring the position."""
        return self.epoch_order()[self.rank::self.world_size]

    def __iter__(self) -> Iterator[CodeBatch]:
        indices = self.rank_indices()
        while self.position < len(indices):
            chunk = indices[self.position:self.position + self.batch_size]
            self.position += len(chunk)
            yield self.cache.batch(chunk, text=self.text)

    def __len__(self) -> int:
        """Batches left in this epoch."""
        return math.ceil((self.per_rank - self.position) / self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world_size, "drop_last": self.drop_last, "sequences": len(self.cache),
                "cache": self.cache.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differences = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in
                       ("seed", "shuffle", "world_size", "drop_last", "sequences", "cache") if state.get(k) != mine[k]]
        if differences:
            raise CacheError("the loader state belongs to another cache or setup: " + "; ".join(differences))
        self.set_epoch(state["epoch"], state["position"])


# ------------------------------------------------------------------------------------------------
# Checking (the format-level half of `simvq verify-cache`)
# ------------------------------------------------------------------------------------------------

@dataclass
class CacheCheck:
    problems: list[str]  # each names its shard file
    shards: int
    sequences: int
    code_counts: np.ndarray  # (K,) occurrences of each code over the cache

    @property
    def utilisation(self) -> float:
        return float((self.code_counts > 0).mean())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_shard(cache_dir: Path, record: dict, m: dict, counts: np.ndarray) -> list[str]:
    """Problems of one shard against its record and the manifest; adds its codes to `counts`."""
    path, name = cache_dir / record["file"], record["file"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if path.stat().st_size != record["bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, the manifest records {record['bytes']}")
    sha = _sha256_file(path)
    if sha != record["sha256"]:
        problems.append(f"{name}: sha256 {sha[:16]}... differs from the manifest's {record['sha256'][:16]}...")
    try:
        arrays = open_shard(path)
    except (CacheError, KeyError, ValueError, TypeError) as err:
        return problems + [f"{name}: unreadable ({err})"]
    n, views, k = record["sequences"], m["augmentation"]["views"], m["codebook_size"]
    expected = {"codes": ((n, *m["grid"]), m["dtype"]), "labels": ((n,), "int32"), "image_index": ((n,), "int64"),
                "view": ((n,), "uint8"), "caption_ids": ((n,), "int32"),
                "caption_offsets": ((record["captions"] + 1,), "int64")}
    if m["text_encoder"] is not None:
        expected["text_embeddings"] = ((record["captions"], m["text_encoder"]["dim"]), "float32")
    misshapen = [f"{name}: tensor '{tensor}' is "
                 f"{(arrays[tensor].shape, arrays[tensor].dtype.name) if tensor in arrays else 'missing'}, "
                 f"expected {shape} {dtype}"
                 for tensor, (shape, dtype) in expected.items()
                 if tensor not in arrays or arrays[tensor].shape != shape or arrays[tensor].dtype != np.dtype(dtype)]
    if misshapen:  # the content checks below assume the declared shapes
        return problems + misshapen
    codes = np.asarray(arrays["codes"]).ravel()
    if n and (codes.min() < 0 or codes.max() >= k):
        bad = codes[(codes < 0) | (codes >= k)]
        problems.append(f"{name}: {len(bad)} code(s) outside [0, {k}), e.g. {int(bad[0])}")
    else:
        counts += np.bincount(codes, minlength=k)[:k]
    labels, num_classes = np.asarray(arrays["labels"]), len(m["dataset"]["class_names"])
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        problems.append(f"{name}: labels outside [0, {num_classes})")
    begin, end = record["image_range"]
    image_index = np.asarray(arrays["image_index"])
    readable = sorted(set(range(begin, end)) - set(record["skipped"]))
    if not np.array_equal(image_index, np.repeat(readable, views)) or n != len(readable) * views:
        problems.append(f"{name}: its rows are not the {views} view(s) of each readable image of {begin}..{end - 1}")
    if n and not np.array_equal(np.asarray(arrays["view"]), np.tile(np.arange(views), len(readable))):
        problems.append(f"{name}: view ids are not 0..{views - 1} per image")
    ids, offsets = np.asarray(arrays["caption_ids"]), np.asarray(arrays["caption_offsets"])
    if n and (ids.min() < 0 or ids.max() >= record["captions"]):
        problems.append(f"{name}: caption ids outside the shard's table of {record['captions']}")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(arrays["caption_bytes"]):
        problems.append(f"{name}: caption offsets do not index the caption bytes")
    if "text_embeddings" in expected and not np.isfinite(arrays["text_embeddings"]).all():
        problems.append(f"{name}: non-finite text embeddings")
    return problems


def check_cache(cache_dir: str | Path) -> CacheCheck:
    """Every check that needs no tokenizer: manifest consistency, each shard's size, sha256, tensors, counts,
    code range (< K), labels, rows vs image ranges, captions. Problems name the shard file."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    if not m["complete"]:
        raise CacheError(f"cache {cache_dir} is incomplete (pre-tokenization was interrupted): re-run the same "
                         f"`simvq pretokenize` command to finish it")
    problems, counts = [], np.zeros(m["codebook_size"], dtype=np.int64)
    num_images, per_shard = m["dataset"]["num_images"], m["sharding"]["images_per_shard"]
    if len(m["shards"]) != m["sharding"]["num_shards"]:
        problems.append(f"{MANIFEST_FILE}: lists {len(m['shards'])} shards, expected {m['sharding']['num_shards']}")
    for i, record in enumerate(m["shards"]):
        if record["index"] != i or record["image_range"] != list(shard_image_range(i, num_images, per_shard)):
            problems.append(f"{record['file']}: index {record['index']} / image range {record['image_range']} "
                            f"out of place (shard {i} holds images {shard_image_range(i, num_images, per_shard)})")
        problems += _check_shard(cache_dir, record, m, counts)
    sequences = sum(r["sequences"] for r in m["shards"])
    if m["totals"]["sequences"] != sequences or m["totals"]["tokens"] != sequences * m["sequence_length"]:
        problems.append(f"{MANIFEST_FILE}: totals {m['totals']} disagree with the shards ({sequences} sequences)")
    return CacheCheck(problems=problems, shards=len(m["shards"]), sequences=sequences, code_counts=counts)
