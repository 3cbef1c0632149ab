"""Memorisation: how close each sample lies to its nearest training image, against how close real held-out
images lie to theirs.

A generator that copies its training set puts samples much nearer to train images than held-out images are; one
that generalises puts them about as near (or farther: it is worse than real data). Both are measured in two
spaces: the FID Inception's pool3 features (what FID sees) and pixels at the samples' resolution (what a person
sees as a copy). Per space:

- `nearest_sample_median` / `nearest_heldout_median`: the median distance to the nearest train image;
  `ratio` = the first over the second (about 1 for a generator that neither copies nor fails; near 0: copies);
- `near_copies`: the share of samples nearer to a train image than all but 1% of the held-out images are
  (the held-out images' 1st percentile: by construction about 1% of real held-out images fall below it);
- `closest`: the sample / train index pairs of the nearest few, for a grid a person can look at.
"""
from __future__ import annotations

import numpy as np
import torch

from evaluation.fid import FEATURE_LAYER, content_hash, extract_features
from evaluation.fid_reference import ReferenceCache, reference_cache_key
from evaluation.inception import resolve_inception

COPY_QUANTILE = 0.01


def nearest(queries: torch.Tensor, base: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query row's nearest base row, in Euclidean distance, in float64 chunks.

    The search expands |q - b|^2 into matrix products; the distance to the row it picks is then computed directly,
    since the expansion leaves a rounding residue of ~1e-6 for an exact copy (how much depends on the CPU's kernels).
    """
    base = base.double()
    base_sq = (base * base).sum(1)
    distances, indices = [], []
    for q in queries.double().split(chunk):
        index = ((q * q).sum(1, keepdim=True) - 2 * q @ base.T + base_sq).argmin(1)
        distances.append((q - base[index]).norm(dim=1))
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3HW) in [0, 1]."""
    return images.reshape(len(images), -1).float() / 255


def compare_space(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, closest: int) -> dict:
    sample_d, sample_i = nearest(samples, train)
    heldout_d, _ = nearest(heldout, train)
    threshold = float(torch.quantile(heldout_d, COPY_QUANTILE))
    order = torch.argsort(sample_d)[:closest]
    median_s, median_h = float(sample_d.median()), float(heldout_d.median())
    return {"nearest_sample_median": median_s, "nearest_heldout_median": median_h,
            "ratio": median_s / median_h if median_h > 0 else float("nan"),
            "copy_threshold": threshold, "near_copies": float((sample_d < threshold).float().mean()),
            "closest": [[int(i), int(sample_i[i]), float(sample_d[i])] for i in order]}


def inception_features(images: torch.Tensor, source: str, batch_size: int, device, cache: bool = True) -> torch.Tensor:
    """pool3 features of uint8 images; with `cache`, read from and written to the FID reference cache by content
    (the train split's features are computed once per Inception)."""
    name, provenance = resolve_inception(source)
    store = ReferenceCache(None) if cache else None
    key = reference_cache_key(content_hash(images), {**provenance, "feature_layer": FEATURE_LAYER})
    if store is not None and (cached := store.load_features(key)) is not None:
        return cached
    features = extract_features(images, name, provenance["weights_path"], (FEATURE_LAYER,), batch_size,
                                device)[FEATURE_LAYER]
    if store is not None:
        store.save_features(key, features)
    return features


def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, *, fid_source: str = "auto",
                 batch_size: int = 64, device=None, closest: int = 8, spaces=("inception", "pixels")) -> dict:
    """Nearest-train-image distances of uint8 (N, 3, H, W) samples against those of held-out images (module doc)."""
    if samples.shape[1:] != train.shape[1:] or heldout.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape[1:])}, train {tuple(train.shape[1:])} and held-out "
                         f"{tuple(heldout.shape[1:])} images must have one shape")
    out = {"num_samples": len(samples), "num_train": len(train), "num_heldout": len(heldout),
           "copy_quantile": COPY_QUANTILE}
    if "pixels" in spaces:
        out["pixels"] = compare_space(pixels(samples), pixels(train), pixels(heldout), closest)
    if "inception" in spaces:
        feats = [inception_features(x, fid_source, batch_size, device, cache=x is not samples)
                 for x in (samples, train, heldout)]
        out["inception"] = compare_space(*feats, closest)
    return out


def closest_pairs_grid(samples: torch.Tensor, train: torch.Tensor, pairs: list) -> np.ndarray:
    """uint8 HWC image: one row of the closest samples over one row of their nearest train images."""
    top = torch.cat([samples[i] for i, _, _ in pairs], dim=2)
    bottom = torch.cat([train[j] for _, j, _ in pairs], dim=2)
    return torch.cat([top, bottom], dim=1).permute(1, 2, 0).numpy()
