"""Sweeps and what-ifs with the closed-form cost model (compiler/costmodel.py).

`evaluate_placements(feats, layouts, spec)` scores a batch of placements (a `Layout` whose arrays are
[points, kernels], or [kernels, points] with `kernels_first=True`: the fast layout). At temperature 0 on one spec,
placements whose sides are whole numbers go through the side table (compiler/analysis/tabulated.py: each kernel's
figures tabulated over the batch's integer sides by the schedule's own `kernel_figures`, then per placement the
gathers, the schedule's route terms and its pipeline, batched along the points): the same figures as
`costmodel.predict`, many times faster. The rest (tau > 0, non-integer sides, traced features, a defective wafer, a
spec whose leaves are [points] arrays: a hardware point per placement; or a batch with so few placements per
distinct side pair that a table would not pay, e.g. one placement) is `jax.vmap(costmodel.predict)`, jitted, in
chunks that stay in cache (8,192 placements of 24 kernels: ~10 MB of intermediates). A batched spec is not
tabulated per hardware point: sweeps vary a handful of leaves over a handful of placements, where a table per point
costs what it saves.
`placements_per_second` measures how fast the batch path is.

`sweep(model, spec, sizes=..., placement=..., hardware=...)` is the grid search researchers run: every combination
of model size x `PlacementParams` knobs x `WaferSpec` figures, one DataFrame row each. How each axis is handled:
  sizes          outer loop: `model(size)` gives `(fn, params, *inputs)` (params may be ShapeDtypeStructs); the
                 program is traced and grouped into kernels once per size.
  static fields  of WaferSpec (sram_bytes_per_core, rows, cols, ...) fix shapes and the kernels' minimum cores:
                 a Python loop, demands recomputed per value.
  placement      `compiler.place` on the host for every PlacementParams point, the compiler's demands of that
                 hardware point (work depends on SIMD widths and SRAM bandwidth, so a hardware point that changes
                 them is re-placed, as the compiler would; clock, link width and hop latency do not); placements
                 are cached by (params, work).
  hardware leaves (clock_hz, link_bits_per_cycle, hop_latency_cycles, SIMD widths, ...): one batched call per
                 leaf point on its own spec, its placements the batch (`evaluate_placements`: the side table where
                 it pays, else vmap(predict)).
Columns: size (when given), each swept knob, kernels, samples_per_s, bottleneck_cycles, latency_cycles, latency_s,
cores, peak_sram_bytes, placed (compiler.place succeeded), feasible (placed and peak SRAM per core within
capacity), placement_id (key into `df.attrs["placements"]`, {kernel: Rect}). Throughput of unplaced points is NaN.

`what_if(exe)` answers "what would most speed up this model?": d(samples/s)/d(parameter) for every differentiable
hardware figure by autodiff through the cost model at the program's placement, and, for static figures (SRAM per
core by default), a central finite difference over recompiled placements at +-10%. Elasticity = d ln(throughput) /
d ln(parameter): % throughput per % parameter. Rows sorted by |elasticity|.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import wafer
from compiler.analysis import costmodel as cm
from compiler.analysis import tabulated
from compiler.errors import PlacementError
from compiler.plan import Plan, build, demands_pass, graph_pass, partition_pass, place_pass, trace_program
from compiler.plan.place import PlacementParams, place

SPEC_LEAVES = tuple(f.name for f in dataclasses.fields(wafer.WaferSpec) if f.metadata.get("pytree_node", True))
SPEC_STATIC = tuple(
    f.name for f in dataclasses.fields(wafer.WaferSpec) if not f.metadata.get("pytree_node", True) and f.name != "name"
)
PLACEMENT_FIELDS = tuple(f.name for f in dataclasses.fields(PlacementParams))
OUTPUTS = tabulated.OUTPUTS


# ---- batched evaluation ---------------------------------------------------------------------------------------


def _outputs(feats, lay, spec, tau):
    out = cm.predict(feats, lay, spec, tau)
    return {k: out[k] for k in OUTPUTS}


@functools.partial(jax.jit, static_argnames=("tau", "spec_batched"))
def _evaluate_chunk(feats, lays, spec, *, tau, spec_batched):
    """lays (and spec leaves when spec_batched): [chunk, ...] -> outputs [chunk]."""
    if spec_batched:
        return jax.vmap(lambda lo, sp: _outputs(feats, lo, sp, tau))(lays, spec)
    return jax.vmap(lambda lo: _outputs(feats, lo, spec, tau))(lays)


def _is_batched_spec(spec) -> bool:
    return any(np.ndim(leaf) > 0 for leaf in jax.tree_util.tree_leaves(spec))


def stack_specs(specs: Sequence) -> wafer.WaferSpec:
    """One WaferSpec whose leaves are [len(specs)] arrays (the specs must share their static fields)."""
    return jax.tree.map(lambda *x: jnp.asarray(np.asarray(x, np.float32)), *specs)


def stack_layouts(layouts: Sequence[cm.Layout]) -> cm.Layout:
    """One Layout with arrays [len(layouts), kernels]."""
    return cm.Layout(
        *(
            jnp.asarray(np.stack([np.asarray(getattr(lo, f)) for lo in layouts]))
            for f in ("height", "width", "row", "col")
        )
    )


def evaluate_placements(
    feats: cm.Features,
    layouts: cm.Layout,
    spec,
    *,
    tau: float = 0.0,
    chunk: int = 8192,
    kernels_first: bool = False,
) -> dict:
    """Cost-model figures of a batch of placements (module docstring: the side table where it applies, else
    `jax.vmap(costmodel.predict)`; the same figures either way).

    Args:
      feats: `costmodel.features(exe)` (compacted here when concrete).
      layouts: a Layout with arrays [points, kernels] ([kernels, points] with `kernels_first`).
      spec: a WaferSpec for every point, or one whose leaves are [points] arrays (`stack_specs`).
      tau: relaxation temperature (0: exact).
      chunk: placements per jitted call (a multiple of 8; ~8,192 keeps a chunk's intermediates in cache).
      kernels_first: the layout's arrays are [kernels, points] (what the side table reads; no transpose).
    Returns:
      {name: np.ndarray [points]} for samples_per_s, bottleneck_cycles, latency_cycles, cores, peak_sram_bytes.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    concrete = not isinstance(feats.counts, jax.core.Tracer)
    if concrete:  # compacted on the host (NumPy: no op-by-op dispatch)
        feats = cm.compact(jax.tree.map(np.asarray, feats))
    if np.ndim(layouts.height) != 2:
        raise ValueError(f"layouts must have arrays [points, kernels], got shape {np.shape(layouts.height)}")
    batched = _is_batched_spec(spec)
    exact = isinstance(tau, (int, float)) and float(tau) == 0.0
    leaves_concrete = not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(spec))
    perfect = getattr(spec, "defects", None) is None  # a defect map makes kernel figures depend on position
    if exact and concrete and not batched and leaves_concrete and perfect:
        lays = layouts if kernels_first else jax.tree.map(lambda x: np.ascontiguousarray(np.asarray(x).T), layouts)
        out = tabulated.evaluate(feats, lays, spec, chunk=chunk)
        if out is None:  # too few placements per distinct side pair for a table to pay
            return _predict_placements(feats, jax.tree.map(lambda x: np.asarray(x).T, lays), spec, tau=0.0, chunk=chunk)
        rest = np.nonzero(~out.pop("valid"))[0]
        if rest.size:  # sides the table does not hold (not whole numbers): the cost model itself
            sub = jax.tree.map(lambda x: np.asarray(x)[:, rest].T, lays)
            other = _predict_placements(feats, sub, spec, tau=0.0, chunk=chunk)
            for k in OUTPUTS:
                out[k][rest] = other[k]
        return out
    if kernels_first:
        layouts = jax.tree.map(lambda x: np.asarray(x).T, layouts)
    return _predict_placements(feats, layouts, spec, tau=tau, chunk=chunk)


