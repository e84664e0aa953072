"""The order training reads its rows in: resumable from a few JSON numbers.

`EpochOrder` draws indices of an in-memory dataset, `BucketOrder` those of one with images of several sizes
(batches of one size each); `CacheOrder` streams global batches from the latent cache,
the same batches on any number of data-parallel ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch

from ldm.data.latent_cache import LatentBatch, LatentCache
from ldm.errors import InputError
from ldm.training.distributed import SINGLE_PROCESS, DataParallel


class _ReshuffledEachEpoch(ABC):
    """An order rebuilt each epoch from an order seed drawn from `generator`; its position is three JSON numbers.

    Restoring the generator state and (epoch, position, order_seed) rebuilds the exact remaining order.
    Subclasses build one epoch's order from `order_seed` (`_shuffle`) and say how many units it holds.
    """

    def __init__(self, units_per_epoch: int, generator: torch.Generator):
        self.units_per_epoch, self.generator = units_per_epoch, generator
        # Positioned at the end of an empty epoch -1, so the first draw starts epoch 0.
        self.epoch, self.position, self.order_seed = -1, units_per_epoch, 0
        self.order: Sequence[torch.Tensor] = []

    @abstractmethod
    def _shuffle(self) -> Sequence[torch.Tensor]: ...

    def _take(self, units: int) -> int:
        """Moves on by `units`, into a new epoch when this one has fewer left; returns where they start."""
        if self.position + units > self.units_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self.order_seed = int(torch.randint(2**62, (1,), generator=self.generator))
            self.order = self._shuffle()
        self.position += units
        return self.position - units

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "order_seed": self.order_seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.order_seed = state["epoch"], state["position"], state["order_seed"]
        if self.epoch >= 0:
            self.order = self._shuffle()


class EpochOrder(_ReshuffledEachEpoch):
    """Batches of dataset indices from a new permutation each epoch (position counted in rows)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        if batch_size > size:
            raise InputError(f"the dataset has {size} images, fewer than one batch of {batch_size}; lower batch_size")
        super().__init__(size, generator)
        self.size, self.batch_size = size, batch_size

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.order_seed))

    def next_batch(self) -> list[int]:
        start = self._take(self.batch_size)
        return self.order[start : start + self.batch_size].tolist()


