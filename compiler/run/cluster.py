"""Several wafers training one model data-parallel: `compile_train(..., wafers=N)`.

    tx = compiler.compile_train(loss_fn, params, global_batch, optax.adam(1e-3), spec=spec, wafers=4)
    state = tx.init(params)                  # every wafer's state, stacked on a leading wafer axis [4, ...]
    state, metrics = tx.step(state, batch)   # batch: the global batch; each wafer takes its quarter
    tx.read_params(state); tx.report         # the report: 4 wafers, the interconnect's cycles

The global batch [N x B, ...] is split into N consecutive shards of B samples (wafer w takes samples w B .. (w+1)
B - 1), each wafer runs the single-wafer plan compiled for B samples, and:
  pipelined          every wafer holds a full copy of the weights and optimizer slots in its SRAM; the gradients of
                     the N wafers are all-reduced (summed and divided by N) and every wafer applies the same update
                     to its own copy, so the copies stay equal, bit for bit; the optimizer's step counts are the host
                     loop's, one for all wafers (an optimizer whose other non-weight-shaped state depended on a
                     single wafer's gradient would fail to trace: there is none in optax's elementwise family);
  weight streaming   one host store (MemoryX) holds the weights and the optimizer state; the weights are broadcast to
                     every wafer, the N gradients are reduced (SwarmX) and the optimizer runs once on the host.
The interconnect's time is the schedule's (compiler/schedule.py, wafer/cluster.py).

Numerics: the step's loss is the mean of the wafers' losses and its gradient the mean of their gradients, which is
the loss and the gradient of the global batch when the loss is a mean over the batch's samples (the usual case, and
what data parallelism means; a loss summed over samples would be scaled by 1 / N). Sums over wafers run in wafer
order (w = 0, 1, ...), one add at a time, and each device loops over its own wafers running the same per-wafer
program (`_opaque`), so the numbers do not depend on where the wafers' states live: all on one device, or one wafer
per device of a mesh, bit for bit (tests/compiler/test_cluster_mesh.py).

States on a device mesh: `compile_train(..., wafers=N, mesh=compiler.cluster_mesh(N))` keeps the wafers' states on
a JAX mesh with one axis "wafer" (`place`: the stacked wafer axis split over it; the host's part, weight
streaming's store and the optimizer's step counts, and the step counter replicated); by default all N live on the
first device. The step is a `jax.shard_map` over that mesh: each device runs its wafers' forward and backward, the
all-reduce is an all-gather over the "wafer" axis, which XLA carries out between the devices (the scale-out engine
is JAX's), and each device updates its wafers' copies. Over several processes (`jax.distributed.initialize`) the
mesh spans every process's devices: docs/cluster.md, experiments/cluster_distributed.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compiler.run import checks
from compiler.run.program import Program, charge

AXIS = "wafer"


class WaferSplitError(ValueError):
    """The global batch does not split evenly over the wafers (or a wafer count is not a positive int)."""


def check_wafers(wafers) -> int:
    if not isinstance(wafers, int | np.integer) or isinstance(wafers, bool) or wafers < 1:
        raise WaferSplitError(f"wafers must be a positive int, got {wafers!r}")
    return int(wafers)


def batch_size(batch) -> int:
    """The global batch's samples: the common leading size of its leaves."""
    leaves = jax.tree_util.tree_leaves(batch)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        raise WaferSplitError(
            f"a batch split over wafers needs every leaf to share its leading (sample) axis; got sizes {sorted(sizes)}"
        )
    return sizes.pop()


