"""The Plan: what compile decides, as one frozen value, built by plain passes `plan -> plan`.

    plan = trace_program(fn, params, *inputs, spec=spec)          # the traced program and the inputs of the passes
    plan = build(plan)                                              # graph, demands, place, partition, route, lay out
    plan.placement, plan.kernels, plan.routes, plan.memory          # what came of it
    compiler.schedule.of(plan)                                      # every timing of it

The passes, in order (`PASSES`), each a function of a plan returning a new one:
  graph_pass      the traced jaxpr grouped into kernels (compiler/frontend/graph.py)
  demands_pass    every kernel's static features (compiler/plan/features.py) and what placement needs of it: its
                  work on one core (the schedule's cycles per sample on a 1 x 1 rectangle, in training its update's
                  share of a step included: `step_share_cycles` / batch), its fewest cores (SRAM) and most useful
                  cores
  place_pass      a rectangle per kernel: the banded floorplan (compiler/plan/place.py) with the plan's
                  PlacementParams, or its hand placement, validated; in weight streaming every kernel in turn on the
                  whole usable wafer
  partition_pass  each kernel's tilings on its rectangle, checked against SRAM (compiler/plan/partition.py)
  route_pass      the streams between rectangles and the host (compiler/plan/route.py); none in weight streaming
  layout_pass     the SRAM allocations of weights, their training slots and activation buffers (a MemoryMap)
Hand placements and PlacementParams are inputs of the plan (`placement_params`, `hand_placement`); so are the task,
the mode, the precision policy, what each core keeps beside its weights (`Storage`) and, in training, the optimizer
whose update every core runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

import wafer
from compiler.errors import PlacementError
from compiler.frontend import precision
from compiler.frontend.graph import build_graph
from compiler.frontend.trace import trace
from compiler.plan import features as ft
from compiler.plan import partition as part
from compiler.plan.place import KernelDemand, PlacementParams, place, usable_region, validate_placement
from compiler.plan.route import KERNEL_COLORS, check_colors, route_with_shares
from wafer.memory import MemoryMap, Rect

TASKS = ("inference", "training")
MODES = ("pipelined", "weight_streaming")


@dataclasses.dataclass(frozen=True)
class Storage:
    """What a kernel's cores keep beside the weights' values.

    Attributes:
      slots: weight-shaped arrays per weight tile, as allocation-name suffixes: "" the weights themselves, and in
        training "#grad" (the gradient's room) and "#opt0", "#opt1", ... (optimizer slots). Every slot takes its
        room in SRAM; the program decides which ones hold data in the state.
      act_copies: activation buffers per kernel (2 in training: the stream buffer and the backward stash).
      act_itemsize: bytes per floating-point activation element (2 under a 16-bit policy); None: as traced.
    """

    slots: tuple[str, ...] = ("",)
    act_copies: int = 1
    act_itemsize: int | None = None

    @property
    def weight_copies(self) -> int:
        return len(self.slots)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What compile decides (module docstring). Inputs first; the passes fill the rest.

    Attributes:
      traced: the traced program (compiler/frontend/trace.py).
      spec: the wafer it is planned for.
      task: "inference" or "training"; mode: "pipelined" (weights resident) or "weight_streaming".
      policy: the precision policy (compiler/frontend/precision.py).
      storage: what every core keeps beside its weights (`Storage`).
      optimizer: the optax transformation of a training step (None in inference).
      placement_params: the knobs of the automatic placement; hand_placement: a given one {kernel: Rect}, or None.
      cluster: a `wafer.ClusterSpec` when several wafers train data-parallel, each running this plan on its share
        of the global batch (the schedule adds the interconnect); None: one wafer.
      graph: the kernel graph (graph_pass).
      features: the kernels' static features; demands: KernelDemands (demands_pass).
      placement: {kernel: Rect} (place_pass).
      kernels: {kernel: KernelPlan} (partition_pass).
      routes: the streams between kernels, or None (route_pass).
      memory: the SRAM layout, a MemoryMap (layout_pass).
    """

    traced: Any
    spec: wafer.WaferSpec
    task: str = "inference"
    mode: str = "pipelined"
    policy: precision.Policy = precision.FP32
    storage: Storage = Storage()
    optimizer: Any = None
    placement_params: PlacementParams = PlacementParams()
    hand_placement: Mapping | None = None
    cluster: Any = None
    graph: Any = None
    features: ft.Features | None = None
    demands: tuple | None = None
    placement: dict | None = None
    kernels: dict | None = None
    routes: Any = None
    memory: MemoryMap | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Plan.task must be one of {TASKS}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"Plan.mode must be one of {MODES}, got {self.mode!r}")

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.graph.kernels)

    @property
    def batch(self) -> int:
        return ft.graph_batch(self.graph)

    @functools.cached_property
    def layout(self):
        """The placement as the schedule's Layout (NumPy)."""
        from compiler.schedule import layout_of

        return layout_of(self.placement, self.names)

    @functools.cached_property
    def weights(self) -> dict[int, tuple[str, part.ParamTiling]]:
        """{flat parameter index: (its SRAM allocation's name, its tiling)} (a shared parameter: its last kernel's)."""
        return {t.index: (f"{p.name}:{t.path}", t) for p in self.kernels.values() for t in p.params}

    @functools.cached_property
    def weight_copies(self) -> dict[int, tuple[tuple[str, part.ParamTiling], ...]]:
        """{flat parameter index: every (allocation name, tiling) holding it, in kernel order}. A parameter read by
        several kernels (tied weights: a module called twice) has a copy in each kernel's SRAM, as each kernel reads
        its weights from its own cores; the programs write every copy and keep them equal (training updates each
        with the gradient summed over all uses). `weights[i]` is the last of them, the one read back."""
        out: dict[int, list] = {}
        for p in self.kernels.values():
            for t in p.params:
                out.setdefault(t.index, []).append((f"{p.name}:{t.path}", t))
        return {i: tuple(v) for i, v in out.items()}


