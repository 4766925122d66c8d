"""The schedule: every timing the project reports, from a plan's kernels and their rectangles, written once.

    sched = compiler.schedule.of(plan)            # a Plan (or a compiled program's plan) on its own spec
    sched = compiler.schedule.of(plan, other)     # the same layout on another spec's figures
    sched.samples_per_s, sched.step_cycles, sched.kernel("dense_0"), sched.compute_map(), sched.events(steps=2)

Its inputs are the plan's `Features` (compiler/plan/features.py: the static facts of every kernel) and a `Layout`
(each kernel's rectangle), and the spec. `kernel_figures` partitions every kernel on its rectangle with the one
partition rule (`compiler.plan.partition.kernel_shape`) and charges what each core then does with the machine's
cost rules (wafer/cost.py); `program_figures` composes kernels into a pipeline. Everything here is arithmetic of
compiler/relax.py, so the same functions run

  on a compiled plan's integer layout, in NumPy float64: the figures the report prints, the emulator charges to its
    clock and counters, plots and the Perfetto trace draw (`Schedule`, `Charge`);
  on a relaxed (continuous) layout in JAX: the differentiable cost model (compiler/analysis/costmodel.py) that
    sweeps, gradient placement and what-ifs evaluate; at temperature 0 on a plan's own layout it returns these
    figures, to float rounding.

Per kernel (cycles per call's batch, of its busiest core; wafer/cost.py's rates):
  compute   the per-core counts of its program (`partition.per_core_counts`: elements divided over its cores,
            every operation issued once per sample the core holds, a task per sample) x `cost.unit_cycles`, plus a
            WEIGHT anchor's matmul on the core's tiles per sample (`matmul_cycles`: wafer/kernel.py's loop rule) and
            the adds of its reduction; a scan kernel's: the adds of its weight dots' chained reductions, every
            iteration (`scan_adds`, the same rule);
  comm      a WEIGHT kernel's multicast of input chunks along its rows and the reduction of its partial sums down
            its columns, in the cheapest of `PATTERNS` for its shape (`reduction`: wafer/fabric.py's closed forms);
            a scan kernel's: every iteration's multicast and chained reduction of each weight dot of its body on
            that weight's tile grid (`partition.scan_runs`), one after another;
  cycles    max(compute, comm) when the spec overlaps them, else their sum.
Training adds each kernel's backward (counted from its VJP's jaxpr; the anchor's weight and input cotangents on the
tiles; the output cotangent multicast up the columns, the input cotangent's partials reduced along the rows; a scan
kernel's: the same two for each weight dot of its body on that weight's tile grid, every iteration, and the adds
of the input cotangent's chained reduction, `scan_bwd_adds`, as compute) and its
update (the optimizer on every core's tiles, after the weight gradient's sum over the tile grid's copies).

Pipelines (B samples per call, kernel i costing s_i cycles per sample, L the longest route's hops x hop latency):
  inference            a call: io + sum_i s_i + L + (B - 1) pace, pace = the slowest of the kernels' s_i, the busiest
                       stream (`stream_cycles`: words / lanes x share per sample) and the edge I/O per sample (inputs
                       in and outputs out at once); throughput clock / pace.
  pipelined training   forward and backward stream through the kernels: sum_i (f_i + b_i) / B + 2 L + (B - 1) pace
                       (the kernels' (f_i + b_i) / B and the busiest stream), then the gradients of tied weights are
                       summed between their copies (+ `tied_cycles`: to the copy read back, added, and back), then
                       every kernel updates its weights at once (+ max_i u_i); the batch streams in over the edge I/O
                       meanwhile, and the slower of the two bounds a step.
  weight streaming     layer by layer on the whole wafer: per kernel max(f_i, weights in) forward and
                       max(b_i + gradient sum, weights in again + gradients out) backward; the optimizer runs on the
                       host.
Several wafers (a `wafer.ClusterSpec` of N, training; wafer/cluster.py has the interconnect's closed forms): every
wafer runs the plan on its B samples of an N x B global batch at once, so a step takes the plan's time plus
  pipelined            the gradients' all-reduce between the wafers (SwarmX: up the tree and back, S = the
                       gradients' bytes) after the last backward and before the update: + 2 levels latency + S / bw;
  weight streaming     weights broadcast to, and gradients reduced from, every wafer through SwarmX: each kernel's
                       weights in (and gradients out) at the slower of the interconnect and the edge I/O, plus the
                       tree's levels of latency;
and samples/s = clock x N x B / step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compiler import relax
from compiler.plan import features as ft
from compiler.plan.partition import kernel_shape, update_counts
from compiler.plan.route import flow_hops, flow_lane_count, flow_physical_hops, host_hops, host_physical_hops, route
from wafer import cluster as wcluster
from wafer import cost, defects, fabric
from wafer import kernel as wkernel
from wafer.step import paint

# ---- the layout ---------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    """Each kernel's rectangle, arrays over kernels [n]: height and width in cores, top-left (row, col). Continuous
    in the cost model; a plan's placement gives integers (`layout_of`)."""

    height: jax.Array
    width: jax.Array
    row: jax.Array
    col: jax.Array

    @property
    def area(self):
        return self.height * self.width

    @staticmethod
    def from_area_aspect(area, aspect, row, col) -> Layout:
        """Rectangles of `area` cores and height/width ratio `aspect`."""
        h = jnp.sqrt(area * aspect)
        return Layout(h, area / h, row, col)

    def as_jax(self, dtype=jnp.float32) -> Layout:
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), self)


