"""What a DataLoader needs beyond the dataset: the resumable per-epoch order and the collate of readable items."""
from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler, default_collate

from simvq_common import distributed
from simvq_common.sharding import even_order, rank_share, share_size

from .seeding import derived_rng


class ImageBatch(NamedTuple):
    """A collated batch: unpacks as `images, labels, skipped`."""

    images: torch.Tensor  # float (B, 3, H, W) in [-1, 1]; B may be below the batch size, even 0
    labels: torch.Tensor  # int64 (B,)
    skipped: int  # items of this batch dropped because their file was unreadable


def collate_skip_none(batch: list) -> ImageBatch:
    """Collate (image, label) items, dropping None (unreadable) items and counting them in `skipped`.

    The count travels with the batch, so it is exact whatever the number of DataLoader workers. If every
    item is bad the batch is empty, images (0, 3, 0, 0): with DDP every rank must still take part in the step.
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return ImageBatch(torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = default_collate(kept)  # stacks into shared memory inside workers
    return ImageBatch(images, labels.long(), skipped)


class EpochSampler(Sampler[int]):
    """A deterministic permutation per (seed, epoch), sharded over ranks (simvq_common.sharding), resumable.

    Each rank gets `num_per_rank` indices, the first `num_real` real, the rest padding (evaluators can drop
    it). `start_index` = k yields exactly the tail [k:] of the epoch's list; `set_epoch` resets it to 0.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, start_index: int = 0) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        world_size = distributed.world_size() if world_size is None else world_size
        rank = distributed.rank() if rank is None else rank
        if n < 0 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"bad sampler arguments: n={n}, rank={rank}, world_size={world_size}, seed={seed}")
        self.num_items, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.num_per_rank = share_size(n, world_size, drop_last)
        self.total_size = self.num_per_rank * world_size
        self.num_real = len(range(self.rank, min(n, self.total_size), world_size))
        self.epoch = 0
        self.start_index = start_index

    @property
    def start_index(self) -> int:
        return self._start_index

    @start_index.setter
    def start_index(self, value: int) -> None:
        if not 0 <= int(value) <= self.num_per_rank:
            raise ValueError(f"start_index {value} outside [0, {self.num_per_rank}] (this rank's samples per "
                             f"epoch): resuming with another dataset size, batch size or world size?")
        self._start_index = int(value)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.start_index = start_index

    def _permutation(self) -> np.ndarray:
        if self.shuffle:
            return derived_rng("epoch-permutation", self.seed, self.epoch).permutation(self.num_items)
        return np.arange(self.num_items)

    def epoch_order(self) -> np.ndarray:
        """The global order of this epoch before sharding, padded or truncated to total_size."""
        return even_order(self._permutation(), self.world_size, self.drop_last)

    def rank_indices(self) -> list[int]:
        """This rank's full list for the current epoch, ignoring start_index."""
        return rank_share(self._permutation(), self.world_size, self.rank, self.drop_last).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index:])

    def __len__(self) -> int:
        return self.num_per_rank - self.start_index
