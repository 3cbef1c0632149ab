"""Plain VQ (VQ-VAE / VQGAN): a learnable codebook trained by the codebook loss. The collapse baseline."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer
from .search import DEFAULT_MAX_BYTES


class VQ(Quantizer):
    display_name = "plain VQ"

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, search_max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(codebook_size, dim, beta, search_max_bytes)
        self.embedding = nn.Embedding(codebook_size, dim)
        # VQGAN's initialisation: tiny codes, so only those the encoder happens to reach ever move
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
