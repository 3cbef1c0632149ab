"""Training batches of a code cache: a deterministic order per (seed, epoch), sharded over ranks, resumable."""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from simvq_common import distributed
from simvq_common.sharding import even_order, rank_share, share_size

from .cache_format import CacheError
from .cache_reader import CodeBatch, CodeCache


class CacheLoader:
    """Batches of `cache` in this rank's share of each epoch's order (docs/CACHE_FORMAT.md, "Reading it").

    `position` counts this rank's sequences consumed this epoch, so `state_dict()` taken after a batch
    resumes right after it, whatever the batch size then. The last batch of an epoch may be short.
    """

    def __init__(self, cache: CodeCache, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 text: bool = False) -> None:
        world_size = distributed.world_size() if world_size is None else world_size
        rank = distributed.rank() if rank is None else rank
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"bad loader arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"seed={seed}")
        if text and not cache.has_text:
            raise CacheError(f"cache {cache.path} holds no text embeddings (pretokenize with text_embeddings=true)")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.text = rank, world_size, drop_last, text
        self.per_rank = share_size(len(cache), world_size, drop_last)
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if epoch < 0 or not 0 <= position <= self.per_rank:
            raise ValueError(f"epoch {epoch} / position {position} outside [0, {self.per_rank}] (this rank's "
                             f"sequences per epoch)")
        self.epoch, self.position = int(epoch), int(position)

    def _permutation(self) -> np.ndarray:
        n = len(self.cache)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def epoch_order(self) -> np.ndarray:
        """The epoch's global order before sharding, padded or truncated to per_rank * world_size."""
        return even_order(self._permutation(), self.world_size, self.drop_last)

    def rank_indices(self) -> np.ndarray:
        """This rank's sequences for the current epoch, in order, ignoring the position."""
        return rank_share(self._permutation(), self.world_size, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[CodeBatch]:
        indices = self.rank_indices()
        while self.position < len(indices):
            chunk = indices[self.position:self.position + self.batch_size]
            self.position += len(chunk)
            yield self.cache.batch(chunk, text=self.text)

    def __len__(self) -> int:
        """Batches left in this epoch."""
        return math.ceil((self.per_rank - self.position) / self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world_size, "drop_last": self.drop_last, "sequences": len(self.cache),
                "cache": self.cache.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differences = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in
                       ("seed", "shuffle", "world_size", "drop_last", "sequences", "cache") if state.get(k) != mine[k]]
        if differences:
            raise CacheError("the loader state belongs to another cache or setup: " + "; ".join(differences))
        self.set_epoch(state["epoch"], state["position"])