def _predict_placements(feats, layouts, spec, *, tau, chunk) -> dict:
    """`jax.vmap(costmodel.predict)` over layouts [points, kernels], in chunks."""
    lays = jax.tree.map(lambda x: np.asarray(x, np.float32), layouts)
    points = lays.height.shape[0]
    batched = _is_batched_spec(spec)
    if batched:
        spec = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x, np.float32), (points,)), spec)
    else:
        spec = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), spec)
    # One jitted vmapped call per chunk, dispatched asynchronously: measured several times faster on CPU than one
    # call over all points (intermediates [points, kernels] fall out of cache) or a lax.map over chunks.
    chunk = min(chunk, max(8, -(-points // 8) * 8))
    outs = []
    for start in range(0, points, chunk):
        take = functools.partial(_padded, start=start, size=chunk)
        sp = jax.tree.map(take, spec) if batched else spec
        outs.append(_evaluate_chunk(feats, jax.tree.map(take, lays), sp, tau=float(tau), spec_batched=batched))
    outs = jax.device_get(outs)
    return {k: np.concatenate([o[k] for o in outs])[:points] for k in OUTPUTS}


def _padded(x: np.ndarray, start: int, size: int) -> np.ndarray:
    """Rows [start, start + size) of x, the last row repeated past its end (so every chunk has one shape)."""
    x = x[start : start + size]
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def random_layouts(
    n_kernels: int, spec, points: int, *, seed: int = 0, max_side: int = 64, kernels_first: bool = False
) -> cm.Layout:
    """`points` random placements [points, n_kernels] ([n_kernels, points] with `kernels_first`: the same
    placements): sides uniform in [1, max_side], corners inside the grid (not checked for overlaps: a benchmark and
    smoke-test input)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(1, max_side + 1, (points, n_kernels)).astype(np.float32)
    w = rng.integers(1, max_side + 1, (points, n_kernels)).astype(np.float32)
    r = rng.integers(0, max(1, spec.rows - max_side), (points, n_kernels)).astype(np.float32)
    c = rng.integers(0, max(1, spec.cols - max_side), (points, n_kernels)).astype(np.float32)
    arrays = (h, w, r, c)
    if kernels_first:
        arrays = tuple(np.ascontiguousarray(x.T) for x in arrays)
    return cm.Layout(*(jnp.asarray(x) for x in arrays))


def placements_per_second(
    feats: cm.Features, spec, *, points: int = 65536, chunk: int = 8192, repeats: int = 5, seed: int = 0
) -> dict:
    """Throughput of `evaluate_placements` on random placements (integer sides 1-64, [kernels, points]), after
    compilation: the median of `repeats` timed calls, each ended when every placement's figures are on the host.

    The side table (compiler/analysis/tabulated.py) is built in the first call, with the XLA compiles, and cached
    for the program, spec and side range; it is timed again apart (`tabulate_s`), and `placements_per_s_cold`
    charges it to every batch (a batch that needed a table of its own).

    Returns {"placements_per_s", "median_s", "compile_s", "tabulate_s", "placements_per_s_cold", "points",
    "kernels"}.
    """
    lays = random_layouts(feats.n, spec, points, seed=seed, kernels_first=True)
    t0 = time.perf_counter()
    evaluate_placements(feats, lays, spec, chunk=chunk, kernels_first=True)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        evaluate_placements(feats, lays, spec, chunk=chunk, kernels_first=True)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    sides = tabulated.table_sides(*(int(np.max(np.asarray(x))) for x in (lays.height, lays.width)))
    compact = cm.compact(jax.tree.map(np.asarray, feats))
    builds = []
    for _ in range(3):  # compiled in the first call above: this is the table's evaluation
        t0 = time.perf_counter()
        jax.block_until_ready(tabulated.dense_table(compact, spec, *sides).figures)
        builds.append(time.perf_counter() - t0)
    tabulate_s = float(np.median(builds))
    return dict(
        placements_per_s=points / med,
        median_s=med,
        compile_s=compile_s,
        tabulate_s=tabulate_s,
        placements_per_s_cold=points / (med + tabulate_s),
        points=points,
        kernels=feats.n,
    )


# ---- sweeps ---------------------------------------------------------------------------------------------------


def _program(args, spec) -> Plan:
    """The plan of `(fn, params, *inputs)` up to its kernel features and demands on `spec`."""
    return build(trace_program(*args, spec=spec), passes=(graph_pass, demands_pass))


def _grid(axes: Mapping[str, Sequence]) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(list(axes[n]) for n in names))]


def _check_axes(placement, hardware):
    for k in placement:
        if k not in PLACEMENT_FIELDS:
            raise ValueError(f"placement axis {k!r} is not a PlacementParams field; the fields are {PLACEMENT_FIELDS}")
    for k in hardware:
        if k not in SPEC_LEAVES and k not in SPEC_STATIC:
            raise ValueError(
                f"hardware axis {k!r} is not a WaferSpec figure; differentiable (vmapped) figures are {SPEC_LEAVES}, "
                f"static (recompiled) ones {SPEC_STATIC}"
            )
    for name, axes in (("placement", placement), ("hardware", hardware)):
        for k, v in axes.items():
            if isinstance(v, str) or not isinstance(v, Sequence) or len(v) == 0:
                raise ValueError(f"{name} axis {k!r} must be a non-empty list of values, got {v!r}")


def sweep(
    model: Callable | tuple,
    spec: wafer.WaferSpec = wafer.WSE2,
    *,
    sizes: Sequence | None = None,
    placement: Mapping[str, Sequence] | None = None,
    hardware: Mapping[str, Sequence] | None = None,
    base_params: PlacementParams | None = None,
    chunk: int = 8192,
    progress: bool = True,
    path: str | None = None,
):
    """Evaluate every combination of model size x placement knobs x hardware figures with the cost model.

    Args:
      model: `model(size) -> (fn, params, *inputs)` when `sizes` is given, else the tuple `(fn, params, *inputs)`
        itself (params may be `jax.ShapeDtypeStruct`s: nothing is run).
      spec: the base wafer; swept figures replace its fields.
      sizes: model sizes, passed to `model` (any values; shown in the `size` column).
      placement: {PlacementParams field: values}, e.g. {"area_exponent": [0.5, 1.0], "fraction": [0.5, 1.0]}.
      hardware: {WaferSpec field: values}, e.g. {"clock_hz": [0.85e9, 1.1e9], "sram_bytes_per_core": [32768, 49152]}.
      base_params: PlacementParams for the knobs not swept (default PlacementParams()).
      chunk: placements per vmapped chunk.
      progress: show tqdm progress bars.
      path: also save the table: ".parquet" (needs pyarrow) or anything else as CSV.
    Returns:
      A pandas DataFrame, one row per point (module docstring); `df.attrs` holds "placements" {id: {kernel: Rect}},
      "swept" (the swept column names) and "spec" (the base spec's name).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    placement = dict(placement or {})
    hardware = dict(hardware or {})
    _check_axes(placement, hardware)
    leaf_axes = {k: v for k, v in hardware.items() if k in SPEC_LEAVES}
    static_axes = {k: v for k, v in hardware.items() if k in SPEC_STATIC}
    p_points, l_points, s_points = _grid(placement), _grid(leaf_axes), _grid(static_axes)
    size_list = [None] if sizes is None else list(sizes)
    groups = [(sz, st) for sz in size_list for st in s_points]
    rows, placements, pid_of = [], {}, {}
    bar = tqdm(total=len(groups) * len(p_points), desc="place", disable=not progress)
    evaluated = []  # (row indices, feats, layouts, specs)
    programs = {}
    for size, st in groups:
        key = repr(size)
        if key not in programs:
            args = model(size) if sizes is not None else model
            if not isinstance(args, tuple) or len(args) < 2:
                raise TypeError("model must give a tuple (fn, params, *inputs)")
            programs = {key: _program(args, spec)}  # keep one program alive at a time
        base = programs[key]
        feats = cm.compact(cm.features(base))
        names = list(base.names)
        sspec = spec.with_(**st)
        leaf_specs = [sspec.with_(**lp) for lp in l_points]
        # Placement depends on the hardware point only through the kernels' work (SIMD widths, SRAM bandwidth):
        # one placement per distinct work vector.
        works, demand_sets, work_of_leaf = [], [], []
        for ls in leaf_specs:
            ds = demands_pass(base.replace(spec=ls)).demands
            w = tuple(d.work for d in ds)
            if w not in works:
                works.append(w)
                demand_sets.append(ds)
            work_of_leaf.append(works.index(w))
        group_rows, group_lays, group_specs = [], [], []
        for pp in p_points:
            params = dataclasses.replace(base_params or PlacementParams(), **pp)
            rects_by_work = []
            for ds in demand_sets:
                try:
                    rects = place(ds, sspec, params)
                except PlacementError:
                    rects = None
                rects_by_work.append(rects)
            bar.update(1)
            for lp, ls, wi in zip(l_points, leaf_specs, work_of_leaf):
                rects = rects_by_work[wi]
                row = dict(size=size, **st, **pp, **lp, kernels=len(names))
                if rects is None:
                    row.update(placed=False, placement_id=-1)
                else:
                    pkey = (key, tuple(sorted(st.items())), tuple(rects.items()))
                    if pkey not in pid_of:
                        pid_of[pkey] = len(placements)
                        placements[pid_of[pkey]] = rects
                    row.update(placed=True, placement_id=pid_of[pkey])
                    group_rows.append(len(rows))
                    group_lays.append(cm.layout_of_placement(rects, names))
                    group_specs.append(ls)
                row["_sram"] = sspec.data_bytes_per_core
                rows.append(row)
        if group_rows:
            evaluated.append((group_rows, feats, group_lays, group_specs))
    bar.close()
    for k in OUTPUTS:
        for r in rows:
            r[k] = math.nan
    total = sum(len(g[0]) for g in evaluated)
    bar = tqdm(total=total, desc="evaluate", disable=not progress)
    for idx, feats, lays, specs in evaluated:
        # one call per hardware point, on its own spec: integer placements can then go through the side table
        # (evaluate_placements decides whether it pays); the figures are the same either way
        by_spec = {}
        for j, sp in enumerate(specs):
            by_spec.setdefault(id(sp), []).append(j)
        for js in by_spec.values():
            for start in range(0, len(js), 8 * chunk):
                part = js[start : start + 8 * chunk]
                out = evaluate_placements(feats, stack_layouts([lays[j] for j in part]), specs[part[0]], chunk=chunk)
                for o, j in enumerate(part):
                    for k in OUTPUTS:
                        rows[idx[j]][k] = float(out[k][o])
                bar.update(len(part))
    bar.close()
    df = pd.DataFrame(rows)
    if sizes is None:
        df = df.drop(columns=["size"])
    clock = df["clock_hz"] if "clock_hz" in df else float(spec.clock_hz)
    df["latency_s"] = df["latency_cycles"] / clock
    df["feasible"] = df["placed"] & (df["peak_sram_bytes"] <= df["_sram"])
    df = df.drop(columns=["_sram"])
    swept = (["size"] if sizes is not None else []) + list(static_axes) + list(placement) + list(leaf_axes)
    order = swept + [
        "kernels",
        "samples_per_s",
        "bottleneck_cycles",
        "latency_cycles",
        "latency_s",
        "cores",
        "peak_sram_bytes",
        "placed",
        "feasible",
        "placement_id",
    ]
    df = df[order]
    df.attrs["placements"] = placements
    df.attrs["swept"] = swept
    df.attrs["spec"] = spec.name
    if path is not None:
        save_table(df, path)
    return df


def save_table(df, path: str) -> str:
    """Write a sweep table: Parquet for a ".parquet" path (needs pyarrow), CSV otherwise. Returns the path."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if str(path).endswith(".parquet"):
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    return path


def pareto_front(df, x: str = "cores", y: str = "samples_per_s"):
    """Rows not dominated in (smaller x, larger y) among feasible rows, sorted by x."""
    d = df[df["feasible"]].sort_values([x, y], ascending=[True, False])
    best = -math.inf
    keep = []
    for i, v in zip(d.index, d[y]):
        if v > best:
            keep.append(i)
            best = v
    return d.loc[keep]


# ---- what-ifs -------------------------------------------------------------------------------------------------


def what_if(
    exe,
    spec: wafer.WaferSpec | None = None,
    *,
    static: Sequence[str] = ("sram_bytes_per_core",),
    step: float = 0.1,
    placement_params: PlacementParams | None = None,
):
    """What would most speed up this program? Sensitivities of its predicted throughput to the hardware figures.

    Args:
      exe: a compiled program (`compiler.compile` or `compile_train`) or a built `Plan`.
      spec: the hardware point (default the program's own spec; its placement is kept for the derivatives).
      static: static WaferSpec fields to probe by recompiling at (1 +- step) x their value.
      step: relative step of the finite differences.
      placement_params: knobs for the recompiled placements (default PlacementParams()).
    Returns:
      A pandas DataFrame with columns parameter, value, derivative (samples/s per unit of the parameter),
      elasticity (% throughput per % parameter), direction ("increase" or "decrease" speeds it up; "none"),
      samples_per_s (at the given point), method ("autodiff" or "finite difference"), sorted by |elasticity|.
    """
    import pandas as pd

    plan = exe if isinstance(exe, Plan) else exe.plan
    spec = plan.spec if spec is None else spec
    feats = cm.compact(cm.features(plan))
    lay = cm.layout_of(plan)
    for s in static:
        if s not in SPEC_STATIC:
            raise ValueError(f"static what-if {s!r} is not a static WaferSpec field; they are {SPEC_STATIC}")
    thr_fn = lambda sp: cm.predict(feats, lay, sp)["samples_per_s"]
    leaves = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), spec)
    thr, grads = jax.value_and_grad(thr_fn)(leaves)
    thr = float(thr)
    rows = []
    for name in SPEC_LEAVES:
        value = float(getattr(spec, name))
        d = float(getattr(grads, name))
        rows.append(dict(parameter=name, value=value, derivative=d, method="autodiff"))
    params = placement_params or PlacementParams()
    for name in static:
        value = getattr(spec, name)
        pts = {}
        for sign in (-1, 1):
            v = value * (1 + sign * step)
            v = int(round(v / 4) * 4) if name == "sram_bytes_per_core" else int(round(v))
            v = max(v, 4 if name == "sram_bytes_per_core" else 1)
            sp = spec.with_(**{name: v})
            try:
                rects = _replace(plan, sp, params)
            except (PlacementError, wafer.SramCapacityError):
                continue
            lo = cm.layout_of_placement(rects, feats.names)
            pts[v] = float(cm.predict(feats, lo, sp)["samples_per_s"])
        if len(pts) == 2:
            (v0, t0), (v1, t1) = sorted(pts.items())
            d = (t1 - t0) / (v1 - v0)
        elif len(pts) == 1:
            (v1, t1), v0 = next(iter(pts.items())), value
            try:
                rects = _replace(plan, spec, params)
                t0 = float(cm.predict(feats, cm.layout_of_placement(rects, feats.names), spec)["samples_per_s"])
                d = (t1 - t0) / (v1 - v0)
            except (PlacementError, wafer.SramCapacityError):
                d = math.nan
        else:
            d = math.nan
        rows.append(dict(parameter=name, value=float(value), derivative=d, method="finite difference"))
    df = pd.DataFrame(rows)
    df["elasticity"] = df["derivative"] * df["value"] / thr if thr > 0 else math.nan
    df["direction"] = np.where(
        df["elasticity"] > 1e-9, "increase", np.where(df["elasticity"] < -1e-9, "decrease", "none")
    )
    df["samples_per_s"] = thr
    df = df.reindex(df["elasticity"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return df[["parameter", "value", "derivative", "elasticity", "direction", "samples_per_s", "method"]]


def _replace(plan: Plan, spec, params: PlacementParams) -> dict:
    """The plan's kernels placed afresh on `spec` with `params` (and partitioned: SRAM checked). Returns the
    placement; raises PlacementError or wafer.SramCapacityError when they do not fit."""
    new = plan.replace(spec=spec, hand_placement=None, placement_params=params)
    return build(new, passes=(demands_pass, place_pass, partition_pass)).placement
