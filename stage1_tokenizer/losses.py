"""Stage-1 adversarial losses: the PatchGAN discriminator and the GAN losses and weights.

The SimVQ paper's recipe: L1 + 1.0 * LPIPS(VGG) + 0.1 * non-saturating GAN loss for the
generator (fixed weight, from step 0; on each image's mean patch logit, as the paper's code) + 1.0 *
quantizer loss; the discriminator is a 3-layer PatchGAN (ndf 64) trained with the hinge loss. The
perceptual distance is in `perceptual.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq_common.errors import ConfigError


class PatchDiscriminator(nn.Module):
    """The pix2pix / VQGAN NLayerDiscriminator with BatchNorm: (B, C, H, W) -> patch logits (B, 1, H', W').

    H' = H / 2**n_layers - 2 (64 -> 6 for n_layers=3). Layers, init, and BatchNorm under DDP: docs/DISCRIMINATOR.md.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
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
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ----------------------------------------------------------------------------------------------------
# GAN losses and weights
# ----------------------------------------------------------------------------------------------------

# generator sides: docs/DISCRIMINATOR.md says which config uses which, and why
GENERATOR_LOSS_KINDS = ("non_saturating_image_mean", "non_saturating_per_patch", "hinge")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, VQGAN convention: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))).

    The 0.5 halves the usual hinge sum (a perfectly separating D with |logits| >= 1 gives 0; D = 0
    everywhere gives 1.0). Means are over all patch logits of the batch.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def check_generator_loss_kind(kind: str) -> None:
    if kind not in GENERATOR_LOSS_KINDS:
        raise ConfigError(f"unknown generator loss kind '{kind}' (loss.gan_kind): expected one of "
                          f"{', '.join(GENERATOR_LOSS_KINDS)}")


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss on D's patch logits (B, 1, H', W') for its reconstructions.

    kind='non_saturating_image_mean' (the SimVQ code's `non_saturate_gen_loss`): each image's
        patch logits averaged first, then mean over images of softplus(-mean_logit) = -log sigmoid(mean_logit)
    kind='non_saturating_per_patch': mean(softplus(-logits_fake)) over every patch logit of the batch
    kind='hinge': -mean(logits_fake), the generator side of the hinge GAN as used by VQGAN.
    """
    check_generator_loss_kind(kind)
    if kind == "non_saturating_image_mean":
        return F.softplus(-logits_fake.flatten(1).mean(dim=1)).mean()
    if kind == "non_saturating_per_patch":
        return F.softplus(-logits_fake).mean()
    return -logits_fake.mean()


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
