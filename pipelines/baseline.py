"""The no-learning baseline a generator must beat: every code drawn independently from the training codes'
frequencies (a unigram model over the codebook), decoded by the same tokenizer.

It keeps the tokenizer and the code statistics and throws away all structure between codes, so a generator
whose FID is not clearly below it has learned nothing about images. It is class-conditional: a sample of class
c draws from the codes of the train sequences of class c, so it can be given the same class of every sample as
the class generator it is compared with (`simvq run` does).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from image_data.transforms import to_uint8
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.cache_reader import CodeCache

from .conditions import class_order
from .sample_files import write_samples

CHUNK = 8192  # sequences read from the cache at a time


def code_frequencies(cache: CodeCache) -> np.ndarray:
    """(K,) float64: how often each code occurs over every sequence of the cache, normalised."""
    counts = np.zeros(cache.codebook_size, dtype=np.int64)
    for start in range(0, len(cache), CHUNK):
        counts += np.bincount(cache.codes(np.arange(start, min(start + CHUNK, len(cache)))).ravel().astype(np.int64),
                              minlength=cache.codebook_size)
    return counts / counts.sum()


def code_counts_by_class(cache: CodeCache) -> np.ndarray:
    """(classes, K) int64: how often each code occurs in the sequences of each class of the cache."""
    k = cache.codebook_size
    counts = np.zeros((len(cache.class_names), k), dtype=np.int64)
    flat = counts.reshape(-1)  # a view: (class, code) pairs as class * K + code
    for start in range(0, len(cache), CHUNK):
        rows = np.arange(start, min(start + CHUNK, len(cache)))
        pairs = cache.labels(rows).astype(np.int64)[:, None] * k + cache.codes(rows).astype(np.int64)
        # unique pairs, not one bincount of classes x K (65,536 x 1,000 ImageNet entries) per chunk
        found, times = np.unique(pairs, return_counts=True)
        flat[found] += times
    return counts


def class_unigram_codes(counts_by_class: np.ndarray, labels: np.ndarray, sequence_length: int,
                        seed: int) -> tuple[torch.Tensor, list[int]]:
    """(len(labels), sequence_length) int64 codes, sample i's drawn independently from the code frequencies of
    class labels[i]; and the classes that had no train codes, which draw from every class's codes instead.

    One generator, default_rng([seed, 1]), draws the samples class by class in class-id order.
    """
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(labels, np.int64)
    everything = counts_by_class.sum(axis=0)
    codes = np.empty((len(labels), sequence_length), np.int64)
    without_codes = []
    for c in np.unique(labels).tolist():
        counts = counts_by_class[c]
        if not counts.any():  # a class absent from the train cache (max_images cut it off)
            without_codes.append(c)
            counts = everything
        rows = np.flatnonzero(labels == c)
        codes[rows] = rng.choice(len(counts), size=(len(rows), sequence_length), p=counts / counts.sum())
    return torch.from_numpy(codes), without_codes


@torch.no_grad()
def baseline_samples(tokenizer_dir: str, cache_dir: str, plan: dict, num: int, seed: int, folder: Path,
                     device: torch.device) -> dict:
    """Class-wise unigram codes with the classes a class generator's FID samples get under `plan`, decoded."""
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(device)
    cache = CodeCache(cache_dir)
    counts = plan["class_counts"]
    labels = class_order(counts) if counts else np.arange(num) % len(cache.class_names)
    codes, without_codes = class_unigram_codes(code_counts_by_class(cache), labels, cache.sequence_length, seed)
    images = torch.cat([to_uint8(tokenizer.decode(chunk.to(device).view(-1, *cache.grid))).cpu()
                        for chunk in codes.split(64)])
    write_samples(folder, images, labels=labels, indices=np.arange(num), codes=codes.numpy(), prompts=[""] * num,
                  meta={"kind": "class-wise unigram baseline: each sample's codes drawn independently from the code "
                                "frequencies of the train cache's sequences of its class", **plan,
                        "classes_without_train_codes": without_codes, "seed": seed, "cache": cache.fingerprint,
                        "tokenizer": {"path": tokenizer_dir, "fingerprint": tokenizer.fingerprint()}})
    return {"path": str(folder), "num": num, "grid": str(folder / "grid.png"), **plan,
            "classes_without_train_codes": without_codes}