class BucketOrder(_ReshuffledEachEpoch):
    """Batches of dataset indices of one image size each (aspect-ratio buckets; position counted in batches).

    Each epoch: every bucket's indices are permuted and cut into batches (a bucket's last incomplete batch is
    left out of that epoch, a different one each epoch), and the batches of all buckets are shuffled together.
    A bucket's share of the batches is so its share of the images, and a batch never mixes sizes.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, generator: torch.Generator):
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            buckets.setdefault(size, []).append(index)
        self.buckets = [torch.tensor(indices) for indices in buckets.values()]
        if all(len(b) < batch_size for b in self.buckets):
            largest = max(len(b) for b in self.buckets)
            raise InputError(
                f"no image size (bucket) has a batch of {batch_size} images, the largest {largest}; lower batch_size"
            )
        self.batch_size = batch_size
        super().__init__(sum(len(b) // batch_size for b in self.buckets), generator)

    @property
    def batches_per_epoch(self) -> int:
        return self.units_per_epoch

    def _shuffle(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.order_seed)
        batches = []
        for bucket in self.buckets:
            shuffled = bucket[torch.randperm(len(bucket), generator=generator)]
            whole = len(bucket) // self.batch_size * self.batch_size
            batches.extend(shuffled[:whole].split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def next_batch(self) -> list[int]:
        position = self._take(1)  # before reading self.order: taking may start an epoch, with a new order
        return self.order[position].tolist()


def index_order(
    sizes: Sequence[tuple[int, int]], batch_size: int, generator: torch.Generator
) -> EpochOrder | BucketOrder:
    """The order to train on images of these sizes in: EpochOrder when they share one, BucketOrder if not."""
    if len(set(sizes)) == 1:
        return EpochOrder(len(sizes), batch_size, generator)
    return BucketOrder(sizes, batch_size, generator)


def check_lanes(batch_size: int, lanes: int, ranks: DataParallel) -> None:
    """ValueError unless each of `lanes` takes an equal share of a batch and the ranks an equal share of lanes."""
    if batch_size % lanes:
        raise InputError(
            f"batch_size {batch_size} does not split into {lanes} data lanes; make batch_size a multiple of data_lanes"
        )
    if lanes % ranks.world_size:
        raise InputError(
            f"data_lanes {lanes} does not split over {ranks.world_size} ranks; set data_lanes to a multiple of "
            f"{ranks.world_size} (or null: one per rank)"
        )


class CacheOrder:
    """Global batches of the cache's train split, a fresh shuffle per epoch; its position is two JSON numbers.

    The split is read as `lanes` streams of disjoint row groups (`LatentCache.iter_batches` ranks), and a
    batch is batch_size / lanes rows of each, lane after lane. A rank of a data-parallel run reads only its
    own lanes, which are its contiguous share of every batch: the batches, and so the run, are the same on
    any number of ranks that divides `lanes`. Epoch e reads the lanes with seed (data_seed + e), so (epoch,
    batches taken) rebuilds the exact stream; an epoch ends when its shortest lane does.

    A cache of aspect-ratio buckets (several latent shapes) is read as lanes per shape, and each batch is one
    shape's: epoch e's sequence of shapes is a shuffle, seeded by (data_seed + e), of each shape as many times
    as its lanes give batches, so a bucket is drawn in proportion to its rows.
    """

    def __init__(
        self, cache: LatentCache, batch_size: int, data_seed: int, lanes: int = 1,
        ranks: DataParallel = SINGLE_PROCESS,
    ):
        check_lanes(batch_size, lanes, ranks)
        self.cache, self.batch_size, self.data_seed, self.lanes = cache, batch_size, data_seed, lanes
        self.lane_rows = batch_size // lanes
        self.batches_per_shape = {
            shape: min(cache.num_rows("train", lane, lanes, shape) for lane in range(lanes)) // self.lane_rows
            for shape in cache.latent_shapes("train")
        }
        self.batches_per_epoch = sum(self.batches_per_shape.values())
        if self.batches_per_epoch == 0:
            raise InputError(
                f"the cache holds {cache.num_rows('train')} train rows, fewer than one batch of {batch_size} "
                f"(in {lanes} lanes of {self.lane_rows}) of any one latent shape; lower batch_size or data_lanes"
            )
        mine = ranks.share(lanes, "data_lanes")
        self.my_lanes = range(mine.start, mine.stop)
        self.epoch, self.taken = 0, 0
        self._lanes: dict[tuple[int, int, int], list[Iterator[LatentBatch]]] | None = None
        self._shapes: list[tuple[int, int, int]] = []

    def _open(self) -> None:
        seed = self.data_seed + self.epoch
        self._lanes = {
            shape: [
                self.cache.iter_batches(
                    "train", self.lane_rows, rank=lane, world_size=self.lanes, seed=seed, drop_last=True, shape=shape,
                )
                for lane in self.my_lanes
            ]
            for shape, batches in self.batches_per_shape.items() if batches
        }
        shapes = [shape for shape, batches in self.batches_per_shape.items() for _ in range(batches)]
        if len(self._lanes) > 1:
            shapes = [shapes[i] for i in torch.randperm(len(shapes), generator=torch.Generator().manual_seed(seed))]
        self._shapes = shapes

    def next_batch(self) -> LatentBatch:
        """This rank's rows of the next global batch (all of them in a single process)."""
        if self.taken == self.batches_per_epoch:
            self.epoch, self.taken, self._lanes = self.epoch + 1, 0, None
        if self._lanes is None:
            self._open()
            for shape in self._shapes[: self.taken]:
                for lane in self._lanes[shape]:
                    next(lane)
        shape = self._shapes[self.taken]
        self.taken += 1
        return LatentBatch.cat([next(lane) for lane in self._lanes[shape]])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.taken, self._lanes = state["epoch"], state["taken"], None