# ---- the passes ---------------------------------------------------------------------------------------------------


def trace_program(
    fn,
    *args,
    spec: wafer.WaferSpec,
    task: str = "inference",
    mode: str = "pipelined",
    policy=None,
    storage: Storage | None = None,
    optimizer=None,
    placement=None,
    placement_params: PlacementParams | None = None,
    batch_axis="auto",
) -> Plan:
    """The first pass: trace `fn(params, *inputs)` (or an nnx.Module on `*inputs`) into a Plan with the passes' inputs.
    `batch_axis` says which axis of each input holds the samples (compiler/frontend/batch.py).

    Under a 16-bit policy, inference traces the weights in the 16-bit format (they are stored so) and training keeps
    float32 master weights; activations are counted at the policy's 2 bytes unless `storage` says otherwise.
    """
    policy = precision.Policy.of(policy)
    traced = trace(fn, *args, policy=policy, stored_params=task == "inference", batch_axis=batch_axis)
    if storage is None:
        storage = Storage(act_itemsize=policy.storage_bytes if policy.mixed else None)
    return Plan(
        traced=traced,
        spec=spec,
        task=task,
        mode=mode,
        policy=policy,
        storage=storage,
        optimizer=optimizer,
        placement_params=placement_params or PlacementParams(),
        hand_placement=None if placement is None else dict(placement),
    )


def graph_pass(plan: Plan) -> Plan:
    """The kernel graph of the traced program."""
    return plan.replace(graph=build_graph(plan.traced))


# Most useful cores: the smallest area whose cycles per sample come within this fraction of the best any area gives
# (more cores than that buy a kernel almost nothing: its per-instruction and per-task costs, its multicasts and
# reductions grow while its share of the work shrinks).
USEFUL_WITHIN = 0.02
# Candidate areas (a geometric grid up to the whole wafer) and aspect ratios (height / width) of the search.
_AREA_STEPS = 48
_ASPECTS = (0.25, 1.0, 4.0)


def per_sample_cycles(task: str, k: dict):
    """A kernel's cycles per batch that the pipeline paces on: the forward (inference), forward and backward
    (training), from `compiler.schedule.kernel_figures`."""
    return k["cycles"] if task == "inference" else k["forward"] + k["backward"]


def step_share_cycles(task: str, k: dict):
    """A kernel's cycles per call or step: what it adds to a step when it is the slowest (`per_sample_cycles`, and
    in training its update: the optimizer and the gradient's sum over its tile grid's copies, once a step)."""
    return per_sample_cycles(task, k) + (0.0 if task == "inference" else k["update"])


