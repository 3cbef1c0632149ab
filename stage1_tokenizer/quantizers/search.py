"""Exact nearest-code search under a memory budget for the distance matrix.

argmin_k ||z - c_k||^2 = argmin_k (||c_k||^2 - 2 z.c_k): the ||z||^2 term is the same for every
code, so it is dropped. The rest is one GEMM of augmented rows, [-2 z, 1] . [c_k, ||c_k||^2], so no
separate pass over each block adds the norms (that pass cost ~15% of the search on CPU). The
(tokens x codes) distance matrix is never materialised whole: it is
computed in blocks of at most `max_bytes`, the running minimum kept per token, so memory stays
bounded at K = 262,144 or 1M codes. Distances are always fp32, also under bf16 autocast.
"""
from __future__ import annotations

import torch

DEFAULT_MAX_BYTES = 8 * 2**20  # 8 MiB of fp32 distances: fastest on the CPUs measured (docs/BENCHMARKS.md)
TOKEN_BLOCK = 2048
MIN_CODE_BLOCK = 1024


def plan_blocks(num_tokens: int, num_codes: int, max_bytes: int) -> tuple[int, int]:
    """(token block, code block) whose fp32 distance block fits in `max_bytes`.

    Blocks of about 2048 x 1024 distances stay in cache between the GEMM that writes them and
    the min that reads them, which is what makes the search run near the GEMM rate; a smaller
    budget shrinks the token side first so that each GEMM stays at least 1024 codes wide.
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must hold at least one fp32 distance, got {max_bytes}")
    max_elems = max_bytes // 4
    token_block = max(1, min(num_tokens, TOKEN_BLOCK, max_elems // min(num_codes, MIN_CODE_BLOCK)))
    return token_block, min(num_codes, max_elems // token_block)


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, max_bytes: int = DEFAULT_MAX_BYTES,
                 host_sync: bool | None = None) -> torch.Tensor:
    """Index of the nearest row of `codebook` (K, d) for every row of `z` (N, d); int64 (N,).

    host_sync (default: on CPU only) lets the merge of code blocks ask which rows improved, which saves work
    on a CPU; on a GPU that question would stall the stream once per block, so it merges with min + where.
    """
    if host_sync is None:
        host_sync = z.device.type == "cpu"
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, d) and codebook (K, d) with the same d, got {tuple(z.shape)} "
                         f"and {tuple(codebook.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        codebook = codebook.float()
        num_tokens, num_codes = z.shape[0], codebook.shape[0]
        indices = torch.empty(num_tokens, dtype=torch.long, device=z.device)
        if num_tokens == 0:
            return indices
        token_block, code_block = plan_blocks(num_tokens, num_codes, max_bytes)
        ones = torch.ones(num_tokens, 1, device=z.device)
        z_aug = torch.cat([z * -2.0, ones], dim=1)  # exact: scaling by -2 only changes the exponent
        codebook_aug_t = torch.cat([codebook, codebook.square().sum(1, keepdim=True)], dim=1).t()
        buffer = torch.empty(token_block * code_block, device=z.device)  # reused: no allocation per block

        def distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            return torch.mm(rows, columns, out=buffer[:rows.shape[0] * columns.shape[1]].view(rows.shape[0], -1))

        for t0 in range(0, num_tokens, token_block):
            rows = z_aug[t0:t0 + token_block]
            if code_block == num_codes:  # the whole codebook in one block: GEMM + argmin, nothing to merge
                indices[t0:t0 + token_block] = distances(rows, codebook_aug_t).argmin(1)
                continue
            best = torch.full((rows.shape[0],), float("inf"), device=z.device)
            best_index = torch.zeros(rows.shape[0], dtype=torch.long, device=z.device)
            for c0 in range(0, num_codes, code_block):
                dist = distances(rows, codebook_aug_t[:, c0:c0 + code_block])
                if not host_sync:
                    value, index = dist.min(1)  # the first minimum within the block
                    better = value < best  # strict: on a tie the earlier (lower) index wins
                    best_index = torch.where(better, index + c0, best_index)
                    best = torch.where(better, value, best)
                    continue
                # amin is ~20x cheaper than min-with-indices on CPU, and after the first blocks few rows
                # still improve: take the argmin of those rows only
                value = dist.amin(1)
                better = value < best  # strict: on a tie the earlier (lower) index wins
                if better.any():
                    rows_better = better.nonzero().squeeze(1)
                    best_index[rows_better] = dist[rows_better].argmin(1) + c0
                    best = torch.where(better, value, best)
            indices[t0:t0 + token_block] = best_index
    return indices