def layout_of(placement, names) -> Layout:
    """The Layout (NumPy float64) of a placement `{kernel name: Rect or (row, col, height, width)}` in `names` order."""
    rects = np.asarray([tuple(placement[n]) for n in names], np.float64).reshape(-1, 4)
    return Layout(height=rects[:, 2], width=rects[:, 3], row=rects[:, 0], col=rects[:, 1])


# ---- kernels --------------------------------------------------------------------------------------------------------

# The reduction patterns a WEIGHT kernel may sum its partial results with (wafer/fabric.py); the schedule picks the
# cheapest for each kernel's shape (a star's root takes every partial in, never the cheapest of these on a line).
PATTERNS = ("chain", "tree", "two_phase")


def _smooth_max(tau):
    return functools.partial(relax.smax2, tau=tau)


def _by_class(classes, fn):
    """fn(dtype class) per kernel, [n] (or [n, ...]: a kernel's row of per-parameter figures): each kernel's own
    static class (`Features.fmac_class`, `acc_class`)."""
    kinds = sorted(set(classes))
    if len(kinds) <= 1:
        return fn(kinds[0] if kinds else "fp32")
    out = 0.0
    for c in kinds:
        v = fn(c)
        mask = np.array([x == c for x in classes])
        out = out + relax.where(mask.reshape(mask.shape + (1,) * (np.ndim(v) - 1)), v, 0.0)
    return out


def matmul_cycles(spec, classes, p, c, d, lhs_isz, rhs_isz, acc_isz, maximum=cost.maximum):
    """Cycles of a core's matmul out[p, c] += lhs[p, d] rhs[d, c] ([n] arrays): wafer/kernel.py's loop rule
    (`matmul_loop`: instructions and SRAM bytes per element) under wafer/cost.py's rates, FMACs of each kernel's
    dtype class."""
    instr, read, write = wkernel.matmul_loop(p, c, d, lhs_isz, rhs_isz, acc_isz)
    per = _by_class(classes, lambda k: cost.element_cycles(spec, "fmac", k, read, write, maximum=maximum))
    return instr * spec.instr_startup_cycles + p * c * d * per


def reduction(spec, f, n, words, elements, itemsize, *, to: str, compute=0.0, comm=0.0, extra_hops=0.0):
    """The cheapest of `PATTERNS` for a call's reductions along n cores of `words` words (`elements` elements of
    `itemsize` bytes) per core to core `to`, per kernel: (transfer cycles, the busiest core's adds, pattern index),
    wafer/fabric.py's closed forms of the primitive the per-core path runs. Cheapest for the kernel: the pattern whose
    superstep, with the rest of the kernel's `compute` and `comm`, is the shortest (its adds are compute, its transfer
    communication; so a higher latency never makes a kernel faster). `extra_hops`: a defective wafer's extra hops
    along the line (`defect_line_hops`)."""
    base_compute, base_comm = compute, comm
    comm, adds = [], []
    for p in PATTERNS:
        comm.append(fabric.reduce_cycles(n, words, spec, pattern=p, to=to, extra_hops=extra_hops))
        adds.append(
            _by_class(
                f.acc_class,
                lambda k, p=p: fabric.reduce_adds_cycles(
                    n, elements, spec, dtype_class=k, itemsize=itemsize, pattern=p, to=to
                ),
            )
        )
    ns = relax.xp(n, words, *comm, *adds)
    total = [cost.superstep_cycles(spec, base_compute + a, base_comm + c) for c, a in zip(comm, adds)]
    total = ns.stack(ns.broadcast_arrays(*total))
    pick = ns.argmin(total, axis=0)
    take = lambda xs: ns.take_along_axis(ns.stack(ns.broadcast_arrays(*xs)), pick[None], axis=0)[0]  # noqa: E731
    return take(comm), take(adds), pick


def _scan_adds(spec, f: ft.Features, n, elements, itemsize, *, to: str):
    """Cycles [n] a scan kernel's busiest core spends adding partial sums over all its iterations: per weight dot
    (parameter p, [n, P]), `p_trips` chained reductions along `n` cores of `elements` elements of `itemsize` bytes
    per core to core `to` (`fabric.reduce_adds_cycles`, as `reduction` charges a WEIGHT anchor's), in the kernel's
    class of adds (`Features.acc_class`, the dots' partial sums' under `partition.scan_runs`)."""

    def per_class(c):
        return fabric.reduce_adds_cycles(n, elements, spec, dtype_class=c, itemsize=itemsize, pattern="chain", to=to)

    per = _by_class(f.acc_class, per_class)
    return relax.xp(per).sum(f.p_trips * per, axis=1)


