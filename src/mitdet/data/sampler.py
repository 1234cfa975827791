"""Batch samplers: aspect-ratio grouped and seeded for training (distributed-aware, resumable), ordered for eval.

Training batches yield `(index, epoch)` pairs so the dataset can reseed augmentations from (seed, epoch, index)
even inside persistent DataLoader workers, which never see `set_epoch` on the main process's sampler.
"""
from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np
from torch.utils.data import Sampler

from mitdet.errors import DataError


def aspect_ratio_groups(widths, heights, k: int = 3) -> list[int]:
    """Group id per image from width/height, binned as torchvision's reference does (2k+1 log-spaced edges)."""
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist()
    return [bisect_right(bins, w / h) for w, h in zip(widths, heights, strict=True)]


class GroupedBatchSampler(Sampler):
    """Shuffled per epoch from (seed, epoch), sharded over ranks, batches of one aspect group where possible.

    Every rank gets the same number of batches, `len(self)` (the shard is padded by repeating indices, and the
    leftovers of the groups are batched together), so DDP never waits on a rank with fewer batches.
    `skip_batches` drops the first k batches of epoch `epoch` (a resumed run); later epochs start at 0.
    """

    def __init__(self, group_ids: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, skip_batches: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if not group_ids:
            raise DataError("the training split has no images", where="data/index/train.jsonl",
                            fix="check metrics/index.json and data/index/rejected.csv for why every image was dropped")
        self.group_ids = np.asarray(group_ids)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches, self._skip_epoch = epoch, skip_batches, epoch
        self.per_rank = math.ceil(len(group_ids) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` for this rank, as image indices (no skipping)."""
        n = len(self.group_ids)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        total = self.per_rank * self.world_size
        if total > n:  # pad so every rank has per_rank indices
            perm = np.concatenate([perm, perm[: total - n]])
        shard = perm[self.rank::self.world_size]
        buffers: dict[int, list[int]] = {}
        out = []
        for idx in shard.tolist():
            buf = buffers.setdefault(int(self.group_ids[idx]), [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                out.append(buf[:])
                buf.clear()
        rest = [i for g in sorted(buffers) for i in buffers[g]]
        out.extend(rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size))
        return out

    def __iter__(self):
        epoch = self.epoch
        skip = self.skip_batches if epoch == self._skip_epoch else 0
        for batch in self.batches(epoch)[skip:]:
            yield [(i, epoch) for i in batch]


class OrderedBatchSampler(Sampler):
    """Evaluation: images in index order (the first `limit` when > 0), this rank's share (no duplicates)."""

    def __init__(self, n: int, batch_size: int, limit: int = 0, rank: int = 0, world_size: int = 1):
        indices = list(range(min(n, limit) if limit > 0 else n))
        self.indices = indices[rank::world_size]
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:  # ordered: nothing changes between epochs
        pass

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]
