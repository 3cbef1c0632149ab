"""Cross-entropy over a large vocabulary, computed in row chunks.

The logits of a batch of N positions over K codes are N x K floats: 8.6 GB in fp32 for 32 x 256
positions at K = 262,144. Here no more than `chunk_rows` x K of them exist at once, forward or
backward: the forward keeps only each row's log-sum-exp, and the backward recomputes each chunk's
logits from the hidden states and the head weight (one extra GEMM per chunk, the usual price).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_MB = 256.0


def chunk_rows(vocab_size: int, budget_mb: float = DEFAULT_CHUNK_MB) -> int:
    """Rows per chunk so that a chunk's fp32 logits fit in `budget_mb`."""
    return max(1, int(budget_mb * 2**20 // (4 * vocab_size)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits, fp64 kept for fp64 inputs
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        target_logit = torch.empty_like(lse)
        w = weight.to(hidden.dtype)
        for s in range(0, n, rows):
            logits = (hidden[s:s + rows] @ w.T).to(acc)
            lse[s:s + rows] = torch.logsumexp(logits, dim=1)
            target_logit[s:s + rows] = logits.gather(1, targets[s:s + rows, None])[:, 0]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows = rows
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
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
            p[torch.arange(len(h), device=p.device), targets[s:s + rows]] -= 1.0
            p.mul_(scale)
            grad_hidden[s:s + rows] = (p.to(h.dtype) @ w).to(hidden.dtype)
            grad_weight.addmm_(p.T, h.to(p.dtype))
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          rows: int) -> torch.Tensor:
    """mean_i CE(hidden[i] @ weight.T, targets[i]) for hidden (N, d), weight (K, d), targets (N,) int64."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} do not fit (N, d), (K, d), (N,)")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, rows)
