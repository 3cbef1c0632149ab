"""The VQ autoencoder: Encoder -> quantizer -> Decoder (VQGAN-style convs, no attention, no quant_conv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq_common.errors import ConfigError

from .config import AutoencoderConfig, QuantizerConfig
from .layers import Downsample, ResBlock, Upsample, group_norm
from .quantizers import QUANTIZERS, Quantizer, QuantizerOutput


class Encoder(nn.Module):
    """conv_in -> per level: res blocks (+ stride-2 conv except at the last) -> 2 mid blocks -> norm, swish, 1x1 to z."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        blocks, width = [], cfg.ch
        for level, out_width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(width, out_width, cfg.norm_groups))
                width = out_width
            if level < len(widths) - 1:
                blocks.append(Downsample(width))
        blocks += [ResBlock(width, width, cfg.norm_groups), ResBlock(width, width, cfg.norm_groups)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(width, cfg.norm_groups)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    """The encoder mirrored; upsampling by conv to 4x channels + depth-to-space."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        width = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1, bias=False)
        blocks = [ResBlock(width, width, cfg.norm_groups), ResBlock(width, width, cfg.norm_groups)]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(width, widths[level], cfg.norm_groups))
                width = widths[level]
            if level > 0:
                blocks.append(Upsample(width))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(width, cfg.norm_groups)
        self.conv_out = nn.Conv2d(width, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


def build_quantizer(cfg: QuantizerConfig, dim: int) -> Quantizer:
    if cfg.kind not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer kind '{cfg.kind}': expected one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[cfg.kind].from_config(cfg, dim)


class VQAutoencoder(nn.Module):
    def __init__(self, autoencoder: AutoencoderConfig, quantizer: QuantizerConfig):
        super().__init__()
        self.encoder = Encoder(autoencoder)
        self.quantizer = build_quantizer(quantizer, autoencoder.z_channels)
        self.decoder = Decoder(autoencoder)
        self.downsample_factor = autoencoder.downsample_factor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images in [-1, 1] (B, 3, H, W) -> (reconstruction, quantizer output)."""
        q = self.quantizer(self.encoder(images))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(images), check_values=True).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.indices_to_codes(indices))
