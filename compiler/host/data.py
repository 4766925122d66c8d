"""The host's input pipeline: deterministic minibatches, prepared and prefetched on a background thread.

On a CS-2 the CPU cluster beside the wafer reads the data set, shuffles it, cuts it into batches and streams them
into the wafer's edge while the wafer trains on the previous batch. Here:

    batches = compiler.Batches.from_arrays(x, y, batch_size=32, seed=0)   # {"x": [32, ...], "y": [32]} per step
    for batch in compiler.prefetch(batches.iterate(start=0, stop=200)):  # on device, 2 batches ahead
        state, metrics = tx.step(state, batch)

`Batches` is random access: batch `i` is a pure function of (seed, i). Each epoch visits the samples in an order
drawn from `numpy.random.default_rng([seed, epoch])`, so a run resumed at step `i` (compiler/host.py) sees exactly
the batches an uninterrupted run would, and the data iterator's position is just the step number.

`fit` reads a `Batches` through grain input workers (compiler/host/pipeline.py: `compiler.Pipeline(batches,
workers=N)`, the same batches in the same order, with worker processes and a checkpointable iterator state);
`Batches` stays the description of the data and its order, and `prefetch` the device-side queue.

The time a batch takes to stream in over the wafer's edge I/O is part of the compiled step's cost
(`tx.record.io_cycles(spec)`, shown in `tx.report` as "batch I/O"); this module is the host side of that stream.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np


class Batches:
    """Minibatches of a data set held in host memory, in a deterministic order.

    Args:
      data: a pytree of arrays sharing their leading (sample) axis, e.g. {"x": [n, ...], "y": [n]}.
      batch_size: samples per batch.
      seed: seed of the epoch shuffles.
      shuffle: draw a new order every epoch (otherwise the data set's order, every epoch).
      drop_remainder: drop the last, partial batch of an epoch, so every batch has `batch_size` samples (a
        compiled step has static shapes); with False the last batch of an epoch is smaller.
    Raises:
      ValueError: leaves with different leading sizes, batch_size < 1, or no full batch to make.
    """

    def __init__(self, data, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True):
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(data)]
        if not leaves:
            raise ValueError("data has no arrays")
        sizes = {x.shape[0] if x.ndim else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"every array in data needs the same leading (sample) axis; got sizes {sorted(sizes)}")
        self.data = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(data), leaves)
        self.n = leaves[0].shape[0]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_remainder and batch_size > self.n:
            raise ValueError(
                f"batch_size {batch_size} is larger than the data set ({self.n} samples): no full batch to make; "
                "use a smaller batch or drop_remainder=False"
            )
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle, self.drop_remainder = bool(shuffle), bool(drop_remainder)

    @classmethod
    def from_arrays(cls, x, y, batch_size: int, **kwargs) -> Batches:
        """Batches {"x": x[i], "y": y[i]} of inputs `x` [n, ...] and targets `y` [n, ...]."""
        return cls({"x": x, "y": y}, batch_size, **kwargs)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_remainder else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of epoch `epoch`, in the order its batches take them."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def indices(self, i: int) -> np.ndarray:
        """The sample indices of batch `i` (counting from 0 over all epochs)."""
        epoch, k = divmod(int(i), self.steps_per_epoch)
        return self.order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def batch(self, i: int):
        """Batch `i`: the data pytree with leaves [batch_size, ...] (numpy, on the host)."""
        return self._take(self.indices(i))

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator:
        """Batches start, start + 1, ... up to (not including) `stop`, or forever when stop is None."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        i, epoch, order = start, None, None
        while stop is None or i < stop:
            e, k = divmod(i, self.steps_per_epoch)
            if e != epoch:  # one permutation per epoch, not per batch
                epoch, order = e, self.order(e)
            yield self._take(order[k * self.batch_size : (k + 1) * self.batch_size])
            i += 1

    def epoch(self) -> Iterator:
        """One pass over the data in its own order (for evaluation): every sample once, remainder kept."""
        for k in range(0, self.n, self.batch_size):
            yield self._take(np.arange(k, min(k + self.batch_size, self.n)))

    def __iter__(self) -> Iterator:
        return self.iterate()

    def describe(self) -> dict:
        """What fixes the order of the batches (saved with checkpoints, checked when a run resumes)."""
        return {
            "samples": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": bool(self.shuffle),
            "drop_remainder": bool(self.drop_remainder),
        }

    def _take(self, idx):
        return jax.tree_util.tree_map(lambda x: x[idx], self.data)


class Prefetcher:
    """An iterator over the items of `iterable`, prepared `size` ahead by a background thread. See `prefetch`."""

    def __init__(self, iterable: Iterable, size: int = 2, *, to_device: bool = True):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        # the thread holds the queue and the stop flag, not self, so a Prefetcher dropped unfinished is collected
        # and its __del__ stops the thread
        self._thread = threading.Thread(
            target=_produce, args=(iter(iterable), self._queue, self._stop, to_device), name="prefetch", daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, item = self._queue.get()
        if kind == "item":
            return item
        self.close()
        if kind == "error":
            raise item
        raise StopIteration

    def close(self):
        """Stop the background thread (it finishes the item it is preparing) and drop what it prepared."""
        self._done = True
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(it: Iterator, q: queue.Queue, stop: threading.Event, to_device: bool):
    try:
        for item in it:
            if stop.is_set():
                return
            if to_device:
                item = jax.device_put(item)
            if not _put(q, stop, ("item", item)):
                return
        _put(q, stop, ("end", None))
    except BaseException as e:  # handed to the consumer, raised there at this item's turn
        _put(q, stop, ("error", e))


def prefetch(iterable: Iterable, size: int = 2, *, to_device: bool = True) -> Prefetcher:
    """Iterate over `iterable` with its items prepared ahead on a background thread.

    A bounded queue holds at most `size` prepared items (plus the one the thread is preparing), so the host runs
    ahead of the training loop by that much and no further. Items keep their order; an exception raised while
    preparing an item is raised by `next` at that item's turn.

    Args:
      iterable: the items (batches), e.g. `Batches.iterate(start)`; it is consumed on the background thread.
      size: how many items to prepare ahead.
      to_device: `jax.device_put` each item on the thread, so the step finds its batch on the device.
    Returns:
      A `Prefetcher`: an iterator, and a context manager whose exit (or `close()`) stops the thread.
    """
    return Prefetcher(iterable, size, to_device=to_device)
