"""What every quantizer shares: input checks, flattening, nearest-code search, straight-through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .search import DEFAULT_MAX_BYTES, nearest_code


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, dim, h, w): z + sg(z_q - z), carries the encoder's gradient
    indices: torch.Tensor    # (B, h, w) int64
    loss: torch.Tensor       # scalar quantizer loss


def check_latents(z: torch.Tensor, dim: int, values: bool | None = True) -> None:
    """Shape always; finiteness when `values` (None: on CPU only, as reading it back syncs a GPU)."""
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"expected latents of shape (batch, {dim}, height, width), got {shape}")
    if z.shape[1] != dim:
        raise ValueError(f"expected {dim} latent channels (the quantizer's dim), got {z.shape[1]} "
                         f"in shape {tuple(z.shape)}: the encoder's z_channels must equal the code dim")
    if (z.device.type == "cpu" if values is None else values) and not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).sum())
        raise ValueError(f"latents contain {bad} non-finite values (NaN or inf): the encoder diverged "
                         f"or its input is corrupt; lower the learning rate or check the data")


class Quantizer(nn.Module):
    """Base class. Subclasses define `codebook()` (K, dim) and `lookup(indices)` (..., dim), and are built from
    the tokenizer's quantizer config by `from_config` (a new kind: one file, one line in QUANTIZERS).

    `lookup` must return exactly the vectors the search ran against, with whatever gradient path
    the method trains through, so that `indices_to_codes(forward(z).indices)` reproduces forward.
    """

    display_name = "quantizer"  # how tables and figures name the kind

    @classmethod
    def from_config(cls, cfg, dim: int) -> Quantizer:
        """The quantizer of a QuantizerConfig (the fields every kind reads; a kind with its own overrides)."""
        return cls(**common_arguments(cfg, dim))

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, search_max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.search_max_bytes = search_max_bytes

    def codebook(self) -> torch.Tensor:
        raise NotImplementedError

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """beta * ||sg(z_q) - z||^2 moves the encoder; ||z_q - sg(z)||^2 moves the codebook side."""
        commitment = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        return self.beta * commitment + codebook

    def update_codebook(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """Hook for codebooks that are not trained by gradient (EMA); a no-op otherwise."""

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, dim, h, w) code vectors, exactly those forward used."""
        if indices.dtype.is_floating_point or indices.ndim != 3:
            raise ValueError(f"expected integer indices of shape (batch, height, width), got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self.lookup(indices.long()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, check_values: bool | None = None) -> QuantizerOutput:
        """check_values (default: on CPU only): refuse non-finite latents. A training step on a GPU skips it,
        as the trainers stop on a non-finite loss anyway; encoding checks everywhere."""
        check_latents(z, self.dim, check_values)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        indices = nearest_code(flat.detach(), self.codebook().detach(), self.search_max_bytes)
        z_q = self.lookup(indices).to(flat.dtype)
        loss = self.loss(flat.float(), z_q.float())
        if self.training:
            self.update_codebook(flat.detach(), indices)
        quantized = flat + (z_q - flat).detach()
        return QuantizerOutput(
            quantized=quantized.view(b, h, w, d).permute(0, 3, 1, 2),
            indices=indices.view(b, h, w),
            loss=loss,
        )

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}"


def common_arguments(cfg, dim: int) -> dict:
    """The constructor arguments every kind takes from a QuantizerConfig."""
    return dict(codebook_size=cfg.codebook_size, dim=dim, beta=cfg.beta,
                search_max_bytes=int(cfg.search_max_mb * 2**20))
