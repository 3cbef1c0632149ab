"""What a decoder kind owns: its config check, how it builds from a GeneratorConfig, its FLOPs term, its KV cache
and the three ways the generator calls it (training, prefill, one decode step). A new kind is one file and one
line in DECODERS (stage2_generator/decoders/__init__.py); the model, training and sampling never name a kind."""
from __future__ import annotations

import torch
from torch import nn


def key_mask(prefix_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool over key positions: the prefix's mask (B, P) on the first P, True after them."""
    keys = torch.ones(len(prefix_mask), length, dtype=torch.bool, device=prefix_mask.device)
    keys[:, :prefix_mask.shape[1]] = prefix_mask
    return keys


class GeneratorDecoder(nn.Module):
    """A causal decoder over inputs (B, n, dim), returning normed hidden states (B, n, dim).

    `forward(x, cache=None, step=False, prefix_mask=None)`: training or scoring (no cache), prefill (an empty
    cache from `new_cache`: fill it with x's positions), or one decode step (x of one position, after the cache's
    filled ones). `prefix_mask` (B, P) bool masks the keys of the first P positions where False (a text prefix's
    padding); prefill records it in the cache for the steps. The caller advances the cache (`advance(n)`),
    which counts `filled` positions of its `capacity`.
    """

    # True: the decode step has the same shapes at every position (torch.compile keeps one graph)
    compilable_step = False

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse a config this kind cannot build, naming the key and the fix."""

    @classmethod
    def build(cls, cfg, angles: torch.Tensor) -> GeneratorDecoder:
        """The decoder of a GeneratorConfig; `angles` (max_positions, head_dim) are every position's rotary angles
        (consecutive feature pairs share an angle)."""
        raise NotImplementedError

    @classmethod
    def matmul_weights(cls, cfg) -> int:
        """Weights of the matrix products per position (for training FLOPs): those of every linear layer of the
        decoder, counted on one built on the meta device (no memory)."""
        with torch.device("meta"):
            decoder = cls.build(cfg, torch.zeros(1, cfg.dim // cfg.heads))
        return sum(m.weight.numel() for m in decoder.modules() if isinstance(m, nn.Linear))

    @property
    def max_positions(self) -> int:
        raise NotImplementedError

    def new_cache(self, batch: int, like: torch.Tensor):
        raise NotImplementedError
