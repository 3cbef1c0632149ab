"""What a DataLoader needs beyond the dataset: the resumable per-epoch order (file by file, or tar by tar) and the
collate of readable items."""
from __future__ import annotations

import warnings
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


class ResumableEpochSampler(Sampler[int]):
    """What both samplers share: a list of indices per (epoch, rank), `rank_indices()`, of `num_per_rank` items;
    `start_index` = k yields exactly its tail [k:]; `set_epoch` resets it to 0 (resume sets it after)."""

    num_per_rank: int
    epoch: int = 0

    def rank_indices(self) -> list[int]:
        raise NotImplementedError

    @property
    def start_index(self) -> int:
        return self._start_index

    @start_index.setter
    def start_index(self, value: int) -> None:
        if not 0 <= int(value) <= self.num_per_rank:
            raise ValueError(f"start_index {value} outside [0, {self.num_per_rank}] (this rank's samples in epoch "
                             f"{self.epoch}): resuming with another dataset size, batch size or world size?")
        self._start_index = int(value)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index:])

    def __len__(self) -> int:
        return self.num_per_rank - self.start_index


class EpochSampler(ResumableEpochSampler):
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


class ShardedEpochSampler(ResumableEpochSampler):
    """EpochSampler's interface for tar shards (a dataset with `shard_boundaries`): near-sequential reads.

    Per (seed, epoch) the tars holding samples are permuted and dealt to ranks (rank r takes the permuted tars
    r::world_size); a rank's samples are its tars' samples shuffled within windows of `shards_per_window`
    consecutive tars of its deal. Every rank takes `num_per_rank` samples (the largest deal's), the first
    `num_real` real, the rest its own list wrapped. `start_index` = k yields exactly the tail [k:]; `set_epoch`
    resets it to 0.
    """

    def __init__(self, data_source, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, shards_per_window: int = 4, start_index: int = 0) -> None:
        boundaries = getattr(data_source, "shard_boundaries", data_source)
        self.boundaries = np.asarray(list(boundaries), dtype=np.int64)
        world_size = distributed.world_size() if world_size is None else world_size
        rank = distributed.rank() if rank is None else rank
        counts = np.diff(self.boundaries)
        if len(self.boundaries) < 2 or self.boundaries[0] != 0 or (counts < 0).any():
            raise ValueError(f"shard_boundaries must rise from 0 (cumulative sample counts), got {boundaries}")
        if world_size < 1 or not 0 <= rank < world_size or seed < 0 or shards_per_window < 1:
            raise ValueError(f"bad sampler arguments: rank={rank}, world_size={world_size}, seed={seed}, "
                             f"shards_per_window={shards_per_window}")
        self.shards = np.flatnonzero(counts)  # the tars that hold samples: the ones dealt
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} tars hold samples, fewer than the {world_size} ranks: every rank "
                             f"needs one (repack into smaller tars: write_webdataset's samples_per_tar)")
        self.counts, self.shuffle, self.seed = counts, bool(shuffle), int(seed)
        self.rank, self.world_size, self.shards_per_window = int(rank), int(world_size), int(shards_per_window)
        self.num_items = int(self.boundaries[-1])
        self._plan: tuple[int, list[np.ndarray], list[int]] | None = None
        self.epoch = 0
        self.start_index = start_index

    def _deal(self) -> tuple[list[np.ndarray], list[int]]:
        """This epoch's tars of every rank, in reading order, and each rank's number of real samples."""
        if self._plan is None or self._plan[0] != self.epoch:
            order = self.shards
            if self.shuffle:
                order = order[derived_rng("shard-permutation", self.seed, self.epoch).permutation(len(order))]
            dealt = [order[r::self.world_size] for r in range(self.world_size)]
            self._plan = (self.epoch, dealt, [int(self.counts[tars].sum()) for tars in dealt])
        return self._plan[1], self._plan[2]

    @property
    def num_per_rank(self) -> int:
        """Samples each rank takes this epoch: the largest deal's (deals differ by epoch, so may this)."""
        return max(self._deal()[1])

    @property
    def num_real(self) -> int:
        """This rank's real samples this epoch (before its list wraps around to pad up to num_per_rank)."""
        return self._deal()[1][self.rank]

    @property
    def total_size(self) -> int:
        return self.num_per_rank * self.world_size

    def rank_tars(self) -> list[int]:
        """This rank's tars this epoch, in reading order."""
        return self._deal()[0][self.rank].tolist()

    def rank_indices(self) -> list[int]:
        """This rank's full list for the current epoch, ignoring start_index."""
        tars, parts = self.rank_tars(), []
        for w, first in enumerate(range(0, len(tars), self.shards_per_window)):
            window = np.concatenate([np.arange(self.boundaries[t], self.boundaries[t + 1])
                                     for t in tars[first:first + self.shards_per_window]])
            if self.shuffle:
                window = derived_rng("shard-window", self.seed, self.epoch, self.rank, w).permutation(window)
            parts.append(window)
        return np.resize(np.concatenate(parts), self.num_per_rank).tolist()  # np.resize wraps the list around


def epoch_sampler_for(dataset: Sized, seed: int = 0, rank: int | None = None, world_size: int | None = None, *,
                      shuffle: bool = True) -> EpochSampler | ShardedEpochSampler:
    """The training sampler of `dataset`: ShardedEpochSampler for tar shards (`shard_boundaries` set) with at least
    one tar per rank, else EpochSampler (random access: fine for files, and for tars too few to deal out)."""
    world_size = distributed.world_size() if world_size is None else world_size
    boundaries = getattr(dataset, "shard_boundaries", None)
    if boundaries is not None and int(np.count_nonzero(np.diff(boundaries))) >= world_size:
        return ShardedEpochSampler(dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    if boundaries is not None:
        warnings.warn(f"fewer tars hold samples than the {world_size} ranks: sampling them at random instead of "
                      f"tar by tar (slower reads)", stacklevel=2)
    return EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
