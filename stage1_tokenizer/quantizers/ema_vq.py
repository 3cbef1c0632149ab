"""EMA VQ (VQ-VAE-2): codes are running means of the encoder outputs assigned to them.

No dead-code restarts: it is a baseline for collapse, shown as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simvq_common.distributed import all_reduce_sum

from .base import Quantizer, common_arguments
from .search import DEFAULT_MAX_BYTES
from .simvq import frozen_codebook


class EMAVQ(Quantizer):
    display_name = "EMA VQ"

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99, eps: float = 1e-5,
                 seed: int = 0, search_max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(codebook_size, dim, beta, search_max_bytes)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.eps = eps
        init = frozen_codebook(codebook_size, dim, seed)  # same start as SimVQ, for a fair comparison
        self.register_buffer("embedding", init.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embedding_sum", init.clone())

    @classmethod
    def from_config(cls, cfg, dim: int) -> EMAVQ:  # reads ema_decay and seed
        return cls(decay=cfg.ema_decay, seed=cfg.seed, **common_arguments(cfg, dim))

    def codebook(self) -> torch.Tensor:
        return self.embedding

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding[indices]

    def loss(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        return self.beta * F.mse_loss(z, z_q.detach())  # the codebook moves by EMA, not by gradient

    @torch.no_grad()
    def update_codebook(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embedding_sum).index_add_(0, indices, z.float())
        all_reduce_sum(counts)  # every rank applies the same update: codebooks stay in sync
        all_reduce_sum(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embedding_sum.lerp_(sums, 1 - self.decay)
        # Laplace smoothing keeps unused codes' denominators away from zero
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embedding.copy_(self.embedding_sum / smoothed.unsqueeze(1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", decay={self.decay}"
