"""What the generator is conditioned on, as prefix embeddings (B, P, d) and, for token text, their key mask.

- class: one token from a class table whose last row is the null class used for guidance;
- pooled text: a sentence embedding projected to `text_tokens` tokens (a learned null embedding);
- token text: up to `text_max_tokens` token features of a text encoder (T5 ...), each projected to one token,
  left-padded (a caption's tokens end the prefix, so its last token predicts the first code, as LlamaGen
  aligns them) and the padding masked out of attention; the null is a learned sequence, all of it attended;
- none: one learned start token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GeneratorConfig


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


def concat_conditions(a, b):
    """Two batches of the same kind of condition, one after the other (guidance's conditional + null batch)."""
    if isinstance(a, TextTokens):
        return TextTokens(torch.cat([a.features, b.features.to(a.features)]), torch.cat([a.mask, b.mask.to(a.mask)]))
    return torch.cat([a, b.to(a)])


class Condition(nn.Module):
    """Maps a batch's conditions to prefix embeddings (B, P, d); `drop` (B,) bool swaps in the null one.

    `prefix_mask(condition)` is the prefix's key mask (B, P) for token text, else None (every prefix position
    is attended)."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.kind = "tokens" if cfg.conditioning == "text" and cfg.text_features == "tokens" else cfg.conditioning
        d = cfg.dim
        # the learned nulls and the start token begin random (unit vectors like the sentence embeddings; N(0, 1)
        # like the token embeddings), not zero: a zero token makes the first RMSNorm (x / ||x||) differentiate
        # at 0, where its gradient is not finite
        if self.kind == "class":
            self.classes = nn.Embedding(cfg.num_classes + 1, d)  # the last row is the null class
            self.null_class = cfg.num_classes
        elif self.kind == "text":
            self.null_text = nn.Parameter(F.normalize(torch.randn(cfg.text_dim), dim=0))
            self.project = nn.Linear(cfg.text_dim, cfg.text_tokens * d, bias=False)
            self.tokens = cfg.text_tokens
        elif self.kind == "tokens":
            self.null_text = nn.Parameter(torch.randn(cfg.text_max_tokens, cfg.text_dim))
            self.project = nn.Linear(cfg.text_dim, d, bias=False)
        else:
            self.start = nn.Parameter(torch.randn(1, 1, d))
        self.dim = d

    def forward(self, condition, drop: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        if self.kind == "class":
            labels = condition if drop is None else torch.where(drop, self.null_class, condition)
            return self.classes(labels)[:, None, :]
        if self.kind == "text":
            # in the projection's dtype: the cache's fp32 embeddings meet bf16 weights under DeepSpeed bf16
            text = condition.to(self.project.weight.dtype)
            if drop is not None:
                text = torch.where(drop[:, None], self.null_text.to(text.dtype), text)
            return self.project(text).view(len(text), self.tokens, self.dim)
        if self.kind == "tokens":
            features = condition.features.to(self.project.weight.dtype)
            if drop is not None:
                features = torch.where(drop[:, None, None], self.null_text.to(features.dtype), features)
            return self.project(features)
        return self.start.expand(batch_size if condition is None else len(condition), 1, self.dim)

    def prefix_mask(self, condition, drop: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.kind != "tokens":
            return None
        return condition.mask if drop is None else condition.mask | drop[:, None]  # the null sequence: all of it

    def null(self, batch_size: int, device: torch.device):
        """The null condition for a batch: what `drop=True` would use (None when unconditional)."""
        if self.kind == "class":
            return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        if self.kind == "text":
            return self.null_text.detach().expand(batch_size, -1)
        if self.kind == "tokens":
            features = self.null_text.detach().expand(batch_size, -1, -1)
            return TextTokens(features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device))
        return None
