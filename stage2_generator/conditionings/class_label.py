"""Class conditioning: one prefix token from a class table whose last row is the null class (guidance)."""
from __future__ import annotations

import torch
from torch import nn

from simvq_common.errors import ConfigError

from .base import Conditioning


class ClassLabel(Conditioning):
    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_classes < 1:
            raise ConfigError("model.conditioning=class needs model.num_classes >= 1 (from the cache's class names)")

    @staticmethod
    def from_batch(batch, device: torch.device):
        return batch.labels.to(device)

    def __init__(self, cfg) -> None:
        super().__init__()
        self.classes = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # the last row is the null class
        self.null_class = cfg.num_classes

    def forward(self, condition, drop: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        labels = condition if drop is None else torch.where(drop, self.null_class, condition)
        return self.classes(labels)[:, None, :]

    def null(self, batch_size: int, device: torch.device):
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
