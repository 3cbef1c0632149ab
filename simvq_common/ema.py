"""Exponential moving average of a model's weights: what the tokenizer exports, and the generator with
optim.ema_decay > 0 (docs/RECIPE.md, "Which weights are exported")."""
from __future__ import annotations

import torch


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (0-based): min(decay, (1 + n) / (10 + n)), so that a short run's
    average is not dominated by its random initial weights (0.1 at update 0, 0.9 at update 80)."""
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay x ema + (1 - decay) x model, parameter by parameter (in the EMA's dtype); buffers are copied."""
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)
