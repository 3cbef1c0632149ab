"""A reference set's statistics on disk: the keyed cache (embedded once per network and layer), our portable
statistics files, and ADM's reference batches (the ImageNet generation standard)."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from simvq_common.errors import ArtifactError
from simvq_common.fingerprint import file_sha256
from .inception import PREPROCESS_VERSION
from simvq_common.io import write_npz_atomic

CACHE_ENV = "SIMVQ_FID_CACHE"  # default directory of the reference-statistics cache
STATS_KEYS = ("mu", "sigma", "num", "weights_sha256", "reference_hash", "inception_source", "suite", "description")
SPATIAL_KEYS = ("mu_s", "sigma_s")  # sFID statistics (files written before sFID lack them)
ADM_IMAGES = "arr_0"  # where ADM's evaluator reads a batch's images


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
    """A portable .npz of reference statistics: mu/sigma (pool3) and mu_s/sigma_s (sFID), as ADM names them,
    with the count, the Inception weights' hash and what the reference is."""
    path = Path(path)
    keys = [k for k in STATS_KEYS + SPATIAL_KEYS if k in stats and k != "description"]
    write_npz_atomic(path, **{k: np.asarray(stats[k]) for k in keys}, description=np.asarray(description))
    return path


def _npz_array_shape(path: Path, name: str) -> tuple[int, ...]:
    """An .npz member's shape from its .npy header, without reading the array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return shape


def _adm_images(data, path: Path) -> torch.Tensor:
    images = data[ADM_IMAGES]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ArtifactError(f"{path}: {ADM_IMAGES} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def load_reference_file(path: str | Path, metrics: set[str] = frozenset({"fid"})) -> dict:
    """A reference .npz for `fid.compute_metrics`: our statistics file (`simvq evaluate save_reference_stats=`)
    or an ADM reference batch (`arr_0` uint8 NHWC images, optionally mu/sigma and mu_s/sigma_s). arr_0 is
    read only when one of `metrics` needs it (KID, precision/recall, or statistics the file lacks): the
    ImageNet 256 batch is ~10 GB in memory."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # np.load would try a pickle: never
        raise ArtifactError(f"{path} is not an .npz archive: give a statistics file written by `simvq evaluate "
                            "save_reference_stats=...` or an ADM reference batch (VIRTUAL_imagenet256_labeled.npz)")
    with np.load(path, allow_pickle=False) as data:
        arrays = sorted(data.files)
        if "weights_sha256" in arrays:
            missing = [k for k in STATS_KEYS if k not in arrays]
            if missing:
                raise ArtifactError(f"{path}: a statistics file without {missing}: rewrite it with `simvq evaluate "
                                    "save_reference_stats=...`")
            out = {k: data[k] for k in arrays if k in STATS_KEYS + SPATIAL_KEYS}
            out = {**{k: str(v) for k, v in out.items() if v.dtype.kind == "U"},
                   **{k: v for k, v in out.items() if v.dtype.kind != "U"}, "num": int(out["num"])}
            return {**out, "layout": "simvq statistics", "path": str(path), "arrays": arrays}
        if ADM_IMAGES not in arrays and "mu" not in arrays:
            raise ArtifactError(f"{path} holds {arrays}: neither a statistics file written by `simvq evaluate "
                                f"save_reference_stats=...` nor an ADM reference batch ({ADM_IMAGES} = uint8 NHWC "
                                "images, mu/sigma, mu_s/sigma_s)")
        out = {k: data[k].astype(np.float64) for k in ("mu", "sigma") + SPATIAL_KEYS if k in arrays}
        needs_images = bool(metrics & {"kid", "prc"}) or ("fid" in metrics and "mu" not in out) or (
            "sfid" in metrics and "mu_s" not in out)
        if needs_images and ADM_IMAGES in arrays:
            out["images"] = _adm_images(data, path)
    num = _npz_array_shape(path, ADM_IMAGES)[0] if ADM_IMAGES in arrays else None
    # ADM's statistics were computed by its TensorFlow evaluator on the same 2015-12-05 Inception: no weights hash
    return {**out, "num": num, "weights_sha256": None, "reference_hash": file_sha256(path), "layout": "ADM reference batch",
            "path": str(path), "arrays": arrays}
