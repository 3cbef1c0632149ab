"""FID, IS, KID and precision/recall of an image set against a reference, with torch-fidelity's formulas.

Inception features from `inception.resolve_inception`; the reference's statistics through `fid_reference`.
Conventions, small-N bias and costs: docs/FID.md.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_features_to_metric)

from .errors import ArtifactError, ConfigError
from .fid_reference import ReferenceCache, reference_cache_key
from .inception import FEATURE_LAYER, LOGITS_LAYER, RESIZE, TORCH_FIDELITY_EXTRACTOR, resolve_inception

SUITE = f"torch-fidelity {torch_fidelity.__version__}"
DEFAULT_BATCH_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

ImagesLike = Union[torch.Tensor, np.ndarray, str, Path]


class _UInt8Images(Dataset):
    """Bare uint8 CHW tensors, as torch-fidelity's datasets must return."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ArtifactError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def _as_dataset(images: ImagesLike) -> Dataset:
    """uint8 tensor/array (N, 3, H, W) or a folder of images (all the same size, read as RGB) -> Dataset."""
    if isinstance(images, (str, Path)):
        from torch_fidelity.datasets import ImagesPathDataset

        return ImagesPathDataset([str(p) for p in _folder_files(Path(images))])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError("images must be uint8 (N, 3, H, W) (convert with stage1_tokenizer.transforms.to_uint8) "
                         f"or a folder; got {getattr(images, 'dtype', type(images))} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 2:
        raise ConfigError("FID statistics need at least 2 images")
    return _UInt8Images(images.cpu())


def content_hash(images: ImagesLike) -> str:
    """sha256 of an image set: dtype, shape and pixel bytes of a tensor; names, sizes and bytes of a folder's files."""
    digest = hashlib.sha256()
    if isinstance(images, (str, Path)):
        digest.update(b"folder-v1")
        for path in _folder_files(Path(images)):
            digest.update(f"|{path.name}|{path.stat().st_size}|".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    images = images.detach().cpu()
    digest.update(f"tensor-v1|{images.dtype}|{tuple(images.shape)}".encode())
    for start in range(0, images.shape[0], 256):  # chunks: no full copy of a large set
        digest.update(np.ascontiguousarray(images[start:start + 256].numpy()))
    return digest.hexdigest()


_EXTRACTORS: dict[tuple, FeatureExtractorBase] = {}


def _extractor(name: str, weights_path: str, layers: tuple[str, ...], cuda: bool) -> FeatureExtractorBase:
    key = (name, weights_path, layers, cuda)
    if key not in _EXTRACTORS:
        from torch_fidelity.utils import create_feature_extractor

        _EXTRACTORS[key] = create_feature_extractor(name, list(layers), cuda=cuda, verbose=False,
                                                    feature_extractor_weights_path=weights_path)
    return _EXTRACTORS[key]


def extract_features(images: ImagesLike, feature_extractor: str, weights_path: str | Path,
                     layers: tuple[str, ...] = (FEATURE_LAYER,), batch_size: int = DEFAULT_BATCH_SIZE,
                     device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Run a registered torch-fidelity extractor over the images: {layer: float32 (N, D)} on the CPU.

    device: None = CUDA when available (torch-fidelity only knows CPU or the current CUDA device).
    """
    from torch_fidelity.utils import get_featuresdict_from_dataset

    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    extractor = _extractor(feature_extractor, str(weights_path), tuple(layers), cuda)
    return get_featuresdict_from_dataset(_as_dataset(images), extractor, batch_size, cuda,
                                         save_cpu_ram=True, verbose=False)


def compute_metrics(generated: ImagesLike, reference: ImagesLike, *, fid: bool = True, isc: bool = False,
                    kid: bool = False, prc: bool = False, source: str | None = "auto",
                    batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None,
                    use_cache: bool = True, device: str | torch.device | None = None,
                    kid_subsets: int = 100, kid_subset_size: int | None = None, prc_neighborhood: int = 3,
                    isc_splits: int = 10, seed: int = 2020) -> dict:
    """FID (and optionally IS, KID, precision/recall) of `generated` against `reference`, torch-fidelity's formulas.

    generated/reference: uint8 (N, 3, H, W) tensors or arrays, or folders of same-size images; reference may
    also be saved statistics (`fid_reference.load_reference_stats`), for FID only. All metrics use pool3
    features; IS needs logits (source "torch-fidelity" only). KID subsets default to min(1000, N_gen, N_ref).
    The reference's statistics come from the cache in `cache_dir` unless use_cache=False.
    Returns the metrics plus everything needed to reproduce them (suite, extractor, weights hash, resize,
    sample counts, reference hash, cache hit or miss).
    """
    if not (fid or isc or kid or prc):
        raise ValueError("no metric requested")
    name, provenance = resolve_inception(source)
    if isc and name != TORCH_FIDELITY_EXTRACTOR:
        raise ConfigError("the Inception Score needs logits, which only torch-fidelity's own Inception has "
                          f"(resolved source: {provenance['source']})")
    weights = provenance["weights_path"]
    layers = (FEATURE_LAYER, LOGITS_LAYER) if isc else (FEATURE_LAYER,)

    gen = extract_features(generated, name, weights, layers, batch_size, device)
    num_generated = gen[FEATURE_LAYER].shape[0]

    need_ref_features = kid or prc
    if isinstance(reference, dict):  # saved statistics (load_reference_stats): FID only
        if need_ref_features:
            raise ConfigError("KID and precision/recall need the reference images; saved statistics hold only "
                              "the FID mean and covariance: give an image folder or split as the reference")
        if reference["weights_sha256"] != provenance["weights_sha256"]:
            raise ConfigError(f"the reference statistics were computed with Inception weights "
                              f"{reference['weights_sha256'][:16]}, this run uses {provenance['weights_sha256'][:16]} "
                              f"({provenance['source']}): recompute them with the same weights")
        ref_stats, ref_features = reference, None
        reference_hash, key, cache_status = reference["reference_hash"], "", "statistics file"
    else:
        reference_hash = content_hash(reference)
        key = reference_cache_key(reference_hash, provenance)
        cache = ReferenceCache(cache_dir) if use_cache else None
        ref_stats = cache.load_stats(key) if (cache and fid) else None
        ref_features = cache.load_features(key) if (cache and need_ref_features) else None
        cache_status = "disabled" if cache is None else "hit"
        if (fid and ref_stats is None) or (need_ref_features and ref_features is None):
            cache_status = "disabled" if cache is None else "miss"
            ref_features = extract_features(reference, name, weights, (FEATURE_LAYER,), batch_size,
                                            device)[FEATURE_LAYER]
            stats = fid_features_to_statistics(ref_features)
            ref_stats = {**stats, "num": ref_features.shape[0]}
            if cache is not None:
                cache.save_stats(key, stats, ref_features.shape[0])
                if need_ref_features:
                    cache.save_features(key, ref_features)
    num_reference = ref_stats["num"] if ref_stats is not None else ref_features.shape[0]

    out: dict = {}
    if fid:
        gen_stats = fid_features_to_statistics(gen[FEATURE_LAYER])
        ref = {"mu": ref_stats["mu"], "sigma": ref_stats["sigma"]}
        out["fid"] = float(fid_statistics_to_metric(gen_stats, ref, verbose=False)[KEY_METRIC_FID])
    if isc:
        value = isc_features_to_metric(gen[LOGITS_LAYER], splits=isc_splits, shuffle=True, rng_seed=seed)
        out["isc_mean"], out["isc_std"] = value[KEY_METRIC_ISC_MEAN], value[KEY_METRIC_ISC_STD]
        out["isc_splits"] = isc_splits
    if kid:
        subset = kid_subset_size or min(1000, num_generated, num_reference)
        value = kid_features_to_metric(gen[FEATURE_LAYER], ref_features, kid_subsets=kid_subsets,
                                       kid_subset_size=subset, rng_seed=seed, verbose=False)
        out["kid_mean"], out["kid_std"] = value[KEY_METRIC_KID_MEAN], value[KEY_METRIC_KID_STD]
        out["kid_subsets"], out["kid_subset_size"] = kid_subsets, subset
    if prc:
        value = prc_features_to_metric(gen[FEATURE_LAYER], ref_features, prc_neighborhood=prc_neighborhood,
                                       save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = value[KEY_METRIC_PRECISION], value[KEY_METRIC_RECALL]
        out["f_score"] = value[KEY_METRIC_F_SCORE]
        out["prc_neighborhood"] = prc_neighborhood
    out.update({
        "num_generated": num_generated,
        "num_reference": num_reference,
        "feature_extractor": name,
        "feature_layer": FEATURE_LAYER,
        "inception_source": provenance["source"],
        "weights_path": weights,
        "weights_sha256": provenance["weights_sha256"],
        "resize": RESIZE,
        "suite": SUITE,
        "reference_hash": reference_hash,
        "reference_cache": cache_status,
        "reference_cache_key": key,
        "provenance": provenance,
    })
    if min(num_generated, num_reference) <= 2048:
        out["note"] = (f"N={min(num_generated, num_reference)} <= 2048: singular covariance; FID is biased upward "
                       "at small N and only comparable at equal N and reference")
    return out


def reference_stats(reference: ImagesLike, source: str | None = "auto", batch_size: int = DEFAULT_BATCH_SIZE,
                    cache_dir: str | Path | None = None, device: str | torch.device | None = None) -> dict:
    """FID statistics of a reference set, as `fid_reference.save_reference_stats` writes them (through the cache)."""
    name, provenance = resolve_inception(source)
    reference_hash = content_hash(reference)
    key = reference_cache_key(reference_hash, provenance)
    cache = ReferenceCache(cache_dir)
    stats = cache.load_stats(key)
    if stats is None:
        features = extract_features(reference, name, provenance["weights_path"], (FEATURE_LAYER,), batch_size,
                                    device)[FEATURE_LAYER]
        stats = {**fid_features_to_statistics(features), "num": features.shape[0]}
        cache.save_stats(key, stats, stats["num"])
    return {**stats, "weights_sha256": provenance["weights_sha256"], "reference_hash": reference_hash,
            "inception_source": provenance["source"], "suite": SUITE}


def compute_fid(generated: ImagesLike, reference: ImagesLike, source: str | None = "auto",
                batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None, **kwargs) -> dict:
    """FID of `generated` against `reference` (uint8 (N, 3, H, W) or folders); see `compute_metrics` for the rest.

    Returns {"fid", "num_generated", "num_reference", "feature_extractor", "weights_sha256", "resize",
    "suite", "inception_source", "reference_cache", ...}.
    """
    return compute_metrics(generated, reference, fid=True, source=source, batch_size=batch_size,
                           cache_dir=cache_dir, **kwargs)
