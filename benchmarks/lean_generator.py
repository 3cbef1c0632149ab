"""The yardstick for the stage-2 training step: a lean plain-PyTorch Llama-style decoder of the generator's
architecture, written for the benchmark (bench_train_step.py) and for nothing else.

Same shapes as `stage2_generator.Generator` with class conditioning: a class-token prefix, token embeddings,
`depth` pre-norm blocks (RMSNorm, attention through `scaled_dot_product_attention` with 2D RoPE on q and k,
SwiGLU), a final RMSNorm and a bias-free head over the K codes, trained with one `F.cross_entropy` over
materialised fp32 logits. `load_generator_weights` copies a Generator's weights in, so a test can show that
both compute the same loss: the benchmark compares implementations of one model, not two models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage2_generator.config import GeneratorConfig
from stage2_generator.decoders.llama import swiglu_hidden
from stage2_generator.model import rotary_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with consecutive feature pairs (x0, x1) sharing an angle: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + swapped * sin


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, hidden = heads, swiglu_hidden(dim)
        self.attn_norm, self.ff_norm = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.up_gate = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, n, d))
        up, gate = self.up_gate(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.down(up * F.silu(gate))


class LeanGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        cfg.check()
        if cfg.conditioning != "class":
            raise ValueError("the lean reference is class-conditioned only")
        d, k = cfg.dim, cfg.codebook_size
        self.classes = nn.Embedding(cfg.num_classes + 1, d)
        self.token_embed = nn.Embedding(k, d)
        self.blocks = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.depth))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, k, bias=False)
        freqs = rotary_frequencies(cfg)  # (n, head_dim)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.classes(labels)[:, None], self.token_embed(codes[:, :-1])], dim=1)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())


@torch.no_grad()
def load_generator_weights(lean: LeanGenerator, generator: nn.Module) -> None:
    """Copy a class-conditioned `Generator`'s weights into `lean`."""
    lean.classes.weight.copy_(generator.condition.classes.weight)
    lean.token_embed.weight.copy_(generator.token_embed.weight)
    lean.head.weight.copy_(generator.head.weight)
    lean.norm.weight.copy_(generator.decoder.norm.weight)
    for block, ours in zip(lean.blocks, generator.decoder.blocks, strict=True):
        for name in ("attn_norm", "ff_norm", "qkv", "out", "up_gate", "down"):
            getattr(block, name).weight.copy_(getattr(ours, name).weight)
