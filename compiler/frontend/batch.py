"""The batch of a traced program: how many samples one call (or one training step) works on.

The batch sets every per-sample figure the compiler reports (samples/s, cycles per sample, a dense kernel's rows
per sample), so it must not be guessed wrong. `compile(..., batch_axis=...)` and `compile_train(...,
batch_axis=...)` say which axis of each input holds the samples, as `jax.vmap`'s `in_axes` does:

  "auto" (the default)  axis 0 of every input of rank >= 1 (the Flax / optax convention), except inputs that are
                        one sample: an input whose only axis a matmul contracts (a feature vector, e.g. `x` of
                        shape (37,) into `nn.Dense`), and an input that the program first reshapes to `(1,
                        *shape)` (how Flax's `nn.Conv` takes an unbatched image). Scalars and PRNG keys (an input
                        the random primitives read, e.g. a dropout key) carry no batch.
  None                  every input is one sample: the batch is 1.
  an int                that axis of every input of rank > the axis (inputs of lower rank carry no batch).
  a pytree              a prefix of the inputs' tree (for `compile`, of the tuple of inputs; for `compile_train`,
                        of the example batch) whose leaves are ints or None, one per input (sub)tree.

Every input with a batch axis must have the same size along it: otherwise `compiler.BatchError` names the inputs
and their sizes. A program without any batched input works on one sample (batch 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.extend import core as jcore

from compiler.errors import BatchError

AUTO = "auto"

# Equations that pass a value through unchanged in shape (a cast, a copy): an input seen through them is the input.
_SAME_SHAPE = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


# Primitives that take a PRNG key: an input they read is a key, not samples.
_KEY_USES = {"random_wrap", "random_bits", "random_split", "random_fold_in", "random_unwrap", "threefry2x32"}


def axes_of(batch_axis, inputs: tuple) -> list:
    """One batch axis (int or None) per flat leaf of `inputs` (a tuple), from `batch_axis` (module docstring;
    "auto" gives AUTO per leaf).

    Raises:
      BatchError: `batch_axis` is not an int, None, "auto", or a prefix of the inputs' tree with such leaves.
    """
    n = len(jax.tree_util.tree_leaves(inputs))
    if batch_axis is None or isinstance(batch_axis, (int, str)):
        _check_axis(batch_axis)
        return [batch_axis] * n
    # a prefix of the tuple of inputs, or (one input) of that input's tree
    for candidate in (batch_axis, (batch_axis,) if len(inputs) == 1 else None):
        if candidate is None:
            continue
        try:
            per = jax.tree_util.tree_map(
                lambda ax, sub: [ax] * len(jax.tree_util.tree_leaves(sub)),
                candidate,
                inputs,
                is_leaf=lambda x: x is None,
            )
        except (ValueError, TypeError):
            continue
        out = [ax for group in jax.tree_util.tree_leaves(per, is_leaf=lambda x: isinstance(x, list)) for ax in group]
        for ax in out:
            _check_axis(ax)
        if len(out) == n:
            return out
    raise BatchError(
        f"batch_axis {batch_axis!r} does not match the inputs' tree {jax.tree_util.tree_structure(inputs)}: give an "
        "int (that axis of every input), None (one sample), 'auto', or a prefix of the inputs' tree whose leaves are "
        "ints or None, as jax.vmap's in_axes"
    )


def _check_axis(ax):
    if ax is None or ax == AUTO or (isinstance(ax, int) and not isinstance(ax, bool) and ax >= 0):
        return
    raise BatchError(f"a batch axis must be a non-negative int, None or 'auto', got {ax!r}")


def one_sample_inputs(jaxpr: jcore.Jaxpr, input_vars: Sequence) -> set:
    """The input variables that are one sample by the "auto" rule (module docstring)."""
    alias = {v: v for v in input_vars}
    out = set()
    for eqn in jaxpr.eqns:
        ins = [alias.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        name = eqn.primitive.name
        if name in _SAME_SHAPE and ins and ins[0] is not None:
            alias[eqn.outvars[0]] = ins[0]
            continue
        if name in _KEY_USES or name.startswith("random_"):
            # a PRNG key (a raw uint32[2] key enters random_wrap; a typed key the random primitives)
            out.update(src for src in ins if src is not None)
        elif name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            for src, contracted in zip(ins[:2], (lc, rc)):
                if src is not None and src.aval.ndim == 1 and 0 in tuple(contracted):
                    out.add(src)
        elif name in ("reshape", "broadcast_in_dim") and ins and ins[0] is not None:
            src = ins[0]
            new = tuple(eqn.params["new_sizes"] if name == "reshape" else eqn.params["shape"])
            if src.aval.ndim >= 1 and new == (1, *src.aval.shape):
                out.add(src)
    return out


def input_batch(jaxpr: jcore.Jaxpr, input_vars: Sequence, inputs: tuple, batch_axis=AUTO) -> int:
    """Samples per call of a traced program whose input leaves are `input_vars` (of `inputs`, a tuple).

    Raises:
      BatchError: an axis beyond an input's rank, or inputs that disagree on the batch size.
    """
    axes = axes_of(batch_axis, inputs)
    paths = ["inputs" + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(inputs)[0]]
    single = one_sample_inputs(jaxpr, input_vars) if AUTO in axes else set()
    sizes = {}
    for v, ax, path in zip(input_vars, axes, paths):
        shape = tuple(v.aval.shape)
        if ax == AUTO:
            if not shape or v in single:
                continue
            ax = 0
        if ax is None:
            continue
        if ax >= len(shape):
            if batch_axis == ax:  # one int for every input: lower-rank inputs carry no batch
                continue
            raise BatchError(f"{path} of shape {shape} has no axis {ax} (its batch axis)")
        sizes[path] = shape[ax]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise BatchError(
            f"the inputs disagree on the batch size (their batch axes have sizes {listed}); give every input the "
            "same batch, or say which axis of each input holds the samples with batch_axis= (a prefix of the "
            "inputs' tree, None for an input that is not batched, as jax.vmap's in_axes)",
            sizes=sizes,
        )
    return next(iter(sizes.values()), 1)