def area_scan(feats: ft.Features, spec, *, within: float = USEFUL_WITHIN) -> tuple[np.ndarray, np.ndarray]:
    """(fewest, useful) cores per kernel [n], from the schedule on a geometric grid of areas up to the whole wafer,
    each at the best of a few aspect ratios: fewest, the smallest area on which some aspect's fullest core fits the
    spec's data bytes (the per-core layout: a weight kernel's cores each hold their input chunk; 1 when none does,
    left to the SRAM check to name); useful, the smallest area whose cycles per batch are within `within` of the
    least any feasible area gives (`step_share_cycles`: in training, more copies of a tile grid also cost their
    gradient's sum)."""
    from compiler.schedule import Layout, kernel_figures

    n = feats.n
    areas = np.unique(np.round(np.geomspace(1, spec.rows * spec.cols, _AREA_STEPS)))
    cand = [(a, asp) for a in areas for asp in _ASPECTS]
    h = np.array([float(np.clip(np.round(np.sqrt(a * asp)), 1, spec.rows)) for a, asp in cand])
    w = np.array([float(np.clip(np.ceil(a / hh), 1, spec.cols)) for (a, _), hh in zip(cand, h)])
    idx = np.repeat(np.arange(n), len(cand))
    zeros = np.zeros(len(idx))
    k = kernel_figures(feats.take(idx), Layout(np.tile(h, n), np.tile(w, n), zeros, zeros), spec)
    shape = (n, len(areas), len(_ASPECTS))
    fits = np.asarray(k["sram_bytes"]).reshape(shape) <= spec.data_bytes_per_core
    cycles = np.where(fits, np.asarray(step_share_cycles(feats.task, k)).reshape(shape), np.inf).min(axis=2)
    feasible = np.isfinite(cycles)
    fewest = np.where(feasible.any(axis=1), areas[np.argmax(feasible, axis=1)], 1.0)
    best = cycles.min(axis=1, keepdims=True)
    ok = cycles <= best * (1.0 + within)
    useful = np.where(feasible.any(axis=1), areas[np.argmax(ok, axis=1)], np.inf)
    return fewest, useful


def demands_pass(plan: Plan) -> Plan:
    """The kernels' features, and what placement needs of each: work on one core (cycles per sample: in training its
    forward, backward and the update's share of a step, `step_share_cycles` / batch, so that a kernel whose
    optimizer update outweighs its per-sample work, an embedding table's, is not starved of cores), fewest cores
    (SRAM) and most useful cores (the fewer of the tiles and rows it can split, and `useful_cores`)."""
    from compiler.schedule import Layout, kernel_figures

    st = plan.storage
    stream_itemsize = plan.policy.storage_bytes if plan.policy.mixed else None
    feats = ft.features(
        plan.graph,
        task=plan.task,
        mode=plan.mode,
        act_itemsize=st.act_itemsize,
        weight_copies=st.weight_copies,
        act_copies=st.act_copies,
        optimizer=plan.optimizer,
        stream_itemsize=stream_itemsize,
    )
    n = feats.n
    one = Layout(np.ones(n), np.ones(n), np.zeros(n), np.zeros(n))
    k1 = kernel_figures(feats, one, plan.spec)
    work = np.asarray(step_share_cycles(plan.task, k1)) / float(feats.batch)
    fewest, useful = area_scan(feats, plan.spec) if plan.mode == "pipelined" else (np.ones(n), np.full(n, np.inf))
    traced, copies = plan.traced, dict(weight_copies=st.weight_copies, act_copies=st.act_copies)
    demands = []
    for k, wk, f, u in zip(plan.graph.kernels, work, fewest, useful):
        weights, _ = part.sram_need(k, traced, **copies)
        lo = max(math.ceil(weights / (0.9 * plan.spec.data_bytes_per_core)), int(f), 1)
        hi = min(part.max_cores(k, traced), u)
        demands.append(KernelDemand(name=k.name, work=max(float(wk), 1e-9), min_cores=lo, max_cores=max(lo, int(hi))))
    return plan.replace(features=feats, demands=tuple(demands))


def place_pass(plan: Plan) -> Plan:
    """A rectangle for every kernel: the hand placement (validated) or the banded floorplan; in weight streaming the
    whole usable wafer for each kernel in turn.

    Raises:
      PlacementError: the kernels do not fit, or a bad hand placement (a kernel too large for the wafer is named
        with the bytes it keeps in SRAM).
    """
    if plan.mode == "weight_streaming":
        full = usable_region(plan.spec)
        return plan.replace(placement={k.name: full for k in plan.graph.kernels})
    try:
        if plan.hand_placement is not None:
            rects = validate_placement(plan.hand_placement, plan.demands, plan.spec)
        else:
            rects = place(plan.demands, plan.spec, plan.placement_params)
    except PlacementError as e:
        raise _with_sram_need(e, plan) from None
    return plan.replace(placement=rects)


