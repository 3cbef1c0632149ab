"""Pooled text conditioning: a sentence embedding projected to `text_tokens` prefix tokens; a learned null
embedding. The `text` kind; with model.text_features=tokens its variant token_text.TokenText serves instead."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq_common.errors import ConfigError

from .base import Conditioning

TEXT_FEATURES = ("", "pooled", "tokens")  # "" = not yet filled in from the cache


class PooledText(Conditioning):
    needs_text = True
    variants: dict[str, type[Conditioning]] = {}  # model.text_features -> another kind (the registry fills it)

    @classmethod
    def resolve(cls, cfg) -> type[Conditioning]:
        return cls.variants.get(cfg.text_features, cls)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.text_dim < 1 or cfg.text_tokens < 1:
            raise ConfigError(f"model.conditioning=text needs text_dim >= 1 (the cache's text encoder) and "
                              f"text_tokens >= 1; got {cfg.text_dim} and {cfg.text_tokens}")

    @classmethod
    def prefix_length(cls, cfg) -> int:
        return cfg.text_tokens

    @classmethod
    def prefix_matmul_weights(cls, cfg) -> int:
        return cfg.text_dim * cfg.dim * cls.prefix_length(cfg)  # the projection, per prefix token

    @staticmethod
    def from_batch(batch, device: torch.device):
        return batch.text_embeddings.to(device)

    def __init__(self, cfg) -> None:
        super().__init__()
        # unit-norm like the sentence embeddings, not zero: a zero prefix makes the first RMSNorm (x / ||x||)
        # differentiate at 0, where its gradient is not finite
        self.null_text = nn.Parameter(F.normalize(torch.randn(cfg.text_dim), dim=0))
        self.project = nn.Linear(cfg.text_dim, cfg.text_tokens * cfg.dim, bias=False)
        self.tokens, self.dim = cfg.text_tokens, cfg.dim

    def forward(self, condition, drop: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        # in the projection's dtype: the cache's fp32 embeddings meet bf16 weights under DeepSpeed bf16
        text = condition.to(self.project.weight.dtype)
        if drop is not None:
            text = torch.where(drop[:, None], self.null_text.to(text.dtype), text)
        return self.project(text).view(len(text), self.tokens, self.dim)

    def null(self, batch_size: int, device: torch.device):
        return self.null_text.detach().expand(batch_size, -1)
