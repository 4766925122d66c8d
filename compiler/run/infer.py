"""Inference: `compile` a program onto the wafer, and the program that runs its forward pass there.

`compile(fn, params, *example_inputs, spec=...)` traces the program and runs the plan passes (compiler/plan/plan.py:
graph, demands, place, partition, route, lay out); `inference_program(plan)` builds the `Program` whose weights live
in their kernels' SRAM allocations (blocked: the leaves themselves, viewed per core as tiles).

Two execution paths, one answer (DESIGN.md):
  fast      reads every weight from its SRAM allocation, stored blocked (wafer/layout.py: the leaf itself, core
            (i, j) owning block (i, j)), so with no copy, and runs the user's own function the way XLA runs best;
            charges the schedule's cost of a call.
  per_core  walks the kernel graph; every weight kernel runs literally on the per-core view of its weights
            (tiles [gh, gw, *tile], padding zero): dense (DenseGeneral and einsums with weights included, per-head
            ones with batch dimensions too), convolution (grouped, depthwise and batch-grouped included) and
            embedding-lookup kernels multicast their input
            chunks (or indices) along rows, run a vmapped per-core matmul / conv / lookup on each core's tile and
            reduce the partial results along columns with the wafer's fabric primitives; epilogues and weightless
            kernels run on the assembled activations (compiler/run/percore.py). It checks the partitioning (tiling,
            padding, reduction direction); the traffic it generates is checked against the plan's when traced.
Both are jitted and differentiable, and both charge the same record, so counters agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import wafer
from compiler.frontend import precision
from compiler.plan import Plan, build, trace_program
from compiler.plan.place import PlacementParams
from compiler.run import checks
from compiler.run.program import Program, charge
from compiler.schedule import Charge
from wafer.memory import MemoryMap


def read_leaves(plan: Plan, state: wafer.WaferState) -> list:
    """The parameter leaves, read from their SRAM allocations, as the traced program takes them (16-bit formats as
    traced; cb16 as float32 values on its grid, float16 only standing in for it in the trace).

    Weights are blocked allocations (wafer/layout.py): the stored array is the leaf itself, so this reads it with
    no copy; the per-core tiles are its view, taken by the per-core path only."""
    policy = plan.policy
    out = []
    for i in range(plan.traced.n_params):
        name, t = plan.weights[i]
        x = state.sram[name]
        if policy.mixed and jnp.issubdtype(t.dtype, jnp.floating):  # (cb16 tiles hold uint16 bits)
            x = policy.load(x, jnp.float32 if policy.storage == "cb16" else t.dtype)
        out.append(x)
    return out


def inference_program(plan: Plan) -> Program:
    """The program of a planned forward pass (module docstring)."""
    traced, spec, policy = plan.traced, plan.spec, plan.policy
    record = Charge(plan)

    def init(params=None, state: wafer.WaferState | None = None) -> wafer.WaferState:
        """Write the weights into their kernels' SRAM allocations (a fresh wafer by default); `params` defaults to the
        ones compiled with (an nnx.Module's own state)."""
        leaves = checks.check_params(traced, traced.params if params is None else params)
        state = wafer.init(spec) if state is None else state
        state = state.replace(memory=_merge_memory(state.memory, plan.memory))
        sram = dict(state.sram)
        for i, leaf in enumerate(leaves):
            for name, t in plan.weight_copies[i]:  # every kernel reading it holds a copy (tied weights)
                # copies: the step donates the state, which must not delete the caller's arrays
                if policy.mixed and _is_float(leaf):
                    sram[name] = jnp.array(policy.store(leaf))  # 16-bit storage (cb16: its bit patterns)
                else:
                    sram[name] = jnp.array(leaf, t.dtype)
        return state.replace(sram=sram)

    def read_params(state):
        leaves = read_leaves(plan, state)
        if policy.mixed:  # in the caller's dtypes (the traced program holds 16-bit stand-ins)
            leaves = [x.astype(_dtype_of(p)) for x, p in zip(leaves, jax.tree_util.tree_leaves(traced.params))]
        # copies: the leaves are the state's own buffers, which the next step (donating the state) deletes
        leaves = [jnp.array(x) for x in leaves]
        return jax.tree_util.tree_unflatten(traced.param_treedef, leaves)

    @functools.cache
    def expected_state():
        return jax.eval_shape(lambda: init())

    def check(state, inputs):
        checks.check_state(state, expected_state(), what="inference")
        checks.check_inputs(traced, inputs)

    def apply(state, *inputs):
        check(state, inputs)
        params = jax.tree_util.tree_unflatten(traced.param_treedef, read_leaves(plan, state))
        out = traced.apply(params, *inputs)
        return charge(state, spec, record), out

    def per_core(state, *inputs):
        from compiler.run.percore import run_per_core

        check(state, inputs)
        if policy.storage == "cb16":
            raise ValueError(
                "the per-core path runs the compiler's traced program, in which float16 stands in for cb16 (no JAX "
                "dtype holds cb16); use path='fast', which rounds to cb16 exactly"
            )
        out, traffic = run_per_core(plan, read_leaves(plan, state), state, inputs)
        expected = sum((p.traffic for p in plan.kernels.values()), wafer.Traffic.none())
        if not np.array_equal(traffic.link_words(spec.rows, spec.cols), expected.link_words(spec.rows, spec.cols)):
            raise AssertionError("per-core path traffic differs from the static cost record; this is a compiler bug")
        return charge(state, spec, record), out

    return Program(
        plan=plan,
        init=init,
        step=jax.jit(apply, donate_argnums=0),
        apply=apply,
        read_params=read_params,
        per_core=jax.jit(per_core, donate_argnums=0),
    )


def compile(
    fn,
    *args,
    spec: wafer.WaferSpec,
    placement=None,
    placement_params: PlacementParams | None = None,
    policy: precision.Policy | str | None = None,
    batch_axis="auto",
) -> Program:
    """Compile `fn(params, *inputs)` (or an `nnx.Module` called on `*inputs`) onto `spec` in layer-pipelined mode.

    Args:
      fn: a JAX-traceable function of (params, *inputs), e.g. a Flax linen `model.apply`; or an nnx.Module.
      *args: `params, *example_inputs` (or just `*example_inputs` for an nnx.Module).
      spec: the wafer.
      placement: optional hand-given placement {kernel name: Rect or (row, col, height, width)}.
      placement_params: knobs of the automatic placement.
      policy: a precision policy (compiler/frontend/precision.py): None or "fp32" (float32, the default), or 16-bit
        storage with float32 accumulation ("fp16", "bf16", "cb16" or a `compiler.Policy`). The program runs as
        `apply_policy(fn, policy)`; weights are stored in SRAM in the 16-bit format, activations are counted
        at 2 bytes and matmul FMACs at the mixed SIMD width.
      batch_axis: which axis of each input holds the samples, as jax.vmap's in_axes: "auto" (axis 0 of every
        input, except an input that is one sample: a vector a matmul contracts, e.g. x of shape (37,) into a Dense
        layer), None (one sample), an int, or a prefix of the inputs' tree (compiler/frontend/batch.py). It sets
        the batch every per-sample figure of the report counts.
    Returns:
      A `Program`: `state = exe.load(params)`, `out, state = exe(state, *inputs)`, `exe.report`.
    Raises:
      compiler.UnsupportedOpError: a primitive without a kernel; wafer.SramCapacityError: a kernel does not fit;
      compiler.PlacementError: the kernels do not fit on the wafer, or a bad hand placement;
      compiler.BatchError: the inputs disagree on the batch size.
    """
    plan = trace_program(
        fn,
        *args,
        spec=spec,
        policy=policy,
        placement=placement,
        placement_params=placement_params,
        batch_axis=batch_axis,
    )
    return inference_program(build(plan))


def _dtype_of(x):
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _is_float(x) -> bool:
    return jnp.issubdtype(_dtype_of(x), jnp.floating)


def _merge_memory(a: MemoryMap, b: MemoryMap) -> MemoryMap:
    if a.allocations and set(a.names) & set(b.names):
        raise ValueError(f"the state already holds allocations {sorted(set(a.names) & set(b.names))}")
    out = a
    for alloc in b.allocations:
        out = out.allocate(alloc.name, alloc.rect, alloc.shape, alloc.dtype, alloc.offset, alloc.layout)
    return out
