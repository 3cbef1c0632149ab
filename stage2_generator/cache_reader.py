"""Reading a complete cache: every shard memory-mapped, any sequence by its global index."""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from simvq_common.artifacts import expect_kind

from .cache_format import MANIFEST_FILE, SAFETENSORS_DTYPES, CacheError, read_manifest, text_encoder_info
from .conditionings import TextTokens


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
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[spec["dtype"]], tuple(spec["shape"]), spec["data_offsets"]
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
    text_embeddings: torch.Tensor | TextTokens | None  # float32 (B, dim) pooled or TextTokens, when asked for


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
        if self.path.is_dir():
            expect_kind(self.path, "code-cache")
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
        self.text_encoder = text_encoder_info(m)  # None when the cache holds no text features
        self.has_text = self.text_encoder is not None
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

    def text_embeddings(self, indices) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The text features of each sequence's caption: pooled (len(indices), dim) float32, or token features
        (len(indices), max_tokens, dim) float32 with their mask (len(indices), max_tokens), left-padded with
        zeros (a caption's tokens last)."""
        if not self.has_text:
            raise CacheError(f"cache {self.path} holds no text embeddings (pretokenize with text_embeddings=true)")
        indices = np.asarray(indices, dtype=np.int64)
        ids = self._gather("caption_ids", indices)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        dim, tokens = self.text_encoder["dim"], self.text_encoder["features"] == "tokens"
        if not tokens:
            out = np.empty((len(indices), dim), dtype=np.float32)
            for s in np.unique(shard_of):
                rows = shard_of == s
                out[rows] = self.shards[s]["text_embeddings"][ids[rows]]
            return out
        width = self.text_encoder["max_tokens"]
        features, mask = np.zeros((len(indices), width, dim), np.float32), np.zeros((len(indices), width), bool)
        for row, (s, entry) in enumerate(zip(shard_of, ids)):
            begin, end = self.shards[s]["text_token_offsets"][entry:entry + 2]
            features[row, width - (end - begin):] = self.shards[s]["text_token_features"][begin:end]
            mask[row, width - (end - begin):] = True
        return features, mask

    def text_condition(self, indices) -> torch.Tensor | TextTokens:
        """text_embeddings as the generator takes them: a tensor (pooled) or TextTokens."""
        text = self.text_embeddings(indices)
        if isinstance(text, tuple):
            return TextTokens(torch.from_numpy(text[0]), torch.from_numpy(text[1]))
        return torch.from_numpy(text)

    def batch(self, indices, text: bool = False) -> CodeBatch:
        indices = np.asarray(indices, dtype=np.int64)
        return CodeBatch(codes=torch.from_numpy(self.codes(indices).astype(np.int64)),
                         labels=torch.from_numpy(self.labels(indices).astype(np.int64)),
                         index=torch.from_numpy(indices.copy()),
                         text_embeddings=self.text_condition(indices) if text else None)

    def __repr__(self) -> str:
        return (f"CodeCache({str(self.path)!r}, {len(self):,} sequences of {self.grid[0]}x{self.grid[1]}, "
                f"K={self.codebook_size:,}, tokenizer {self.manifest['tokenizer']['fingerprint']})")

