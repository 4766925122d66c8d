"""Lowering: a kernel graph, placed and partitioned, becomes an `Executable` that runs on a `WaferState`.

`compile(fn, params, *example_inputs, spec=...)` traces the program, groups it into kernels, places them
(layer-pipelined: one rectangle each), partitions each over its rectangle, routes the activations between them,
lays out SRAM (weight tiles as allocations, activation buffers reserved) and builds the report.

Two execution paths, one answer (DESIGN.md):
  fast      reads every weight from its SRAM tiles, reassembles the leaves and runs the user's own function,
            the way XLA runs best; charges the program's static cost.
  per_core  walks the kernel graph; weight kernels run literally: dense and convolution kernels multicast
            their input chunks along rows, run a vmapped per-core matmul/conv on each core's tile and reduce
            the partial sums along columns with the wafer's fabric primitives; epilogues and weightless kernels
            run on the assembled activations. It checks the partitioning (tiling, padding, reduction
            direction) and the traffic it generates is checked against the static cost record when traced.
Both are jitted and differentiable, and both charge the same record, so counters agree.

Pipeline timing for a batch of B samples (cycles per sample s_i = kernel i's cycles per batch / B):
  B samples stream through the pipeline: time = sum_i s_i + route latency + (B - 1) * max_i s_i.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import wafer
from compiler import partition as part
from compiler import precision
from compiler.graph import build_graph
from compiler.place import KernelDemand, PlacementError, PlacementParams, place, validate_placement
from compiler.report import KernelRow, Report
from compiler.route import route
from compiler.trace import trace
from wafer import cost
from wafer.memory import MemoryMap, Rect


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class PipelineRecord:
    """The static cost of one forward call of a layer-pipelined program (a `wafer.charge` record)."""

    plans: tuple
    routes: object
    batch: int

    def link_words(self, rows: int, cols: int) -> np.ndarray:
        out = self.routes.link_words(rows, cols) * self.batch
        for p in self.plans:
            out += p.traffic.link_words(rows, cols)
        return out

    def compute_map(self, spec, rows: int, cols: int):
        out = np.zeros((rows, cols))
        for p in self.plans:
            mask = np.zeros((rows, cols))
            mask[p.rect.row : p.rect.row + p.grid[0], p.rect.col : p.rect.col + p.grid[1]] = 1.0
            out = out + p.compute_cycles(spec) * mask
        return out

    def sample_cycles(self, spec) -> list:
        return [p.cycles(spec) / self.batch for p in self.plans]

    def cycles(self, spec):
        s = self.sample_cycles(spec)
        worst = functools.reduce(cost.maximum, s, 0.0)
        latency = sum(s) + self.routes.max_hops * spec.hop_latency_cycles
        return latency + (self.batch - 1) * worst


class Executable:
    """A program compiled onto a wafer. See the module docstring and DESIGN.md's public API.

    Attributes:
      spec, graph, traced: the wafer, the kernel graph, the traced program.
      placement: {kernel name: Rect}.
      plans: {kernel name: KernelPlan}.
      routes: activation routes between kernels.
      memory: the SRAM layout (`MemoryMap`) of weights and activation buffers.
      record: the static cost of one call.
      report: the compile report.
      policy: the precision policy (compiler/precision.py); `Policy.FP32` unless compiled with one.
    """

    def __init__(self, traced, graph, spec, placement, plans, routes, memory, *, policy=None):
        self.traced, self.graph, self.spec = traced, graph, spec
        self.policy = precision.Policy.of(policy)
        self.placement = dict(placement)
        self.plans = plans
        self.routes = routes
        self.memory = memory
        self.record = PipelineRecord(tuple(plans.values()), routes, graph_batch(graph))
        self._tilings = {t.index: (f"{p.name}:{t.path}", t) for p in plans.values() for t in p.params}
        self.report = build_report(self)
        self._fast = jax.jit(self._forward_fast, donate_argnums=0)
        self._per_core = jax.jit(self._forward_per_core, donate_argnums=0)

    # ---- state ---------------------------------------------------------------------------------------------

    def load(self, params=None, state: wafer.WaferState | None = None) -> wafer.WaferState:
        """Write the weights into their kernels' SRAM tiles. Returns a new state (a fresh wafer by default).

        `params` defaults to the ones the program was compiled with (for an nnx.Module: its state).
        """
        leaves = self.traced.flatten_params(self.traced.params if params is None else params)
        if state is None:
            state = wafer.init(self.spec)
        state = state.replace(memory=_merge_memory(state.memory, self.memory))
        sram = dict(state.sram)
        for i, leaf in enumerate(leaves):
            name, t = self._tilings[i]
            if self.policy.mixed and _is_float(leaf):
                sram[name] = t.tile_array(self.policy.store(leaf))  # 16-bit storage (cb16: its bit patterns)
            else:
                sram[name] = t.tile_array(jnp.asarray(leaf, t.dtype))
        return state.replace(sram=sram)

    def read_params(self, state: wafer.WaferState):
        """The params, reassembled from their SRAM tiles."""
        leaves = self._read_leaves(state)
        if self.policy.mixed:  # in the caller's dtypes (the traced program holds 16-bit stand-ins)
            leaves = [x.astype(_dtype_of(p)) for x, p in zip(leaves, jax.tree_util.tree_leaves(self.traced.params))]
        return jax.tree_util.tree_unflatten(self.traced.param_treedef, leaves)

    def _read_leaves(self, state):
        out = []
        for i in range(self.traced.n_params):
            name, t = self._tilings[i]
            x = t.untile(state.sram[name])
            if self.policy.mixed and jnp.issubdtype(t.dtype, jnp.floating):  # (cb16 tiles hold uint16 bits)
                # fp16/bf16 as traced (exact); cb16 as float32 on the cb16 grid (float16 only stands in for it)
                x = self.policy.load(x, jnp.float32 if self.policy.storage == "cb16" else t.dtype)
            out.append(x)
        return out

    # ---- running -------------------------------------------------------------------------------------------

    def __call__(self, state: wafer.WaferState, *inputs, path: str = "fast"):
        """Run the forward pass on the emulated wafer: `out, state = exe(state, *inputs)`."""
        self._check_path(path)
        if path == "fast":
            return self._fast(state, *inputs)
        if path == "per_core":
            return self._per_core(state, *inputs)
        raise ValueError(f"path must be 'fast' or 'per_core', got {path!r}")

    def apply(self, state, *inputs, path: str = "fast"):
        """Unjitted forward (for use inside a user's own jit/grad): returns (out, state)."""
        self._check_path(path)
        fwd = self._forward_fast if path == "fast" else self._forward_per_core
        return fwd(state, *inputs)

    def _check_path(self, path):
        if path == "per_core" and self.policy.storage == "cb16":
            raise ValueError(
                "the per-core path runs the compiler's traced program, in which float16 stands in for cb16 (no JAX "
                "dtype holds cb16); use path='fast', which rounds to cb16 exactly"
            )

    def _forward_fast(self, state, *inputs):
        params = jax.tree_util.tree_unflatten(self.traced.param_treedef, self._read_leaves(state))
        out = self.traced.apply(params, *inputs)
        return out, charge_in_box(state, self.spec, self.record)

    def _forward_per_core(self, state, *inputs):
        from compiler.percore import run_per_core

        out, traffic = run_per_core(self, state, inputs)
        expected = sum((p.traffic for p in self.plans.values()), wafer.Traffic.none())
        got, want = (
            traffic.link_words(self.spec.rows, self.spec.cols),
            expected.link_words(self.spec.rows, self.spec.cols),
        )
        if not np.array_equal(got, want):
            raise AssertionError("per-core path traffic differs from the static cost record; this is a compiler bug")
        return out, charge_in_box(state, self.spec, self.record)


def charge_in_box(state: wafer.WaferState, spec, record) -> wafer.WaferState:
    """`wafer.charge(state, spec, record)` (same counters, bit for bit) for a record whose link and compute maps
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


def _dtype_of(x):
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _is_float(x) -> bool:
    return jnp.issubdtype(_dtype_of(x), jnp.floating)


def graph_batch(graph) -> int:
    for k in graph.kernels:
        if k.batch:
            return int(k.batch)
    return 1


def _merge_memory(a: MemoryMap, b: MemoryMap) -> MemoryMap:
    if a.allocations and set(a.names) & set(b.names):
        raise ValueError(f"the state already holds allocations {sorted(set(a.names) & set(b.names))}")
    out = a
    for alloc in b.allocations:
        out = out.allocate(alloc.name, alloc.rect, alloc.shape, alloc.dtype, alloc.offset)
    return out


def demands(
    graph, traced, spec, *, weight_copies: int = 1, act_copies: int = 1, act_itemsize: int | None = None
) -> list[KernelDemand]:
    """What placement needs to know of each kernel: its work on one core, its fewest and most useful cores."""
    out = []
    for k in graph.kernels:
        work = float(cost.kernel_cycles(spec, k.counts, k.in_bytes + k.param_bytes, k.out_bytes))
        lo = part.min_cores(
            k, traced, spec, weight_copies=weight_copies, act_copies=act_copies, act_itemsize=act_itemsize
        )
        out.append(
            KernelDemand(name=k.name, work=max(work, 1.0), min_cores=lo, max_cores=max(lo, part.max_cores(k, traced)))
        )
    return out


def lay_out(
    traced,
    graph,
    spec,
    placement=None,
    placement_params=None,
    *,
    slots=("",),
    act_copies: int = 1,
    act_itemsize: int | None = None,
):
    """Place, partition and route a kernel graph, and lay out its SRAM.

    Args:
      slots: weight-shaped arrays per weight tile, as allocation-name suffixes: "" the weights themselves, names
        starting with "#r" reserved room without data (e.g. "#rgrad" for gradients), others allocations with
        data (e.g. "#opt0" for an optimizer slot).
      act_copies: activation buffers per kernel (2 in training: stream buffer and backward stash).
      act_itemsize: bytes per floating-point activation element in SRAM (2 under a 16-bit precision policy);
        None: as traced.
    Returns:
      (placement {name: Rect}, plans {name: KernelPlan}, Routes, MemoryMap).
    """
    copies = len(slots)
    act = dict(act_copies=act_copies, act_itemsize=act_itemsize)
    ds = demands(graph, traced, spec, weight_copies=copies, **act)
    try:
        if placement is None:
            rects = place(ds, spec, placement_params or PlacementParams())
        else:
            rects = validate_placement(placement, ds, spec)
    except PlacementError as e:
        raise _with_sram_need(e, graph, traced, spec, ds, weight_copies=copies, **act) from None
    plans = {
        k.name: part.plan_kernel(k, rects[k.name], traced, spec, weight_copies=copies, **act) for k in graph.kernels
    }
    routes = route(rects, _flows(graph), spec)
    memory = MemoryMap(spec.rows, spec.cols, spec.sram_bytes_per_core)
    for p in plans.values():
        for t in p.params:
            for slot in slots:
                memory = _alloc(memory, f"{p.name}:{t.path}{slot}", t.rect, t.tile, t.dtype, p.name)
                for n, rect in enumerate(t.replica_reservations()):
                    # room for the other copies of the tile grid: reserved, no data kept
                    memory = _alloc(memory, f"{p.name}:{t.path}{slot}#copies{n}", rect, t.tile, t.dtype, p.name)
        if p.act_bytes:
            rect = Rect(p.rect.row, p.rect.col, *p.grid)
            memory = _alloc(memory, f"{p.name}:activations", rect, (p.act_bytes // 4,), "float32", p.name)
    return rects, plans, routes, memory


def compile(
    fn,
    *args,
    spec: wafer.WaferSpec,
    placement=None,
    placement_params: PlacementParams | None = None,
    policy: precision.Policy | str | None = None,
):
    """Compile `fn(params, *inputs)` (or an `nnx.Module` called on `*inputs`) onto `spec` in layer-pipelined mode.

    Args:
      fn: a JAX-traceable function of (params, *inputs), e.g. a Flax linen `model.apply`; or an nnx.Module.
      *args: `params, *example_inputs` (or just `*example_inputs` for an nnx.Module).
      spec: the wafer.
      placement: optional hand-given placement {kernel name: Rect or (row, col, height, width)}.
      placement_params: knobs of the automatic placement.
      policy: a precision policy (compiler/precision.py): None or "fp32" (float32, the default), or 16-bit
        storage with float32 accumulation ("fp16", "bf16", "cb16" or a `compiler.Policy`). The program runs as
        `apply_policy(fn, policy)`; weights are stored in SRAM in the 16-bit format, activations are counted
        at 2 bytes and matmul FMACs at the mixed SIMD width.
    Returns:
      An `Executable`.
    Raises:
      compiler.UnsupportedOpError: a primitive without a kernel; wafer.SramCapacityError: a kernel does not fit;
      compiler.PlacementError: the kernels do not fit on the wafer, or a bad hand placement.
    """
    policy = precision.Policy.of(policy)
    if policy.mixed:
        traced = precision.trace_policy(fn, *args, policy=policy, stored_params=True)
    else:
        traced = trace(fn, *args)
    graph = build_graph(traced)
    act_itemsize = policy.storage_bytes if policy.mixed else None
    rects, plans, routes, memory = lay_out(traced, graph, spec, placement, placement_params, act_itemsize=act_itemsize)
    return Executable(traced, graph, spec, rects, plans, routes, memory, policy=policy)


def _with_sram_need(err, graph, traced, spec, ds, **copies):
    """`err` with the SRAM bytes behind the core count of the kernel it names, when that kernel needs more than
    one core's SRAM (placement errors speak of cores; the user sized a model in bytes)."""
    d = next((d for d in ds if d.name == err.kernel), None)
    if d is None or d.min_cores <= 1:
        return err
    weights, acts = part.sram_need(graph.kernel(d.name), traced, **copies)
    return PlacementError(
        f"{err.reason} (kernel {d.name!r} keeps {weights:,} bytes of weights and {acts:,} bytes of activations in "
        f"SRAM, {spec.sram_bytes_per_core:,} bytes per core: at least {d.min_cores:,} cores)",
        err.kernel,
    )


def _alloc(memory, name, rect, shape, dtype, kernel):
    try:
        return memory.allocate(name, rect, shape, dtype)
    except wafer.SramCapacityError as e:
        raise wafer.SramCapacityError(
            e.allocation, e.core, e.bytes_needed, e.bytes_free, e.capacity, detail=f"in kernel {kernel!r}"
        ) from None


def _flows(graph):
    """(src, dst, words per sample) of the activations between kernels, host in and out included."""
    batch = graph_batch(graph)
    flows = []
    for src, dst, nbytes in graph.edges:
        flows.append((src, dst, nbytes / 4 / batch))
    first, last = graph.kernels[0], graph.kernels[-1]
    in_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in graph.traced.input_avals)
    out_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in graph.traced.out_avals)
    flows.append(("host", first.name, in_bytes / 4 / batch))
    flows.append((last.name, "host", out_bytes / 4 / batch))
    return flows