def kernel_figures(f: ft.Features, lay: Layout, spec, tau=0.0) -> dict:
    """Every kernel's partition and cycles on its rectangle ([n] arrays; module docstring).

    Returns `kernel_shape`'s dict plus (cycles per batch, per core: the busiest core):
      compute, comm, cycles: a forward pass's compute, communication and superstep;
      anchor, adds, multicast, reduction, reduce_pattern (index into PATTERNS): a WEIGHT kernel's matmul on its
        tiles, its reduction's adds, the multicast of its input chunks and the reduction of its partial sums;
      scan_comm: a scan kernel's weight dots' multicasts and reductions over all its iterations (in comm);
      scan_adds: the adds of those reductions on the busiest core (`_scan_adds`; in compute, as `adds`);
      sram_bytes (per core);
    in training: forward (= cycles), backward, bwd_compute, bwd_comm, bwd_pattern, scan_bwd_comm (a scan kernel's
    weight dots' backward multicasts and reductions over all its iterations, in bwd_comm), scan_bwd_adds (the adds
    of those reductions along the rows, in bwd_compute), grad_sum (the sum of the
    weight gradient over the tile grid's copies), update (per step: the gradient sum and the optimizer's update;
    weight streaming: the gradient sum is the backward's), io (weight streaming: weights in, per pass).
    """
    mx = _smooth_max(tau)
    k = kernel_shape(f, lay.height, lay.width)
    weight = f.anchor == ft.WEIGHT
    per_core = lambda counts: {key: counts[:, j] for j, key in enumerate(f.keys)}  # noqa: E731
    # forward: the anchor's matmul on the core's tiles, the rest of the kernel spread over its cores
    runs = k["samples"]
    # a defective wafer: the extra hops of the longest line along the rows (xr) and down the columns (xc) of the
    # kernel's core grid, which its multicasts and reductions span (wafer/defects.py's rule)
    xr, xc = defect_line_hops(lay, k, spec)
    mm = matmul_cycles(spec, f.fmac_class, k["mm_p"], k["mm_c"], k["mm_d"], f.isz_in, f.isz_w, f.isz_out, mx)
    anchor = runs * mm
    multicast = fabric.multicast_cycles(k["gw"], k["in_words"], spec, src="first", extra_hops=xr)
    rest = cost.compute_cycles(spec, per_core(k["counts"]), maximum=mx)
    red, adds, pattern = reduction(
        spec,
        f,
        k["gh"],
        k["out_words"],
        k["out_elems"],
        f.isz_out,
        to="last",
        compute=rest + anchor,
        comm=multicast,
        extra_hops=xc,
    )
    zero = 0.0 * k["cores"]
    anchor, adds = relax.where(weight, anchor, zero), relax.where(weight, adds, zero)
    multicast, red = relax.where(weight, multicast, zero), relax.where(weight, red, zero)
    # a scan's weight dots (partition.scan_runs): at every iteration, each one's multicast of input chunks along its
    # weight's rows and chained reduction of partial sums down its columns, one after another; the reduction's adds
    # (the busiest core's, `reduction`'s rule for a WEIGHT anchor's, in the chain pattern) are compute, as a WEIGHT
    # anchor's are: the cores that add are the kernel's, between its other work
    col = lambda x: x[:, None] if getattr(x, "ndim", 0) else x  # noqa: E731
    scan_runs = fabric.multicast_cycles(k["s_gw"], k["s_in_words"], spec, src="first", extra_hops=col(xr))
    scan_runs = scan_runs + fabric.reduce_cycles(k["s_gh"], k["s_out_words"], spec, to="last", extra_hops=col(xc))
    scan_comm = relax.xp(scan_runs).sum(f.p_trips * scan_runs, axis=1)
    scan_adds = _scan_adds(spec, f, k["s_gh"], k["s_out_elems"], f.p_sout, to="last")
    compute = rest + anchor + adds + scan_adds
    comm = multicast + red + scan_comm
    cycles = cost.superstep_cycles(spec, compute, comm, maximum=mx)
    k.update(
        compute=compute,
        comm=comm,
        cycles=cycles,
        anchor=anchor,
        adds=adds,
        multicast=multicast,
        reduction=red,
        reduce_pattern=pattern,
        scan_comm=scan_comm,
        scan_adds=scan_adds,
        sram_bytes=k["weight_bytes"] + k["act_bytes"],
        extra_hops=relax.where(weight, relax.maximum(xr + zero, xc + zero), zero),
    )
    if f.task != "training":
        return k
    # backward: the weight's cotangent on every core (x^T g), the input's where it carries a gradient (g W^T, its
    # partials reduced along the rows to the west edge the input came in at), the output cotangent multicast up
    # the columns from the bottom row; the rest of the kernel's backward program spread over its cores
    dx = f.dx * weight
    dw = runs * matmul_cycles(spec, f.fmac_class, k["mm_d"], k["mm_c"], k["mm_p"], f.isz_in, f.isz_out, f.isz_w, mx)
    dxm = runs * matmul_cycles(
        spec, f.fmac_class, k["mm_pin"], k["ta"], k["mm_c"] * f.window, f.isz_out, f.isz_w, f.isz_in, mx
    )
    in_elems = f.n_in * k["rows_in"] * k["in_chunk"]
    b_multicast = relax.where(
        weight, fabric.multicast_cycles(k["gh"], k["out_words"], spec, src="last", extra_hops=xc), zero
    )
    b_rest = cost.compute_cycles(spec, per_core(k["bwd_counts"]), maximum=mx) + relax.where(weight, dw, zero)
    b_red, b_adds, b_pattern = reduction(
        spec,
        f,
        k["gw"],
        k["in_words"],
        in_elems,
        f.isz_in,
        to="first",
        compute=b_rest + dxm,
        comm=b_multicast,
        extra_hops=xr,
    )
    # a scan's weight dots' backward (partition.scan_backward_traffic), at every iteration, one after another: each
    # one's output cotangent multicast up its weight's columns from the bottom row, and its input's cotangent
    # partials reduced along the rows to the west edge in a chain (a cell's dots read its carry, whose cotangent
    # every iteration's transpose computes). Their FMACs (x^T g and g W^T) are in bwd_counts, spread over the
    # kernel's cores as the forward's are in counts.
    scan_bwd = fabric.multicast_cycles(k["s_gh"], k["s_out_words"], spec, src="last", extra_hops=col(xc))
    scan_bwd = scan_bwd + fabric.reduce_cycles(k["s_gw"], k["s_in_words"], spec, to="first", extra_hops=col(xr))
    scan_bwd_comm = relax.xp(scan_bwd).sum(f.p_trips * scan_bwd, axis=1)
    scan_bwd_adds = _scan_adds(spec, f, k["s_gw"], k["s_in_elems"], f.p_sin, to="first")
    b_compute = b_rest + dx * (dxm + b_adds) + scan_bwd_adds
    b_comm = b_multicast + dx * b_red + scan_bwd_comm
    backward = cost.superstep_cycles(spec, b_compute, b_comm, maximum=mx)
    # the weight gradient summed over the copies of the tile grid (chains between copies, then back): every copy
    # updates with the same sum
    tile_elems = k["ta"] * k["tb"] * f.lead
    sums = 0.0
    for copies, stride, extra in ((k["rr"], k["gh"], xc), (k["rc"], k["gw"], xr)):
        moves = fabric.strided_allreduce_cycles(copies, stride, k["tile_words"], spec, extra_hops=extra)
        adds_ = fabric.reduce_adds_cycles(copies, tile_elems, spec, itemsize=f.isz_w, pattern="chain", to="all")
        sums = sums + moves + adds_
    grad_sum = relax.where(weight, sums, zero)
    upd = update_counts(f, k)
    optimizer = cost.compute_cycles(spec, {key: upd[:, j] for j, key in enumerate(f.keys)}, maximum=mx)
    streaming = f.mode == "weight_streaming"
    k.update(
        forward=cycles,
        backward=backward + grad_sum if streaming else backward,
        bwd_compute=b_compute,
        bwd_comm=b_comm,
        bwd_pattern=b_pattern,
        scan_bwd_comm=scan_bwd_comm,
        scan_bwd_adds=scan_bwd_adds,
        grad_sum=grad_sum,
        update=optimizer if streaming else optimizer + grad_sum,
        io=cost.io_cycles(spec, f.stream_bytes),
    )
    return k


