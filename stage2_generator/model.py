"""The stage-2 generator: a decoder (stage2_generator.decoders: the project's Llama-style one by default) over the
tokenizer's codes.

A sequence is [condition prefix, code_0, ..., code_{L-2}]; the hidden state at position P - 1 + j
predicts code_j (P = prefix length, L = h * w codes in raster order). The prefix (stage2_generator.conditionings)
is one class token, tokens projected from a sentence embedding or from a text encoder's token features
(padding masked out of attention), or one learned start token, each with a null for guidance. Positions are rotary: 2d rotates half of each head by the code's row and half by its column
(prefix tokens are not rotated); 1d by sequence position. The output head is zero-initialised, so
training starts at the uniform loss ln K, and it scores only the K image codes: nothing outside the
image vocabulary can be sampled.

Generation is prefill (the prefix, filling the KV cache) then one decode step per code; `decode_step` is
what sampling compiles (`compile_decode_step`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simvq_common.errors import ArtifactError, ConfigError
from simvq_common.pretrained import PretrainedModel

from .conditionings import build_conditioning, conditioning_for
from .config import GeneratorConfig
from .decoders import decoder_for
from .loss import DEFAULT_CHUNK_MB, chunk_rows, chunked_cross_entropy


def rotary_frequencies(cfg: GeneratorConfig) -> torch.Tensor:
    """(P + L - 1, head_dim) rotation angles of every input position (consecutive pairs of features share a
    frequency, as decoders.llama.rotate and x-transformers' rotate_half apply them)."""
    head_dim = cfg.dim // cfg.heads
    h, w = cfg.grid
    n_prefix, n_codes = cfg.prefix_length, cfg.sequence_length - 1  # the last code is never an input

    def angles(position: torch.Tensor, dim: int) -> torch.Tensor:
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return (position[:, None].double() * inv_freq).repeat_interleave(2, dim=1)

    if cfg.rope == "1d":
        freqs = angles(torch.arange(n_prefix + n_codes), head_dim)
    else:
        j = torch.arange(n_codes)
        codes = torch.cat([angles(j // w, head_dim // 2), angles(j % w, head_dim // 2)], dim=1)
        freqs = torch.cat([torch.zeros(n_prefix, head_dim, dtype=torch.float64), codes])
    return freqs.float()


class OutputHead(nn.Linear):
    """Scores the K codes. Called as a module for the loss too, so ZeRO-3 gathers its weight either way."""

    def __init__(self, dim: int, codebook_size: int, loss_chunk_mb: float) -> None:
        super().__init__(dim, codebook_size, bias=False)
        nn.init.zeros_(self.weight)
        self.loss_rows = chunk_rows(codebook_size, loss_chunk_mb)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (..., K), or with targets the mean cross-entropy over K in chunks."""
        if targets is None:
            return super().forward(hidden).float()
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1),
                                     self.loss_rows)


class Generator(PretrainedModel, nn.Module):
    config_schema, kind = GeneratorConfig, "generator"

    def __init__(self, cfg: GeneratorConfig, loss_chunk_mb: float = DEFAULT_CHUNK_MB) -> None:
        super().__init__()
        cfg.check()
        self.config = cfg
        d, k = cfg.dim, cfg.codebook_size
        self.condition = build_conditioning(cfg)
        self.token_embed = nn.Embedding(k, d)
        angles = rotary_frequencies(cfg)
        self.decoder = decoder_for(cfg).build(cfg, angles)
        self.head = OutputHead(d, k, loss_chunk_mb)
        self._step_compiled = False

    @classmethod
    def check_layout(cls, state: dict[str, torch.Tensor], source: Path) -> None:
        if any(key.startswith("decoder.layers.") for key in state):
            raise ArtifactError(f"{source} holds a generator with the x-transformers decoder of simvq-gen before "
                                f"2026-12-01, whose weights are laid out differently: retrain it (simvq "
                                f"train-generator) with this version")

    @property
    def prefix_length(self) -> int:
        return self.config.prefix_length

    def _hidden(self, codes: torch.Tensor, condition, drop) -> torch.Tensor:
        prefix = self.condition(condition, drop, batch_size=len(codes))
        inputs = codes[:, :-1]
        if self.training and self.config.input_noise > 0:  # from torch's generator, seeded per step by the trainer
            noisy = torch.rand(inputs.shape, device=inputs.device) < self.config.input_noise
            inputs = torch.where(noisy, torch.randint_like(inputs, self.config.codebook_size), inputs)
        x = torch.cat([prefix, self.token_embed(inputs)], dim=1)
        return self.decoder(x, prefix_mask=self.condition.prefix_mask(condition, drop))

    def forward(self, codes: torch.Tensor, condition=None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-code cross-entropy of codes (B, L) given the conditions (class ids, text embeddings,
        TextTokens or None); `drop` (B,) bool nulls some."""
        hidden = self._hidden(codes, condition, drop)
        return self.head(hidden[:, self.prefix_length - 1:], codes)  # positions predicting code_0 .. code_{L-1}

    def logits(self, codes: torch.Tensor, condition=None) -> torch.Tensor:
        """Uncached fp32 logits (B, L, K) of every code given the ones before it (for tests and scoring)."""
        return self.head(self._hidden(codes, condition, None)[:, self.prefix_length - 1:])

    @torch.no_grad()
    def prefill(self, condition, batch_size: int | None = None,
                codes: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """Encode the prefix (and any given leading codes (B, t)): the logits (B, K) of the next code and the cache."""
        x = self.condition(condition, None, batch_size=batch_size)
        if codes is not None and codes.shape[1]:
            x = torch.cat([x, self.token_embed(codes)], dim=1)
        cache = self.decoder.new_cache(len(x), like=x)
        hidden = self.decoder(x, cache, prefix_mask=self.condition.prefix_mask(condition))
        cache.advance(x.shape[1])
        return self.head(hidden[:, -1]), cache

    @torch.no_grad()
    def decode_step(self, code: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """Append code (B,) to the cached sequence (in place): the logits (B, K) of the code after it, and the cache."""
        if cache.filled >= cache.capacity:
            raise ValueError(f"the cache is full: the grid {self.config.grid} with a prefix of {self.prefix_length} "
                             f"allows {cache.capacity} positions")
        logits = self._step(code, cache)
        cache.advance(1)
        return logits, cache

    def _step(self, code: torch.Tensor, cache) -> torch.Tensor:
        return self.head(self.decoder(self.token_embed(code)[:, None], cache, step=True)[:, -1])

    def compile_decode_step(self) -> None:
        """Compile the decode step (once per model; a new batch size compiles once more). Every step has the same
        shapes (the cache is preallocated, the position is a tensor), so one graph serves every position."""
        if not self.decoder.compilable_step:
            raise ConfigError(f"compile=true needs a decoder whose decode step keeps its shapes; model.decoder="
                              f"{self.config.decoder!r} grows its cache at every step: sample with compile=false")
        if not self._step_compiled:
            self._step = torch.compile(self._step, dynamic=False)
            self._step_compiled = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (>= 2-D: linear and embedding weights), none on norms and vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_flops_per_token(cfg: GeneratorConfig) -> int:
    """Model FLOPs of one trained token (forward + backward), for MFU: 6 per weight of every matrix product
    (attention and feed-forward projections, the output head; embeddings are lookups) plus 12 x layers x width
    x positions for the attention scores and their weighted sum (PaLM's count; causal masking not discounted)."""
    d, positions = cfg.dim, cfg.prefix_length + cfg.sequence_length - 1
    matmul_weights = decoder_for(cfg).matmul_weights(cfg) + d * cfg.codebook_size
    matmul_weights += conditioning_for(cfg).prefix_matmul_weights(cfg)
    return 6 * matmul_weights + 12 * cfg.depth * d * positions
