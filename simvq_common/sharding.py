"""One epoch's order shared over ranks, as torch's DistributedSampler does: every rank takes as many items."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class WorkShare(NamedTuple):
    """This process's part of work split over ranks (items rank, rank + world, ...), and how the parts come
    together: `gather(obj)` returns every rank's obj in rank order (a collective: every rank of the group calls
    it). A dataset takes one from its caller and runs no collective of its own choosing."""

    rank: int
    world: int
    gather: Callable[[object], list]


ALONE = WorkShare(0, 1, lambda obj: [obj])  # all the work here, nothing exchanged


def share_size(n: int, world_size: int, drop_last: bool) -> int:
    """Items each rank takes from an epoch of `n`: rounded up (the head repeated as padding) or down (drop_last)."""
    return n // world_size if drop_last else math.ceil(n / world_size)


def even_order(order: np.ndarray, world_size: int, drop_last: bool) -> np.ndarray:
    """`order` padded by repeating its head, or truncated (drop_last), to share_size * world_size items."""
    return np.resize(order, share_size(len(order), world_size, drop_last) * world_size)  # np.resize repeats cyclically


def rank_share(order: np.ndarray, world_size: int, rank: int, drop_last: bool) -> np.ndarray:
    """Rank `rank`'s items of the epoch, in order: positions rank, rank + world_size, ... of the evened order."""
    return even_order(order, world_size, drop_last)[rank::world_size]
