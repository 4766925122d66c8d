"""Several wafers training one model data-parallel: `compile_train(..., wafers=N)`.

    tx = compiler.compile_train(loss_fn, params, global_batch, optax.adam(1e-3), spec=spec, wafers=4)
    state = tx.init(params)                  # every wafer's state, stacked on a leading wafer axis [4, ...]
    state, metrics = tx.step(state, batch)   # batch: the global batch; each wafer takes its quarter
    tx.read_params(state); tx.report         # the report: 4 wafers, the interconnect's cycles

The global batch [N x B, ...] is split into N consecutive shards of B samples (wafer w takes samples w B .. (w+1)
B - 1), each wafer runs the single-wafer plan compiled for B samples, and:
  pipelined          every wafer holds a full copy of the weights and optimizer state in its SRAM; the gradients of
                     the N wafers are all-reduced (summed and divided by N) and every wafer applies the same update
                     to its own copy, so the copies stay equal, bit for bit;
  weight streaming   one host store (MemoryX) holds the weights and the optimizer state; the weights are broadcast to
                     every wafer, the N gradients are reduced (SwarmX) and the optimizer runs once on the host.
The interconnect's time is the schedule's (compiler/schedule.py, wafer/cluster.py).

Numerics: the step's loss is the mean of the wafers' losses and its gradient the mean of their gradients, which is
the loss and the gradient of the global batch when the loss is a mean over the batch's samples (the usual case, and
what data parallelism means; a loss summed over samples would be scaled by 1 / N). Sums over wafers run in wafer
order (w = 0, 1, ...), one add at a time, so the result does not depend on where the wafers' states live: on one
device, or one wafer per device of a mesh, the numbers are the same bit for bit (`shard`).

States on a device mesh: `mesh(N)` is a JAX mesh with one axis "wafer"; `shard(state, mesh)` puts every stacked
leaf's wafer axis on it (the host store and the step counter replicated). The jitted step keeps that placement, and
XLA's SPMD partitioner turns the sums over wafers into collectives between the devices: the scale-out engine is
JAX's. Over several processes (`jax.distributed.initialize`), the mesh spans every process's devices; see
docs/cluster.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


@jax.custom_vjp
def _allreduced(params):
    """The identity on the params, whose cotangent (the wafer's gradient) is all-reduced over the wafers."""
    return params


def _allreduced_fwd(params):
    return params, None


def _allreduced_bwd(_, g):
    return (jax.tree_util.tree_map(lambda x: wafer_mean(jax.lax.all_gather(x, AXIS)), g),)


_allreduced.defvjp(_allreduced_fwd, _allreduced_bwd)


def allreduce_gradients(loss_fn):
    """`loss_fn` whose gradient with respect to the params is the mean over the wafers (run under a vmap with
    axis_name "wafer"): what the pipelined wafers all-reduce before each applies its update."""

    def loss(params, batch):
        return loss_fn(_allreduced(params), batch)

    return loss


def _stack(tree, wafers: int):
    return jax.tree_util.tree_map(lambda x: jnp.repeat(jnp.asarray(x)[None], wafers, axis=0), tree)


def _first(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _metrics(metrics, has_aux: bool):
    out = {"loss": wafer_mean(metrics["loss"])}
    if has_aux:
        out["aux"] = metrics["aux"]  # per wafer, stacked [wafers, ...]
    return out


def pipelined(single: Program, wafers: int) -> Program:
    """N copies of a pipelined single-wafer program whose loss all-reduces its gradients (`allreduce_gradients`)."""
    from compiler.run.train import TrainState

    axes = TrainState(wafer=0, host=0, step=None)

    def init(params=None):
        s = single.init(params)
        return TrainState(wafer=_stack(s.wafer, wafers), host=_stack(s.host, wafers), step=s.step)

    def apply(state, batch):
        run = jax.vmap(single.apply, in_axes=(axes, 0), out_axes=(axes, 0), axis_name=AXIS)
        state, metrics = run(state, split(batch, wafers))
        return state, _metrics(metrics, single.has_aux)

    def on_wafer(read):
        return lambda state: read(TrainState(wafer=_first(state.wafer), host=_first(state.host), step=state.step))

    return Program(
        plan=single.plan,
        init=init,
        step=jax.jit(apply, donate_argnums=0),
        apply=apply,
        read_params=on_wafer(single.read_params),
        read_opt_state=on_wafer(single.read_opt_state),
        has_aux=single.has_aux,
    )


def streaming(plan, loss, optimizer, wafers: int, *, has_aux: bool, init_one) -> Program:
    """Weight streaming on N wafers: one host store, weights broadcast, gradients reduced, one optimizer update.

    Args:
      plan: the single-wafer plan (with its cluster); loss: `(params, batch) -> (loss, aux or None)`.
      init_one: the single-wafer program's init (its host store and one wafer's state).
    """
    from compiler.run.train import TrainState

    record = _record(plan)

    def init(params=None):
        s = init_one(params)
        return TrainState(wafer=_stack(s.wafer, wafers), host=s.host, step=s.step)

    def apply(state, batch):
        params, opt_state = state.host["params"], state.host["opt_state"]
        grad = jax.value_and_grad(loss, has_aux=True)
        # the same weights to every wafer (in_axes None: a broadcast), a shard of the batch to each
        (values, aux), grads = jax.vmap(grad, in_axes=(None, 0))(params, split(batch, wafers))
        grads = jax.tree_util.tree_map(wafer_mean, grads)  # SwarmX's reduce
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        w = jax.vmap(lambda w: charge(w, plan.spec, record))(state.wafer)
        host = {"params": params, "opt_state": opt_state}
        metrics = {"loss": values, "aux": aux} if has_aux else {"loss": values}
        return TrainState(wafer=w, host=host, step=state.step + 1), _metrics(metrics, has_aux)

    return Program(
        plan=plan,
        init=init,
        step=jax.jit(apply, donate_argnums=0),
        apply=apply,
        read_params=lambda state: state.host["params"],
        read_opt_state=lambda state: state.host["opt_state"],
        has_aux=has_aux,
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


def shard(tx: Program, state, mesh: Mesh | None = None):
    """`state` of an N-wafer program `tx` with its wafer axis on `mesh` (default `mesh(N)`; module docstring): the
    wafers' states are split over the mesh's "wafer" axis; the host store in weight streaming (one, MemoryX's) and
    the step counter are replicated on every device."""
    wafers = 1 if tx.plan.cluster is None else tx.plan.cluster.wafers
    mesh = globals()["mesh"](wafers) if mesh is None else mesh
    if AXIS not in mesh.axis_names:
        raise ValueError(f"expected a mesh with a {AXIS!r} axis (compiler.cluster_mesh), got {mesh.axis_names}")
    split_ = NamedSharding(mesh, P(AXIS))
    replicated = NamedSharding(mesh, P())

    def put(x, stacked):
        sharding = split_ if stacked and wafers > 1 else replicated
        return _place(x, sharding)

    from compiler.run.train import TrainState

    wafer_state = jax.tree_util.tree_map(lambda x: put(x, True), state.wafer)  # [wafers, ...] when wafers > 1
    stacked_host = wafers > 1 and tx.plan.mode == "pipelined"  # weight streaming: one store for every wafer
    host = jax.tree_util.tree_map(lambda x: put(x, stacked_host), state.host)
    return TrainState(wafer=wafer_state, host=host, step=put(state.step, False))


def _place(x, sharding: NamedSharding):
    """`x` with `sharding`, also when the mesh spans devices of other processes (each process gives its part)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