def kernel_row(plan, spec, batch: int, source: str, *, flops_factor: float = 1.0, **figures) -> KernelRow:
    """A report row of one kernel plan: its place, SRAM and cost per sample (figures: the mode's own columns)."""
    return KernelRow(
        name=plan.name,
        kind=plan.kind,
        rect=tuple(int(v) for v in plan.rect),
        cores=plan.cores,
        weight_bytes_per_core=plan.weight_bytes,
        act_bytes_per_core=plan.act_bytes,
        flops_per_sample=flops_factor * plan.flops / batch,
        compute_cycles_per_sample=float(plan.compute_cycles(spec)) / batch,
        comm_cycles_per_sample=float(plan.comm_cycles(spec)) / batch,
        source=source,
        **figures,
    )


def build_report(exe: Executable, mode: str = "layer-pipelined inference") -> Report:
    spec, rec = exe.spec, exe.record
    rows = []
    per_sample = rec.sample_cycles(spec)
    kinds = {k.name: k for k in exe.graph.kernels}
    for p, s in zip(rec.plans, per_sample):
        rows.append(kernel_row(p, spec, rec.batch, kinds[p.name].source, cycles_per_sample=float(s)))
    worst = max(rows, key=lambda r: r.cycles_per_sample)
    active = sum(r.cores for r in rows)
    flops = sum(r.flops_per_sample for r in rows)
    policy = getattr(exe, "policy", precision.FP32)
    lanes = spec.simd_width("fmac", policy.dtype_class)  # peak: matmul FMACs at the policy's SIMD width
    util = flops / (active * 2 * lanes * worst.cycles_per_sample) if worst.cycles_per_sample else 0.0
    latency = float(sum(per_sample) + exe.routes.max_hops * spec.hop_latency_cycles)
    link = exe.routes.max_link_words + max(
        (p.traffic.link_words(spec.rows, spec.cols).max() / rec.batch for p in rec.plans if p.traffic.phases),
        default=0.0,
    )
    return Report(
        spec_name=spec.name,
        mode=f"{mode} ({policy})" if policy.mixed else mode,
        batch=rec.batch,
        kernels=tuple(rows),
        bottleneck=worst.name,
        cycles_per_sample=worst.cycles_per_sample,
        samples_per_s=float(spec.clock_hz / worst.cycles_per_sample) if worst.cycles_per_sample else float("inf"),
        latency_cycles=latency,
        latency_s=latency / float(spec.clock_hz),
        active_cores=int(active),
        total_cores=spec.cores,
        compute_utilization=float(min(util, 1.0)),
        peak_sram_bytes_per_core=int(exe.memory.occupancy().max()),
        sram_bytes_per_core=spec.sram_bytes_per_core,
        max_link_words_per_sample=float(link),
        route_hops=int(exe.routes.max_hops),
        clock_hz=float(spec.clock_hz),
        # what bounds the pipeline: its bottleneck kernel's slower side
        bound="fabric" if worst.comm_cycles_per_sample > worst.compute_cycles_per_sample else "compute",
    )