def per_wafer(batch, wafers: int):
    """The first wafer's shard of `batch` (the example batch of the single-wafer plan).

    Raises:
      WaferSplitError: the global batch's samples are not a multiple of `wafers`.
    """
    n = batch_size(batch)
    if n % wafers:
        lo, hi = (n // wafers) * wafers, (n // wafers + 1) * wafers
        raise WaferSplitError(
            f"a global batch of {n} samples does not split over {wafers} wafers; use a multiple of {wafers} "
            f"(e.g. {lo or hi} or {hi}) or another number of wafers"
        )
    return jax.tree_util.tree_map(lambda x: x[: n // wafers], batch)


def split(batch, wafers: int):
    """The global batch as shards [wafers, samples / wafers, ...] (wafer w: samples w B .. (w+1) B - 1)."""
    return jax.tree_util.tree_map(lambda x: jnp.reshape(x, (wafers, x.shape[0] // wafers, *x.shape[1:])), batch)


def wafer_mean(x, axis: int = 0):
    """The mean over the wafer axis `axis` of x, summed in wafer order one add at a time (see module docstring)."""
    parts = [jax.lax.index_in_dim(x, w, axis, keepdims=False) for w in range(x.shape[axis])]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total / len(parts) if jnp.issubdtype(total.dtype, jnp.inexact) else total


def _gather_mean(x):
    """The mean over every wafer of the mesh of `x` [local wafers, ...]: an all-gather over the "wafer" axis (XLA's
    collective), then the sum in wafer order."""
    return wafer_mean(jax.lax.all_gather(x, AXIS, tiled=True))


def _stack(tree, wafers: int):
    return jax.tree_util.tree_map(lambda x: jnp.repeat(jnp.asarray(x)[None], wafers, axis=0), tree)


def _first(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _at(tree, w):
    """Wafer `w` (traced) of a stacked tree."""
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, w, 0, False), tree)


def _put(tree, w, value):
    return jax.tree_util.tree_map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, w, 0), tree, value)


def _opaque(n: int):
    """`n` as a loop bound XLA cannot see. Loops over a device's wafers with it are neither unrolled nor fused
    across wafers, so every wafer runs the same per-wafer program whether a device holds one wafer or all of them:
    the numbers are bit-identical across placements (a fused or unrolled loop contracts multiply-adds differently)."""
    return jax.lax.optimization_barrier(jnp.asarray(n, jnp.int32))


def _each(n: int, count, fn):
    """fn(w) for w = 0 .. n - 1 (a loop of `count` = `_opaque(n)` trips), stacked [n, ...]."""
    shapes = jax.eval_shape(fn, 0)
    out = jax.tree_util.tree_map(lambda s: jnp.zeros((n, *s.shape), s.dtype), shapes)
    return jax.lax.fori_loop(0, count, lambda w, acc: _put(acc, w, fn(w)), out)


def _surrogate_loss(params, loss_in):
    """A loss whose gradient with respect to the params is the all-reduced gradient it is given, exactly
    (d/dp sum(g p) = g), and whose value is the wafer's own loss: what each wafer's update runs once the gradients
    are all-reduced. `loss_in` = {"grad", "value", "aux"}."""
    grads, leaves = jax.tree_util.tree_leaves(loss_in["grad"]), jax.tree_util.tree_leaves(params)
    dot = sum(jnp.sum(jax.lax.stop_gradient(g) * p) for g, p in zip(grads, leaves))
    return loss_in["value"] + (dot - jax.lax.stop_gradient(dot)), loss_in["aux"]


def _program(plan, mesh: Mesh, wafers: int, state_specs, local, read_params, read_opt_state, init_fn, has_aux):
    """A Program whose step runs `local` on every device of `mesh` (its wafers' states and batch shards)."""
    metric_specs = {"loss": P(), "aux": P(AXIS)} if has_aux else {"loss": P()}
    run = jax.shard_map(
        local, mesh=mesh, in_specs=(state_specs, P(AXIS)), out_specs=(state_specs, metric_specs), check_vma=False
    )

    def apply(state, batch):
        # the global batch: it splits over the wafers, and each wafer's shard is what the plan was traced with
        checks.check_inputs(plan.traced, (jax.eval_shape(lambda b: per_wafer(b, wafers), batch),), "the batch")
        return run(state, split(batch, wafers))

    return Program(
        plan=plan,
        init=init_fn,
        step=jax.jit(apply, donate_argnums=0),
        apply=apply,
        read_params=read_params,
        read_opt_state=read_opt_state,
        has_aux=has_aux,
    )


def pipelined(plan, loss, optimizer, wafers: int, mesh: Mesh, *, has_aux: bool, build) -> Program:
    """Pipelined training on N wafers (module docstring): every wafer's state in its SRAM, gradients all-reduced.

    Args:
      plan: the single-wafer plan (with its cluster); loss: `(params, batch) -> (loss, aux or None)`.
      build: `build(loss_fn) -> Program`, the single-wafer pipelined program of a loss returning (loss, aux).
    """
    from compiler.run.train import TrainState

    single = build(_surrogate_loss)  # its init, reads and update; the update's loss is the surrogate
    specs = TrainState(wafer=P(AXIS), host=P(), step=P())

    def local(state, shards):
        n = jax.tree_util.tree_leaves(shards)[0].shape[0]  # this device's wafers
        count = _opaque(n)
        one = lambda w, wafer_state: TrainState(wafer=_at(wafer_state, w), host=state.host, step=state.step)  # noqa: E731
        grad = jax.value_and_grad(loss, has_aux=True)
        (values, auxs), grads = _each(n, count, lambda w: grad(single.read_params(one(w, state.wafer)), _at(shards, w)))
        mean = jax.tree_util.tree_map(_gather_mean, grads)  # the all-reduce

        def update(w, carry):
            wafer_state, _ = carry
            loss_in = {"grad": mean, "value": values[w], "aux": _at(auxs, w)}
            new, _ = single.apply(one(w, wafer_state), loss_in)
            return _put(wafer_state, w, new.wafer), new.host

        wafer_state, host = jax.lax.fori_loop(0, count, update, (state.wafer, state.host))
        metrics = {"loss": _gather_mean(values)}
        if has_aux:
            metrics["aux"] = auxs
        return TrainState(wafer=wafer_state, host=host, step=state.step + 1), metrics

    def init(params=None):
        s = single.init(params)
        return place(TrainState(wafer=_stack(s.wafer, wafers), host=s.host, step=s.step), mesh)

    def on_wafer(read):
        return lambda state: read(TrainState(wafer=_first(state.wafer), host=state.host, step=state.step))

    return _program(
        plan, mesh, wafers, specs, local, on_wafer(single.read_params), on_wafer(single.read_opt_state), init, has_aux
    )


def streaming(plan, loss, optimizer, wafers: int, mesh: Mesh, *, has_aux: bool, init_one) -> Program:
    """Weight streaming on N wafers: one host store, weights broadcast, gradients reduced, one optimizer update.

    Args:
      plan: the single-wafer plan (with its cluster); loss: `(params, batch) -> (loss, aux or None)`.
      init_one: the single-wafer program's init (its host store and one wafer's state).
    """
    from compiler.run.train import TrainState

    record = _record(plan)
    specs = TrainState(wafer=P(AXIS), host=P(), step=P())

    def local(state, shards):
        n = jax.tree_util.tree_leaves(shards)[0].shape[0]
        count = _opaque(n)
        params, opt_state = state.host["params"], state.host["opt_state"]
        grad = jax.value_and_grad(loss, has_aux=True)
        # the same weights to every wafer (a broadcast), each its own shard of the batch
        (values, auxs), grads = _each(n, count, lambda w: grad(params, _at(shards, w)))
        grads = jax.tree_util.tree_map(_gather_mean, grads)  # SwarmX's reduce
        updates, opt_state = optimizer.update(grads, opt_state, params)  # once, on the host (MemoryX)
        params = optax.apply_updates(params, updates)
        w = jax.lax.fori_loop(0, count, lambda i, ws: _put(ws, i, charge(_at(ws, i), plan.spec, record)), state.wafer)
        metrics = {"loss": _gather_mean(values)}
        if has_aux:
            metrics["aux"] = auxs
        return TrainState(wafer=w, host={"params": params, "opt_state": opt_state}, step=state.step + 1), metrics

    def init(params=None):
        s = init_one(params)
        return place(TrainState(wafer=_stack(s.wafer, wafers), host=s.host, step=s.step), mesh)

    return _program(
        plan,
        mesh,
        wafers,
        specs,
        local,
        lambda state: state.host["params"],
        lambda state: state.host["opt_state"],
        init,
        has_aux,
    )


def _record(plan):
    from compiler.schedule import Charge

    return Charge(plan)


# ---- states on a device mesh ----------------------------------------------------------------------------------------


def mesh(wafers: int, devices=None) -> Mesh:
    """A mesh with one axis "wafer" over `devices` (default: the first `wafers` of `jax.devices()`, every process's).

    One wafer per device when there are as many devices as wafers; with fewer devices (a divisor of `wafers`) each
    holds several wafers.
    Raises:
      ValueError: the devices cannot share the wafers evenly.
    """
    wafers = check_wafers(wafers)
    devices = list(jax.devices()[:wafers] if devices is None else devices)
    if not devices or wafers % len(devices):
        raise ValueError(
            f"{len(devices)} devices cannot hold {wafers} wafers evenly; give a divisor of {wafers} devices "
            "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)"
        )
    return Mesh(np.array(devices, dtype=object), (AXIS,))


def place(state, mesh: Mesh):
    """An N-wafer `TrainState` on `mesh` (module docstring): the wafers' states split over its "wafer" axis; the
    host's part (weight streaming's store, the optimizer's step counts) and the step counter replicated."""
    from compiler.run.train import TrainState

    split_, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    return TrainState(
        wafer=jax.tree_util.tree_map(lambda x: _place(x, split_), state.wafer),
        host=jax.tree_util.tree_map(lambda x: _place(x, replicated), state.host),
        step=_place(state.step, replicated),
    )


def _place(x, sharding: NamedSharding):
    """`x` with `sharding`, also when the mesh spans devices of other processes (each process gives its part)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
