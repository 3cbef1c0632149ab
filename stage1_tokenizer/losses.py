"""Stage-1 (VQGAN-style) training losses: perceptual distance, PatchGAN discriminator, GAN losses.

The paper's recipe (REFERENCE.md section 2): L1 + 1.0 * LPIPS(VGG) + 0.1 * non-saturating GAN loss
for the generator (fixed weight, GAN from step 0) + 1.0 * quantizer loss; the discriminator is a
3-layer PatchGAN (ndf 64) trained with the hinge loss.

Perceptual backends (`build_perceptual_loss`):

* ``"lpips-vgg"``  -- the standard LPIPS(net='vgg') from the ``lpips`` package. It ships only the
  linear heads; the VGG16 backbone is torchvision's ImageNet checkpoint (vgg16-397923af.pth), taken
  from ``weights_path``, else the torch hub cache, else downloaded. Offline without the file it raises
  `PerceptualBackendUnavailable` -- never a randomly initialised backbone.
* ``"stlpips-vgg"`` -- the shift-tolerant LPIPS (VGG) of ``stlpips-pytorch``, which ships the full
  weights (backbone + heads) and so works offline. Its distances are NOT numerically comparable to
  standard LPIPS numbers (different backbone: blur-pool, stride-1 max-pool, own training).
* ``"none"``       -- no perceptual loss (returns None).

Every returned module is frozen (eval mode, requires_grad=False everywhere, and it stays in eval mode
when a parent calls ``.train()``: the LPIPS heads contain Dropout), runs in fp32 even under autocast
(LPIPS' feature normalisation uses eps=1e-10, which underflows to 0 in fp16 and gives NaN), takes
x, y of shape (B, 3, H, W) in [-1, 1] and returns per-image distances (B,), differentiable w.r.t. the
inputs. Its ``.provenance`` dict records package, version and weight files (with sha256) for reports.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import math
import re
import socket
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simvq_common.errors import UserError

PERCEPTUAL_BACKENDS = ("lpips-vgg", "stlpips-vgg", "none")
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0


class PerceptualBackendUnavailable(UserError, RuntimeError):
    """The requested perceptual backend cannot be built with real (pretrained) weights here."""


# ----------------------------------------------------------------------------------------------------
# perceptual distance
# ----------------------------------------------------------------------------------------------------


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


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_URL).name
    if cached.is_file():
        return cached, "torch hub cache"
    if not allow_download:
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"{cached} is not in the torch hub cache and downloads are disabled"))
    hash_prefix = re.search(r"-([0-9a-f]{8,})\.pth$", cached.name).group(1)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)  # urlopen in torch.hub sets none: fail fast offline
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix=hash_prefix, progress=False)
    except Exception as e:  # URLError, socket errors, hash mismatch, read-only cache dir ...
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"the VGG16 weights are not in the torch hub cache ({cached}) and downloading them failed "
            f"({type(e).__name__}: {e})")) from e
    finally:
        socket.setdefaulttimeout(old_timeout)
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
    digest = _sha256(path)
    match = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if match and not digest.startswith(match.group(1)):
        raise PerceptualBackendUnavailable(_unavailable_message(
            f"'{path}' does not match the sha256 prefix {match.group(1)} in its name (corrupt or partial?)"))
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
        "package_version": _package_version("lpips"),
        "heads_file": str(heads_file),
        "heads_sha256": _sha256(heads_file),
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
        "package_version": _package_version("stlpips-pytorch"),
        "variant": "shift_tolerant",
        "weights_file": str(weights_file),
        "weights_source": "shipped in the stlpips-pytorch package",
        "weights_sha256": _sha256(weights_file),
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
            raise ValueError("weights_path applies to 'lpips-vgg' only; 'stlpips-vgg' uses its shipped weights")
        return _build_stlpips_vgg()
    raise ValueError(f"unknown perceptual backend '{backend}': expected one of {PERCEPTUAL_BACKENDS}")


# ----------------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ----------------------------------------------------------------------------------------------------

DISCRIMINATOR_NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups when the width allows
    raise ValueError(f"unknown discriminator norm '{kind}': expected one of {DISCRIMINATOR_NORMS}")


class PatchDiscriminator(nn.Module):
    """The pix2pix / VQGAN NLayerDiscriminator: (B, C, H, W) -> patch logits (B, 1, H', W').

    conv4x4/s2 + LeakyReLU(0.2); (n_layers - 1) x [conv4x4/s2 + norm + LeakyReLU], channels doubling up
    to 8 * ndf; conv4x4/s1 + norm + LeakyReLU; conv4x4/s1 to 1 channel. All padding 1, so each stride-2
    conv halves H and each stride-1 conv removes 1: H' = H / 2**n_layers - 2 (64 -> 6, 128 -> 14 for
    n_layers=3). Convs before a norm have no bias. Init: conv weights N(0, 0.02) (biases 0), norm scales
    N(1, 0.02), norm shifts 0. ndf=64, n_layers=3, norm='batch' has 2,765,633 parameters (as VQGAN).

    norm: 'batch' (default, as VQGAN and the paper) or 'group' (GroupNorm, gcd(32, C) groups).
    BatchNorm is kept as default for fidelity to the reference; it has consequences to know about:
    * its statistics are per batch, so calling D on reals and on fakes separately (as VQGAN does)
      normalises each with its own statistics; concatenating them into one call shares them.
    * under DDP, each rank normalises with its local batch (use nn.SyncBatchNorm.convert_sync_batchnorm
      for global statistics), and with the default broadcast_buffers=True the running stats are
      re-broadcast in place before every forward; calling D twice before one backward (reals, then
      fakes: the usual GAN pattern) then fails with "modified by an inplace operation" (pytorch
      issues #22095, #110363, #175024). Fixes: SyncBatchNorm, broadcast_buffers=False, or one
      concatenated call (reals + fakes) per backward.
    'group' has none of these batch couplings (per-sample normalisation) and is the simpler choice for
    multi-GPU runs; it is a deviation from VQGAN, so record it in the run config.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.norm_kind = norm
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       _norm(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   _norm(norm, ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ----------------------------------------------------------------------------------------------------
# GAN losses and weights
# ----------------------------------------------------------------------------------------------------

GENERATOR_LOSS_KINDS = ("non_saturating", "hinge")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, VQGAN convention: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))).

    The 0.5 halves the usual hinge sum (a perfectly separating D with |logits| >= 1 gives 0; D = 0
    everywhere gives 1.0). Means are over all patch logits of the batch.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The generator's adversarial loss on D's logits for its reconstructions.

    kind='non_saturating' (default; the paper: non-saturating G loss with a hinge D):
        mean(softplus(-logits_fake)) = mean(-log sigmoid(logits_fake))
    kind='hinge': -mean(logits_fake), the generator side of the hinge GAN as used by VQGAN.
    """
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    if kind == "hinge":
        return -logits_fake.mean()
    raise ValueError(f"unknown generator loss kind '{kind}': expected one of {GENERATOR_LOSS_KINDS}")


def adaptive_generator_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                              max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive GAN weight: ||d rec/d W|| / (||d g/d W|| + 1e-4), clamped to [0, max_weight], detached.

    W is the decoder's last layer weight; both gradients come from torch.autograd.grad(retain_graph=True),
    so the graph stays usable for the real backward and no .grad is touched. rec_loss is whatever
    non-adversarial loss the GAN term should be balanced against (VQGAN: L1 + perceptual). The caller
    multiplies by its own GAN weight. (The paper itself uses a fixed 0.1, not this adaptive weight.)
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    if rec_grad is None or g_grad is None:
        which = "rec_loss" if rec_grad is None else "g_loss"
        raise ValueError(f"adaptive_generator_weight: {which} does not depend on last_layer_weight")
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def gan_weight_at(step: int, start_step: int, weight: float) -> float:
    """The GAN loss weight in effect at `step`: 0 before start_step, `weight` from start_step on."""
    return float(weight) if step >= start_step else 0.0
