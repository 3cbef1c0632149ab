"""The project's own decoder (`model.decoder: llama`, the default): Llama-style pre-norm blocks (RMSNorm, rotary
attention through `scaled_dot_product_attention`, SwiGLU), with a preallocated KV cache for generation.

Written here rather than taken from x-transformers (which is registered beside it for research: xtransformers.py):
the general library's per-layer work (the rotation recomputed and concatenated in every layer, RMSNorm as three
kernels, separate q / k / v products) cost a measured 4-34% of the training step (docs/BENCHMARKS.md, "Stage-2
training step"); its growing cache also changes shape at every decode step, which torch.compile cannot keep.
Here the cache has a fixed shape and the decode position is a tensor, so a compiled decode step is one graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from simvq_common.errors import ConfigError

from .base import GeneratorDecoder, key_mask

NORM_EPS = 1e-6


def swiglu_hidden(dim: int) -> int:
    """The SwiGLU hidden width, as Llama's: 8/3 of the width, rounded up to a multiple of 256."""
    return 256 * -(-int(8 * dim / 3) // 256)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, NORM_EPS)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, heads, n, head_dim); consecutive feature pairs (x0, x1) share an angle:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). In the angles' fp32, returned in x's dtype (bf16 under
    DeepSpeed bf16, which casts the weights but not these buffers)."""
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * cos + swapped * sin).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer for up to `keys.shape[-2]` positions, and how many are filled.

    keys, values: (layers, B, heads, max_positions, head_dim). The filled length is kept twice: `length`, a
    1-element int64 tensor on the cache's device, is what the decoder reads, so that a (compiled) decode step
    is the same graph at every position; `filled` is the same number on the host, for checks that must not
    wait for the device.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: torch.Tensor
    filled: int = 0
    attended: torch.Tensor | None = None  # (B, 1, 1, max_positions) bool: False at masked-out (padding) keys

    @classmethod
    def empty(cls, layers: int, batch: int, heads: int, positions: int, head_dim: int, like: torch.Tensor):
        shape = (layers, batch, heads, positions, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape), torch.zeros(1, dtype=torch.long, device=like.device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def advance(self, positions: int) -> None:
        """Record `positions` more filled (after the decoder wrote them)."""
        self.length += positions
        self.filled += positions


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ff_norm = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.up_gate = nn.Linear(dim, 2 * hidden, bias=False)  # [up; gate]: the SwiGLU is up * silu(gate)
        self.down = nn.Linear(hidden, dim, bias=False)

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None, layer: int, step: bool) -> torch.Tensor:
        """mask: the SDPA boolean mask (True = attend); None = causal (not stepping) or every filled key."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if step:  # one new position at cache.length: written in place, attending to every filled position
            cache.keys[layer].index_copy_(2, cache.length, k)
            cache.values[layer].index_copy_(2, cache.length, v)
            k, v = cache.keys[layer], cache.values[layer]
        elif cache is not None:  # prefill: the cache is empty, the n positions attend among themselves
            cache.keys[layer, :, :, :n], cache.values[layer, :, :, :n] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0, step: bool = False) -> torch.Tensor:
        x = x + self.attend(self.attn_norm(x), cos, sin, mask, cache, layer, step)
        up, gate = self.up_gate(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.down(up * F.silu(gate))


class Decoder(GeneratorDecoder):
    """`depth` blocks and a final RMSNorm over inputs (B, n, dim); `cos` / `sin` (max_positions, head_dim)
    hold the rotation of every position."""

    compilable_step = True  # the cache has a fixed shape: a compiled decode step is one graph

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.decoder_options:
            raise ConfigError(f"model.decoder_options={dict(cfg.decoder_options)}: the llama decoder takes none (its "
                              f"architecture is fixed); options are for model.decoder=x-transformers")

    @classmethod
    def build(cls, cfg, angles: torch.Tensor) -> Decoder:
        """The decoder of a GeneratorConfig; `angles` (max_positions, head_dim) are every position's rotation."""
        return cls(cfg.dim, cfg.depth, cfg.heads, swiglu_hidden(cfg.dim), angles.cos(), angles.sin(),
                   checkpoint_activations=cfg.checkpoint_activations)

    def __init__(self, dim: int, depth: int, heads: int, hidden: int, cos: torch.Tensor, sin: torch.Tensor,
                 checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.checkpoint_activations = checkpoint_activations

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def new_cache(self, batch: int, like: torch.Tensor) -> KVCache:
        return KVCache.empty(len(self.blocks), batch, self.heads, self.max_positions, self.head_dim, like)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, step: bool = False,
                prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training / scoring (no cache), prefill (an empty cache: fill it with x's positions), or one decode
        step (x of one position, written at cache.length). `prefix_mask` (B, P) bool masks the keys of the
        first P positions where False (a text prefix's padding; prefill records it in the cache for the steps).
        The caller advances the cache (KVCache.advance): outside a compiled step, so that the host-side count
        never enters its graph."""
        n = x.shape[1]
        if step:
            cos, sin = self.cos.index_select(0, cache.length), self.sin.index_select(0, cache.length)
            mask = (torch.arange(cache.capacity, device=x.device) <= cache.length)[None, :]  # (1 query, keys)
            if cache.attended is not None:
                mask = mask & cache.attended
        else:
            if n > self.max_positions:
                raise ValueError(f"{n} positions; the decoder allows {self.max_positions}")
            cos, sin = self.cos[:n], self.sin[:n]
            mask = None if prefix_mask is None else self.causal_mask(prefix_mask, n)
            if cache is not None and prefix_mask is not None:
                cache.attended = key_mask(prefix_mask, cache.capacity)[:, None, None, :]
        for i, block in enumerate(self.blocks):
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                # keep each block's input only; its activations are recomputed in the backward
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, step)
        return self.norm(x)

    @staticmethod
    def causal_mask(prefix_mask: torch.Tensor, n: int) -> torch.Tensor:
        """(B, 1, n, n) bool: query i attends key j <= i unless j is a masked prefix position; a masked position
        attends itself alone (so that no query is left without a key, whose softmax would be NaN). No other
        position reads it, and no loss does: its output is inert."""
        keys = key_mask(prefix_mask, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=prefix_mask.device).tril()
        diagonal = torch.eye(n, dtype=torch.bool, device=prefix_mask.device)
        return (causal[None, None] & keys[:, None, None, :]) | diagonal
