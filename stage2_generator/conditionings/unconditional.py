"""No condition: one learned start token."""
from __future__ import annotations

import torch
from torch import nn

from .base import Conditioning


class Unconditional(Conditioning):
    conditional = False

    def __init__(self, cfg) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.randn(1, 1, cfg.dim))  # N(0, 1), not zero (see pooled_text)
        self.dim = cfg.dim

    def forward(self, condition, drop: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        return self.start.expand(batch_size if condition is None else len(condition), 1, self.dim)
