"""The per-core execution path: every weight kernel run literally on its cores, a recurrent cell's included.

The flattened jaxpr is evaluated kernel by kernel. A kernel's anchor (compiler.plan.partition.anchor_operand) runs
per core on the tiles its weight's SRAM allocation holds (`state.read`: the per-core view [gh, gw, *tile], padding
zero), as the partitioner tiled and charged it (`partition.per_core_kind`):

  dense   dot_general(x, W) with no batch dimensions, W either operand: Flax Dense, DenseGeneral (attention q/k/v
          [d, heads, head_dim] and out [heads, head_dim, d]), einsums with weights, a tied embedding's `attend`.
          W is tiled as the matrix [K, N] of its contracted and free axes (`partition.weight_axes`: a view of the
          stored tensor); x's free axes are flattened into rows M and its contracted axes, ordered as W's, into K.
  batched dot_general(x, W) with batch dimensions, W [*batch, K, N] (its leading axes the dot's batch axes: per-head
          or per-expert einsums, `bhd,hde->bhe`): every core holds its tile of every batch slice, receives its chunk
          of x's rows of every slice and multiplies slice by slice (a batched matmul), as `dense` otherwise.
  conv    conv_general_dilated(x, W), W [*window, in, out] per feature group: plain, grouped and depthwise; and
          batch-grouped (batch_group_count G): every row receives the whole batch, and a core picks for each of its
          output channels the N / G samples of that channel's group.
  gather  an embedding lookup table[ids] of a table [V, D] (Flax Embed): core (i, j) holds rows i*ta.. of the
          table's columns j*tb..; it looks up every index, giving the row where the index falls in its rows and
          zeros elsewhere.

All four are the same fabric program: x's contracted axis is cut into gh chunks (zero-padded; a gather's chunk is
the indices themselves, a grouped convolution's is tk input channels of every group), chunk i enters row i at its
west edge and is multicast along the row (`wafer.multicast`); core (i, j) runs the matmul / conv / lookup of its
chunk with its SRAM tile W[i, j] (`wafer.map_cores`; a grouped convolution's core first picks the channels of its
own columns' groups); partial results are summed along each column to the bottom row (`wafer.reduce`; a lookup's
partials are one row and zeros, so the sum is exact), whose gw cores hold the output's N axis in chunks. Rows of
data (x's rows, lookups, output rows of a convolution) split over the copies of the tile grid (`_grouped`). The
traffic this generates is what the partition recorded (`partition.anchor_traffic`); the caller checks it.

A scan (a recurrent cell: Flax `nn.RNN` of an LSTMCell, GRUCell or SimpleCell, or a hand-written `lax.scan`) runs
as a `lax.scan` whose body's weight dots (`partition.scan_runs`: a dot_general by a parameter, or a cast or transpose
of one, passed into the scan as a constant) run as `dense` above at every iteration, each on its weight's own tile
grid at the kernel's corner (one copy, x's rows not split, chained reductions), the rest of the body on the
assembled values. A weight is tiled as the matrix [K, N] its first dot multiplies (`partition.kernel_views`, as an
anchor's: `x @ W.T` and `W @ h` contracting W's last axis included). A scan in the body runs the same way, its dots
at each of its iterations of each outer one (`ScanDot.nest`; the weight a constant of every scan down to it). An
iteration's traffic is static: the scan's is the body's, once per iteration, one after another
(`partition.scan_traffic`, the record; the schedule charges the same, `scan_comm`, and the reductions' adds on the
busiest core, `scan_adds`, as compute like a WEIGHT anchor's). Training's backward of a scan runs on the assembled
weights; its traffic is that of the same dots' backward on the tiles (`partition.scan_backward_traffic`, the record
the step charges; the schedule's `scan_bwd_comm`, and `scan_bwd_adds` for the input cotangent's reductions' adds).

Left on the assembled weights (`partition.scan_left_off` says which and why; `compiler.fuzz.per_core_kinds` raises
on them): a dot with batch dimensions on its weight (a batched weight, `einsum("bk,bkn->bn", h, W)`): an anchor's
`batched` rule above runs such a weight per core, but the scan program, its record and its charges
(`partition.scan_traffic`, `_anchor_shapes`, `Features.p_rows`, `scan_comm`) carry one [K, N] tile grid per weight
and no batch of slices, so wiring it in means a batch axis through all three; and a second use of a weight as
another matrix, with other rows or dtypes, or with partial sums of another dtype class than the kernel's first dot
(the partition charges one shape per weight and one class of adds per kernel).

Flax's `nn.Embed(1, D)` looks nothing up: it broadcasts its one row [1, D], a matrix on one row of cores. Each of them
broadcasts its own tile to its columns of the output (`partition.row_broadcasts`): nothing crosses the fabric, as
recorded (nothing) and charged (no comm).

The rest of a kernel (epilogues, norms, a positional table added, weightless kernels) runs on the assembled
activations, reading its parameters from SRAM whole. A tied weight is read by each kernel from its own copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

import wafer
from compiler.plan import features as ft
from compiler.plan.partition import (
    anchor_operand,
    batch_dims,
    conv_rows_span,
    group_offsets,
    per_core_kind,
    row_broadcasts,
    scan_runs,
)


def _eval_eqn(eqn, invals):
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


def _groups(tiles, tiling):
    """SRAM tiles [gh, gw, ...] of the first copy -> [G, gh, gw, ...], one tile grid per group of cores (every
    copy holds the same values; see ParamTiling.replicas)."""
    rr, rc = tiling.replicas
    return jnp.broadcast_to(tiles[None], (rr * rc, *tiles.shape))


def _grouped(xg, tiles, tiling, op, pattern="chain", local=()):
    """Run `op(chunk, tile, *local)` on every core of every group, with the fabric moving data as the partitioner
    says.

    Args:
      xg: [G, gh, *chunk]: group g's input, cut into gh chunks along the contracted axis.
      tiles: the weight's SRAM tiles [gh, gw, *tile] (first copy).
      local: core-grid arrays [gh, gw, ...] every group's core (i, j) knows of itself (its rows of a table, the
        channels its columns' feature groups read), the same in every group.
    Returns:
      ([G, gw, *out_chunk] summed partial results at each group's bottom row, region-local traffic).
    """
    gh, gw = tiling.grid
    # chunk i of group g enters row i of the group at its west edge and is multicast along the row
    west = jnp.pad(xg[:, :, None], [(0, 0), (0, 0), (0, gw - 1)] + [(0, 0)] * (xg.ndim - 2))
    xin, t_in = jax.vmap(lambda a: wafer.multicast(a, "row", src=0))(west)
    partial, _ = jax.vmap(lambda a, w: wafer.map_cores(op, a, w, *local))(xin, _groups(tiles, tiling))
    summed, t_out = jax.vmap(lambda a: wafer.reduce(a, "col", "sum", to="last", pattern=pattern))(partial)
    traffic = (t_in + t_out).replicate(group_offsets(tiling))
    return summed[:, 0], traffic


def _dense_per_core(x, tiles, tiling, eqn, pattern="chain", pos=1, perm=None):
    """y = dot_general(x, W) (W the operand `pos`) with W's tiles [gh, gw, tk, tn] on cores, as the matrix [K, N]
    the partition tiles (`ParamTiling.axes`), and x's rows split over groups; returns (y, traffic).

    A batched weight [*batch, K, N] (`per_core_kind` "batched": its leading axes the dot's batch axes) has tiles
    [gh, gw, *batch, tk, tn]: every core holds its tile of every batch slice, receives its K chunk of x's rows of
    every slice [B, mt, tk] and multiplies slice by slice, [B, mt, tn].

    Args:
      x: the data operand [*free, *contracted] (and its batch axes) in any axis order.
      perm: the weight operand is the stored weight transposed so (`anchor_operand`): its axis a is W's perm[a].
    """
    gh, gw = tiling.grid
    rr, rc = tiling.replicas
    groups = rr * rc
    tk, tn = tiling.tile[-2:]
    k_dim, n_dim = tiling.matrix_shape[-2:]
    (lc, rc_), _ = eqn.params["dimension_numbers"]
    xc, wc = (lc, rc_) if pos == 1 else (rc_, lc)
    wb, xb = batch_dims(eqn, pos)
    nd = len(tiling.shape)
    w_rows, w_cols = tiling.axes or ((nd - 2,), (nd - 1,))
    perm = tuple(range(nd)) if perm is None else perm
    pair = {perm[a]: b for a, b in zip(wc, xc)}  # W's axis -> the x axis it contracts with
    x_c = [pair[r] for r in w_rows]  # x's contracted axes in the order W's rows flatten them
    x_free = [a for a in range(x.ndim) if a not in xc and a not in xb]
    batch = tuple(tiling.shape[a] for a in wb)
    nb = int(np.prod(batch))
    lead = tuple(x.shape[a] for a in x_free)
    m = int(np.prod(lead))
    mt = -(-m // groups)
    x2 = jnp.transpose(x, [*xb, *x_free, *x_c]).reshape(nb, m, k_dim)
    x2 = jnp.pad(x2, ((0, 0), (0, groups * mt - m), (0, gh * tk - k_dim)))
    xg = jnp.transpose(x2.reshape(nb, groups, mt, gh, tk), (1, 3, 0, 2, 4))  # [G, gh, nb, mt, tk]
    if not wb:
        xg = xg[:, :, 0]  # [G, gh, mt, tk]
    else:
        tiles = tiles.reshape(gh, gw, nb, tk, tn)
    pet = eqn.params.get("preferred_element_type")
    prec = eqn.params.get("precision")
    op = lambda a, w: jnp.matmul(a, w, precision=prec, preferred_element_type=pet)
    summed, traffic = _grouped(xg, tiles, tiling, op, pattern)  # [G, gw, (nb,) mt, tn]
    if not wb:
        summed = summed[:, :, None]
    y = jnp.transpose(summed, (2, 0, 3, 1, 4)).reshape(nb, groups * mt, gw * tn)[:, :m, :n_dim]
    w_free = tuple(tiling.shape[a] for a in w_cols)
    y = y.reshape(*batch, *lead, *w_free)
    if pos == 0:  # dot_general(W, x): W's free axes first, after the batch axes
        b = len(batch)
        src = tuple(range(b, b + len(lead)))
        y = jnp.moveaxis(y, src, tuple(a + len(w_free) for a in src))
    return y.astype(eqn.outvars[0].aval.dtype), traffic


def _gather_per_core(ids, tiles, tiling, eqn, pattern="chain"):
    """An embedding lookup table[ids] (`partition.embedding_gather`) with the table's tiles [gh, gw, ta, tb] on
    cores: the indices split over groups, every row of a group receives them all (multicast along the row), core
    (i, j) gives the row of each index in its rows i*ta.. (its columns j*tb..) and zeros for the others, and the
    column sums at the bottom row are the looked-up rows; returns (y [*ids, D], traffic).

    Args:
      ids: the gather's start indices [..., 1] (integers).
    """
    gh, gw = tiling.grid
    rr, rc = tiling.replicas
    groups = rr * rc
    ta, tb = tiling.tile
    v_dim, d_dim = tiling.shape
    lead = ids.shape[:-1]
    m = int(np.prod(lead))
    mt = -(-m // groups)
    flat = ids.reshape(m)
    mode = eqn.params["mode"]
    fill = mode == jax.lax.GatherScatterMode.FILL_OR_DROP
    if not fill:  # CLIP and PROMISE_IN_BOUNDS clamp an index into the table (XLA's gather), before it is sent
        flat = jnp.clip(flat, 0, v_dim - 1)
    xg = jnp.broadcast_to(jnp.pad(flat, (0, groups * mt - m)).reshape(groups, 1, mt), (groups, gh, mt))

    def lookup(a, w, first):
        # a core holds table rows first..first + ta - 1: the others' indices give zeros (the padding rows past the
        # table's end are zero too)
        local = a - first
        mine = (local >= 0) & (local < ta)
        return jnp.where(mine[:, None], w[jnp.clip(local, 0, ta - 1)], jnp.zeros((), w.dtype))

    first = jnp.broadcast_to((jnp.arange(gh, dtype=flat.dtype) * ta)[:, None], (gh, gw))
    summed, traffic = _grouped(xg, tiles, tiling, lookup, pattern, (first,))  # [G, gw, mt, tb]
    y = jnp.transpose(summed, (0, 2, 1, 3)).reshape(groups * mt, gw * tb)[:m, :d_dim]
    if fill:  # an index outside the table gives the fill value (known at the bottom row, which holds the index)
        valid = (flat >= 0) & (flat < v_dim)
        fv = eqn.params["fill_value"]
        y = jnp.where(valid[:, None], y, jnp.asarray(np.nan if fv is None else fv, y.dtype))
    return y.reshape(*lead, d_dim).astype(eqn.outvars[0].aval.dtype), traffic


def _conv_per_core(x, tiles, tiling, eqn, pattern="chain", pos=1):
    """Convolution: input features over a group's rows, output features over its columns, output rows (first
    spatial axis) over groups; each group reads its rows of the padded input with the window's halo.

    With G feature groups (grouped, depthwise), W is [*window, Cin / G, Cout] and the tiles cut its Cin / G and Cout:
    row i of the grid receives channels i*tk.. of every group (G x tk channels), and core (i, j) picks, for each of
    its tn output channels, the tk of that channel's group, a convolution of tn groups of tk channels each. With G
    batch groups, every row receives the whole batch and core (i, j) picks, for each of its tn output channels, the
    N / G samples of that channel's group: a convolution of tn batch groups."""
    p = eqn.params
    dn = p["dimension_numbers"]
    gh, gw = tiling.grid
    rr, rc = tiling.replicas
    groups = rr * rc
    tk, tn = tiling.tile[-2:]
    cin, cout = tiling.shape[-2:]
    c_ax, sp = dn.lhs_spec[1], dn.lhs_spec[2]
    o_ax, o_sp = dn.out_spec[1], dn.out_spec[2]
    out_aval = eqn.outvars[0].aval
    padding = list(p["padding"])
    if groups > 1:
        ho = out_aval.shape[o_sp]
        mt = -(-ho // groups)
        lo, hi = padding[0]
        span = conv_rows_span(eqn, mt)
        stride = p["window_strides"][0]
        need = (groups - 1) * mt * stride + span
        have = x.shape[sp] + lo + hi
        cfg = [(0, 0, 0)] * x.ndim
        cfg[sp] = (lo, hi + max(0, need - have), 0)
        xp = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
        starts = jnp.arange(groups) * (mt * stride)
        xs = jax.vmap(lambda s0: jax.lax.dynamic_slice_in_dim(xp, s0, span, axis=sp))(starts)  # [G, ...]
        padding[0] = (0, 0)
    else:
        mt = out_aval.shape[o_sp] if len(padding) else 1
        xs = x[None]
    # cut each feature group's input features into gh chunks: [G, gh, ..., fg * tk, ...]
    fg = p["feature_group_count"]
    ca = c_ax + 1
    xs = xs.reshape(*xs.shape[:ca], fg, cin, *xs.shape[ca + 1 :])
    pad = [(0, 0)] * xs.ndim
    pad[ca + 1] = (0, gh * tk - cin)
    xs = jnp.pad(xs, pad)
    xs = xs.reshape(*xs.shape[: ca + 1], gh, tk, *xs.shape[ca + 2 :])
    xs = jnp.moveaxis(xs, ca + 1, 1)  # [G, gh, ..., fg, tk, ...], fg at ca + 1
    xg = xs.reshape(*xs.shape[: ca + 1], fg * tk, *xs.shape[ca + 3 :])

    def conv(a, w, *pick):
        groups_ = bgroups = 1
        if pick and fg > 1:  # the tk channels of each output channel's feature group, tn groups of tk
            a, groups_ = jnp.take(a, pick[0], axis=c_ax), tn
        elif pick:  # the samples of each output channel's batch group, tn groups of N / G
            a, bgroups = jnp.take(a, pick[0], axis=dn.lhs_spec[0]), tn
        return jax.lax.conv_general_dilated(
            a,
            w,
            window_strides=p["window_strides"],
            padding=padding,
            lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn,
            feature_group_count=groups_,
            batch_group_count=bgroups,
            precision=p["precision"],
            preferred_element_type=p["preferred_element_type"],
        )

    local = ()
    if fg > 1:
        # output channel o = j * tn + t belongs to group o // (Cout / G) (padding channels past Cout: any group, their
        # weights are zero); its input channels are that group's tk on this row
        o = np.arange(gw)[:, None] * tn + np.arange(tn)[None, :]
        g = np.minimum(o // (cout // fg), fg - 1)
        pick = (g[:, :, None] * tk + np.arange(tk)).reshape(gw, tn * tk)
        local = (jnp.broadcast_to(jnp.asarray(pick, jnp.int32), (gh, gw, tn * tk)),)
    bg = p["batch_group_count"]
    if bg > 1:
        # output channel o belongs to batch group o // (Cout / G), which reads samples g * N / G.. of the batch
        # (group-major, as XLA splits it); a core picks them for each of its tn output channels
        nbg = x.shape[dn.lhs_spec[0]] // bg
        o = np.arange(gw)[:, None] * tn + np.arange(tn)[None, :]
        g = np.minimum(o // (cout // bg), bg - 1)
        pick = (g[:, :, None] * nbg + np.arange(nbg)).reshape(gw, tn * nbg)
        local = (jnp.broadcast_to(jnp.asarray(pick, jnp.int32), (gh, gw, tn * nbg)),)
    summed, traffic = _grouped(xg, tiles, tiling, conv, pattern, local)  # [G, gw, *out: features tn, rows mt]
    y = jnp.moveaxis(summed, 1, o_ax + 1)  # [G, ..., gw, tn, ...]
    y = y.reshape(*y.shape[: o_ax + 1], gw * tn, *y.shape[o_ax + 3 :])
    y = jax.lax.slice_in_dim(y, 0, cout, axis=o_ax + 1)
    y = jnp.moveaxis(y, 0, o_sp)  # [..., G, mt, ...] on the row axis
    y = y.reshape(*y.shape[:o_sp], y.shape[o_sp] * y.shape[o_sp + 1], *y.shape[o_sp + 2 :])
    y = jax.lax.slice_in_dim(y, 0, out_aval.shape[o_sp], axis=o_sp)
    return y.astype(out_aval.dtype), traffic


def _row_broadcast_per_core(eqn, tiles, tiling):
    """A one-row weight [1, D] broadcast (`partition.row_broadcasts`: Flax's `nn.Embed(1, D)`) with its tiles
    [1, gw, 1, tb] on one row of cores: core (0, j) broadcasts its tile to its tb columns of the output; no traffic.
    """
    out = eqn.outvars[0].aval
    gw, tb = tiling.grid[1], tiling.tile[-1]
    dims = eqn.params["broadcast_dimensions"]
    cast = tiles.astype(eqn.invars[0].aval.dtype)
    y, _ = wafer.map_cores(lambda w: jax.lax.broadcast_in_dim(w, (*out.shape[:-1], tb), dims), cast)
    y = jnp.moveaxis(y[0], 0, -2).reshape(*out.shape[:-1], gw * tb)[..., : out.shape[-1]]
    return y.astype(out.dtype)


def _scan_per_core(eqn, invals, runs, tiles, tilings, depth=0):
    """A `lax.scan` whose body's weight dots (`partition.scan_runs`, those of this scan in `runs`) run per core at
    every iteration (`_dense_per_core` on the weights' `tiles`, one copy of each tile grid, chained reductions), the
    rest of the body on the assembled values; returns (outputs, traffic of all iterations). `eqn` is `depth` scans
    deep in its kernel's (`ScanDot.path`): a scan in its body that holds weight dots runs the same way.

    The traffic of an iteration is static (wafer.Traffic): the body's trace records it once, and the scan's is that
    iteration's, `length` times over, one after another (what `partition.scan_traffic` records)."""
    p = eqn.params
    closed = p["jaxpr"]
    body, nc, ncarry = closed.jaxpr, p["num_consts"], p["num_carry"]
    below = [d for d in runs if len(d.path) > depth and d.path[depth] is eqn]
    mine = {d.dot: d for d in below if len(d.path) == depth + 1}
    nested = {d.path[depth + 1] for d in below if len(d.path) > depth + 1}
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    seen = []

    def step(carry, x):
        env = dict(zip(body.constvars, closed.consts))
        env.update(zip(body.invars, [*consts, *carry, *x]))
        read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]  # noqa: E731
        traffic = wafer.Traffic.none()
        for e in body.eqns:
            ins = [read(a) for a in e.invars]
            d = mine.get(e)
            if e in nested:
                outs, t = _scan_per_core(e, ins, below, tiles, tilings, depth + 1)
                traffic = traffic + t
            elif d is None:
                outs = _eval_eqn(e, ins)
            else:
                # a weight the body casts is cast by each core on its tile, as for an anchor
                w = tiles[d.widx].astype(e.invars[d.pos].aval.dtype)
                y, t = _dense_per_core(ins[1 - d.pos], w, tilings[d.widx], e, "chain", d.pos, d.perm)
                traffic, outs = traffic + t, [y]
            env.update(zip(e.outvars, outs))
        seen.append(traffic)
        outs = [read(a) for a in body.outvars]
        return outs[:ncarry], outs[ncarry:]

    carry, ys = jax.lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    traffic = wafer.Traffic.none()
    for _ in range(p["length"]):
        traffic = traffic + seen[-1]
    return [*carry, *ys], traffic


def run_per_core(plan, leaves, state, inputs):
    """Evaluate a plan's program kernel by kernel, with the parameter `leaves` read from `state`'s SRAM. Returns
    (outputs, traffic generated by per-core kernels)."""
    traced = plan.traced
    jaxpr = traced.jaxpr
    env = {}
    param_vars = jaxpr.invars[: traced.n_params]
    for v, val in zip(param_vars, leaves):
        env[v] = val
    for v, val in zip(jaxpr.invars[traced.n_params :], traced.flatten_inputs(*inputs)):
        env[v] = val
    for v, val in zip(jaxpr.constvars, traced.consts):
        env[v] = val

    def read(a):
        return a.val if isinstance(a, jcore.Literal) else env[a]

    traffic = wafer.Traffic.none()
    runs = {"dense": _dense_per_core, "batched": _dense_per_core, "conv": _conv_per_core, "gather": _gather_per_core}
    for kernel in plan.graph.kernels:
        kplan = plan.kernels[kernel.name]
        tilings = {t.index: t for t in kplan.params}
        # only the kernel's anchor runs per core: it is what the partition tiles and charges (a kernel whose every
        # equation reads weights only, e.g. an embedding of one row broadcast, has none)
        anchor, widx, pos, perm = anchor_operand(kernel, traced)
        dots = []
        if plan.features.anchor[kernel.index] != ft.WEIGHT:
            anchor = None
            # a scan's weight dots run per core at every iteration, on the tiles of each weight they multiply by
            dots = scan_runs(kernel, traced, tilings) if plan.features.anchor[kernel.index] == ft.SPREAD else []
        scan_tiles = {d.widx: state.read(f"{kplan.name}:{tilings[d.widx].path}") for d in dots}
        rows = row_broadcasts(kernel, traced, tilings)
        for eqn in kernel.eqns:
            invals = [read(a) for a in eqn.invars]
            done = False
            if any(d.scan is eqn for d in dots):
                outs, t = _scan_per_core(eqn, invals, dots, scan_tiles, tilings)
                traffic = traffic | t.at(kplan.rect.row, kplan.rect.col)
                done = True
            if eqn in rows:  # a one-row weight broadcast: each core of its row broadcasts its tile
                tiling = tilings[rows[eqn]]
                outs = [_row_broadcast_per_core(eqn, state.read(f"{kplan.name}:{tiling.path}"), tiling)]
                done = True
            if eqn is anchor:
                tiling = tilings.get(widx)
                kind = per_core_kind(eqn, tiling, pos, perm)
                if kind is not None:
                    tiles = state.read(f"{kplan.name}:{tiling.path}")  # the per-core view [gh, gw, *tile]
                    # a weight the program casts (a 16-bit copy of a float32 one) is cast by each core on its tile; one
                    # it transposes is read along its other axes (`ParamTiling.axes`)
                    tiles = tiles.astype(eqn.invars[pos].aval.dtype)
                    args = {"dense": (pos, perm), "batched": (pos, perm), "conv": (pos,), "gather": ()}[kind]
                    y, t = runs[kind](invals[1 - pos], tiles, tiling, eqn, kplan.reduce_pattern, *args)
                    traffic = traffic | t.at(kplan.rect.row, kplan.rect.col)
                    outs, done = [y], True
            if not done:
                outs = _eval_eqn(eqn, invals)
            for v, val in zip(eqn.outvars, outs):
                env[v] = val
    flat_out = [read(a) for a in jaxpr.outvars]
    return jax.tree_util.tree_unflatten(traced.out_treedef, flat_out), traffic