def _per_flow(x, like):
    """A per-flow feature [F] shaped [F, 1, ...] to broadcast against per-flow figures [F, ...] of a layout whose
    arrays carry trailing batch axes (`Layout`: [n, ...]); unchanged for a plain [n] layout."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def defect_line_hops(lay: Layout, k: dict, spec):
    """A defective wafer's extra hops of every kernel's longest line of its core grid (`grid_h` x `grid_w` at the
    rectangle's top-left), [n] each: (along its rows, down its columns) (`wafer.defects.line_extra`; 0.0, 0.0 on a
    perfect wafer). A WEIGHT kernel's multicasts and reductions along its rows (columns) are charged the row's
    (column's) extra hops across its whole core grid: exact for one copy of its tile grid, an upper bound for a
    copy's shorter line when it holds several side by side (docs/defects.md)."""
    rm = defects.remap_of(spec)
    if rm is None:
        return 0.0, 0.0
    rows = defects.line_extra(rm, 1, lay.row, lay.col, k["grid_h"], k["grid_w"])
    cols = defects.line_extra(rm, 0, lay.row, lay.col, k["grid_h"], k["grid_w"])
    return rows, cols


def route_hops(f: ft.Features, lay: Layout, spec):
    """Hops of the longest lane of any stream between kernels or to and from the host (compiler/plan/route.py): on a
    defective wafer, physical hops (`flow_physical_hops`, `host_physical_hops`).

    The layout's arrays are [n] or [n, ...] (kernels first, trailing batch axes: compiler/analysis/tabulated.py
    evaluates many placements of a perfect wafer at once this way); the result is a scalar or [...]."""
    if f.flow_src.shape[0] == 0:
        return 0.0
    ns = relax.xp(lay.height, lay.row)
    src = ns.asarray(f.flow_src).astype(int)
    dst = ns.asarray(f.flow_dst).astype(int)
    s, d = ns.maximum(src, 0), ns.maximum(dst, 0)
    r, c, h, w = lay.row, lay.col, lay.height, lay.width
    rm = defects.remap_of(spec)
    if rm is None:
        between = flow_hops(r[s], c[s], h[s], w[s], r[d], c[d], h[d], w[d])
        inbound = host_hops(c[d], w[d], inbound=True, cols=spec.cols)
        outbound = host_hops(c[s], w[s], inbound=False, cols=spec.cols)
    else:
        between = flow_physical_hops(rm, r[s], c[s], h[s], w[s], r[d], c[d], h[d], w[d])
        inbound = host_physical_hops(rm, r[d], c[d], h[d], w[d], inbound=True)
        outbound = host_physical_hops(rm, r[s], c[s], h[s], w[s], inbound=False)
    hops = relax.where(_per_flow(src < 0, r), inbound, relax.where(_per_flow(dst < 0, r), outbound, between))
    return relax.smax(hops, 0.0, axis=0)


def stream_cycles(f: ft.Features, lay: Layout, spec):
    """Cycles per sample the busiest link of the streams between kernels (and from and to the host) is busy, [F]
    per stream: its words over its lanes (`flow_lane_count`: the host's streams run along every row of the first
    and last kernels), times the streams sharing the link (`Features.flow_share`), at a word per cycle per link.
    [F, ...] for a layout with trailing batch axes (`route_hops`)."""
    ns = relax.xp(lay.height, lay.row)
    if f.flow_src.shape[0] == 0:
        return ns.zeros((0,))
    src = ns.asarray(f.flow_src).astype(int)
    dst = ns.asarray(f.flow_dst).astype(int)
    s, d = ns.maximum(src, 0), ns.maximum(dst, 0)
    r, c, h, w = lay.row, lay.col, lay.height, lay.width
    between = flow_lane_count(r[s], c[s], h[s], w[s], r[d], c[d], h[d], w[d])
    lanes = relax.where(_per_flow(src < 0, r), h[d], relax.where(_per_flow(dst < 0, r), h[s], between))
    words = _per_flow(f.flow_words, r) / relax.maximum(lanes, 1.0) * _per_flow(f.flow_share, r)
    return words * (cost.WORD_BITS / spec.link_bits_per_cycle)


def tied_cycles(f: ft.Features, lay: Layout, spec):
    """Cycles of a training step's sums of tied weights' gradients (`Features.tie_words`), one pair of kernels after
    another: each copy's gradient to the kernel of the copy read back and the sum back again, each way its words
    over the stream's lanes (`flow_lane_count`) at a word per cycle per link plus its longest lane's hops x hop
    latency (`flow_hops`; on a defective wafer the physical hops, `flow_physical_hops`, as `route_hops`); the routes
    of `tied_routes` carry them. Between the two, the copy read back adds the gradient it received to its own: its
    elements (`Features.tie_elems`) over the stream's lanes, the cores at their ends adding in parallel, an `@fadds`
    each at the ALU's element rate for the weight's element bytes (`tie_isz`, as `fabric.reduce_adds_cycles` charges
    the gradient sum over a weight kernel's tile-grid copies). 0 without tied weights."""
    ns = relax.xp(lay.height, lay.row)
    if f.tie_src.shape[0] == 0:
        return 0.0 * ns.sum(lay.height)
    s = ns.asarray(f.tie_src).astype(int)
    d = ns.asarray(f.tie_dst).astype(int)
    r, c, h, w = lay.row, lay.col, lay.height, lay.width
    word = cost.WORD_BITS / spec.link_bits_per_cycle
    rm = defects.remap_of(spec)
    total = 0.0
    for a, b in ((s, d), (d, s)):
        lanes = flow_lane_count(r[a], c[a], h[a], w[a], r[b], c[b], h[b], w[b])
        if rm is None:
            hops = flow_hops(r[a], c[a], h[a], w[a], r[b], c[b], h[b], w[b])
        else:
            hops = flow_physical_hops(rm, r[a], c[a], h[a], w[a], r[b], c[b], h[b], w[b])
        words = _per_flow(f.tie_words, r)
        total = total + words / relax.maximum(lanes, 1.0) * word + hops * spec.hop_latency_cycles
        if a is s:
            isz = _per_flow(f.tie_isz, r)
            add = cost.element_cycles(spec, "alu", "fp32", isz, isz, isz / 4.0)
            total = total + _per_flow(f.tie_elems, r) / relax.maximum(lanes, 1.0) * add
    return relax.fold_sum(total)


def tied_routes(plan):
    """The routes (compiler/plan/route.py) of a training step's tied-weight gradient sums (`tied_cycles`), both ways,
    words per step; None without tied weights."""
    f = plan.features
    if f.tie_src.shape[0] == 0:
        return None
    names = f.names
    flows = []
    for a, b, words in zip(f.tie_src, f.tie_dst, f.tie_words):
        src, dst = names[int(a)], names[int(b)]
        flows += [(src, dst, float(words)), (dst, src, float(words))]
    return route(plan.placement, flows, plan.spec)


# ---- programs -------------------------------------------------------------------------------------------------------


def program_figures(f: ft.Features, lay: Layout, spec, tau=0.0, cluster=None) -> dict:
    """The program's figures (module docstring), from `kernel_figures`, the streams and the longest route; with a
    `wafer.ClusterSpec` of N > 1 wafers (training), N wafers each on its share of the batch (module docstring).

    Returns a dict: kernel (the per-kernel dict), cycles_per_sample [n] (of each kernel), stream_cycles [F] (per
    sample, of each stream's busiest link), io_sample_cycles (a sample over the edge I/O, inference), pace [n + 2]
    (per sample: the kernels, the busiest stream, the edge I/O), bottleneck_cycles (the slowest of them),
    step_cycles (a call, or a training step), samples_per_s, latency_cycles, hops, io_cycles (the batch over the
    edge I/O, training), compute_cycles (a training step's compute), cores (active), peak_sram_bytes; in training
    also wafers and interconnect_cycles (pipelined: the gradients' all-reduce between wafers, on the step's
    critical path; weight streaming: SwarmX's weight broadcasts and gradient reduces, overlapping the compute), and
    tied_cycles (pipelined: the sums of tied weights' gradients between their copies, `tied_cycles`).
    """
    k = kernel_figures(f, lay, spec, tau)
    hops = route_hops(f, lay, spec)
    # the longest route's hops a defective wafer adds (for the report; 0 on a perfect wafer)
    route_extra = 0.0 * hops
    if getattr(spec, "defects", None) is not None:
        route_extra = hops - route_hops(f, lay, spec.with_(defects=None))
    streams = stream_cycles(f, lay, spec)
    tied = tied_cycles(f, lay, spec) if f.task == "training" and f.mode == "pipelined" else None
    return pipeline_figures(f, k, hops, streams, spec, tau, cluster, route_extra=route_extra, tied=tied)


# The kernel figures `pipeline_figures` reads: what a placement's kernels contribute to the program's figures beyond
# their routes (compiler/analysis/tabulated.py tabulates these over integer sides).
PIPELINE_KEYS = ("cycles", "cores", "sram_bytes", "forward", "backward", "update", "io")


def pipeline_figures(
    f: ft.Features, k: dict, hops, streams, spec, tau=0.0, cluster=None, *, route_extra=None, tied=None
) -> dict:
    """The program's figures (`program_figures`) from its kernels' figures `k` (`kernel_figures`' dict, or at least
    its `PIPELINE_KEYS` of the task), the longest route's `hops` (`route_hops`) and the streams' cycles per sample
    [F] (`stream_cycles`): the pipeline rules of the module docstring, and nothing that depends on a rectangle.
    `route_extra`: the hops a defective wafer adds to the longest route (reported; 0 by default); `tied`: pipelined
    training's sums of tied weights' gradients (`tied_cycles`; 0 by default).

    Per-kernel figures may carry trailing batch axes ([n, ...], with hops [...] and streams [F, ...]): reductions
    over kernels and streams run along axis 0, so many placements are composed at once."""
    ns = relax.xp(k["cycles"], spec.clock_hz)
    batch = f.batch
    latency = hops * spec.hop_latency_cycles
    stream = relax.smax(streams, tau, axis=0) if streams.shape[0] else 0.0 * batch
    peak = relax.smax(k["sram_bytes"], 0.0, axis=0)
    out = dict(
        kernel=k,
        hops=hops,
        route_extra_hops=0.0 * hops if route_extra is None else route_extra,
        peak_sram_bytes=peak,
        stream_cycles=streams,
    )
    total = relax.fold_sum  # over kernels
    worst_of = lambda x: relax.smax(x, tau, axis=0)  # noqa: E731
    # pace's entries after the kernels', one per placement
    tail = lambda *xs: ns.stack([ns.broadcast_to(x, ns.shape(k["cycles"])[1:]) for x in xs])  # noqa: E731
    if f.task == "inference":
        s = k["cycles"] / batch
        # inputs in and outputs out over the edge I/O at once (full duplex)
        io = cost.io_cycles(spec, relax.maximum(f.io_bytes, f.io_out_bytes)) / batch
        pace = ns.concatenate([s, tail(stream + 0.0 * batch, io + 0.0 * batch)])
        worst = worst_of(pace)
        call = io + total(s) + latency
        out.update(
            cycles_per_sample=s,
            io_sample_cycles=io,
            io_cycles=0.0 * io,
            pace=pace,
            bottleneck_cycles=worst,
            latency_cycles=call,
            step_cycles=call + (batch - 1) * worst,
            compute_cycles=call + (batch - 1) * worst,
            samples_per_s=spec.clock_hz / worst,
            cores=total(k["cores"]),
        )
        return out
    mx = _smooth_max(tau)
    io = cost.io_cycles(spec, f.io_bytes)
    s = (k["forward"] + k["backward"]) / batch
    wafers = 1 if cluster is None else cluster.wafers
    interconnect = 0.0 * batch
    if wafers > 1 and f.mode == "weight_streaming":
        # MemoryX -> SwarmX -> every wafer's edge: weights broadcast in, gradients reduced out, at the slower of the
        # interconnect and the edge I/O, plus the tree's levels
        k["io"] = wcluster.stream_seconds(cluster, f.stream_bytes, spec.edge_io_bits_per_s) * spec.clock_hz
        interconnect = total(3.0 * k["io"])
    elif wafers > 1:
        interconnect = wcluster.allreduce_seconds(cluster, ns.sum(f.stream_bytes)) * spec.clock_hz
    tied = (0.0 if tied is None or f.mode != "pipelined" else tied) + 0.0 * batch
    if f.mode == "pipelined":
        pace = ns.concatenate([s, tail(stream + 0.0 * batch, 0.0 * batch)])
        worst = worst_of(pace)
        # after the last backward, before every kernel updates: the tied weights' gradients summed between their
        # copies, and the gradients all-reduced between the wafers
        compute = total(s) + 2.0 * latency + (batch - 1) * worst + tied + interconnect + worst_of(k["update"])
        cores = total(k["cores"])
    else:
        pace = ns.concatenate([s, tail(0.0 * batch, 0.0 * batch)])
        worst = worst_of(s)
        compute = total(mx(k["forward"], k["io"]) + mx(k["backward"], 2.0 * k["io"]))
        cores = relax.smax(k["cores"], 0.0, axis=0)
    step = mx(compute, io)
    out.update(
        cycles_per_sample=s,
        io_sample_cycles=io / batch,
        pace=pace,
        bottleneck_cycles=worst,
        latency_cycles=step,
        step_cycles=step,
        compute_cycles=compute,
        io_cycles=io,
        samples_per_s=spec.clock_hz * batch * wafers / step,
        cores=cores,
        wafers=wafers + 0.0 * batch,
        interconnect_cycles=interconnect,
        tied_cycles=tied,
    )
    return out


# ---- a plan's schedule -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Span:
    """One event of the schedule: `name` on `track` from cycle `start` for `cycles` (category `cat`, extra args)."""

    name: str
    track: str
    start: float
    cycles: float
    cat: str
    args: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A plan's figures on a spec (NumPy, exact). Built by `of(plan, spec)`.

    Attributes:
      plan, spec: what was scheduled.
      figures: `program_figures`' dict (NumPy).
    """

    plan: object
    spec: object
    figures: dict

    # ---- program figures ----

    @property
    def kernels(self) -> dict:
        """Per-kernel figures: {figure: [n] array} (`kernel_figures`)."""
        return self.figures["kernel"]

    @property
    def names(self) -> tuple:
        return self.plan.features.names

    @property
    def step_cycles(self) -> float:
        """Cycles of one call (inference) or one training step: what the emulator adds to its clock."""
        return float(self.figures["step_cycles"])

    @property
    def samples_per_s(self) -> float:
        return float(self.figures["samples_per_s"])

    @property
    def bottleneck(self) -> str:
        """The kernel with the most cycles per sample."""
        return self.names[int(np.argmax(self.figures["cycles_per_sample"]))]

    def kernel(self, name: str) -> dict:
        """One kernel's figures: {figure: float}."""
        i = self.plan.features.index(name)
        return {key: float(np.asarray(v)[i]) for key, v in self.kernels.items() if np.ndim(v) == 1}

    def bound(self) -> str:
        """What bounds the throughput: "I/O" (the batch, or streamed weights, over the edge I/O), "fabric" (the
        busiest stream between kernels, or the slowest kernel's own communication) or "compute"."""
        k, fig = self.kernels, self.figures
        n = len(self.names)
        pace = np.asarray(fig["pace"])
        worst = int(np.argmax(pace))
        if self.plan.task == "inference":
            if worst == n + 1:
                return "I/O"
            if worst == n:
                return "fabric"
            return "fabric" if k["comm"][worst] > k["compute"][worst] else "compute"
        if float(fig["io_cycles"]) >= float(fig["compute_cycles"]):
            return "I/O"
        if self.plan.mode == "pipelined" and 2 * float(fig["interconnect_cycles"]) > float(fig["compute_cycles"]):
            return "interconnect"
        if self.plan.mode == "weight_streaming":
            return "I/O" if float(np.sum(3 * k["io"])) >= float(np.sum(k["forward"] + k["backward"])) else "compute"
        if worst == n:
            return "fabric"
        comm, compute = k["comm"][worst] + k["bwd_comm"][worst], k["compute"][worst] + k["bwd_compute"][worst]
        return "fabric" if comm > compute else "compute"

    # ---- what the emulator charges ----

    def busy(self) -> np.ndarray:
        """Compute cycles per kernel per call or step [n] (`busy_cycles`)."""
        return np.asarray(busy_cycles(self.plan.task, self.kernels))

    def compute_map(self, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """Busy cycles per core per call or step, [rows, cols], on the cores doing each kernel's work."""
        return compute_map(self.plan, self.busy(), rows, cols)

    def link_words(self, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """Words sent per core per direction per call or step, [4, rows, cols] (`link_words`)."""
        return link_words(self.plan, rows, cols)

    # ---- events ----

    def events(self, steps: int = 1) -> list[Span]:
        """The spans of `steps` calls or training steps, one after the other (compiler/views/trace_export.py draws
        them). Tracks: "program" (a span per step), "host I/O", "weight streaming I/O", and one per kernel."""
        spans: list[Span] = []
        t = 0.0
        step_events = {
            ("inference", "pipelined"): self._inference_step,
            ("training", "pipelined"): self._pipelined_training_step,
            ("training", "weight_streaming"): self._streaming_step,
        }[(self.plan.task, self.plan.mode)]
        for step in range(steps):
            step_events(spans, t)
            spans.append(Span(f"step {step}", "program", t, self.step_cycles, "step", {"step": step}))
            t += self.step_cycles
        return spans

    def _inference_step(self, spans, t0):
        batch = int(float(self.plan.features.batch))
        k, s = self.kernels, np.asarray(self.figures["cycles_per_sample"], np.float64)
        pace = float(self.figures["bottleneck_cycles"])
        io = float(self.figures["io_sample_cycles"])
        _span(spans, "inputs in, outputs out", "host I/O", t0, io * batch, "io", cycles_per_sample=io)
        hops = float(self.figures["hops"])
        latency = hops * float(self.spec.hop_latency_cycles)
        _span(spans, "first input over the fabric", "routes", t0 + io, latency, "route", hops=int(hops))
        start = t0 + io + latency
        for i, name in enumerate(self.names):
            compute, comm = float(k["compute"][i]) / batch, float(k["comm"][i]) / batch
            for j in range(batch):
                t = start + j * pace
                _span(spans, f"sample {j}", name, t, s[i], "sample", kernel=name, sample=j)
                _span(spans, "compute", name, t, compute, "compute")
                _span(spans, "fabric", name, t if self.spec.overlap else t + compute, comm, "fabric")
            start += s[i]

    def _pipelined_training_step(self, spans, t0):
        batch = int(float(self.plan.features.batch))
        k, s = self.kernels, np.asarray(self.figures["cycles_per_sample"], np.float64)
        pace = float(self.figures["bottleneck_cycles"])
        latency = 2 * float(self.figures["hops"]) * float(self.spec.hop_latency_cycles)
        _span(spans, "batch I/O", "host I/O", t0, float(self.figures["io_cycles"]), "io")
        start = t0 + latency
        for i, name in enumerate(self.names):
            f, b = float(k["forward"][i]), float(k["backward"][i])
            for j in range(batch):
                t = start + j * pace
                _span(spans, f"sample {j}", name, t, (f + b) / batch, "sample", kernel=name, sample=j)
                _span(spans, "forward", name, t, f / batch, "forward")
                _span(spans, "backward", name, t + f / batch, b / batch, "backward")
            start += s[i]
        end = t0 + latency + float(np.sum(s)) + (batch - 1) * pace
        tied = float(self.figures.get("tied_cycles", 0.0))
        _span(spans, "tied weights' gradient sums", "routes", end, tied, "route")
        end += tied
        allreduce = float(self.figures["interconnect_cycles"])
        wafers = int(self.figures["wafers"])
        _span(spans, "gradient all-reduce", "interconnect", end, allreduce, "interconnect", wafers=wafers)
        for i, name in enumerate(self.names):
            _span(spans, "update", name, end + allreduce, float(k["update"][i]), "update")

    def _streaming_step(self, spans, t0):
        k = self.kernels
        _span(spans, "batch I/O", "host I/O", t0, float(self.figures["io_cycles"]), "io")
        t = t0
        for i, name in enumerate(self.names):
            f, io = float(k["forward"][i]), float(k["io"][i])
            length = max(f, io)
            _span(spans, "forward", name, t, length, "forward", weights_in_cycles=io, compute_cycles=f)
            _span(spans, "compute", name, t, f, "compute")
            _span(spans, "weights in", "weight streaming I/O", t, io, "io")
            t += length
        for i in reversed(range(len(self.names))):
            b, io, name = float(k["backward"][i]), float(k["io"][i]), self.names[i]
            length = max(b, 2 * io)
            _span(spans, "backward", name, t, length, "backward", weights_and_gradients_cycles=2 * io, compute_cycles=b)
            _span(spans, "compute", name, t, b, "compute")
            _span(spans, "weights in, gradients out", "weight streaming I/O", t, 2 * io, "io")
            t += length


def _span(spans, name, track, start, cycles, cat, **args):
    if float(cycles) > 0:  # zero-length spans are left out
        spans.append(Span(name, track, float(start), float(cycles), cat, args))


def of(plan, spec=None) -> Schedule:
    """The schedule of a plan on `spec` (default the plan's own): its figures in NumPy float64.

    Another spec's differentiable figures (clock, SIMD widths, bandwidths, latencies) change the cycles; the layout
    (rectangles, tilings) stays the plan's.
    """
    spec = plan.spec if spec is None else spec
    figures = program_figures(plan.features, plan.layout, spec, cluster=plan.cluster)
    return Schedule(plan, spec, jax.tree.map(np.asarray, figures))


# ---- maps and the emulator's charge -------------------------------------------------------------------------------


def busy_cycles(task: str, k: dict):
    """Cycles each kernel's cores compute per call or step [n]: a call's compute (its own communication apart), or a
    training step's forward, backward and update."""
    return k["compute"] if task == "inference" else k["forward"] + k["backward"] + k["update"]


def compute_map(plan, busy, rows: int | None = None, cols: int | None = None):
    """`busy` cycles [n] painted on the cores doing each kernel's work, [rows, cols] (JAX when `busy` is)."""
    rows = plan.spec.rows if rows is None else rows
    cols = plan.spec.cols if cols is None else cols
    return paint(rows, cols, [(p.grid_rect, busy[i], None) for i, p in enumerate(plan.kernels.values())])


def link_words(plan, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """Words sent per core per direction [4, rows, cols] per call (inference: the streams between kernels for every
    sample, and every kernel's own traffic) or per step (training: activations forward and their cotangents back,
    every kernel's forward traffic and its backward's, and in layer-pipelined mode the tied weights' gradient sums,
    `tied_routes`)."""
    rows = plan.spec.rows if rows is None else rows
    cols = plan.spec.cols if cols is None else cols
    batch = int(float(plan.features.batch))
    training = plan.task == "training"
    out = np.zeros((4, rows, cols))
    for p in plan.kernels.values():
        out += p.traffic.link_words(rows, cols)
        if training:
            out += p.backward_traffic.link_words(rows, cols)
    if plan.routes is not None:
        out += (2 if training else 1) * batch * plan.routes.link_words(rows, cols)
    if training and plan.mode == "pipelined":
        ties = tied_routes(plan)
        if ties is not None:
            out += ties.link_words(rows, cols)
    return out


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Charge:
    """What one call or step of a plan charges to a `wafer.WaferState` (a `wafer.charge` record): the schedule's
    cycles on the spec it is given (NumPy, or JAX when the spec's figures are traced), its busy map, the plan's link
    words (static)."""

    plan: object

    @functools.cached_property
    def _links(self) -> np.ndarray:
        return link_words(self.plan)

    def link_words(self, rows: int, cols: int) -> np.ndarray:
        return self._links if (rows, cols) == self._links.shape[1:] else link_words(self.plan, rows, cols)

    def _figures(self, spec):
        return program_figures(self.plan.features, self.plan.layout, spec, cluster=self.plan.cluster)

    def cycles(self, spec):
        return self._figures(spec)["step_cycles"]

    def compute_map(self, spec, rows: int, cols: int):
        return compute_map(self.plan, busy_cycles(self.plan.task, self._figures(spec)["kernel"]), rows, cols)
