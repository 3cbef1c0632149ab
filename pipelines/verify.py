"""`simvq verify-cache`: is a code cache intact, and do its codes still decode to images?

The format-level checks (checksums, counts, shapes, every code < K, labels, captions) are
stage2_generator.cache_check.check_cache; this adds the half that needs stage 1: decoding a few sequences, spread
over the whole cache, with the tokenizer the manifest records (whose fingerprint must match) into a PNG grid.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipelines.config import VerifyCacheConfig
from simvq_common.errors import UserError
from simvq_common.hub import model_source_exists
from stage1_tokenizer.tokenizer import Tokenizer
from image_data.visualize import save_image_grid
from stage2_generator.cache_check import check_cache
from stage2_generator.cache_format import VERIFY_GRID_FILE, CacheError
from stage2_generator.cache_reader import CodeCache


def verify_cache(cfg: VerifyCacheConfig) -> dict:
    """Raises CacheError listing every problem (each naming its shard); returns a summary when all is well."""
    if not cfg.cache:
        raise UserError("name the cache directory: simvq verify-cache CACHE")
    check = check_cache(cfg.cache)
    if check.problems:
        raise CacheError(f"cache {cfg.cache} failed verification ({len(check.problems)} problem(s)):\n  "
                         + "\n  ".join(check.problems))
    cache = CodeCache(cfg.cache)
    summary = {"cache": str(cfg.cache), "fingerprint": cache.fingerprint, "shards": check.shards,
               "sequences": check.sequences, "tokens": check.sequences * cache.sequence_length,
               "codebook_size": cache.codebook_size, "utilisation": check.utilisation, "grid": None}
    if cfg.decode > 0 and len(cache):
        summary["grid"] = str(_decode_grid(cache, cfg))
    return summary


@torch.no_grad()
def _decode_grid(cache: CodeCache, cfg: VerifyCacheConfig) -> Path:
    recorded = cache.manifest["tokenizer"]
    directory = cfg.tokenizer or recorded["path"]
    if not model_source_exists(directory):  # a Hub id or ready-made name resolves in from_pretrained
        raise UserError(f"the tokenizer {directory} that made the cache is not there: pass tokenizer=DIR (a copy "
                        f"with fingerprint {recorded['fingerprint']}), or decode=0 to skip decoding")
    tokenizer = Tokenizer.from_pretrained(directory)
    if tokenizer.fingerprint() != recorded["fingerprint"]:
        raise CacheError(f"tokenizer {directory} has fingerprint {tokenizer.fingerprint()}; the cache was made by "
                         f"tokenizer {recorded['fingerprint']}")
    indices = np.unique(np.linspace(0, len(cache) - 1, min(cfg.decode, len(cache))).round().astype(np.int64))
    codes = torch.from_numpy(cache.codes(indices).astype(np.int64)).view(len(indices), *cache.grid)
    images = tokenizer.decode(codes).clamp(-1, 1)
    path = Path(cfg.grid) if cfg.grid else cache.path / VERIFY_GRID_FILE
    return save_image_grid(images, path, rows=math.isqrt(len(indices) - 1) + 1)
