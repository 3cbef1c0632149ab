"""SimVQ (arXiv 2411.02038): a frozen random codebook reparameterised by one learnable linear layer.

C' = C W^T + b. Plain VQ updates only the codes that get selected, so most never move and die;
here every step moves W, and with it the whole space the codes span, so all codes stay in use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer, common_arguments
from .search import DEFAULT_MAX_BYTES


def frozen_codebook(codebook_size: int, dim: int, seed: int) -> torch.Tensor:
    """N(0, dim^-1/2) rows from a CPU generator: the same tensor on every rank and every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(codebook_size, dim, generator=generator) * dim ** -0.5


class SimVQ(Quantizer):
    display_name = "SimVQ"

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, bias: bool = True, seed: int = 0,
                 search_max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(codebook_size, dim, beta, search_max_bytes)
        # a buffer, not a parameter: never trained, saved in the state dict
        self.register_buffer("frozen_codebook", frozen_codebook(codebook_size, dim, seed))
        self.basis = nn.Linear(dim, dim, bias=bias)

    @classmethod
    def from_config(cls, cfg, dim: int) -> SimVQ:  # reads bias and seed
        return cls(bias=cfg.bias, seed=cfg.seed, **common_arguments(cfg, dim))

    def _transform(self, rows: torch.Tensor) -> torch.Tensor:
        # Always fp32: under bf16 autocast a bf16 codebook would change which code is nearest.
        with torch.autocast(device_type=rows.device.type, enabled=False):
            return F.linear(rows, self.basis.weight, self.basis.bias)

    def codebook(self) -> torch.Tensor:
        return self._transform(self.frozen_codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        # The linear layer is applied to the selected rows only (N x d x d instead of K x d x d):
        # the same vectors as codebook()[indices], with the gradient reaching W and b.
        return self._transform(self.frozen_codebook[indices])
