"""Batch sampler that keeps every batch inside one aspect bucket (so images in a batch
share a tensor shape), deterministic per (seed, epoch) and resumable mid-epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; all indices in a batch share a bucket.

    Per epoch: indices are shuffled within each bucket, chunked into batches of
    `batch_size` (a bucket's last partial batch is kept unless `drop_last`), and the
    batches of all buckets are shuffled together. The order depends only on
    (seed, epoch), so runs repeat exactly and a resumed run sees the same batches.

    Epochs: a full pass advances to the next epoch automatically; `set_epoch(e)` may
    also be called each epoch (calling it with the current epoch keeps the resume
    position, so `load_state_dict` followed by `set_epoch` is safe).

    Resumption: `state_dict()` records how many batches this rank has yielded in the
    current epoch. A DataLoader with workers pulls batches ahead of the training loop,
    so a checkpoint should store the trainer's count of *consumed* batches as
    "position" rather than trusting the sampler's own counter.

    Distributed: with `num_replicas` > 1 the epoch's global batch list is truncated to
    a multiple of `num_replicas` (so every rank takes the same number of steps and
    collectives stay in lockstep; at most num_replicas-1 batches per epoch are
    skipped, and they differ each epoch), then rank r takes batches r, r+n, r+2n, ...
    All ranks must use the same seed."""

    def __init__(
        self,
        bucket_of: list[tuple[int, int]],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        # Group once; sorted keys so the unshuffled order is stable across runs.
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            groups.setdefault(tuple(bucket), []).append(index)
        self._groups = [groups[key] for key in sorted(groups)]

    def _global_batch_count(self) -> int:
        count = 0
        for members in self._groups:
            full, rest = divmod(len(members), self.batch_size)
            count += full + (1 if rest and not self.drop_last else 0)
        return count

    def __len__(self) -> int:
        """Batches this rank yields per epoch (independent of the epoch)."""
        return self._global_batch_count() // self.num_replicas

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's full batch list for `epoch`."""
        # A string seed hashes deterministically (unlike hash() of a tuple), and keeps
        # (seed, epoch) pairs distinct where seed + epoch would collide.
        rng = random.Random(f"bucket-sampler/{self.seed}/{epoch}")
        batches: list[list[int]] = []
        for members in self._groups:
            order = list(members)
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)

        usable = len(batches) - len(batches) % self.num_replicas
        return batches[:usable][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_for_epoch(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            # Count before yielding: once the consumer has the batch it is "used",
            # even if the loop stops (max_steps) before asking for the next one.
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"invalid sampler state {state}")
        self.epoch = epoch
        # A position past the end (e.g. the dataset shrank) means the epoch is done.
        self.position = min(position, len(self))