# Automatic placements re-placed with a kernel's fewest cores raised, when its rectangle's shape overflows a core.
_SRAM_RETRIES = 6


def partition_pass(plan: Plan) -> Plan:
    """Every kernel's tilings on its rectangle. An automatic placement whose rectangle overflows a kernel's cores
    (its fewest cores came from a scan of other shapes) is placed again with that kernel's fewest cores raised by
    the overflow; a hand placement, or one still overflowing after a few tries, raises wafer.SramCapacityError."""
    for attempt in range(_SRAM_RETRIES + 1):
        try:
            return plan.replace(kernels=part.partition(plan.graph, plan.placement, plan.features, plan.spec))
        except wafer.SramCapacityError as e:
            if plan.hand_placement is not None or plan.mode == "weight_streaming" or attempt == _SRAM_RETRIES:
                raise
            rect = plan.placement[e.allocation]
            grow = math.ceil(rect.cores * 1.25 * e.bytes_needed / e.capacity)
            demands = tuple(
                dataclasses.replace(
                    d,
                    min_cores=max(d.min_cores, grow),
                    max_cores=None if d.max_cores is None else max(d.max_cores, grow),
                )
                if d.name == e.allocation
                else d
                for d in plan.demands
            )
            plan = place_pass(plan.replace(demands=demands))
    raise AssertionError("unreachable")


def route_pass(plan: Plan) -> Plan:
    """The activation streams between kernels and the host (none in weight streaming: one layer at a time); the
    links each stream shares with others (`Features.flow_share`), and the colours every router needs, checked
    against the spec's (`compiler.plan.route.check_colors`: a ColorError names the router and its streams)."""
    feats = plan.features
    if plan.mode == "weight_streaming":
        routes = None
    else:
        flows = ft.flows(plan.graph)
        routes, shares = route_with_shares(plan.placement, flows, plan.spec, groups=ft.flow_groups(plan.graph))
        feats = dataclasses.replace(feats, flow_share=shares)
    colors = {}
    for i, (name, kp) in enumerate(plan.kernels.items()):
        if feats.anchor[i] != ft.WEIGHT:
            continue
        c = KERNEL_COLORS["multicast"] + KERNEL_COLORS[kp.reduce_pattern]
        if plan.task == "training":
            c += KERNEL_COLORS["multicast"] + KERNEL_COLORS[kp.backward_pattern] * int(feats.dx[i])
            if any(t.replicas != (1, 1) for t in kp.params):  # the gradient's sum over copies: a chain and back
                c += KERNEL_COLORS["chain"] + KERNEL_COLORS["multicast"]
        colors[name] = c
    check_colors(routes, plan.placement, colors, plan.spec)
    return plan.replace(routes=routes, features=feats)


