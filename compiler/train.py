"""Training on the emulated wafer: `compile_train`, its two execution modes, and the training cost.

    tx = compiler.compile_train(loss_fn, params, example_batch, optimizer, spec=spec, mode="auto")
    state = tx.init(params)                  # weights and optimizer state into SRAM (or the host store)
    state, metrics = tx.step(state, batch)   # forward, backward and update; metrics["loss"]
    tx.read_params(state); tx.report

Layer-pipelined mode (Cerebras's mode for models that fit): every kernel keeps its weights, its optimizer state
and the activations stashed for the backward pass in its own rectangle's SRAM. A step reads the weight tiles,
takes the gradient of the loss *with respect to those tiles* (the gradient of an untile is a tile: each core
gets the gradient of exactly the weights it holds, never a gradient of the whole SRAM), applies the optax
transformation to the tiles, which is what the hardware does when each core updates its own weights, and
writes weights and optimizer slots back in place. Padding in uneven tiles has zero gradient and so stays zero.
Elementwise transformations (sgd, momentum, Adam/AdamW, RMSProp, Lion, schedules, weight decay) and global-norm
clipping give the same numbers on tiles as on the original arrays; a transformation that looks at parameter
shapes (e.g. Adafactor's factored moments) must use `update_on="params"`, which untiles, updates and re-tiles.

Weight-streaming mode (models whose weights do not fit): the weights and optimizer state live in a host-side
store (the MemoryX role); each layer in turn streams its weights in over the edge I/O, uses the whole wafer for
its forward and backward, streams its gradient out, and the optimizer runs off-wafer. `mode="auto"` picks
layer-pipelined when the program fits and weight streaming when it does not.

Both modes compute exactly what native JAX computes: the step is `value_and_grad` of the user's loss and the
user's optax transformation, on the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import wafer
from compiler import partition as part
from compiler import precision
from compiler.graph import build_graph
from compiler.lower import graph_batch, kernel_row, lay_out
from compiler.place import PlacementError
from compiler.report import Report
from compiler.trace import trace
from wafer import cost
from wafer.kernel import count as count_fn
from wafer.memory import MemoryMap, Rect

MODES = ("auto", "pipelined", "weight_streaming")


@struct.dataclass
class TrainState:
    """What a training run carries between steps.

    Attributes:
      wafer: the WaferState (weights, optimizer slots and buffers in SRAM in pipelined mode; counters).
      host: host-side store: in weight streaming {"params", "opt_state"}; in pipelined mode the optimizer state
        leaves that are not weight-shaped (step counts), which live with the host loop.
      step: training steps taken.
    """

    wafer: wafer.WaferState
    host: Any
    step: jax.Array


def _has_aux(loss_fn, params, batch) -> bool:
    out = jax.eval_shape(loss_fn, params, batch)
    if isinstance(out, tuple) and len(out) == 2:
        return True
    if not (hasattr(out, "shape") and out.shape == ()):
        raise ValueError(
            f"loss_fn(params, batch) must return a scalar or (scalar, aux); got {jax.tree_util.tree_structure(out)}"
        )
    return False


def _mirrors(opt_state_shape, param_avals):
    """Which optimizer-state leaves mirror which parameter leaves.

    Optax slots (momentum, mu, nu, ...) are trees shaped like the params: their leaves appear in parameter order
    as runs of n leaves with the parameters' shapes. Returns (mirror, k): mirror[j] = (slot, param index) for
    weight-shaped leaf j, None for the others (counts, scalars); k = the number of slots.
    """
    leaves = jax.tree_util.tree_leaves(opt_state_shape)
    n = len(param_avals)
    shapes = [(tuple(a.shape), np.dtype(a.dtype)) for a in param_avals]
    mirror = [None] * len(leaves)
    j, slot = 0, 0
    while j < len(leaves):
        run = leaves[j : j + n]
        if n and len(run) == n and all((tuple(x.shape), np.dtype(x.dtype)) == s for x, s in zip(run, shapes)):
            for i in range(n):
                mirror[j + i] = (slot, i)
            j += n
            slot += 1
        else:
            j += 1
    return mirror, slot


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class TrainRecord:
    """Static cost of one training step (a `wafer.charge` record).

    Pipelined: B samples stream forward and backward through the kernels (backward = 2 x forward per kernel:
    the input gradient and the weight gradient each cost as much as the forward), then every kernel updates its
    weights on its own cores at once; the batch streams in through the edge I/O meanwhile, and the slower of the
    two bounds the step. Streaming: for each layer, weights stream in (forward), in again and gradients out
    (backward); each phase costs the slower of its compute on the whole wafer and its I/O.
    """

    mode: str
    plans: tuple
    routes: Any
    batch: int
    update_counts: tuple  # per plan: {(op_class, dtype_class): elements} per core of its optimizer update
    io_bytes: float  # batch bytes streamed in per step
    stream_bytes: tuple = ()  # per plan: weight bytes streamed per step (weight streaming)

    def _fwd(self, spec):
        return [p.cycles(spec) for p in self.plans]

    def kernel_cycles(self, spec):
        """[(forward, backward, update) cycles per step] per kernel."""
        out = []
        for _p, f, u in zip(self.plans, self._fwd(spec), self.update_counts):
            out.append((f, 2 * f, cost.compute_cycles(spec, u)))
        return out

    def compute_cycles(self, spec):
        ks = self.kernel_cycles(spec)
        if self.mode == "weight_streaming":
            total = 0.0
            for (f, b, _), nbytes in zip(ks, self.stream_bytes):
                io = cost.io_cycles(spec, nbytes)
                total = total + cost.maximum(f, io) + cost.maximum(b, 2 * io)
            return total
        per_sample = [(f + b) / self.batch for f, b, _ in ks]
        worst = functools.reduce(cost.maximum, per_sample, 0.0)
        update = functools.reduce(cost.maximum, [u for _, _, u in ks], 0.0)
        hops = self.routes.max_hops if self.routes is not None else 0
        return sum(per_sample) + 2 * hops * spec.hop_latency_cycles + (self.batch - 1) * worst + update

    def io_cycles(self, spec):
        return cost.io_cycles(spec, self.io_bytes)

    def cycles(self, spec):
        return cost.maximum(self.compute_cycles(spec), self.io_cycles(spec))

    def bound(self, spec) -> str:
        """What bounds a step: "compute", "fabric" or "I/O"."""
        if float(self.io_cycles(spec)) >= float(self.compute_cycles(spec)):
            return "I/O"
        if self.mode == "weight_streaming":
            ks = self.kernel_cycles(spec)
            io = sum(float(cost.io_cycles(spec, 3 * b)) for b in self.stream_bytes)
            return "I/O" if io >= sum(float(f + b) for f, b, _ in ks) else "compute"
        comm = sum(float(p.comm_cycles(spec)) for p in self.plans)
        comp = sum(float(p.compute_cycles(spec)) for p in self.plans)
        return "fabric" if comm > comp else "compute"

    def link_words(self, rows, cols):
        out = np.zeros((4, rows, cols))
        for p in self.plans:
            out += 3 * p.traffic.link_words(rows, cols)  # forward, input gradient, weight gradient
        if self.routes is not None:
            out += 2 * self.batch * self.routes.link_words(rows, cols)  # activations forward, gradients back
        return out

    def compute_map(self, spec, rows, cols):
        out = np.zeros((rows, cols))
        for p, (f, b, u) in zip(self.plans, self.kernel_cycles(spec)):
            mask = np.zeros((rows, cols))
            mask[p.rect.row : p.rect.row + p.grid[0], p.rect.col : p.rect.col + p.grid[1]] = 1.0
            out = out + (f + b + u) * mask
        return out


class Trainer:
    """A training step compiled onto a wafer. See the module docstring.

    Attributes:
      mode: "pipelined" or "weight_streaming"; spec, traced, graph, placement, plans, memory, record, report.
      policy: the precision policy (compiler/precision.py); `loss_fn` is the policy's `apply_policy(loss_fn)`.
    """

    def __init__(
        self,
        *,
        loss_fn,
        has_aux,
        optimizer,
        spec,
        mode,
        traced,
        graph,
        placement,
        plans,
        routes,
        memory,
        mirror,
        slots,
        update_on,
        policy=None,
    ):
        self.loss_fn, self.has_aux, self.optimizer, self.spec, self.mode = loss_fn, has_aux, optimizer, spec, mode
        self.policy = precision.Policy.of(policy)
        self.traced, self.graph, self.placement, self.plans, self.routes = traced, graph, placement, plans, routes
        self.memory, self._mirror, self._slots, self.update_on = memory, mirror, slots, update_on
        self._tilings = {t.index: (f"{p.name}:{t.path}", t) for p in plans.values() for t in p.params}
        self._opt_treedef = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, traced.params))
        if mode == "pipelined" and update_on == "tiles":
            tiles = [jax.ShapeDtypeStruct((*t.grid, *t.tile), t.dtype) for _, t in self._ordered()]
            tiled = jax.eval_shape(optimizer.init, self._tile_tree(tiles))
            self._opt_struct = jax.tree_util.tree_structure(tiled)
            # shape-dependent state (e.g. Adafactor's factored moments) may keep the structure but not the shapes:
            # weight-shaped leaves must become tile-shaped, every other leaf must keep its shape
            leaves = jax.tree_util.tree_leaves(jax.eval_shape(optimizer.init, traced.params))
            want = [tuple(x.shape) if m is None else tiles[m[1]].shape for x, m in zip(leaves, mirror)]
            got = [tuple(x.shape) for x in jax.tree_util.tree_leaves(tiled)]
            if self._opt_struct != self._opt_treedef or want != got:
                raise ValueError(
                    "this optimizer's state depends on parameter shapes (its structure or leaf shapes differ for "
                    "tiles); compile with update_on='params'"
                )
        self.record = self._record()
        self.report = build_train_report(self)
        self.step = jax.jit(self._step, donate_argnums=0)

    # ---- state -------------------------------------------------------------------------------------------

    def init(self, params=None) -> TrainState:
        """Weights and optimizer state into SRAM (pipelined) or the host store (weight streaming)."""
        params = self.traced.params if params is None else params
        leaves = self.traced.flatten_params(params)
        state = wafer.init(self.spec).replace(memory=self.memory)
        if self.mode == "weight_streaming":
            # copies: the step donates its state, which must not delete the caller's arrays
            params = jax.tree_util.tree_unflatten(self.traced.param_treedef, [jnp.array(x) for x in leaves])
            host = {"params": params, "opt_state": self.optimizer.init(params)}
            return TrainState(wafer=state, host=host, step=jnp.zeros((), jnp.int32))
        tiles = [self._tiling(i).tile_array(jnp.asarray(x, self._tiling(i).dtype)) for i, x in enumerate(leaves)]
        opt_leaves = jax.tree_util.tree_leaves(self._init_opt(tiles, params))
        sram = {self._name(i): t for i, t in enumerate(tiles)}
        host = []
        for leaf, m in zip(opt_leaves, self._mirror):
            if m is None:
                host.append(leaf)
            else:
                sram[self._name(m[1], f"#opt{m[0]}")] = self._to_tiles(leaf, m[1])
        return TrainState(wafer=state.replace(sram=sram), host=host, step=jnp.zeros((), jnp.int32))

    def read_params(self, state: TrainState):
        """The params: untiled from SRAM (pipelined) or from the host store (weight streaming)."""
        if self.mode == "weight_streaming":
            return state.host["params"]
        leaves = [self._tiling(i).untile(state.wafer.sram[self._name(i)]) for i in range(self.traced.n_params)]
        return jax.tree_util.tree_unflatten(self.traced.param_treedef, leaves)

    def read_opt_state(self, state: TrainState):
        """The optimizer state, shaped as `optimizer.init(params)` would make it."""
        if self.mode == "weight_streaming":
            return state.host["opt_state"]
        leaves, it = [], iter(state.host)
        for m in self._mirror:
            if m is None:
                leaves.append(next(it))
            else:
                slot, i = m
                leaves.append(self._tiling(i).untile(state.wafer.sram[self._name(i, f"#opt{slot}")]))
        return jax.tree_util.tree_unflatten(self._opt_treedef, leaves)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _tiling(self, i):
        return self._tilings[i][1]

    def _name(self, i, slot=""):
        return self._tilings[i][0] + slot

    def _to_tiles(self, leaf, i):
        return leaf if self.update_on == "tiles" else self._tiling(i).tile_array(leaf)

    def _init_opt(self, tiles, params):
        return self.optimizer.init(self._tile_tree(tiles) if self.update_on == "tiles" else params)

    def _ordered(self):
        return sorted(self._tilings.values(), key=lambda nt: nt[1].index)

    def _tile_tree(self, tiles):
        return jax.tree_util.tree_unflatten(self.traced.param_treedef, list(tiles))

    def _loss(self, params, batch):
        out = self.loss_fn(params, batch)
        return out if self.has_aux else (out, None)

    # ---- the step ----------------------------------------------------------------------------------------

    def _step(self, state: TrainState, batch):
        if self.mode == "weight_streaming":
            return self._step_streaming(state, batch)
        w = state.wafer
        n = self.traced.n_params
        tiles = [w.sram[self._name(i)] for i in range(n)]

        def loss_of_tiles(tiles):
            leaves = [self._tiling(i).untile(t) for i, t in enumerate(tiles)]
            return self._loss(jax.tree_util.tree_unflatten(self.traced.param_treedef, leaves), batch)

        (loss, aux), g_tiles = jax.value_and_grad(loss_of_tiles, has_aux=True)(tiles)
        opt_leaves, it = [], iter(state.host)
        for m in self._mirror:
            if m is None:
                opt_leaves.append(next(it))
            else:
                slot, i = m
                opt_leaves.append(w.sram[self._name(i, f"#opt{slot}")])
        if self.update_on == "tiles":
            opt_state = jax.tree_util.tree_unflatten(self._opt_struct, opt_leaves)
            updates, opt_state = self.optimizer.update(self._tile_tree(g_tiles), opt_state, self._tile_tree(tiles))
            new_tiles = jax.tree_util.tree_leaves(optax.apply_updates(self._tile_tree(tiles), updates))
            new_opt = jax.tree_util.tree_leaves(opt_state)
        else:
            untile = lambda xs: [self._tiling(i).untile(x) for i, x in enumerate(xs)]
            params = jax.tree_util.tree_unflatten(self.traced.param_treedef, untile(tiles))
            grads = jax.tree_util.tree_unflatten(self.traced.param_treedef, untile(g_tiles))
            opt_in = [x if m is None else self._tiling(m[1]).untile(x) for x, m in zip(opt_leaves, self._mirror)]
            opt_state = jax.tree_util.tree_unflatten(self._opt_treedef, opt_in)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            new_tiles = [self._tiling(i).tile_array(x) for i, x in enumerate(jax.tree_util.tree_leaves(params))]
            new_opt = [
                x if m is None else self._tiling(m[1]).tile_array(x)
                for x, m in zip(jax.tree_util.tree_leaves(opt_state), self._mirror)
            ]
        sram = dict(w.sram)
        host = []
        for i, t in enumerate(new_tiles):
            sram[self._name(i)] = t.astype(tiles[i].dtype)
        for x, m in zip(new_opt, self._mirror):
            if m is None:
                host.append(x)
            else:
                sram[self._name(m[1], f"#opt{m[0]}")] = x
        w = wafer.charge(w.replace(sram=sram), self.spec, self.record)
        metrics = {"loss": loss}
        if self.has_aux:
            metrics["aux"] = aux
        return TrainState(wafer=w, host=host, step=state.step + 1), metrics

    def _step_streaming(self, state: TrainState, batch):
        params, opt_state = state.host["params"], state.host["opt_state"]
        (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        w = wafer.charge(state.wafer, self.spec, self.record)
        metrics = {"loss": loss}
        if self.has_aux:
            metrics["aux"] = aux
        return TrainState(wafer=w, host={"params": params, "opt_state": opt_state}, step=state.step + 1), metrics

    # ---- cost --------------------------------------------------------------------------------------------

    def _record(self) -> TrainRecord:
        batch = graph_batch(self.graph)
        io_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in self.traced.input_avals)
        update_counts, stream = [], []
        for p in self.plans.values():
            counts = {}
            if p.params and self.mode == "pipelined":  # in weight streaming the optimizer runs off-wafer
                # a core updates its own tile of each weight: count the update on one core's tiles
                tiles = [jax.ShapeDtypeStruct(t.tile, t.dtype) for t in p.params]
                counts, _, _ = count_fn(_update_fn(self.optimizer), tiles)
            update_counts.append({k: float(v) for k, v in counts.items()})
            stream.append(float(sum(np.prod(t.shape) * self._stream_itemsize(t) for t in p.params)))
        routes = self.routes if self.mode == "pipelined" else None
        return TrainRecord(
            self.mode, tuple(self.plans.values()), routes, batch, tuple(update_counts), io_bytes, tuple(stream)
        )

    def _stream_itemsize(self, t) -> int:
        """Bytes per weight element streamed in (and per gradient element out): 16-bit under a mixed policy, whose
        float32 master weights stay in the host store."""
        if self.policy.mixed and jnp.issubdtype(t.dtype, jnp.floating):
            return self.policy.storage_bytes
        return np.dtype(t.dtype).itemsize


def _update_fn(optimizer):
    def update(tiles):
        state = optimizer.init(tiles)
        updates, _ = optimizer.update(tiles, state, tiles)
        return optax.apply_updates(tiles, updates)

    return update


def compile_train(
    loss_fn,
    params,
    example_batch,
    optimizer: optax.GradientTransformation,
    *,
    spec: wafer.WaferSpec,
    mode: str = "auto",
    placement=None,
    placement_params=None,
    update_on: str = "tiles",
    policy: precision.Policy | str | None = None,
) -> Trainer:
    """Compile a training step of `loss_fn(params, batch)` with an optax `optimizer` onto `spec`.

    Args:
      loss_fn: returns a scalar loss or (loss, aux).
      params, example_batch: example pytrees (shapes and dtypes are what matter).
      optimizer: any optax GradientTransformation.
      spec: the wafer.
      mode: "pipelined" (weights resident), "weight_streaming" (weights from the host store), or "auto":
        pipelined when it fits, streaming when it does not.
      placement, placement_params: as for `compile` (pipelined mode).
      update_on: "tiles" (each core updates its own tiles; exact for elementwise transformations and global-norm
        clipping) or "params" (untile, update, re-tile: for transformations that look at parameter shapes).
      policy: a precision policy (compiler/precision.py): None or "fp32" (float32, the default), or 16-bit
        storage with float32 accumulation ("fp16", "bf16", "cb16" or a `compiler.Policy`). The loss runs as
        `apply_policy(loss_fn, policy)` on float32 master weights, which stay in SRAM with float32 optimizer
        state; activations are counted at 2 bytes and matmul FMACs at the mixed SIMD width.
    Raises:
      ValueError: bad mode/update_on or loss output; wafer.SramCapacityError or compiler.PlacementError when
        mode="pipelined" does not fit, or a single layer does not fit the whole wafer in weight streaming.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if update_on not in ("tiles", "params"):
        raise ValueError(f"update_on must be 'tiles' or 'params', got {update_on!r}")
    has_aux = _has_aux(loss_fn, params, example_batch)
    scalar_loss = (lambda p, b: loss_fn(p, b)[0]) if has_aux else loss_fn
    policy = precision.Policy.of(policy)
    if policy.mixed:
        traced = precision.trace_policy(scalar_loss, params, example_batch, policy=policy, stored_params=False)
        loss_fn = precision.apply_policy(loss_fn, policy)
    else:
        traced = trace(scalar_loss, params, example_batch)
    act_itemsize = policy.storage_bytes if policy.mixed else None
    graph = build_graph(traced)
    opt_shape = jax.eval_shape(optimizer.init, params)
    mirror, n_slots = _mirrors(opt_shape, traced.param_avals)
    common = dict(
        loss_fn=loss_fn,
        has_aux=has_aux,
        optimizer=optimizer,
        spec=spec,
        traced=traced,
        graph=graph,
        mirror=mirror,
        update_on=update_on,
        policy=policy,
    )
    if mode in ("auto", "pipelined"):
        slots = ("", "#grad", *(f"#opt{k}" for k in range(n_slots)))
        try:
            rects, plans, routes, memory = lay_out(
                traced, graph, spec, placement, placement_params, slots=slots, act_copies=2, act_itemsize=act_itemsize
            )
            return Trainer(
                mode="pipelined", placement=rects, plans=plans, routes=routes, memory=memory, slots=slots, **common
            )
        except (wafer.SramCapacityError, PlacementError):
            if mode == "pipelined":
                raise
    # Weight streaming: every layer in turn on the whole usable wafer, its weights streamed in.
    full = Rect(0, spec.memcpy_cols_west, spec.rows, spec.cols - spec.memcpy_cols_west - spec.memcpy_cols_east)
    plans = {
        k.name: part.plan_kernel(k, full, traced, spec, weight_copies=1, act_copies=2, act_itemsize=act_itemsize)
        for k in graph.kernels
    }
    memory = MemoryMap(spec.rows, spec.cols, spec.sram_bytes_per_core)
    biggest = max(plans.values(), key=lambda p: p.sram_bytes)
    memory = memory.allocate(
        "streamed_layer", Rect(full.row, full.col, *biggest.grid), (max(1, biggest.sram_bytes // 4),), "float32"
    )
    return Trainer(
        mode="weight_streaming",
        placement={k: full for k in plans},
        plans=plans,
        routes=None,
        memory=memory,
        slots=("",),
        **common,
    )


def build_train_report(tx: Trainer) -> Report:
    """The training report: per-kernel forward/backward/update cycles, SRAM per core, what bounds a step."""
    spec, rec = tx.spec, tx.record
    rows = []
    kinds = {k.name: k for k in tx.graph.kernels}
    for p, (f, b, u), nbytes in zip(rec.plans, rec.kernel_cycles(spec), rec.stream_bytes):
        rows.append(
            kernel_row(
                p,
                spec,
                rec.batch,
                kinds[p.name].source,
                flops_factor=3.0,  # forward, input gradient, weight gradient
                cycles_per_sample=float(f + b) / rec.batch,
                forward_cycles=float(f),
                backward_cycles=float(b),
                update_cycles=float(u),
                io_cycles=float(cost.io_cycles(spec, nbytes)) if rec.mode == "weight_streaming" else 0.0,
            )
        )
    step = float(rec.cycles(spec))
    worst = max(rows, key=lambda r: r.cycles_per_sample)
    active = sum(r.cores for r in rows) if rec.mode == "pipelined" else max(r.cores for r in rows)
    flops = sum(r.flops_per_sample for r in rows)
    policy = getattr(tx, "policy", precision.FP32)
    lanes = spec.simd_width("fmac", policy.dtype_class)  # peak: matmul FMACs at the policy's SIMD width
    util = flops * rec.batch / (active * 2 * lanes * step) if step else 0.0
    return Report(
        spec_name=spec.name,
        mode=f"{rec.mode} training ({policy})" if policy.mixed else f"{rec.mode} training",
        batch=rec.batch,
        kernels=tuple(rows),
        bottleneck=worst.name,
        cycles_per_sample=step / rec.batch,
        samples_per_s=float(spec.clock_hz * rec.batch / step),
        latency_cycles=step,
        latency_s=step / float(spec.clock_hz),
        active_cores=int(active),
        total_cores=spec.cores,
        compute_utilization=float(min(util, 1.0)),
        peak_sram_bytes_per_core=int(max(p.sram_bytes for p in rec.plans)),
        sram_bytes_per_core=spec.sram_bytes_per_core,
        max_link_words_per_sample=float(rec.link_words(spec.rows, spec.cols).max() / rec.batch),
        route_hops=int(tx.routes.max_hops) if tx.routes is not None else 0,
        clock_hz=float(spec.clock_hz),
        bound=rec.bound(spec),
        io_cycles_per_step=float(rec.io_cycles(spec)),
    )
