"""An endless, resumable stream of training batches.

The sampler makes global batches (batch_size x processes) per epoch; each process takes its
contiguous slice, so N processes with batch b see exactly the samples 1 process with batch N*b
sees. Each batch carries the (epoch, position) after it, which is what a checkpoint records.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch.utils.data import DataLoader, Sampler

from tuner.data.dataset import collate


class KeyBatches(Sampler):
    """Yields lists of dataset keys (index, epoch, position) for this process, forever."""

    def __init__(self, sampler, epoch: int, position: int, rank: int, world: int):
        self.sampler, self.epoch, self.position = sampler, epoch, position
        self.rank, self.world = rank, world

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            batches = self.sampler.batches_for_epoch(epoch)
            while position < len(batches):
                batch = batches[position]
                position += 1
                share = -(-len(batch) // self.world)
                mine = batch[self.rank * share : (self.rank + 1) * share]
                if len(batch) < self.world:
                    continue  # a leftover too small to give every process a sample
                yield [(index, epoch, position) for index in mine]
            epoch, position = epoch + 1, 0


def collate_with_position(groups):
    batch = collate([samples for samples, _ in groups])
    batch["epoch"], batch["position"] = groups[0][1]
    return batch


class KeyedDataset:
    """Wraps TrainDataset so each sample also reports where the stream is."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        index, epoch, position = key
        return self.dataset[key], (epoch, position)


def batch_stream(dataset, sampler, state: dict, accelerator, num_workers: int):
    key_batches = KeyBatches(
        sampler,
        state["epoch"],
        state["position"],
        accelerator.process_index,
        accelerator.num_processes,
    )
    loader = DataLoader(
        KeyedDataset(dataset),
        batch_sampler=key_batches,
        collate_fn=collate_with_position,
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=num_workers > 0,
        # Its own generator: creating the iterator must not draw from the
        # global RNG, or a resumed run's LoRA dropout would drift.
        generator=torch.Generator().manual_seed(sampler.seed),
    )
    if num_workers > 0:
        return iter(loader)  # the workers already load ahead
    from_cache = dataset.plan.latents is not None and dataset.plan.texts is not None
    if accelerator.device.type == "cpu" and from_cache:
        # Cached batches are memory work that cannot overlap a CPU step: a thread competes with
        # it for the cores and the GIL (tiny-z-image: +0.7 ms of CPU a step, where loading the
        # batch in the step costs 0.15 ms). Decoding images does overlap (PIL releases the GIL).
        # Nothing to pin and no workers: the same batches without the DataLoader's per-batch
        # machinery (65 -> 50 us a batch on tiny-flux2, paid inside the step here).
        return in_step_batches(KeyedDataset(dataset), key_batches)
    return Prefetched(iter(loader))


def in_step_batches(keyed, key_batches):
    """What DataLoader(keyed, batch_sampler=key_batches, collate_fn=collate_with_position)
    yields with no workers and no pinning."""
    for keys in key_batches:
        yield collate_with_position([keyed[key] for key in keys])


class Prefetched:
    """Loads the next batches in a thread while the GPU runs the step: without DataLoader
    workers, reading the cached latents and text and stacking them would hold up the launch of
    the next step's kernels. One thread consumes the loader, in order, so the batches and the
    (epoch, position) each carries are exactly the loader's."""

    def __init__(self, batches, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._fill, args=(batches,), name="tuner-batches", daemon=True
        )
        self.thread.start()

    def _fill(self, batches) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(Failed(StopIteration()))
        except BaseException as exc:  # raised again in the training thread, at next()
            self._put(Failed(exc))

    def _put(self, entry) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        entry = self.queue.get()
        if isinstance(entry, Failed):
            raise entry.exc
        return entry

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc
