"""The no-learning baseline a generator must beat: every code drawn independently from the training codes'
frequencies (a unigram model over the codebook), decoded by the same tokenizer.

It keeps the tokenizer and the code statistics and throws away all structure between codes, so a generator
whose FID is not clearly below it has learned nothing about images.
"""
from __future__ import annotations

import numpy as np
import torch

from stage2_generator.cache_reader import CodeCache


def code_frequencies(cache: CodeCache) -> np.ndarray:
    """(K,) float64: how often each code occurs over every sequence of the cache, normalised."""
    counts = np.zeros(cache.codebook_size, dtype=np.int64)
    for start in range(0, len(cache), 8192):
        counts += np.bincount(cache.codes(np.arange(start, min(start + 8192, len(cache)))).ravel().astype(np.int64),
                              minlength=cache.codebook_size)
    return counts / counts.sum()


def unigram_codes(frequencies: np.ndarray, num: int, sequence_length: int, seed: int) -> torch.Tensor:
    """(num, sequence_length) int64 codes, each drawn independently from `frequencies`."""
    rng = np.random.default_rng([seed, 1])
    return torch.from_numpy(rng.choice(len(frequencies), size=(num, sequence_length), p=frequencies))
