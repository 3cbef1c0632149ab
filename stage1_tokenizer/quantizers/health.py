"""Codebook health: usage counts over a pass, utilisation, perplexity, dead codes, a usage plot."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from simvq_common.distributed import all_reduce_sum


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a usage distribution given as counts or frequencies: K when all K codes are used
    equally, 1 at collapse, 0 when nothing was counted."""
    counts = torch.as_tensor(counts).double()
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


class CodebookUsage:
    """Counts how often each code is chosen; merge across ranks before reading the statistics."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def update(self, indices: torch.Tensor) -> None:
        flat = indices.reshape(-1).to(self.counts.device)
        self.counts += torch.bincount(flat, minlength=self.codebook_size)

    def merged(self) -> "CodebookUsage":
        """A copy whose counts are summed over all ranks (the counts themselves are left alone)."""
        out = CodebookUsage(self.codebook_size, self.counts.device)
        out.counts = all_reduce_sum(self.counts.clone())
        return out

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def used(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def dead(self) -> int:
        return self.codebook_size - self.used

    @property
    def utilisation(self) -> float:
        """Share of codes used at least once (the paper's 'util')."""
        return self.used / self.codebook_size

    @property
    def perplexity(self) -> float:
        return perplexity(self.counts)

    def summary(self) -> dict:
        return {"codebook_size": self.codebook_size, "tokens": self.total, "used": self.used,
                "dead": self.dead, "utilisation": self.utilisation, "perplexity": self.perplexity}

    def save_plot(self, path: str | Path, title: str = "") -> Path:
        """Rank-frequency plot (codes sorted by use, log-log) with the summary in the title."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        counts = self.counts.cpu().sort(descending=True).values.numpy()
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ranks = range(1, len(counts) + 1)
        ax.fill_between(ranks, counts.clip(min=0.5), 0.5, step="post", alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("uses")
        ax.set_xlim(1, len(counts))
        s = self.summary()
        ax.set_title(f"{title}\nutil {s['utilisation']:.1%}  ppl {s['perplexity']:.0f}  "
                     f"dead {s['dead']:,}/{s['codebook_size']:,}  tokens {s['tokens']:,}", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path
