"""The input workers: a `compiler.Batches` read by grain worker processes, prefetched, with a checkpointable position.

A CS-2 trains beside a CPU cluster whose worker nodes run the input function and stream batches into the wafer
while the chief drives the training loop. Here grain (https://github.com/google/grain) plays the worker nodes:

    pipe = compiler.Pipeline(batches, workers=4, prefetch=2)     # batches: a compiler.Batches
    it = pipe.iterator()                                         # batch 0, 1, ... (numpy pytrees)
    batch = next(it); it.get_state()                             # JSON-able: where the stream stands
    pipe.stats(predicted_samples_per_s=tx.report.samples_per_s)  # do the workers keep up with the wafer?

The data set is a random-access source (`ArraySource`: `len` and `source[i]`, grain's data-source protocol), and
the stream is a grain `MapDataset` of batch indices mapped to batches: batch i gathers the samples
`Batches.indices(i)` picks (each epoch shuffled by `numpy.random.default_rng([seed, epoch])`, so the order is a
pure function of the seed, as before) and applies an optional `transform` (the user's input function, numpy in,
numpy out). With `workers=0` grain reads in this process on one thread; with `workers=N` it runs N worker
processes (`IterDataset.mp_prefetch`), worker k preparing batches k, k + N, ..., each `prefetch` ahead, and
interleaves them back in order. Either way the order of the batches is the same.

The iterator's state (grain's, JSON-able) is saved with every training checkpoint (compiler/host/fit.py); a
resumed run restores it with `set_state` and continues with the next batch, bit for bit what an uninterrupted
run sees. A state is tied to the number of workers: a run resumed with another count restarts the stream at the
checkpoint's step instead (the same batches, since `Batches` is random access).

Throughput: each batch carries the seconds its worker took to make it (measured in the worker). The pipeline
keeps up `workers x batch / seconds-per-batch` samples/s (a thread counts as one worker); `stats` compares that
with the wafer's predicted consumption (`tx.report.samples_per_s`) and says how many workers would keep up.
Transfers between processes are not in that figure; the wall time the training loop waited for batches is
(`InputStats.wait_s`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np

from compiler.host.data import Batches

# Batches whose making time the throughput is the median of (the recent ones: a pipeline may warm up or slow down).
_WINDOW = 256
# The stream has no end of its own (fit stops it): grain needs a length, and this many batches is never reached.
_ENDLESS = 1 << 62


class ArraySource:
    """A random-access data source over arrays in host memory (grain's protocol: `len(source)`, `source[i]`).

    Args:
      data: a pytree of arrays sharing their leading (sample) axis.
    """

    def __init__(self, data):
        leaves, self.treedef = jax.tree_util.tree_flatten(data)
        self.leaves = [np.asarray(x) for x in leaves]
        self.n = self.leaves[0].shape[0] if self.leaves else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return jax.tree_util.tree_unflatten(self.treedef, [x[int(i)] for x in self.leaves])

    def take(self, idx):
        """Samples `idx` at once, stacked: the pytree with leaves [len(idx), ...]."""
        return jax.tree_util.tree_unflatten(self.treedef, [x[idx] for x in self.leaves])


class _MakeBatch:
    """Batch index -> (index, batch, seconds it took): what a worker runs (pickled into each worker process)."""

    def __init__(self, batches: Batches, transform: Callable | None):
        self.source = ArraySource(batches.data)
        self.batches = batches
        self.transform = transform

    def __call__(self, i):
        t0 = time.perf_counter()
        batch = self.source.take(self.batches.indices(int(i)))
        if self.transform is not None:
            batch = self.transform(batch)
        return int(i), batch, time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class InputStats:
    """What the input pipeline measured, against what the wafer consumes.

    Attributes:
      workers: worker processes (0: one thread in the training process).
      batch_size: samples per batch.
      batches: batches made so far.
      seconds_per_batch: median seconds a worker took to make a batch (measured in the worker), over the last
        256 batches.
      samples_per_s: what the pipeline keeps up: max(workers, 1) x batch_size / seconds_per_batch.
      predicted_samples_per_s: what the wafer consumes (`tx.report.samples_per_s`), or None.
      wait_s: wall seconds the training loop waited for a batch (after the first).
    """

    workers: int
    batch_size: int
    batches: int
    seconds_per_batch: float
    samples_per_s: float
    predicted_samples_per_s: float | None = None
    wait_s: float = 0.0

    @property
    def input_bound(self) -> bool:
        """The workers make fewer samples per second than the wafer would consume."""
        p = self.predicted_samples_per_s
        return p is not None and self.samples_per_s < p

    @property
    def workers_needed(self) -> int | None:
        """The fewest workers that keep up with the wafer (None without a prediction)."""
        p = self.predicted_samples_per_s
        if p is None or not math.isfinite(self.seconds_per_batch):
            return None
        return max(1, math.ceil(p * self.seconds_per_batch / self.batch_size))

    def summary(self) -> str:
        """One line: the pipeline's throughput, the wafer's, and whether the workers keep up."""
        who = f"{self.workers} worker{'s' if self.workers != 1 else ''}" if self.workers else "1 thread"
        line = (
            f"input pipeline {self.samples_per_s:,.0f} samples/s ({who}, "
            f"{1e3 * self.seconds_per_batch:.3g} ms per batch of {self.batch_size})"
        )
        if self.predicted_samples_per_s is None:
            return line
        line += f" vs wafer {self.predicted_samples_per_s:,.0f} samples/s: "
        if self.input_bound:
            return line + f"input-bound; {self.workers_needed} workers would keep up"
        return line + "keeps up"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "input_bound": self.input_bound, "workers_needed": self.workers_needed}


class Pipeline:
    """The input workers over a `Batches` (module docstring).

    Args:
      batches: the `compiler.Batches` whose order the stream follows.
      workers: grain worker processes (0: read in this process, on one thread).
      prefetch: batches each worker prepares ahead.
      transform: `transform(batch) -> batch` on the numpy batch, run by the workers (picklable when workers > 0).
    Raises:
      ValueError: workers < 0, prefetch < 1, or batches not a `compiler.Batches`.
    """

    def __init__(self, batches: Batches, *, workers: int = 0, prefetch: int = 2, transform: Callable | None = None):
        if not isinstance(batches, Batches):
            raise ValueError(f"Pipeline needs a compiler.Batches, got {type(batches).__name__}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ValueError(f"workers must be an int >= 0 (0: read in this process), got {workers!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        self.batches, self.workers, self.prefetch, self.transform = batches, workers, prefetch, transform
        self._seconds: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._made = 0
        self.wait_s = 0.0

    def dataset(self, start: int = 0) -> grain.IterDataset:
        """The grain dataset of batches start, start + 1, ... as (index, batch, seconds) triples."""
        ds = grain.MapDataset.range(0, _ENDLESS)[start:].map(_MakeBatch(self.batches, self.transform))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch))
        if self.workers:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=1))
        return ds

    def iterator(self, start: int = 0, state: dict | None = None) -> PipelineIterator:
        """Batches from `start` (or from a saved `state`, `PipelineIterator.get_state()`)."""
        if state is not None:
            start = int(state["start"])
        it = PipelineIterator(self, start)
        if state is not None:
            it.set_state(state)
        return it

    def describe(self) -> dict:
        return {**self.batches.describe(), "workers": self.workers}

    def stats(self, predicted_samples_per_s: float | None = None) -> InputStats:
        """What the batches made so far measured (module docstring), against the wafer's consumption."""
        seconds = float(np.median(self._seconds)) if self._seconds else math.nan
        bs = self.batches.batch_size
        rate = max(self.workers, 1) * bs / seconds if seconds > 0 else math.inf
        return InputStats(
            workers=self.workers,
            batch_size=bs,
            batches=self._made,
            seconds_per_batch=seconds,
            samples_per_s=rate,
            predicted_samples_per_s=None if predicted_samples_per_s is None else float(predicted_samples_per_s),
            wait_s=self.wait_s,
        )


class PipelineIterator(Iterator):
    """Batches of a `Pipeline` in order (numpy pytrees), and their position as grain's JSON-able state."""

    def __init__(self, pipeline: Pipeline, start: int):
        self.pipeline, self.start = pipeline, int(start)
        self._it = iter(pipeline.dataset(self.start))
        self.position = self.start  # the index of the next batch

    def __next__(self):
        i, batch, seconds = next(self._it)
        if i != self.position:  # grain hands batches back in order; a wrong state would show here
            raise RuntimeError(f"input pipeline out of order: expected batch {self.position}, got {i}")
        self.pipeline._seconds.append(seconds)
        self.pipeline._made += 1
        self.position += 1
        return batch

    def get_state(self) -> dict:
        """Where the stream stands: {"start", "next", "workers", "grain": grain's iterator state} (JSON-able)."""
        return {
            "start": self.start,
            "next": self.position,
            "workers": self.pipeline.workers,
            "grain": self._it.get_state(),
        }

    def set_state(self, state: dict):
        """Continue from a `get_state()`: grain's own state when the worker count matches, else at its "next"."""
        if int(state["workers"]) == self.pipeline.workers and int(state["start"]) == self.start:
            self._it.set_state(state["grain"])
        else:  # another worker count lays the stream out differently: restart it at the same batch
            self.close()
            self.start = int(state["next"])
            self._it = iter(self.pipeline.dataset(self.start))
        self.position = int(state["next"])

    def close(self):
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _absl_flags_parsed():
    """grain's worker processes read absl flags; a program that never parsed them (any not using absl.app) gets
    UnparsedFlagAccessError. Mark them parsed, with their defaults, as absl.app would."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def stream(pipeline: Pipeline, start: int, stop: int, state: dict | None = None) -> Iterator[tuple[Any, dict]]:
    """(batch on the device, iterator state after it) for batches start .. stop - 1: what `fit` prefetches."""
    it = pipeline.iterator(start, state)
    try:
        for _ in range(start, stop):
            batch = next(it)
            yield jax.device_put(batch), it.get_state()
    finally:
        it.close()
