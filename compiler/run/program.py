"""Programs: what compile returns. Pure functions over a state, and the plan they came from.

As optax's `GradientTransformation` is a pair of pure functions, a `Program` is a value of functions:

    program.init(params=None) -> state             weights (and a training step's optimizer state) into SRAM
    program.step(state, *args) -> (state, out)      jitted, the state donated: a forward call (out: the model's
                                                    output) or a training step (out: metrics, metrics["loss"])
    program.apply(state, *args) -> (state, out)     the same, unjitted (inside a user's own jit or grad)
    program.read_params(state) -> params            the weights, read back from SRAM (or the host store)
    program.plan, program.schedule, program.report  what compile decided, its timing, the compile report

Inference and training programs, pipelined or weight streaming, are the same type, built by different builders
(compiler/run/infer.py, compiler/run/train.py); nothing downstream (the host loop, plots, traces, the CLI) asks
which one it holds beyond `plan.task` and `plan.mode`. An inference program also keeps the public call form
`out, state = exe(state, *inputs)` (`path="per_core"` for the literal per-core path) and `exe.load(params)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np

import wafer
from compiler import schedule as sched


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A compiled wafer program (module docstring).

    Attributes:
      plan: the `compiler.plan.Plan`.
      init: params (default: the ones compiled with) -> state.
      step: (state, *args) -> (state, out), jitted, donating the state.
      apply: the same function, unjitted.
      read_params: state -> params.
      read_opt_state: state -> the optimizer state as `optimizer.init(params)` shapes it (training), or None.
      per_core: (state, *inputs) -> (state, out) on the literal per-core path (inference), or None.
      has_aux: whether a training loss returns (loss, aux) (metrics["aux"]).
    """

    plan: object
    init: Callable
    step: Callable
    apply: Callable
    read_params: Callable
    read_opt_state: Callable | None = None
    per_core: Callable | None = None
    has_aux: bool = False

    # ---- what was decided, and its timing ----

    @functools.cached_property
    def schedule(self) -> sched.Schedule:
        """The schedule of the plan on its spec (compiler/schedule.py)."""
        return sched.of(self.plan)

    @functools.cached_property
    def report(self):
        """The compile report (compiler/views/report.py)."""
        from compiler.views.report import build_report

        return build_report(self.schedule)

    @functools.cached_property
    def record(self) -> sched.Charge:
        """What one call or step charges to the wafer's counters (`wafer.charge` record)."""
        return sched.Charge(self.plan)

    @property
    def spec(self):
        return self.plan.spec

    @property
    def placement(self) -> dict:
        """{kernel name: Rect}."""
        return dict(self.plan.placement)

    @property
    def plans(self) -> dict:
        """{kernel name: KernelPlan}: each kernel's partition."""
        return self.plan.kernels

    @property
    def routes(self):
        return self.plan.routes

    @property
    def memory(self):
        return self.plan.memory

    @property
    def traced(self):
        return self.plan.traced

    @property
    def graph(self):
        return self.plan.graph

    @property
    def policy(self):
        return self.plan.policy

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def task(self) -> str:
        return self.plan.task

    # ---- the inference forms of the public API ----

    def load(self, params=None, state: wafer.WaferState | None = None) -> wafer.WaferState:
        """`init`: write the weights into their SRAM allocations (into `state`, or a fresh wafer)."""
        return self.init(params) if state is None else self.init(params, state)

    def __call__(self, state, *inputs, path: str = "fast"):
        """Run the forward pass on the emulated wafer: `out, state = exe(state, *inputs)` (path "fast" or
        "per_core")."""
        if self.plan.task != "inference":
            raise TypeError("a training program is run with program.step(state, batch), not called")
        if path == "fast":
            state, out = self.step(state, *inputs)
        elif path == "per_core":
            state, out = self.per_core(state, *inputs)
        else:
            raise ValueError(f"path must be 'fast' or 'per_core', got {path!r}")
        return out, state


# ---- charging the counters ----------------------------------------------------------------------------------------


def charge(state: wafer.WaferState, spec, record) -> wafer.WaferState:
    """`wafer.charge(state, spec, record)` (the same counters, bit for bit) for a record whose link and compute maps
    are static NumPy arrays, reading and writing only the bounding box of the cores they charge.

    A compiled program charges its kernels' rectangles and its routes' lanes; adding the whole [4, rows, cols]
    link and [rows, cols] busy maps costs a pass over 15 MB of counters per call on the full WSE-2 grid, about
    as long as the MLP forward of experiments/bench_forward.py itself. An update of one box of the donated
    counters is done in place.
    """
    links = record.link_words(state.rows, state.cols)
    busy = record.compute_map(spec, state.rows, state.cols)
    if not isinstance(busy, np.ndarray):  # traced spec figures: the map is a tracer, charge it whole
        return wafer.charge(state, spec, record)
    return state.replace(
        links=_add_in_box(state.links, links),
        busy=_add_in_box(state.busy, busy),
        clock=state.clock + record.cycles(spec),
        steps=state.steps + 1,
    )


def _add_in_box(counter, delta: np.ndarray):
    """counter + delta (float32), touching only the bounding box of delta's nonzero entries over the last two
    axes (the core grid)."""
    nz = delta != 0
    hit = nz.reshape(-1, *nz.shape[-2:]).any(axis=0)
    if not hit.any():
        return counter
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    lead = (0,) * (delta.ndim - 2)
    box = jax.lax.slice(counter, (*lead, r0, c0), (*delta.shape[:-2], r1, c1))
    box = box + delta[..., r0:r1, c0:c1].astype(np.float32)
    return jax.lax.dynamic_update_slice(counter, box, (*lead, r0, c0))
