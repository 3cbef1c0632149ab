"""Perceptual distances for stage-1 training: LPIPS(VGG) or shift-tolerant LPIPS, always with real weights.

Backends, where their weights come from and why they are frozen and fp32: docs/PERCEPTUAL.md.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from simvq_common.downloads import download_checked, hub_cache_path, name_hash_prefix
from simvq_common.errors import ConfigError, UserError
from simvq_common.fingerprint import file_sha256
from simvq_common.provenance import package_version

PERCEPTUAL_BACKENDS = ("lpips-vgg", "stlpips-vgg", "none")
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1


class PerceptualBackendUnavailable(UserError, RuntimeError):
    """The requested perceptual backend cannot be built with real (pretrained) weights here."""


class PerceptualDistance(nn.Module):
    """A frozen LPIPS-style network: forward(x, y) -> (B,) distances, inputs (B, 3, H, W) in [-1, 1]."""

    def __init__(self, net: nn.Module, provenance: dict):
        super().__init__()
        self.net = net
        self.provenance = dict(provenance)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualDistance":
        # always eval: the LPIPS linear heads sit behind nn.Dropout, which must never be active
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"perceptual distance expects two (B, 3, H, W) tensors of equal shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            d = self.net(x.float(), y.float())
        return d.reshape(x.shape[0])


def _load_checked(module: nn.Module, state: dict, what: str) -> set[str]:
    """load_state_dict(strict=False) that refuses unexpected keys and shape mismatches; returns missing keys.

    The lpips packages load their own weights with strict=False, which silently leaves mismatched layers
    random; here every key of the file must land in the model.
    """
    own = module.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or mismatched:
        raise PerceptualBackendUnavailable(
            f"{what}: weights do not fit the network (unexpected keys {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]})")
    module.load_state_dict(state, strict=False)
    return {k for k in own if k not in state}


def _check_complete(model: nn.Module, missing: set[str], what: str) -> None:
    """Every tensor of the model came from a file, except LPIPS' constant input scaling and head aliases.

    LPIPS registers its heads twice (lin0..lin4 and the ModuleList lins, same tensors): lins.* are aliases.
    scaling_layer.shift/scale are constants set in code (not in the weight files).
    """
    own = model.state_dict()
    aliases = {k for k in own if k.startswith("lins.") and re.sub(r"^lins\.(\d+)\.", r"lin\1.", k) in own}
    left = {k for k in missing - aliases if not k.startswith("scaling_layer.")}
    if left:
        raise PerceptualBackendUnavailable(f"{what}: no weights for {sorted(left)[:5]} (would stay random)")


def _unavailable_message(reason: str) -> str:
    return (f"perceptual backend 'lpips-vgg' is unavailable: {reason}. "
            f"The lpips package ships only its linear heads; its VGG16 backbone is torchvision's "
            f"ImageNet checkpoint ({Path(VGG16_URL).name}, {VGG16_URL}). Alternatives: "
            f"backend 'stlpips-vgg' (works offline: stlpips-pytorch ships its full weights, but its "
            f"numbers are not comparable to standard LPIPS), weights_path=... pointing to a local "
            f"torchvision VGG16 state dict (e.g. vgg16-397923af.pth), or backend 'none' (no perceptual loss). "
            f"A randomly initialised backbone is never used.")


def _resolve_vgg16_file(weights_path: str, allow_download: bool) -> tuple[Path, str]:
    """The local VGG16 checkpoint and where it came from: weights_path > torch hub cache > download."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise PerceptualBackendUnavailable(_unavailable_message(
                f"weights_path '{weights_path}' does not exist or is not a file"))
        return path, "weights_path"
    cached = hub_cache_path(VGG16_URL)
    if cached.is_file():
        return cached, "torch hub cache"
    if not allow_download:
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"{cached} is not in the torch hub cache and downloads are disabled"))
    try:
        download_checked(VGG16_URL, cached)
    except Exception as e:  # URLError, socket errors, hash mismatch, read-only cache dir ...
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"the VGG16 weights are not in the torch hub cache ({cached}) and downloading them failed "
            f"({type(e).__name__}: {e})")) from e
    return cached, f"downloaded from {VGG16_URL}"


