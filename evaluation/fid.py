"""FID, sFID, IS, KID and precision/recall of an image set against a reference, with torch-fidelity's formulas.

Inception features from `inception.resolve_inception`; the reference's statistics through `fid_reference`
(the keyed cache, our statistics files and ADM's reference batches). Conventions, small-N bias and costs:
docs/FID.md.
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

from simvq_common.errors import ArtifactError, ConfigError
from .fid_reference import ReferenceCache, reference_cache_key
from .inception import FEATURE_LAYER, LOGITS_LAYER, RESIZE, SPATIAL_LAYER, resolve_inception

SUITE = f"torch-fidelity {torch_fidelity.__version__}"
DEFAULT_BATCH_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

ImagesLike = Union[torch.Tensor, np.ndarray, str, Path]
# The statistics each Frechet metric compares, under the names our and ADM's files give them.
STATISTICS = {"fid": (FEATURE_LAYER, "mu", "sigma"), "sfid": (SPATIAL_LAYER, "mu_s", "sigma_s")}


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
        raise ValueError("images must be uint8 (N, 3, H, W) (convert with image_data.transforms.to_uint8) "
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


def frechet_distance(features: torch.Tensor, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance of the features' Gaussian to (mu, sigma), torch-fidelity's formula, in float64
    (ADM's files store float64 means; torch-fidelity's are float32 and it wants both sides alike)."""
    stats = fid_features_to_statistics(features)
    ours = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}
    theirs = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    return float(fid_statistics_to_metric(ours, theirs, verbose=False)[KEY_METRIC_FID])


class ReferenceSide:
    """The reference's statistics and features per layer: from its file where it holds them, else from the
    cache, else computed from its images (all missing layers in one pass, then cached).

    reference: images (tensor, array, folder) or a dict from `fid_reference.load_reference_file`: our
    statistics file (mu/sigma, maybe mu_s/sigma_s; no images) or an ADM batch (`images` from arr_0, maybe
    mu/sigma/mu_s/sigma_s). `origins` records where each metric's reference side came from.
    """

    def __init__(self, reference, extractor: str, provenance: dict, cache: ReferenceCache | None,
                 batch_size: int, device):
        self.file = reference if isinstance(reference, dict) else None
        self.images = reference.get("images") if self.file is not None else reference
        self.extractor, self.provenance, self.cache = extractor, provenance, cache
        self.batch_size, self.device = batch_size, device
        self.hash = self.file["reference_hash"] if self.file is not None else content_hash(reference)
        self.stats: dict[str, dict] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.origins: dict[str, str] = {}
        self.cache_status = "disabled" if cache is None else "hit"
        if self.file is not None and self.file.get("weights_sha256") not in (None, provenance["weights_sha256"]):
            raise ConfigError(f"the reference statistics were computed with Inception weights "
                              f"{self.file['weights_sha256'][:16]}, this run uses "
                              f"{provenance['weights_sha256'][:16]} ({provenance['source']}): recompute them "
                              "with the same weights")

    def key(self, layer: str) -> str:
        return reference_cache_key(self.hash, {**self.provenance, "feature_layer": layer})

    def prepare(self, stats_for: list[str], features_for: list[str]) -> None:
        """Make ready the statistics of the metrics in `stats_for` ("fid", "sfid") and the pool3 features
        `features_for` lists metrics of ("kid", "prc")."""
        missing = set()
        for metric in stats_for:
            layer, mu, sigma = STATISTICS[metric]
            if self.file is not None and mu in self.file:
                self.stats[layer] = {"mu": self.file[mu], "sigma": self.file[sigma]}
                self.origins[metric] = f"reference file ({mu}, {sigma})"
            elif self.cache is not None and (cached := self.cache.load_stats(self.key(layer))) is not None:
                self.stats[layer] = cached
                self.origins[metric] = "computed from the reference images (cached)"
            else:
                missing.add(layer)
                self.origins[metric] = "computed from the reference images"
        if features_for:  # one pool3 feature set serves KID and precision/recall: read it once
            cached = self.cache.load_features(self.key(FEATURE_LAYER)) if self.cache is not None else None
            if cached is not None:
                self.features[FEATURE_LAYER] = cached
            else:
                missing.add(FEATURE_LAYER)
            self.origins.update((metric, "computed from the reference images") for metric in features_for)
        if missing:
            self._compute(sorted(missing), keep_features=bool(features_for))

    def _compute(self, layers: list[str], keep_features: bool) -> None:
        if self.images is None:
            needs = ", ".join(m for m, o in self.origins.items() if o.startswith("computed"))
            raise ConfigError(f"{needs} need the reference images or statistics this reference file does not hold "
                              f"({self.file.get('path', 'statistics file')} has {', '.join(self.file['arrays'])}): "
                              "give the reference images (a folder, a split, or an ADM batch with arr_0)")
        if self.cache is not None:
            self.cache_status = "miss"
        computed = extract_features(self.images, self.extractor, self.provenance["weights_path"], tuple(layers),
                                    self.batch_size, self.device)
        for layer in layers:
            stats = {**fid_features_to_statistics(computed[layer]), "num": computed[layer].shape[0]}
            self.stats.setdefault(layer, stats)
            if self.cache is not None:
                self.cache.save_stats(self.key(layer), stats, stats["num"])
        if keep_features and FEATURE_LAYER in computed:
            self.features[FEATURE_LAYER] = computed[FEATURE_LAYER]
            if self.cache is not None:
                self.cache.save_features(self.key(FEATURE_LAYER), computed[FEATURE_LAYER])

    @property
    def num(self) -> int | None:
        if self.file is not None and self.file.get("num") is not None:
            return self.file["num"]
        for layer in (FEATURE_LAYER, SPATIAL_LAYER):
            if layer in self.features:
                return self.features[layer].shape[0]
            if "num" in self.stats.get(layer, {}):
                return self.stats[layer]["num"]
        return None


