"""x-transformers' `Decoder` as a generator decoder (`model.decoder: x-transformers`), for research: its attention
and feed-forward variants (and dropout, which the project's own decoder lacks) come from model.decoder_options,
passed to `x_transformers.Decoder` as keyword arguments over Llama-like defaults.

The generator's rotary angles (model.rope: 2d over the code grid with the prefix not rotated, or 1d) are handed
to every layer, so the positions mean what they mean in the project's own decoder. The defaults below are part
of what a saved `x-transformers` generator builds: change one only under a new decoder name. x-transformers'
cache grows by one position per decode step (a new shape each step, so the decode step is not compiled);
sampling is otherwise the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from simvq_common.errors import ConfigError

from .base import GeneratorDecoder, key_mask
from .llama import swiglu_hidden

# Llama-like: SwiGLU (as wide as the llama decoder's: ff_mult, set per width) without biases, RMSNorm, SDPA attention;
# each can be overridden
DEFAULT_OPTIONS = {"ff_glu": True, "ff_swish": True, "ff_no_bias": True, "use_rmsnorm": True, "attn_flash": True}
# set from the generator's config (size, positions) and by its causal use: not options
FIXED = ("dim", "depth", "heads", "attn_dim_head", "causal", "cross_attend", "rotary_pos_emb", "rotary_xpos",
         "rotary_emb_dim", "rotary_interpolation_factor", "rotary_xpos_scale_base", "rotary_base_rescale_factor",
         "polar_pos_emb", "alibi_pos_bias", "rel_pos_bias", "dynamic_pos_bias")
# options whose state the KV cache does not carry (cached sampling would differ from training) or whose randomness
# is not torch's (a resumed run would differ)
REFUSED = ("shift_tokens", "layer_dropout")


@dataclass
class GrowingCache:
    """x-transformers' per-layer keys and values (LayerIntermediates) of the `filled` positions so far."""

    capacity: int
    intermediates: Any = None
    key_mask: torch.Tensor | None = None  # (B, capacity) bool: False at masked-out (padding) keys
    filled: int = 0

    def advance(self, positions: int) -> None:
        self.filled += positions


class XTransformersDecoder(GeneratorDecoder):
    @classmethod
    def check(cls, cfg) -> None:
        fixed = sorted(set(cfg.decoder_options) & set(FIXED))
        if fixed:
            raise ConfigError(f"model.decoder_options sets {fixed}: the generator sets these (model.size sets width, "
                              f"depth and heads; positions are its rotary angles); remove them")
        refused = sorted(set(cfg.decoder_options) & set(REFUSED))
        if refused:
            raise ConfigError(f"model.decoder_options sets {refused}: KV-cached sampling or exact resume does not hold "
                              f"with them here (the cache does not carry shifted tokens; layer dropout draws from "
                              f"Python's random); remove them")
        if cfg.checkpoint_activations:
            raise ConfigError("model.checkpoint_activations=true is for the llama decoder; x-transformers' decoder "
                              "does not recompute activations here: set it to false")

    @classmethod
    def build(cls, cfg, angles: torch.Tensor) -> XTransformersDecoder:
        return cls(cfg.dim, cfg.depth, cfg.heads, angles, dict(cfg.decoder_options))

    def __init__(self, dim: int, depth: int, heads: int, angles: torch.Tensor, options: dict) -> None:
        from x_transformers import Decoder

        super().__init__()
        try:
            self.net = Decoder(dim=dim, depth=depth, heads=heads, attn_dim_head=dim // heads,
                               **{**DEFAULT_OPTIONS, "ff_mult": swiglu_hidden(dim) / dim, **options})
        except (TypeError, AssertionError) as error:  # an option it does not know, or a combination it refuses
            raise ConfigError(f"model.decoder_options={options}: x_transformers.Decoder refused them ({error}); see "
                              f"its keyword arguments (attn_*, ff_*, layer options)") from error
        self.register_buffer("angles", angles, persistent=False)

    @property
    def max_positions(self) -> int:
        return self.angles.shape[0]

    def new_cache(self, batch: int, like: torch.Tensor) -> GrowingCache:
        return GrowingCache(self.max_positions)

    def forward(self, x: torch.Tensor, cache: GrowingCache | None = None, step: bool = False,
                prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        start = cache.filled if step else 0
        end = start + x.shape[1]
        if end > self.max_positions:
            raise ValueError(f"{end} positions; the decoder allows {self.max_positions}")
        keys = cache.key_mask if step else None
        if prefix_mask is not None:
            keys = key_mask(prefix_mask, self.max_positions)
            if cache is not None:
                cache.key_mask = keys
        # queries take the last x.shape[1] angles, keys (cached ones included) all of them
        options = {"rotary_pos_emb": (self.angles[None, :end], None),
                   "self_attn_kv_mask": None if keys is None else keys[:, :end]}
        if cache is None:
            return self.net(x, **options)
        hidden, cache.intermediates = self.net(x, cache=cache.intermediates if step else None, return_hiddens=True,
                                               **options)
        return hidden