def _vgg16_features_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """({'features.<i>.weight'|'features.<i>.bias': tensor}, sha256) of a torchvision VGG16 checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"cannot read '{path}' as a torch state dict ({type(e).__name__}: {e})")) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"'{path}' holds a {type(state).__name__}, not a VGG16 state dict"))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"'{path}' is not a torchvision VGG16 state dict (no features.* keys; found {sorted(state)[:4]})"))
    digest = file_sha256(path)
    prefix = name_hash_prefix(path)
    if prefix and not digest.startswith(prefix):
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"'{path}' does not match the sha256 prefix {prefix} in its name (corrupt or partial?)"))
    return features, digest


def _build_lpips_vgg(weights_path: str, allow_download: bool) -> PerceptualDistance:
    import lpips

    heads_file = Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"
    # resolve the backbone file first so that an offline failure costs nothing
    vgg_file, vgg_source = _resolve_vgg16_file(weights_path, allow_download)
    features, vgg_sha256 = _vgg16_features_state(vgg_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pnet_rand=True: no torchvision download in the constructor; pretrained=False: heads loaded below
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    missing = _load_checked(model, torch.load(heads_file, map_location="cpu", weights_only=True),
                            f"lpips heads {heads_file}")
    # the lpips trunk keeps torchvision's layer indices: net.slice<k>.<i>.* == features.<i>.*
    trunk = {}
    for key in model.net.state_dict():
        src = "features." + key.split(".", 1)[1]
        if src not in features:
            raise PerceptualBackendUnavailable(_unavailable_message(
                f"'{vgg_file}' is not a torchvision VGG16 state dict (no key '{src}'; "
                f"found {sorted(features)[:4] or 'no features.* keys'})"))
        trunk["net." + key] = features[src]
    missing = missing & _load_checked(model, trunk, f"VGG16 backbone {vgg_file}")
    _check_complete(model, missing, "lpips-vgg")
    provenance = {
        "backend": "lpips-vgg",
        "package": "lpips",
        "package_version": package_version("lpips"),
        "heads_file": str(heads_file),
        "heads_sha256": file_sha256(heads_file),
        "backbone_file": str(vgg_file),
        "backbone_source": vgg_source,
        "backbone_sha256": vgg_sha256,
        "comparable_to_standard_lpips": True,
    }
    return PerceptualDistance(model, provenance)


def _build_stlpips_vgg() -> PerceptualDistance:
    try:
        from stlpips_pytorch import stlpips
    except ImportError as e:  # it imports IPython and torchsummary without declaring them
        raise PerceptualBackendUnavailable(
            f"perceptual backend 'stlpips-vgg' needs stlpips-pytorch (+ IPython, torchsummary): {e}") from e

    weights_file = Path(stlpips.__file__).resolve().parent / "weights" / "vST0.0" / "vgg_shift_tolerant.pth"
    if not weights_file.is_file():
        raise PerceptualBackendUnavailable(f"stlpips-vgg: shipped weights missing at {weights_file}")
    # variant='shift_tolerant' builds its own VGG (the default variant downloads torchvision's);
    # pretrained=False: we load the shipped file ourselves and check every tensor lands
    model = stlpips.LPIPS(net="vgg", variant="shift_tolerant", pretrained=False, verbose=False)
    missing = _load_checked(model, torch.load(weights_file, map_location="cpu", weights_only=True),
                            f"stlpips {weights_file}")
    _check_complete(model, missing, "stlpips-vgg")
    provenance = {
        "backend": "stlpips-vgg",
        "package": "stlpips-pytorch",
        "package_version": package_version("stlpips-pytorch"),
        "variant": "shift_tolerant",
        "weights_file": str(weights_file),
        "weights_source": "shipped in the stlpips-pytorch package",
        "weights_sha256": file_sha256(weights_file),
        "comparable_to_standard_lpips": False,
    }
    return PerceptualDistance(model, provenance)


def build_perceptual_loss(backend: str, weights_path: str = "", *,
                          allow_download: bool = True) -> PerceptualDistance | None:
    """The perceptual distance for `backend` ('lpips-vgg' | 'stlpips-vgg' | 'none').

    weights_path: a local torchvision VGG16 state dict for 'lpips-vgg' (else the torch hub cache, else a
    download unless allow_download=False). Raises PerceptualBackendUnavailable when real weights cannot
    be had, ValueError for an unknown backend. Returns None for 'none'.
    """
    if backend == "none":
        return None
    if backend == "lpips-vgg":
        return _build_lpips_vgg(weights_path, allow_download)
    if backend == "stlpips-vgg":
        if weights_path:
            raise ConfigError("weights_path applies to 'lpips-vgg' only; 'stlpips-vgg' uses its shipped weights")
        return _build_stlpips_vgg()
    raise ConfigError(f"unknown perceptual backend '{backend}': expected one of {PERCEPTUAL_BACKENDS}")
