"""The differentiable cost model: the schedule (compiler/schedule.py) evaluated on a relaxed, continuous layout.

    feats = costmodel.features(plan_or_program)          # the kernels' static facts, as JAX arrays
    lay = costmodel.layout_of(plan_or_program)           # each kernel's rectangle (or any continuous Layout)
    out = costmodel.predict(feats, lay, spec, tau=0.0)   # samples/s, bottleneck, latency, per-kernel cycles, ...

`predict` is `compiler.schedule.program_figures` in JAX: pure, jittable, vmappable over layouts and over specs
whose figures are arrays, and differentiable in the layout (each kernel's height, width, row, col) and in the spec's
leaves (clock, SIMD widths, bandwidths, latencies). It is not a second model: the partition rule, the cost rules and
the pipeline formulas are the schedule's own, so at tau = 0 on a compiled plan's layout it returns the report's
figures, to float32 rounding (float64 with JAX's x64 mode on).

Relaxations (compiler/relax.py):
  ceil, floor   straight-through: the value is exact, the gradient is that of the identity. With integer heights
                and widths, the figures are the plan's.
  max           of cycles (compute vs SRAM vs communication in a kernel, the pipeline's bottleneck over kernels):
                log-sum-exp at temperature `tau` in cycles, `tau * log(sum(exp(x / tau)))`, an upper bound within
                tau * log(n); `tau = 0` (the default) is the exact max. A positive tau spreads the gradient over the
                near-bottleneck kernels, which is what gradient-based placement needs.
  min           of core counts (tile grids) and the longest route: exact (a gradient almost everywhere); smoothing
                small integers would distort the grid.
  choices       the reduction pattern of each WEIGHT kernel (the cheapest of chain, tree, two-phase) and a matmul's
                loop order (the one with fewer instructions): exact selections; the gradient is the chosen one's.
  fabric terms  wafer/fabric.py's closed forms count rounds and dependent stages with exact ceil / round: piecewise
                constant in a kernel's side (no gradient through the number of tree rounds), linear in the words.
Features come from a plan (or a program's plan, or just a kernel graph): sweeps and searches need no compiled
program. Batches of integer placements at tau = 0 (`compiler.analysis.sweep.evaluate_placements`) are evaluated
through compiler/analysis/tabulated.py: `kernel_figures` tabulated over the batch's sides, then the route terms and
`pipeline_figures` per placement: the same figures as `jax.vmap(predict)`, bit for bit, ~20x faster.
`compact(feats)` drops the instruction-count columns no kernel uses (same figures, several times faster
in batched sweeps).
"""

from __future__ import annotations

import jax.numpy as jnp

from compiler import relax, schedule
from compiler.plan import Plan
from compiler.plan import features as ft
from compiler.schedule import Layout

# The relaxations, under the names the cost model has always offered.
smax, smax2, smin2 = relax.smax, relax.smax2, relax.smin2
st_ceil, st_floor, st_round = relax.ceil, relax.floor, relax.round
Features = ft.Features


def _plan(x) -> Plan:
    return x if isinstance(x, Plan) else x.plan


def features(x) -> ft.Features:
    """The static features of a plan's kernels (a `Plan`, or a compiled program's) as float32 JAX arrays."""
    return _plan(x).features.as_jax()


def compact(feats: ft.Features) -> ft.Features:
    """`Features.compact`: without the instruction-count columns that are zero for every kernel."""
    return feats.compact()


def layout_of(x) -> Layout:
    """The Layout (float32 JAX arrays) of a plan's placement (or a compiled program's)."""
    return _plan(x).layout.as_jax()


def layout_of_placement(placement, names) -> Layout:
    """The Layout of a placement `{kernel name: Rect or (row, col, height, width)}`, kernels in `names` order."""
    return schedule.layout_of(placement, names).as_jax()


def kernel_costs(feats: ft.Features, lay: Layout, spec, tau=0.0) -> dict:
    """Per-kernel figures [n] (`compiler.schedule.kernel_figures`): cores, compute, comm and cycles per batch, SRAM
    bytes per core, ..."""
    return schedule.kernel_figures(feats, lay, spec, tau)


def route_hops(feats: ft.Features, lay: Layout, spec):
    """The longest route, in hops (`compiler.schedule.route_hops`)."""
    return schedule.route_hops(feats, lay, spec)


def predict(feats: ft.Features, lay: Layout, spec, tau=0.0) -> dict:
    """Predicted figures of one call (inference) or one step (training) on `spec`.

    Returns a dict of: per-kernel `cycles_per_sample` [n], `bottleneck_cycles` (per sample), `samples_per_s`,
    `latency_cycles`, `call_cycles` (what the emulator charges its clock for a call or step), `cores` (active),
    `peak_sram_bytes`, `hops`, and `kernel` (the per-kernel dict of `kernel_costs`).
    """
    lay = Layout(*(jnp.asarray(getattr(lay, f)) for f in ("height", "width", "row", "col")))
    out = schedule.program_figures(feats, lay, spec, tau)
    out["call_cycles"] = out["step_cycles"]
    return out