def layout_pass(plan: Plan) -> Plan:
    """The SRAM layout: per weight one blocked allocation per storage slot (wafer/layout.py: the whole leaf, whose
    per-core view is the tiles; the other copies of a tile grid reserved), and an activation buffer per kernel; in
    weight streaming one buffer for the largest layer, streamed in turn."""
    spec = plan.spec
    memory = MemoryMap(spec.rows, spec.cols, spec.data_bytes_per_core)
    if plan.mode == "weight_streaming":
        biggest = max(plan.kernels.values(), key=lambda p: p.sram_bytes)
        rect = Rect(biggest.rect.row, biggest.rect.col, *biggest.grid)
        return plan.replace(memory=memory.allocate("streamed_layer", rect, (max(1, biggest.sram_bytes // 4),)))
    # Each kernel's allocations on a map of their own, then joined: where no two kernels' allocations share a core
    # (their rectangles are disjoint) that is the map allocating them all in turn gives, without checking every
    # allocation against all before it. Otherwise, or on an error (named as the map in turn names it), in turn.
    try:
        own = [_kernel_allocations(memory, p, plan.storage.slots).allocations for p in plan.kernels.values()]
    except (wafer.SramCapacityError, ValueError):
        own = None
    if own is not None:
        names = [a.name for allocs in own for a in allocs]
        if _disjoint([allocs for allocs in own if allocs]) and len(set(names)) == len(names):
            joined = tuple(a for allocs in own for a in allocs)
            return plan.replace(memory=dataclasses.replace(memory, allocations=joined))
    for p in plan.kernels.values():
        memory = _kernel_allocations(memory, p, plan.storage.slots)
    return plan.replace(memory=memory)


def _kernel_allocations(memory: MemoryMap, p: part.KernelPlan, slots) -> MemoryMap:
    """`memory` with kernel `p`'s allocations added: per weight one blocked allocation per storage slot and the
    reserved room for its tile grid's other copies; its activation buffer."""
    for t in p.params:
        for slot in slots:
            # blocked: the whole leaf, unpadded, so the fast path reads and updates it with no copy
            memory = _alloc(memory, f"{p.name}:{t.path}{slot}", t.rect, t.tile, t.dtype, p.name, t.blocked)
            for n, rect in enumerate(t.replica_reservations()):
                # room for the other copies of the tile grid: reserved, no data kept
                memory = _alloc(memory, f"{p.name}:{t.path}{slot}#copies{n}", rect, t.tile, t.dtype, p.name)
    if p.act_bytes:
        memory = _alloc(memory, f"{p.name}:activations", p.grid_rect, (p.act_bytes // 4,), "float32", p.name)
    return memory


def _disjoint(groups) -> bool:
    """Whether the bounding boxes of the groups' allocation rectangles are pairwise disjoint."""
    box = np.array(
        [
            (
                min(a.rect.row for a in g),
                min(a.rect.col for a in g),
                max(a.rect.row + a.rect.height for a in g),
                max(a.rect.col + a.rect.width for a in g),
            )
            for g in groups
        ],
        np.int64,
    ).reshape(-1, 4)
    r0, c0, r1, c1 = (box[:, i] for i in range(4))
    meet = (r0[:, None] < r1[None, :]) & (r0[None, :] < r1[:, None]) & (c0[:, None] < c1[None, :])
    meet &= c0[None, :] < c1[:, None]
    np.fill_diagonal(meet, False)
    return not meet.any()


PASSES = (graph_pass, demands_pass, place_pass, partition_pass, route_pass, layout_pass)


def with_placement(plan_or_program, placement) -> Plan:
    """The plan (of a `Plan` or a compiled program) laid out on another placement `{kernel: Rect or (row, col,
    height, width)}`: the place (validated as a hand placement), partition, route and layout passes again, without
    re-tracing. `compiler.estimate(with_placement(exe, rects))` is the report a compile with that placement gives,
    streams sharing links included (which a sweep's cost model cannot see), in a fraction of a compile's time.
    """
    plan = plan_or_program if isinstance(plan_or_program, Plan) else plan_or_program.plan
    plan = plan.replace(hand_placement=dict(placement), placement=None, kernels=None, routes=None, memory=None)
    return build(plan, (place_pass, partition_pass, route_pass, layout_pass))


def build(plan: Plan, passes=PASSES) -> Plan:
    """Run the passes in order."""
    for p in passes:
        plan = p(plan)
    return plan


def _alloc(memory, name, rect, shape, dtype, kernel, layout=None):
    try:
        return memory.allocate(name, rect, shape, dtype, layout=layout)
    except wafer.SramCapacityError as e:
        raise wafer.SramCapacityError(
            e.allocation, e.core, e.bytes_needed, e.bytes_free, e.capacity, detail=f"in kernel {kernel!r}"
        ) from None


def _with_sram_need(err: PlacementError, plan: Plan) -> PlacementError:
    """`err` with the SRAM bytes behind the core count of the kernel it names, when that kernel needs more than
    one core's SRAM (placement errors speak of cores; the user sized a model in bytes)."""
    d = next((d for d in plan.demands if d.name == err.kernel), None)
    if d is None or d.min_cores <= 1:
        return err
    st = plan.storage
    weights, acts = part.sram_need(
        plan.graph.kernel(d.name),
        plan.traced,
        weight_copies=st.weight_copies,
        act_copies=st.act_copies,
        act_itemsize=st.act_itemsize,
    )
    return PlacementError(
        f"{err.reason} (kernel {d.name!r} keeps {weights:,} bytes of weights and {acts:,} bytes of activations in "
        f"SRAM, {plan.spec.data_bytes_per_core:,} bytes of data per core: at least {d.min_cores:,} cores)",
        err.kernel,
    )
