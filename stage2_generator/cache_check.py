"""The format-level half of `simvq verify-cache`: every check of a cache that needs no tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simvq_common.fingerprint import file_sha256

from .cache_format import MANIFEST_FILE, CacheError, read_manifest, sharding_image_range, text_encoder_info
from .cache_reader import open_shard


@dataclass
class CacheCheck:
    problems: list[str]  # each names its shard file
    shards: int
    sequences: int
    code_counts: np.ndarray  # (K,) occurrences of each code over the cache

    @property
    def utilisation(self) -> float:
        return float((self.code_counts > 0).mean())


def _check_shard(cache_dir: Path, record: dict, m: dict, counts: np.ndarray) -> list[str]:
    """Problems of one shard against its record and the manifest; adds its codes to `counts`."""
    path, name = cache_dir / record["file"], record["file"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if path.stat().st_size != record["bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, the manifest records {record['bytes']}")
    sha = file_sha256(path, memo=False)
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
    text = text_encoder_info(m)
    if text is not None and text["features"] == "tokens":
        expected["text_token_offsets"] = ((record["captions"] + 1,), "int64")
        if "text_token_offsets" in arrays:
            tokens = int(arrays["text_token_offsets"][-1])
            expected["text_token_features"] = ((tokens, text["dim"]), "float16")
    elif text is not None:
        expected["text_embeddings"] = ((record["captions"], text["dim"]), "float32")
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
    if "text_token_features" in expected:
        lengths = np.diff(np.asarray(arrays["text_token_offsets"]))
        if arrays["text_token_offsets"][0] != 0 or lengths.min(initial=1) < 1 or lengths.max(initial=0) > text[
                "max_tokens"]:
            problems.append(f"{name}: text token offsets are not 1..{text['max_tokens']} tokens per caption")
        if not np.isfinite(arrays["text_token_features"]).all():
            problems.append(f"{name}: non-finite text token features")
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
    if len(m["shards"]) != m["sharding"]["num_shards"]:
        problems.append(f"{MANIFEST_FILE}: lists {len(m['shards'])} shards, expected {m['sharding']['num_shards']}")
    for i, record in enumerate(m["shards"]):
        if record["index"] != i or record["image_range"] != list(sharding_image_range(m, i)):
            problems.append(f"{record['file']}: index {record['index']} / image range {record['image_range']} "
                            f"out of place (shard {i} holds images {sharding_image_range(m, i)})")
        problems += _check_shard(cache_dir, record, m, counts)
    sequences = sum(r["sequences"] for r in m["shards"])
    if m["totals"]["sequences"] != sequences or m["totals"]["tokens"] != sequences * m["sequence_length"]:
        problems.append(f"{MANIFEST_FILE}: totals {m['totals']} disagree with the shards ({sequences} sequences)")
    return CacheCheck(problems=problems, shards=len(m["shards"]), sequences=sequences, code_counts=counts)
