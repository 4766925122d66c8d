"""The per-core execution path: each weight kernel run literally on its cores.

The flattened jaxpr is evaluated kernel by kernel. A kernel's anchor runs per core when it is
  dense  dot_general(x[..., K], W[K, N]) contracting x's last axis with W's first (Flax Dense),
  conv   conv_general_dilated(x, W) with W's last two axes (in, out) features and no feature groups:
as the partitioner says: x's contracted axis is cut into gh chunks (zero-padded), chunk i enters row i at its
west edge and is multicast along the row (`wafer.multicast`); core (i, j) runs the matmul/conv of its chunk with
its SRAM tile W[i, j] (`wafer.map_cores`); partial results are summed along each column to the bottom row
(`wafer.reduce`), whose gw cores hold the output's N axis in chunks. Other equations (epilogues, weightless
kernels, grouped convolutions, embedding gathers) run on the assembled activations with weights reassembled
from their tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

import wafer
from compiler.plan import features as ft
from compiler.plan.partition import anchor_weight, conv_rows_span, group_offsets, per_core_kind


def _eval_eqn(eqn, invals):
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


def _groups(tiles, tiling):
    """SRAM tiles [gh, gw, ...] of the first copy -> [G, gh, gw, ...], one tile grid per group of cores (every
    copy holds the same values; see ParamTiling.replicas)."""
    rr, rc = tiling.replicas
    return jnp.broadcast_to(tiles[None], (rr * rc, *tiles.shape))


def _grouped(xg, tiles, tiling, op, pattern="chain"):
    """Run `op(chunk, tile)` on every core of every group, with the fabric moving data as the partitioner says.

    Args:
      xg: [G, gh, *chunk]: group g's input, cut into gh chunks along the contracted axis.
      tiles: the weight's SRAM tiles [gh, gw, *tile] (first copy).
    Returns:
      ([G, gw, *out_chunk] summed partial results at each group's bottom row, region-local traffic).
    """
    gh, gw = tiling.grid
    # chunk i of group g enters row i of the group at its west edge and is multicast along the row
    west = jnp.pad(xg[:, :, None], [(0, 0), (0, 0), (0, gw - 1)] + [(0, 0)] * (xg.ndim - 2))
    xin, t_in = jax.vmap(lambda a: wafer.multicast(a, "row", src=0))(west)
    partial, _ = jax.vmap(lambda a, w: wafer.map_cores(op, a, w))(xin, _groups(tiles, tiling))
    summed, t_out = jax.vmap(lambda a: wafer.reduce(a, "col", "sum", to="last", pattern=pattern))(partial)
    traffic = (t_in + t_out).replicate(group_offsets(tiling))
    return summed[:, 0], traffic


def _dense_per_core(x, tiles, tiling, eqn, pattern="chain"):
    """y = x @ W with W's tiles on cores and x's rows split over groups; returns (y, traffic)."""
    gh, gw = tiling.grid
    rr, rc = tiling.replicas
    groups = rr * rc
    tk, tn = tiling.tile
    k_dim, n_dim = tiling.shape
    lead = x.shape[:-1]
    m = int(np.prod(lead))
    mt = -(-m // groups)
    x2 = jnp.pad(x.reshape(m, k_dim), ((0, groups * mt - m), (0, gh * tk - k_dim)))
    xg = jnp.transpose(x2.reshape(groups, mt, gh, tk), (0, 2, 1, 3))  # [G, gh, mt, tk]
    pet = eqn.params.get("preferred_element_type")
    prec = eqn.params.get("precision")
    op = lambda a, w: jnp.matmul(a, w, precision=prec, preferred_element_type=pet)
    summed, traffic = _grouped(xg, tiles, tiling, op, pattern)  # [G, gw, mt, tn]
    y = jnp.transpose(summed, (0, 2, 1, 3)).reshape(groups * mt, gw * tn)[:m, :n_dim]
    return y.reshape(*lead, n_dim).astype(eqn.outvars[0].aval.dtype), traffic


def _conv_per_core(x, tiles, tiling, eqn, pattern="chain"):
    """Convolution: input features over a group's rows, output features over its columns, output rows (first
    spatial axis) over groups; each group reads its rows of the padded input with the window's halo."""
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
    # cut input features into gh chunks: [G, gh, ..., tk, ...]
    pad = [(0, 0)] * xs.ndim
    pad[c_ax + 1] = (0, gh * tk - cin)
    xs = jnp.pad(xs, pad)
    xs = xs.reshape(*xs.shape[: c_ax + 1], gh, tk, *xs.shape[c_ax + 2 :])
    xg = jnp.moveaxis(xs, c_ax + 1, 1)
    conv = lambda a, w: jax.lax.conv_general_dilated(
        a,
        w,
        window_strides=p["window_strides"],
        padding=padding,
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=dn,
        feature_group_count=1,
        batch_group_count=p["batch_group_count"],
        precision=p["precision"],
        preferred_element_type=p["preferred_element_type"],
    )
    summed, traffic = _grouped(xg, tiles, tiling, conv, pattern)  # [G, gw, *out with features tn and rows mt]
    y = jnp.moveaxis(summed, 1, o_ax + 1)  # [G, ..., gw, tn, ...]
    y = y.reshape(*y.shape[: o_ax + 1], gw * tn, *y.shape[o_ax + 3 :])
    y = jax.lax.slice_in_dim(y, 0, cout, axis=o_ax + 1)
    y = jnp.moveaxis(y, 0, o_sp)  # [..., G, mt, ...] on the row axis
    y = y.reshape(*y.shape[:o_sp], y.shape[o_sp] * y.shape[o_sp + 1], *y.shape[o_sp + 2 :])
    y = jax.lax.slice_in_dim(y, 0, out_aval.shape[o_sp], axis=o_sp)
    return y.astype(out_aval.dtype), traffic


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
    var_param = {v: i for i, v in enumerate(param_vars)}

    def read(a):
        return a.val if isinstance(a, jcore.Literal) else env[a]

    traffic = wafer.Traffic.none()
    for kernel in plan.graph.kernels:
        kplan = plan.kernels[kernel.name]
        tilings = {t.index: t for t in kplan.params}
        # only the kernel's anchor runs per core: it is what the partition tiles and charges (a kernel whose every
        # equation reads weights only, e.g. an embedding of one row broadcast, has none)
        anchor = anchor_weight(kernel, traced)[0] if plan.features.anchor[kernel.index] == ft.WEIGHT else None
        for eqn in kernel.eqns:
            invals = [read(a) for a in eqn.invars]
            done = False
            if eqn is anchor:
                w = eqn.invars[1]
                idx = var_param.get(w) if isinstance(w, jcore.Var) else None
                tiling = tilings.get(idx) if idx is not None else None
                kind = per_core_kind(eqn, tiling)
                if kind is not None:
                    tiles = state.read(f"{kplan.name}:{tiling.path}")  # the per-core view [gh, gw, *tile]
                    run = _dense_per_core if kind == "dense" else _conv_per_core
                    y, t = run(invals[0], tiles, tiling, eqn, kplan.reduce_pattern)
                    traffic = traffic | t.at(kplan.rect.row, kplan.rect.col)
                    outs, done = [y], True
            if not done:
                outs = _eval_eqn(eqn, invals)
            for v, val in zip(eqn.outvars, outs):
                env[v] = val
    flat_out = [read(a) for a in jaxpr.outvars]
    return jax.tree_util.tree_unflatten(traced.out_treedef, flat_out), traffic
