"""What a conditioning kind owns: its prefix module, null condition and key mask, its config check, its prefix
length and FLOPs term, and what it takes from a cache batch. A new kind is one file and one line in
CONDITIONINGS (stage2_generator/conditionings/__init__.py); nothing else names a kind."""
from __future__ import annotations

import torch
from torch import nn


class Conditioning(nn.Module):
    """Maps a batch's conditions to prefix embeddings (B, P, d); `drop` (B,) bool swaps in the null one.

    Subclasses set the class attributes and override what differs; `cfg` is the GeneratorConfig."""

    conditional = True  # False: there is no condition (no guidance, no condition dropout)
    needs_text = False  # its cache must hold text embeddings (and their encoder must match across caches)

    @classmethod
    def resolve(cls, cfg) -> type[Conditioning]:
        """The kind that serves `cfg` (a kind with variants, e.g. pooled or token text, picks one)."""
        return cls

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse a config this kind cannot build, naming the key and the fix."""

    @classmethod
    def prefix_length(cls, cfg) -> int:
        return 1

    @classmethod
    def prefix_matmul_weights(cls, cfg) -> int:
        """Weights of the prefix's matrix products per sequence (training FLOPs, for MFU); lookups count 0."""
        return 0

    @staticmethod
    def from_batch(batch, device: torch.device):
        """The condition a CacheLoader batch carries for this kind, on `device`."""
        return None

    @staticmethod
    def concat(a, b):
        """Two batches of this kind's conditions, one after the other (guidance's conditional + null batch)."""
        return torch.cat([a, b.to(a)])

    def prefix_mask(self, condition, drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """The prefix's key mask (B, P), or None when every prefix position is attended."""
        return None

    def null(self, batch_size: int, device: torch.device):
        """The null condition for a batch: what `drop=True` would use (None when unconditional)."""
        return None