def choose_kid_subset_size(requested: int | None, num_generated: int, num_reference: int) -> int:
    """KID's subset size: requested, else min(1000, N / 2) so that subsets differ and their spread means
    something (torch-fidelity draws subsets without replacement: a subset of all N images is always the same)."""
    smallest = min(num_generated, num_reference)
    if requested:
        if requested > smallest:
            raise ConfigError(f"kid_subset_size={requested} exceeds the smaller image set ({smallest} images)")
        return requested
    return max(2, min(1000, smallest // 2))


def compute_metrics(generated: ImagesLike, reference, *, fid: bool = True, sfid: bool = False, isc: bool = False,
                    kid: bool = False, prc: bool = False, source: str | None = "auto",
                    batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None,
                    use_cache: bool = True, device: str | torch.device | None = None,
                    kid_subsets: int = 100, kid_subset_size: int | None = None, prc_neighborhood: int = 3,
                    isc_splits: int = 10, seed: int = 2020) -> dict:
    """FID (and optionally sFID, IS, KID, precision/recall) of `generated` against `reference`.

    generated: uint8 (N, 3, H, W) tensor or array, or a folder of same-size images. reference: the same, or
    a file loaded by `fid_reference.load_reference_file` (our statistics, or an ADM reference batch, whose
    stored statistics are used and whose arr_0 images serve KID and precision/recall). FID and sFID are
    ADM's definitions on pool3 and `mixed_6/conv` features; IS needs torch-fidelity's weights (logits).
    Returns the metrics, where each reference side came from, and everything needed to reproduce them.
    """
    if not (fid or sfid or isc or kid or prc):
        raise ValueError("no metric requested")
    name, provenance = resolve_inception(source)
    if isc and provenance["source"] != "torch-fidelity":
        raise ConfigError("the Inception Score needs logits, which only torch-fidelity's own Inception weights have "
                          f"(resolved source: {provenance['source']})")
    layers = [FEATURE_LAYER] * (fid or kid or prc) + [SPATIAL_LAYER] * sfid + [LOGITS_LAYER] * isc
    gen = extract_features(generated, name, provenance["weights_path"], tuple(layers), batch_size, device)
    num_generated = next(iter(gen.values())).shape[0]

    cache = ReferenceCache(cache_dir) if use_cache else None
    ref = ReferenceSide(reference, name, provenance, cache, batch_size, device)
    ref.prepare([m for m, wanted in (("fid", fid), ("sfid", sfid)) if wanted],
                [m for m, wanted in (("kid", kid), ("prc", prc)) if wanted])
    num_reference = ref.num

    out: dict = {}
    for metric, wanted in (("fid", fid), ("sfid", sfid)):
        if wanted:
            layer = STATISTICS[metric][0]
            out[metric] = frechet_distance(gen[layer], ref.stats[layer]["mu"], ref.stats[layer]["sigma"])
    if isc:
        value = isc_features_to_metric(gen[LOGITS_LAYER], splits=isc_splits, shuffle=True, rng_seed=seed)
        out["isc_mean"], out["isc_std"] = value[KEY_METRIC_ISC_MEAN], value[KEY_METRIC_ISC_STD]
        out["isc_splits"] = isc_splits
    if kid:
        ref_features = ref.features[FEATURE_LAYER]
        subset = choose_kid_subset_size(kid_subset_size, num_generated, ref_features.shape[0])
        value = kid_features_to_metric(gen[FEATURE_LAYER], ref_features, kid_subsets=kid_subsets,
                                       kid_subset_size=subset, rng_seed=seed, verbose=False)
        out["kid_mean"], out["kid_std"] = value[KEY_METRIC_KID_MEAN], value[KEY_METRIC_KID_STD]
        out["kid_subsets"], out["kid_subset_size"] = kid_subsets, subset
        if subset == min(num_generated, ref_features.shape[0]):
            out["kid_std"] = None
            out["kid_std_note"] = (f"kid_subset_size={subset} holds every image of the smaller set: all "
                                   "subsets are the same, so there is no spread to report")
    if prc:
        value = prc_features_to_metric(gen[FEATURE_LAYER], ref.features[FEATURE_LAYER],
                                       prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = value[KEY_METRIC_PRECISION], value[KEY_METRIC_RECALL]
        out["f_score"] = value[KEY_METRIC_F_SCORE]
        out["prc_neighborhood"] = prc_neighborhood
    out.update({
        "num_generated": num_generated,
        "num_reference": num_reference,
        "reference_statistics": ref.origins,
        "feature_extractor": name,
        "feature_layers": {"fid/kid/prc": FEATURE_LAYER, "sfid": SPATIAL_LAYER, "isc": LOGITS_LAYER},
        "inception_source": provenance["source"],
        "weights_path": provenance["weights_path"],
        "weights_sha256": provenance["weights_sha256"],
        "resize": RESIZE,
        "suite": SUITE,
        "reference_hash": ref.hash,
        "reference_cache": "statistics file" if ref.images is None else ref.cache_status,
        "reference_cache_key": ref.key(FEATURE_LAYER),
        "provenance": provenance,
    })
    smallest = min(num_generated, num_reference or num_generated)
    if smallest <= 2048:
        out["note"] = (f"N={smallest} <= 2048: singular covariance; FID is biased upward at small N and only "
                       "comparable at equal N and reference")
    return out


def reference_stats(reference: ImagesLike, source: str | None = "auto", batch_size: int = DEFAULT_BATCH_SIZE,
                    cache_dir: str | Path | None = None, device: str | torch.device | None = None) -> dict:
    """FID and sFID statistics of a reference set, as `fid_reference.save_reference_stats` writes them."""
    name, provenance = resolve_inception(source)
    ref = ReferenceSide(reference, name, provenance, ReferenceCache(cache_dir), batch_size, device)
    ref.prepare(["fid", "sfid"], [])
    pool3, spatial = ref.stats[FEATURE_LAYER], ref.stats[SPATIAL_LAYER]
    return {"mu": pool3["mu"], "sigma": pool3["sigma"], "mu_s": spatial["mu"], "sigma_s": spatial["sigma"],
            "num": ref.num, "weights_sha256": provenance["weights_sha256"], "reference_hash": ref.hash,
            "inception_source": provenance["source"], "suite": SUITE}


def compute_fid(generated: ImagesLike, reference, source: str | None = "auto",
                batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None, **kwargs) -> dict:
    """FID of `generated` against `reference` (uint8 (N, 3, H, W) or folders); see `compute_metrics` for the rest."""
    return compute_metrics(generated, reference, fid=True, source=source, batch_size=batch_size,
                           cache_dir=cache_dir, **kwargs)
