"""Autoregressive sampling: prefill + KV-cached decode steps, classifier-free guidance, seeds per sample.

Guidance runs the conditional and the null batch together (one doubled batch through the decoder) and
combines their logits before temperature, top-k and top-p:

    l = l_u + s_t (l_c - l_u),   computed as l_c + (s_t - 1)(l_c - l_u) so that s_t = 1 is exactly l_c.

s = 1 is plain conditional sampling (no null batch is run), s = 0 unconditional, s > 1 guided; negative
s is refused. The schedule is `constant` (s_t = s) or `linear` (s_t rises from 1 at the first code to s at
the last). Temperature 0 is argmax (then top-k / top-p change nothing).

Randomness: sample i's draws are uniforms from numpy's generator seeded with (seed, global index i), one per
code position, turned into a code by inverting the filtered distribution's CDF. So a sample's codes depend
on its seed and index, never on the batch it was drawn in or the number of processes.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import SamplingConfig
from .model import Generator


def sample_uniforms(seed: int, indices, length: int) -> torch.Tensor:
    """(len(indices), length) float64 uniforms in [0, 1): row i from the generator of (seed, indices[i])."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, int(i)]).random(length) for i in indices])
                            if len(indices) else np.zeros((0, length)))


def guidance_at(cfg: SamplingConfig, position: int, length: int) -> float:
    if cfg.guidance_schedule == "linear" and length > 1:
        return 1.0 + (cfg.guidance_scale - 1.0) * position / (length - 1)
    return cfg.guidance_scale


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (the most likely code stays)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this code already reaches p
        logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    return logits


def pick_codes(logits: torch.Tensor, uniforms: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """One code per row of logits (B, K): argmax at temperature 0, else the inverse CDF at `uniforms` (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.double() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1])[:, None]
    codes = torch.searchsorted(cdf, target, right=True)[:, 0]
    # u * total can round up to the total: fall back to the last code with probability > 0
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(codes, last)


@torch.no_grad()
def generate(model: Generator, condition, indices, cfg: SamplingConfig, *,
             prefix_codes: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
    """Codes (B, L) for B = len(indices) samples with global indices `indices`.

    condition: class ids (B,), text embeddings (B, text_dim), TextTokens or None (unconditional).
    prefix_codes (B, t): the first t codes are given (an image's top rows) and the rest generated.
    use_cache=False recomputes the whole sequence at every step (the reference the cache is tested and
    benchmarked against).
    """
    conditional = model.condition.conditional
    cfg.check(conditional)
    batch, length = len(indices), model.config.sequence_length
    device = next(model.parameters()).device
    if use_cache and cfg.compile:
        model.compile_decode_step()
    uniforms = sample_uniforms(cfg.seed, indices, length)
    codes = torch.zeros(batch, length, dtype=torch.long, device=device)
    start = 0 if prefix_codes is None else prefix_codes.shape[1]
    if start:
        codes[:, :start] = prefix_codes
    guided = conditional and cfg.guidance_scale != 1.0
    if guided:  # one doubled batch: rows [0, B) conditional, [B, 2B) null
        condition = model.condition.concat(condition, model.condition.null(batch, device))
    rows = 2 * batch if guided else batch

    def run(t: int, cache):
        """Logits of code t and the cache after feeding codes[:, :t]."""
        if cache is None or not use_cache:
            return model.prefill(condition, rows, codes[:, :t].repeat(rows // batch, 1))
        return model.decode_step(codes[:, t - 1].repeat(rows // batch), cache)

    cache = None
    for t in range(start, length):
        logits, cache = run(t, cache)
        if guided:
            cond, null = logits[:batch], logits[batch:]
            logits = cond + (guidance_at(cfg, t, length) - 1.0) * (cond - null)
        codes[:, t] = pick_codes(logits, uniforms[:, t], cfg).to(device)
    return codes
