"""Token text conditioning: up to `text_max_tokens` token features of a text encoder (T5 ...), each projected to
one prefix token, left-padded (a caption's tokens end the prefix, so its last token predicts the first code, as
LlamaGen aligns them) and the padding masked out of attention; the null is a learned sequence, all attended."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from simvq_common.errors import ConfigError

from .pooled_text import PooledText


@dataclass
class TextTokens:
    """A batch of token features (B, T, text_dim) and their mask (B, T) bool, True where a token is: left-padded,
    a caption's tokens last."""

    features: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index) -> TextTokens:
        return TextTokens(self.features[index], self.mask[index])

    def to(self, device) -> TextTokens:
        return TextTokens(self.features.to(device), self.mask.to(device))

    @property
    def device(self) -> torch.device:
        return self.features.device


class TokenText(PooledText):
    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.text_max_tokens < 1:
            raise ConfigError(f"token text features need text_max_tokens >= 1 (the cache's encoder); got "
                              f"{cfg.text_max_tokens}")

    @classmethod
    def prefix_length(cls, cfg) -> int:
        return cfg.text_max_tokens

    @staticmethod
    def concat(a, b):
        return TextTokens(torch.cat([a.features, b.features.to(a.features)]), torch.cat([a.mask, b.mask.to(a.mask)]))

    def __init__(self, cfg) -> None:
        nn.Module.__init__(self)  # its own parameters, not the pooled kind's
        self.null_text = nn.Parameter(torch.randn(cfg.text_max_tokens, cfg.text_dim))  # N(0, 1) like token features
        self.project = nn.Linear(cfg.text_dim, cfg.dim, bias=False)

    def forward(self, condition, drop: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        features = condition.features.to(self.project.weight.dtype)
        if drop is not None:
            features = torch.where(drop[:, None, None], self.null_text.to(features.dtype), features)
        return self.project(features)

    def prefix_mask(self, condition, drop: torch.Tensor | None = None) -> torch.Tensor | None:
        return condition.mask if drop is None else condition.mask | drop[:, None]  # the null sequence: all of it

    def null(self, batch_size: int, device: torch.device):
        features = self.null_text.detach().expand(batch_size, -1, -1)
        return TextTokens(features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device))
