"""Cross-entropy over a large vocabulary within a memory budget for the logits.

The logits of a batch of N positions over K codes are N x K floats: 8.6 GB in fp32 for 32 x 256 positions at
K = 262,144. When they fit the budget (`rows` >= N) the forward turns them in place into the gradient
softmax - onehot and keeps that: the backward is two GEMMs, no more than `F.cross_entropy` does, and no extra
N x K buffer. When they do not, no more than `rows` x K of them exist at once: the forward keeps only each
row's log-sum-exp and the backward recomputes each chunk's logits (one extra GEMM per chunk, the usual price).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_MB = 256.0


def chunk_rows(vocab_size: int, budget_mb: float = DEFAULT_CHUNK_MB) -> int:
    """Rows per chunk so that a chunk's fp32 logits fit in `budget_mb`."""
    return max(1, int(budget_mb * 2**20 // (4 * vocab_size)))


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Turn logits (n, K) into their softmax in place; return each row's log-sum-exp (n,)."""
    peak = logits.amax(dim=1, keepdim=True)
    total = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
    logits.div_(total)
    return (peak + total.log())[:, 0]


def _subtract_onehot_(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probs[torch.arange(len(probs), device=probs.device), targets] -= 1.0
    return probs


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits, fp64 kept for fp64 inputs
        w = weight.to(hidden.dtype)
        ctx.rows, ctx.kept = rows, n <= rows
        if ctx.kept:
            logits = (hidden @ w.T).to(acc)
            target_logit = logits.gather(1, targets[:, None])[:, 0]
            lse = _softmax_(logits)
            # d mean CE / d logits = (softmax - onehot) / n; the 1/n and the upstream gradient scale the GEMMs' outputs
            ctx.save_for_backward(hidden, weight, _subtract_onehot_(logits, targets).to(hidden.dtype))
            return (lse - target_logit).mean()
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for s in range(0, n, rows):
            logits = (hidden[s:s + rows] @ w.T).to(acc)
            target_logit[s:s + rows] = logits.gather(1, targets[s:s + rows, None])[:, 0]
            peak = logits.amax(dim=1, keepdim=True)
            lse[s:s + rows] = (peak + logits.sub_(peak).exp_().sum(dim=1, keepdim=True).log())[:, 0]
        ctx.save_for_backward(hidden, weight, targets, lse)
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.kept:
            hidden, weight, grad_logits = ctx.saved_tensors
            scale = grad_out / hidden.shape[0]
            w = weight.to(hidden.dtype)
            grad_hidden = (grad_logits @ w).mul_(scale.to(hidden.dtype))
            grad_weight = (grad_logits.T @ hidden).to(weight.dtype).mul_(scale.to(weight.dtype))
            return grad_hidden, grad_weight, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        n, rows = hidden.shape[0], ctx.rows
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        scale = grad_out.to(lse.dtype) / n
        for s in range(0, n, rows):
            h = hidden[s:s + rows]
            # d loss / d logits = (softmax - onehot) / n, built in place in the chunk's logits
            p = (h @ w.T).to(lse.dtype).sub_(lse[s:s + rows, None]).exp_()
            p = _subtract_onehot_(p, targets[s:s + rows]).mul_(scale)
            grad_hidden[s:s + rows] = p.to(h.dtype) @ w
            if h.dtype == p.dtype:
                grad_weight.addmm_(p.T, h)
            else:  # a bf16 GEMM (fp32 ones run far below a GPU's bf16 rate), accumulated over chunks in fp32
                grad_weight += p.to(h.dtype).T @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          rows: int) -> torch.Tensor:
    """mean_i CE(hidden[i] @ weight.T, targets[i]) for hidden (N, d), weight (K, d), targets (N,) int64."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} do not fit (N, d), (K, d), (N,)")
    if rows >= len(hidden) and torch.compiler.is_compiling():
        # compiled, the logits that fit are left to inductor, which fuses the log-softmax, the gather and their
        # backward into fewer passes over them than the in-place eager form above (docs/BENCHMARKS.md)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        return F.cross_entropy((hidden @ weight.to(hidden.dtype).T).to(acc), targets)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, rows)
