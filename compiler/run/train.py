"""Training on the emulated wafer: `compile_train` and its two execution modes.

    tx = compiler.compile_train(loss_fn, params, example_batch, optimizer, spec=spec, mode="auto")
    state = tx.init(params)                  # weights and optimizer state into SRAM (or the host store)
    state, metrics = tx.step(state, batch)   # forward, backward and update; metrics["loss"]
    tx.read_params(state); tx.report

Layer-pipelined mode (Cerebras's mode for models that fit): every kernel keeps its weights, its optimizer state
and the activations stashed for the backward pass in its own rectangle's SRAM. Weights, optimizer slots and
gradients are blocked allocations (wafer/layout.py): each is stored as the whole leaf, core (i, j) of its
rectangle owning block (i, j), so its per-core view is exactly the tile that core holds. A step reads the weights
from SRAM, takes the gradient of the loss *with respect to those stored arrays* (each core gets the gradient of
exactly the block it holds, never a gradient of the whole SRAM), applies the optax transformation to them, which
is what the hardware does when each core updates its own weights, and writes weights and optimizer slots back in
place; no step reassembles a weight from tiles (measured at 1.4-1.6x native for an MLP, docs/performance.md).
The padding of uneven tiles is implicit (zeros in the per-core view). Elementwise transformations (sgd, momentum,
Adam/AdamW, RMSProp, Lion, schedules, weight decay) and global-norm clipping are exactly a per-core update; a
transformation that looks at parameter shapes (e.g. Adafactor's factored moments) is not, and must be compiled
with `update_on="params"` (which says the update runs on whole parameters, off the per-core model).

Weight-streaming mode (models whose weights do not fit): the weights and optimizer state live in a host-side
store (the MemoryX role); each layer in turn streams its weights in over the edge I/O, uses the whole wafer for
its forward and backward, streams its gradient out, and the optimizer runs off-wafer. `mode="auto"` picks
layer-pipelined when the program fits and weight streaming when it does not.

Both modes compute exactly what native JAX computes: the step is `value_and_grad` of the user's loss and the
user's optax transformation, on the same numbers. They are two builders, `pipelined_trainer` and
`streaming_trainer`, of the same `Program` type (compiler/run/program.py); their cost is the schedule's
(compiler/schedule.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import wafer
from compiler.errors import PlacementError
from compiler.frontend import precision
from compiler.plan import Plan, Storage, build, trace_program
from compiler.plan.place import PlacementParams
from compiler.run import checks
from compiler.run import cluster as cluster_lib
from compiler.run.program import Program, charge
from compiler.schedule import Charge

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


# ---- the builders ---------------------------------------------------------------------------------------------------


def _loss_of(loss_fn, has_aux):
    def loss(params, batch):
        out = loss_fn(params, batch)
        return out if has_aux else (out, None)

    return loss


def _metrics(loss, aux, has_aux):
    return {"loss": loss, "aux": aux} if has_aux else {"loss": loss}


def pipelined_trainer(
    plan: Plan, loss_fn, optimizer, *, has_aux: bool, mirror, update_on: str = "tiles", check_batch: bool = True
) -> Program:
    """A layer-pipelined training step (module docstring): weights, optimizer slots and stashes in SRAM.

    Args:
      plan: a built training plan in mode "pipelined" whose storage slots are ("", "#grad", "#opt0", ...).
      mirror: per optimizer-state leaf, (slot, parameter index) for weight-shaped leaves, None for the others
        (`_mirrors`).
      update_on: "tiles" (each core updates its own tiles: checked that the optimizer allows it) or "params"
        (whole parameters; both run on the stored blocked arrays, which are the parameters).
      check_batch: check each batch against the traced example (off for the multi-wafer update, whose "batch" is
        the all-reduced gradient, compiler/run/cluster.py; the cluster program checks the global batch).
    """
    traced, spec = plan.traced, plan.spec
    n = traced.n_params
    loss = _loss_of(loss_fn, has_aux)
    record = Charge(plan)
    tiling = lambda i: plan.weights[i][1]  # noqa: E731
    name = lambda i, slot="": plan.weights[i][0] + slot  # noqa: E731
    tree = lambda leaves: jax.tree_util.tree_unflatten(traced.param_treedef, list(leaves))  # noqa: E731
    opt_treedef = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, traced.params))
    if update_on == "tiles":
        # the update runs on the blocked arrays, which equals each core updating its own tile only for
        # transformations that do not look at shapes: check that the optimizer's state has the same form for tiles
        tiles = [jax.ShapeDtypeStruct((*tiling(i).grid, *tiling(i).tile), tiling(i).dtype) for i in range(n)]
        tiled = jax.eval_shape(optimizer.init, tree(tiles))
        opt_struct = jax.tree_util.tree_structure(tiled)
        # shape-dependent state (e.g. Adafactor's factored moments) may keep the structure but not the shapes:
        # weight-shaped leaves must become tile-shaped, every other leaf must keep its shape
        leaves = jax.tree_util.tree_leaves(jax.eval_shape(optimizer.init, traced.params))
        want = [tuple(x.shape) if m is None else tiles[m[1]].shape for x, m in zip(leaves, mirror)]
        got = [tuple(x.shape) for x in jax.tree_util.tree_leaves(tiled)]
        if opt_struct != opt_treedef or want != got:
            raise ValueError(
                "this optimizer's state depends on parameter shapes (its structure or leaf shapes differ for "
                "tiles); compile with update_on='params'"
            )

    def init(params=None) -> TrainState:
        params = traced.params if params is None else params
        leaves = checks.check_params(traced, params)
        state = wafer.init(spec).replace(memory=plan.memory)
        # copies: the step donates the state, which must not delete the caller's arrays
        weights = [jnp.array(x, tiling(i).dtype) for i, x in enumerate(leaves)]
        opt = optimizer.init(tree(weights))
        sram = {name(i): x for i, x in enumerate(weights)}
        host = []
        for leaf, m in zip(jax.tree_util.tree_leaves(opt), mirror):
            if m is None:
                host.append(jnp.array(leaf, copy=True))
            else:
                sram[name(m[1], f"#opt{m[0]}")] = jnp.array(leaf, copy=True)
        sram = _with_copies(plan, sram, copy=True)
        return TrainState(wafer=state.replace(sram=sram), host=host, step=jnp.zeros((), jnp.int32))

    # read_params and read_opt_state copy: the stored arrays are the state's own buffers, which the next step
    # (donating the state) deletes
    def read_params(state: TrainState):
        return tree(jnp.array(state.wafer.sram[name(i)]) for i in range(n))

    def read_opt_state(state: TrainState):
        leaves, it = [], iter(state.host)
        for m in mirror:
            if m is None:
                leaves.append(next(it))
            else:
                slot, i = m
                leaves.append(jnp.array(state.wafer.sram[name(i, f"#opt{slot}")]))
        return jax.tree_util.tree_unflatten(opt_treedef, leaves)

    @functools.cache
    def expected_state():
        return jax.eval_shape(lambda: init())

    def apply(state: TrainState, batch):
        checks.check_state(state, expected_state(), what="training")
        if check_batch:
            checks.check_inputs(traced, (batch,), "the batch")
        w = state.wafer
        # each weight, gradient and optimizer slot is a blocked allocation (wafer/layout.py): the stored array is
        # the leaf itself, core (i, j) owning block (i, j). The gradient is taken with respect to those arrays and
        # the optimizer runs on them in place, with no reassembly from per-core tiles: an elementwise update of the
        # blocked array is each core updating its own block, and the padding of uneven tiles is implicit.
        weights = [w.sram[name(i)] for i in range(n)]
        (value, aux), grads = jax.value_and_grad(lambda p: loss(tree(p), batch), has_aux=True)(weights)
        # The gradient is complete before the update reads it: without the barrier XLA may fuse the backward's batch
        # sums (e.g. a bias's gradient) into the optimizer's update, which changes the order of those sums, and
        # training drifts from native by an ulp and chaotically after. With it, a step computes what native JAX
        # computes, bit for bit (tests/compiler/test_train_numerics.py).
        grads = jax.lax.optimization_barrier(grads)
        opt_leaves, it = [], iter(state.host)
        for m in mirror:
            opt_leaves.append(next(it) if m is None else w.sram[name(m[1], f"#opt{m[0]}")])
        opt_state = jax.tree_util.tree_unflatten(opt_treedef, opt_leaves)
        updates, opt_state = optimizer.update(tree(grads), opt_state, tree(weights))
        new_weights = jax.tree_util.tree_leaves(optax.apply_updates(tree(weights), updates))
        new_opt = jax.tree_util.tree_leaves(opt_state)
        sram = dict(w.sram)
        host = []
        for i, x in enumerate(new_weights):
            sram[name(i)] = x.astype(weights[i].dtype)
        for x, m in zip(new_opt, mirror):
            if m is None:
                host.append(x)
            else:
                sram[name(m[1], f"#opt{m[0]}")] = x
        sram = _with_copies(plan, sram)
        w = charge(w.replace(sram=sram), spec, record)
        return TrainState(wafer=w, host=host, step=state.step + 1), _metrics(value, aux, has_aux)

    return Program(
        plan=plan,
        init=init,
        step=jax.jit(apply, donate_argnums=0),
        apply=apply,
        read_params=read_params,
        read_opt_state=read_opt_state,
        has_aux=has_aux,
    )


def _with_copies(plan: Plan, sram: dict, *, copy: bool = False) -> dict:
    """`sram` with the other copies of every shared parameter (tied weights: one copy in each kernel reading it,
    `Plan.weight_copies`) and of its optimizer slots set equal to the copy the step updated (`Plan.weights`): each
    copy is updated with the gradient summed over every use, so all hold the same values."""
    slots = [s for s in plan.storage.slots if s != "#grad"]
    for i, copies in plan.weight_copies.items():
        main, _ = plan.weights[i]
        for other, _ in copies:
            if other == main:
                continue
            for slot in slots:
                if main + slot not in sram:
                    continue
                x = sram[main + slot]  # blocked storage: every copy is the leaf itself, whatever its tiling
                sram[other + slot] = jnp.array(x, copy=True) if copy else x  # (init: no buffer donated twice)
    return sram


def streaming_trainer(plan: Plan, loss_fn, optimizer, *, has_aux: bool) -> Program:
    """A weight-streaming training step (module docstring): weights and optimizer state in the host store."""
    traced, spec = plan.traced, plan.spec
    loss = _loss_of(loss_fn, has_aux)
    record = Charge(plan)

    def init(params=None) -> TrainState:
        leaves = checks.check_params(traced, traced.params if params is None else params)
        # copies: the step donates its state, which must not delete the caller's arrays
        params = jax.tree_util.tree_unflatten(traced.param_treedef, [jnp.array(x) for x in leaves])
        state = wafer.init(spec).replace(memory=plan.memory)
        host = {"params": params, "opt_state": optimizer.init(params)}
        return TrainState(wafer=state, host=host, step=jnp.zeros((), jnp.int32))

    @functools.cache
    def expected_state():
        return jax.eval_shape(lambda: init())

    def apply(state: TrainState, batch):
        checks.check_state(state, expected_state(), what="training")
        checks.check_inputs(traced, (batch,), "the batch")
        params, opt_state = state.host["params"], state.host["opt_state"]
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        w = charge(state.wafer, spec, record)
        host = {"params": params, "opt_state": opt_state}
        return TrainState(wafer=w, host=host, step=state.step + 1), _metrics(value, aux, has_aux)

    return Program(
        plan=plan,
        init=init,
        step=jax.jit(apply, donate_argnums=0),
        apply=apply,
        read_params=lambda state: state.host["params"],
        read_opt_state=lambda state: state.host["opt_state"],
        has_aux=has_aux,
    )


def compile_train(
    loss_fn,
    params,
    example_batch,
    optimizer: optax.GradientTransformation,
    *,
    spec: wafer.WaferSpec,
    mode: str = "auto",
    placement=None,
    placement_params: PlacementParams | None = None,
    update_on: str = "tiles",
    policy: precision.Policy | str | None = None,
    wafers: int = 1,
    cluster: wafer.ClusterSpec | None = None,
    mesh=None,
    batch_axis="auto",
) -> Program:
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
        clipping) or "params" (whole parameters: for transformations that look at parameter shapes).
      policy: a precision policy (compiler/frontend/precision.py): None or "fp32" (float32, the default), or 16-bit
        storage with float32 accumulation ("fp16", "bf16", "cb16" or a `compiler.Policy`). The loss runs as
        `apply_policy(loss_fn, policy)` on float32 master weights, which stay in SRAM with float32 optimizer
        state; activations are counted at 2 bytes and matmul FMACs at the mixed SIMD width.
      wafers: train data-parallel on this many wafers (compiler/run/cluster.py): `example_batch` is the global
        batch, split evenly over them; the state gains a leading wafer axis.
      cluster: the interconnect between the wafers (`wafer.ClusterSpec`; default: CS-2 figures for `wafers`).
      mesh: where the wafers' states live: a JAX mesh with a "wafer" axis (`compiler.cluster_mesh(N)`: a wafer per
        device, across processes too); default: all on the first device.
      batch_axis: which axis of each leaf of the batch holds the samples (as for `compile`; a prefix of the
        example batch's tree, e.g. {"x": 0, "mask": None}).
    Returns:
      A `Program`: `state = tx.init(params)`, `state, metrics = tx.step(state, batch)`, `tx.report`.
    Raises:
      compiler.WaferSplitError: the global batch does not split evenly over `wafers`.
      ValueError: bad mode/update_on or loss output; wafer.SramCapacityError or compiler.PlacementError when
        mode="pipelined" does not fit, or a single layer does not fit the whole wafer in weight streaming.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if update_on not in ("tiles", "params"):
        raise ValueError(f"update_on must be 'tiles' or 'params', got {update_on!r}")
    wafers = cluster_lib.check_wafers(wafers)
    if cluster is None:
        cluster = wafer.ClusterSpec(wafers=wafers)
    elif wafers not in (1, cluster.wafers):
        raise ValueError(f"wafers={wafers} but cluster has {cluster.wafers} wafers; give one of them")
    wafers = cluster.wafers
    if wafers > 1:  # every wafer compiles for its share of the global batch
        example_batch = cluster_lib.per_wafer(example_batch, wafers)
    has_aux = _has_aux(loss_fn, params, example_batch)
    scalar_loss = (lambda p, b: loss_fn(p, b)[0]) if has_aux else loss_fn
    policy = precision.Policy.of(policy)
    loss_fn = precision.apply_policy(loss_fn, policy)
    on = cluster if wafers > 1 else None
    if on is not None and mesh is None:
        mesh = cluster_lib.mesh(wafers, jax.devices()[:1])
    act_itemsize = policy.storage_bytes if policy.mixed else None
    mirror, n_slots = _mirrors(jax.eval_shape(optimizer.init, params), jax.tree_util.tree_leaves(params))
    common = dict(spec=spec, task="training", policy=policy, optimizer=optimizer, batch_axis=batch_axis)
    if mode in ("auto", "pipelined"):
        slots = ("", "#grad", *(f"#opt{k}" for k in range(n_slots)))
        storage = Storage(slots=slots, act_copies=2, act_itemsize=act_itemsize)
        try:
            plan = trace_program(
                scalar_loss,
                params,
                example_batch,
                mode="pipelined",
                storage=storage,
                placement=placement,
                placement_params=placement_params,
                **common,
            )
            plan = build(plan).replace(cluster=on)
            if on is None:
                return pipelined_trainer(plan, loss_fn, optimizer, has_aux=has_aux, mirror=mirror, update_on=update_on)
            build_one = lambda lf: pipelined_trainer(  # noqa: E731
                plan, lf, optimizer, has_aux=True, mirror=mirror, update_on=update_on, check_batch=False
            )
            loss = _loss_of(loss_fn, has_aux)
            return cluster_lib.pipelined(plan, loss, optimizer, wafers, mesh, has_aux=has_aux, build=build_one)
        except (wafer.SramCapacityError, PlacementError):
            if mode == "pipelined":
                raise
    # Weight streaming: every layer in turn on the whole usable wafer, its weights streamed in.
    storage = Storage(slots=("",), act_copies=2, act_itemsize=act_itemsize)
    plan = build(trace_program(scalar_loss, params, example_batch, mode="weight_streaming", storage=storage, **common))
    plan = plan.replace(cluster=on)
    tx = streaming_trainer(plan, loss_fn, optimizer, has_aux=has_aux)
    if on is None:
        return tx
    loss = _loss_of(loss_fn, has_aux)
    return cluster_lib.streaming(plan, loss, optimizer, wafers, mesh, has_aux=has_aux, init_one=tx.init)
