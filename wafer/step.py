"""Supersteps: compute, then communicate; charging their cost to the state; running many.

A superstep is a set of per-core kernels (each on its region; kernels sharing a core run one after the other
there) and the traffic they exchange. Its cycles are `cost.superstep_cycles(max over cores of compute,
traffic cycles)`. A step function is written brax-style, `fn(state) -> (state, Superstep)`, updating SRAM only;
`step` and `run` charge the counters. Because the cost is fixed by shapes, `run` traces the step once, scans it
over SRAM alone and charges n times the per-step cost in one update, so counters cost nothing per step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from wafer import cost
from wafer.fabric import Traffic
from wafer.kernel import KernelCost
from wafer.state import WaferState


# A static pytree (no leaves): a record can be returned from jit, e.g. `state, record = jit(run)(...)`.
@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Superstep:
    """The cost record of one superstep: kernels (concurrent on their regions) and their traffic."""

    kernels: tuple[KernelCost, ...] = ()
    traffic: Traffic = dataclasses.field(default_factory=Traffic.none)

    def compute_map(self, spec, rows: int | None = None, cols: int | None = None):
        """Compute cycles per core, [rows, cols] (kernels sharing a core add up)."""
        rows = spec.rows if rows is None else rows
        cols = spec.cols if cols is None else cols
        return paint(rows, cols, [(k.rect, k.cycles(spec), k.mask) for k in self.kernels])

    def compute_cycles(self, spec):
        """Cycles of the slowest core's compute."""
        if not self.kernels:
            return 0.0
        if len({k.rect for k in self.kernels}) == len(self.kernels) and not any(
            a.rect.overlaps(b.rect) for i, a in enumerate(self.kernels) for b in self.kernels[i + 1 :]
        ):
            worst = 0.0
            for k in self.kernels:  # disjoint regions: max of per-kernel cycles, no grid-sized map needed
                worst = cost.maximum(worst, k.cycles(spec))
            return worst
        m = self.compute_map(spec)
        return m.max() if isinstance(m, np.ndarray) else jax.numpy.max(m)

    def comm_cycles(self, spec):
        return self.traffic.cycles(spec)

    def link_words(self, rows: int, cols: int) -> np.ndarray:
        """Words sent per core per direction, [4, rows, cols]."""
        return self.traffic.link_words(rows, cols)

    def cycles(self, spec):
        """Cycles of the superstep on `spec`."""
        return cost.superstep_cycles(spec, self.compute_cycles(spec), self.comm_cycles(spec))

    def seconds(self, spec):
        return cost.seconds(spec, self.cycles(spec))

    @property
    def flops(self) -> float:
        """FLOPs of the whole superstep, over all cores."""
        total = 0.0
        for k in self.kernels:
            cores = k.rect.cores if k.mask is None else int(np.count_nonzero(k.mask))
            total += k.flops * cores
        return total

    def __or__(self, other: Superstep) -> Superstep:
        return Superstep(self.kernels + other.kernels, self.traffic | other.traffic)


def paint(rows: int, cols: int, items) -> np.ndarray:
    """A [rows, cols] map of per-core values: `value` on every core of `rect` (where `mask` [h, w] is set, if
    given), summed where rectangles overlap. Values may be JAX tracers (a spec passed through jit or grad); the map
    is then a JAX array.

    Args:
      items: (rect, value, mask or None) triples.
    """
    out = np.zeros((rows, cols))
    for rect, value, mask in items:
        m = np.zeros((rows, cols))
        m[rect.rows, rect.cols] = 1.0 if mask is None else mask
        out = out + value * m
    return out


def superstep(*parts) -> Superstep:
    """Combine KernelCost and Traffic records of one superstep (kernels concurrent, traffic concurrent)."""
    kernels, traffic = [], Traffic.none()
    for p in parts:
        if isinstance(p, KernelCost):
            kernels.append(p)
        elif isinstance(p, Traffic):
            traffic = traffic | p
        elif isinstance(p, Superstep):
            kernels.extend(p.kernels)
            traffic = traffic | p.traffic
        else:
            raise TypeError(f"superstep() takes KernelCost, Traffic or Superstep records, got {type(p).__name__}")
    return Superstep(tuple(kernels), traffic)


def charge(state: WaferState, spec, record, n=1) -> WaferState:
    """Add `n` times a step's cost to the state's counters (one array update per counter).

    `record` is a `Superstep` or any record with the same three methods: `link_words(rows, cols)` (static
    words per core per direction), `compute_map(spec, rows, cols)` (compute cycles per core) and `cycles(spec)`
    (the step's cycles); the compiler's pipeline records are charged this way.
    """
    rows, cols = state.rows, state.cols
    links = record.link_words(rows, cols)
    busy = record.compute_map(spec, rows, cols)
    cycles = record.cycles(spec)
    return state.replace(
        links=state.links + (n * links).astype(np.float32) if links.any() else state.links,
        busy=state.busy + n * busy,
        clock=state.clock + n * cycles,
        steps=state.steps + n,
    )


def step(state: WaferState, spec, fn) -> tuple[WaferState, Superstep]:
    """Run one superstep `fn(state) -> (state, Superstep)` and charge its cost. Returns (state, record)."""
    new_state, record = fn(state)
    _check_record(record)
    return charge(new_state, spec, record), record


def run(state: WaferState, spec, fn, n: int, *, unroll: int = 1) -> tuple[WaferState, Superstep]:
    """Run `n` supersteps of `fn(state) -> (state, Superstep)` with `lax.scan`; charge n x its cost once.

    `fn` must only update SRAM (counters are charged here), and its cost record must not depend on data,
    which holds for anything built from wafer primitives. Returns (state, the per-step record).
    """
    if int(n) != n or n < 0:
        raise ValueError(f"run: n must be a non-negative int, got {n!r}")
    records = []

    def body(sram, _):
        new_state, record = fn(state.replace(sram=sram))
        _check_record(record)
        records.append(record)
        return new_state.sram, None

    sram, _ = jax.lax.scan(body, state.sram, None, length=int(n), unroll=unroll)
    return charge(state.replace(sram=sram), spec, records[0], n), records[0]


def _check_record(record):
    if not isinstance(record, Superstep):
        raise TypeError(
            "a step function must return (state, Superstep); build the record with "
            f"wafer.superstep(kernel_cost, traffic, ...), got {type(record).__name__}"
        )
