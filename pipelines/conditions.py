"""What each sample of `simvq sample` is conditioned on, as a function of its global index alone.

Without class_counts, sample g gets condition g mod C (the C requested classes or prompts, round robin). With
class_counts (class-conditional generators), the counts describe the samples with indices 0..sum - 1: sample g
gets entry g of `class_order(counts)`, the classes interleaved in proportion to their counts, so every run of
consecutive indices follows the mix to within about one sample per class and equal counts give round robin.
Either way a sample's class does not depend on the batch size, the process count or the split into calls.

`largest_remainder` allocates a reference's class histogram to N samples (`simvq run`'s class_mix=reference);
`reference_classes` reads that histogram from a val cache, and `reference_captions` gives a text generator's
samples the val captions in the same mix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.config import SampleConfig
from pipelines.text import TextEncoder, check_same_encoder
from simvq_common.errors import ConfigError, UserError
from simvq_common.fingerprint import file_sha256
from stage2_generator.cache_reader import CodeCache
from stage2_generator.config import GeneratorConfig

NAMES_SHOWN = 20  # valid class names listed when a requested one is unknown


@dataclass
class Conditions:
    """What the samples are conditioned on: sample g gets slot `slots(g)` of each list (C = len(names) slots)."""

    names: list[str]  # the class names, the prompts, or [""] (unconditional)
    class_ids: list[int]  # the class id of each slot; -1 for text and unconditional
    prompts: list[str]  # the prompt of each slot; "" for class and unconditional
    model_input: object  # class ids (C,), prompt features (C, ...); None unconditional
    text_encoder: dict | None = None  # TextEncoder.info when prompts were encoded
    prompt_source: dict | None = None  # where the prompts came from: config, file (path, hash) or cache
    order: np.ndarray | None = None  # with class_counts: the slot of global indices 0..sum - 1; None = round robin

    def slots(self, indices: np.ndarray) -> np.ndarray:
        return indices % len(self.names) if self.order is None else self.order[indices]


def class_order(counts: list[int]) -> np.ndarray:
    """(sum(counts),) int64: the slot of each index, slot c appearing counts[c] times, interleaved in proportion.

    Slot c's k-th sample sits at (k + 1/2) / counts[c] of the way through (ties: the lower slot first), the
    Sainte-Lague order: equal counts give round robin, and a prefix of any length is close to the mix.
    """
    counts = np.asarray(counts, np.int64)
    slots = np.repeat(np.arange(len(counts)), counts)
    # exact enough: equal fractions divide to the same double, distinct ones (counts < 2^25) never do
    where = (np.concatenate([np.arange(n) for n in counts]) + 0.5) / counts[slots]
    return slots[np.lexsort((slots, where))]


def largest_remainder(counts: list[int], total: int) -> list[int]:
    """`total` split over the classes in proportion to `counts` (Hamilton's method): each class gets the floor of
    its quota total * counts[c] / sum(counts), and the leftover samples go to the largest remainders (ties: the
    lower class id). At total = sum(counts) it returns counts itself."""
    counts = [int(c) for c in counts]
    whole = sum(counts)
    if whole < 1 or total < 0 or min(counts) < 0:
        raise ValueError(f"largest_remainder needs counts >= 0 with a positive sum and total >= 0; got {counts}, "
                         f"{total}")
    floors = [total * c // whole for c in counts]
    remainders = [total * c % whole for c in counts]  # integers: no rounding decides a tie
    by_remainder = sorted(range(len(counts)), key=lambda c: (-remainders[c], c))
    for c in by_remainder[:total - sum(floors)]:
        floors[c] += 1
    return floors


def check_class_counts(counts: list[int], num_classes: int, given_classes: bool) -> None:
    what = "the classes given" if given_classes else "the generator's classes"
    order = "in the order of `classes`" if given_classes else "in class-id order"
    if len(counts) != num_classes:
        raise UserError(f"class_counts has {len(counts)} entries but there are {num_classes} classes ({what}): give "
                        f"one count per class, {order}")
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
        raise UserError(f"class_counts={list(counts)}: every count must be a whole number >= 0")
    if sum(counts) < 1:
        raise UserError(f"class_counts={list(counts)} sums to 0: give at least one class a count >= 1")


def resolve_classes(requested: list[str], model_cfg: GeneratorConfig) -> list[int]:
    """Class ids for `requested` (names, or ids written as numbers); all classes when empty."""
    if not requested:
        return list(range(model_cfg.num_classes))
    by_name = {name: i for i, name in enumerate(model_cfg.class_names)}
    ids, unknown = [], []
    for item in requested:
        if item in by_name:  # a name wins over an id, in case names are numbers
            ids.append(by_name[item])
        elif item.isdigit() and int(item) < model_cfg.num_classes:
            ids.append(int(item))
        else:
            unknown.append(item)
    if unknown:
        names = model_cfg.class_names
        valid = (f"names {names[:NAMES_SHOWN]}{f' ... ({len(names)} in all)' if len(names) > NAMES_SHOWN else ''} "
                 f"or ids 0..{model_cfg.num_classes - 1}" if names else f"ids 0..{model_cfg.num_classes - 1}")
        raise UserError(f"unknown class(es) {unknown}: the generator's classes are {valid}")
    return ids


def given_prompts(cfg: SampleConfig) -> list[str]:
    """Which of the ways to give prompts (prompts, prompts_file, prompts_from) cfg sets."""
    return [key for key in ("prompts", "prompts_file", "prompts_from") if getattr(cfg, key)]


def prompt_list(cfg: SampleConfig) -> tuple[list[str], dict]:
    """The prompts of one of prompts / prompts_file / prompts_from, and where they came from (sampling.json)."""
    given = given_prompts(cfg)
    if len(given) != 1:
        raise UserError("the generator is text-conditional: give exactly one of prompts=['a photo of ...'], "
                        "prompts_file=FILE (one per line) or prompts_from=CACHE (a cache's captions)"
                        + (f"; got {' and '.join(given)}" if given else ""))
    if cfg.prompts:
        return list(cfg.prompts), {"kind": "config"}
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts_file={path} does not exist: give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompts_file={path} holds no prompts: write one per line")
        return prompts, {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path, memo=False)[:16]}
    cache = CodeCache(cfg.prompts_from)
    prompts = cache_captions(cache)
    return prompts, {"kind": "cache", "path": str(Path(cfg.prompts_from).resolve()), "fingerprint": cache.fingerprint,
                     "images": len(prompts)}


def cache_captions(cache: CodeCache) -> list[str]:
    """One caption per image of `cache` (its first view's), in image order: the prompts whose samples are
    compared with those images (a text-to-image FID on held-out captions)."""
    _, first = np.unique(cache.image_index(np.arange(len(cache))), return_index=True)
    return [cache.caption(int(i)) for i in first]


def generator_text_encoder(model_cfg: GeneratorConfig, device: torch.device) -> TextEncoder:
    """The text encoder the generator was trained with, loaded by its name and checked to be the same one
    (features, width, tokens, weights)."""
    if not model_cfg.text_encoder:
        raise UserError("the generator records no text encoder: retrain it on a cache pre-tokenized with "
                        "text_embeddings=true")
    features = model_cfg.text_features or "pooled"  # generators from before token features were pooled
    encoder = TextEncoder(model_cfg.text_encoder, device, features, max(model_cfg.text_max_tokens, 1))
    recorded = {"name": model_cfg.text_encoder, "features": features, "dim": model_cfg.text_dim,
                "max_tokens": model_cfg.text_max_tokens,
                # generators from before the weights' hash was recorded cannot check it
                "weights_sha256": model_cfg.text_encoder_sha256 or encoder.info["weights_sha256"]}
    check_same_encoder(recorded, encoder.info, "the generator",
                       f"load the encoder it was trained with ({model_cfg.text_encoder}) or retrain it on a cache "
                       f"pre-tokenized with this one")
    return encoder


def sample_count(cfg: SampleConfig, conditions: Conditions, per_condition: int) -> int:
    """How many samples this call draws: num_samples, else the rest of class_counts' indices, else per_condition
    per condition."""
    if conditions.order is None:
        return cfg.num_samples or per_condition * len(conditions.names)
    planned = len(conditions.order)
    if cfg.first_index >= planned:
        raise UserError(f"class_counts={cfg.class_counts} plan the samples with indices 0..{planned - 1}; "
                        f"first_index={cfg.first_index} is past them: lower first_index or raise the counts")
    num = cfg.num_samples or planned - cfg.first_index
    if cfg.first_index + num > planned:
        raise UserError(f"class_counts={cfg.class_counts} plan the samples with indices 0..{planned - 1}, but "
                        f"first_index={cfg.first_index} with num_samples={num} asks for indices up to "
                        f"{cfg.first_index + num - 1}: lower num_samples or first_index, or raise the counts")
    return num


def reference_classes(val_cache: str, train_cache: str) -> tuple[np.ndarray, list[int]]:
    """The class of each val cache sequence (one per reference image) as an id of the train cache's classes
    (those the generators learned; an image folder's splits may list different classes), and their histogram."""
    val, train_names = CodeCache(val_cache), CodeCache(train_cache).class_names
    missing = sorted(set(val.class_names) - set(train_names))
    labels = val.labels(np.arange(len(val))).astype(np.int64)
    if missing and np.isin(labels, [val.class_names.index(name) for name in missing]).any():
        raise ConfigError(f"the val split has images of classes the train split lacks ({missing[:5]}): no "
                          f"generator learned them; give both splits the same class folders")
    to_train = np.array([train_names.index(name) if name in train_names else -1 for name in val.class_names])
    labels = to_train[labels]
    return labels, np.bincount(labels, minlength=len(train_names)).tolist()


def reference_captions(val: CodeCache, labels: np.ndarray, class_counts: list[int]) -> list[str]:
    """Sample g's prompt: the caption of a val image of class class_order(class_counts)[g]; class c's samples
    are spread evenly over its val images in val order (at counts = the val counts, each image once)."""
    members = [np.flatnonzero(labels == c) for c in range(len(class_counts))]
    taken = [0] * len(class_counts)
    captions = []
    for c in class_order(class_counts).tolist():
        captions.append(val.caption(int(members[c][taken[c] * len(members[c]) // class_counts[c]])))
        taken[c] += 1
    return captions
