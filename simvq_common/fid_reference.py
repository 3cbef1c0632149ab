"""A reference set's FID statistics on disk: the keyed cache (embedded once per network) and portable files."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ArtifactError
from .inception import PREPROCESS_VERSION
from .io import write_npz_atomic

CACHE_ENV = "SIMVQ_FID_CACHE"  # default directory of the reference-statistics cache
STATS_KEYS = ("mu", "sigma", "num", "weights_sha256", "reference_hash", "inception_source", "suite", "description")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simvq-gen" / "fid-reference"


def reference_cache_key(images_hash: str, provenance: dict) -> str:
    """The reference's content hash, the network and its weights, the preprocessing: 32 hex."""
    spec = {"images": images_hash, "extractor": provenance["feature_extractor"],
            "weights_sha256": provenance["weights_sha256"], "layer": provenance["feature_layer"],
            "preprocess": PREPROCESS_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _load_npz(path: Path, key: str, names: tuple[str, ...]) -> dict | None:
    """The arrays of a cache file, or None if it is missing, unreadable or written under another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in names}
    except (OSError, ValueError, KeyError, EOFError):
        return None


class ReferenceCache:
    """Reference mu/sigma (and features, when KID or precision/recall need them) per cache key."""

    def __init__(self, cache_dir: str | Path | None):
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def stats_path(self, key: str) -> Path:
        return self.root / f"fid-ref-{key}.stats.npz"

    def features_path(self, key: str) -> Path:
        return self.root / f"fid-ref-{key}.features.npz"

    def load_stats(self, key: str) -> dict | None:
        out = _load_npz(self.stats_path(key), key, ("mu", "sigma", "num"))
        return None if out is None else {"mu": out["mu"], "sigma": out["sigma"], "num": int(out["num"])}

    def save_stats(self, key: str, stats: dict, num: int) -> None:
        write_npz_atomic(self.stats_path(key), key=np.array(key), mu=stats["mu"], sigma=stats["sigma"],
                         num=np.array(num))

    def load_features(self, key: str) -> torch.Tensor | None:
        out = _load_npz(self.features_path(key), key, ("features",))
        return None if out is None else torch.from_numpy(out["features"])

    def save_features(self, key: str, features: torch.Tensor) -> None:
        write_npz_atomic(self.features_path(key), key=np.array(key), features=features.numpy())


def save_reference_stats(path: str | Path, stats: dict, description: str) -> Path:
    """A portable .npz of reference FID statistics: mu, sigma, count, the Inception weights' hash, what it is."""
    path = Path(path)
    write_npz_atomic(path, **{k: np.asarray(stats[k]) for k in STATS_KEYS if k != "description"},
                     description=np.asarray(description))
    return path


def load_reference_stats(path: str | Path) -> dict:
    """The statistics `save_reference_stats` wrote, to pass as `reference` to compute_metrics (FID only)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in STATS_KEYS}
    except (OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"{path} is not a reference statistics file written by `simvq evaluate "
                            f"save_reference_stats=...` ({err})") from None
    return {**{k: str(out[k]) for k in STATS_KEYS if out[k].dtype.kind == "U"}, "mu": out["mu"],
            "sigma": out["sigma"], "num": int(out["num"])}
