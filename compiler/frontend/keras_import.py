"""Keras 3 models (JAX backend) as plain JAX functions: `fn, params = compiler.from_keras(model)`;
`compiler.to_keras(model, params)`.

How: Keras 3 on the JAX backend computes with `jax.numpy`, and `model.stateless_call(trainable, non_trainable,
*inputs, training=...)` runs the model on explicit variable values and returns `(outputs, new_non_trainable)`, so
tracing it gives plain lax primitives (Keras' own `jit`-wrapped helpers are inlined by `trace`).

Params: `{"params": {name: array}, "state": {name: array}}` keyed by each variable's `path` with Keras'
per-process layer numbering taken out and repeats numbered in model order ("dense/kernel", "dense/kernel#1",
"batch_normalization/moving_mean"), so that two instances of one architecture share names: trainable variables
in "params", float non-trainable ones (BatchNorm's moving statistics, weights of frozen layers) in "state".
Keras' kernels are already in the wafer's layouts (Dense [in, out], Conv [*kernel, in, out]). The values are
copied when imported: `model.predict`/`fit` donate the variables' buffers, so an array read from a variable can be
deleted under us by a later Keras call.

Random state: a Keras `SeedGenerator` keeps its state in an integer non-trainable variable. Those are not params:
in train mode `fn(params, *inputs, rng=key)` derives each generator's state from `rng` (fold_in by generator), so
dropout masks come from the key you pass, a new one every step; in inference they keep their current values.

Modes: `train=False` (the default, Keras' `training=False`): `fn(params, *inputs) -> outputs`. `train=True`:
`fn(params, *inputs, rng=key) -> (outputs, new_params)` with `new_params["state"]` the updated moving statistics, as
`model(x, training=True)` would leave them. A multi-input functional model takes its inputs as Keras does: one
list argument (`fn(params, [a, b])`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from compiler.frontend.frameworks import require


def _keras():
    keras = require("keras")
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"from_keras needs Keras on the JAX backend, this process runs Keras on {keras.backend.backend()!r}: set "
            "KERAS_BACKEND=jax before keras is first imported; a TF-backend Keras model goes through "
            "compiler.from_tf(model, *example_inputs)"
        )
    return keras


def _names(variables) -> list[str]:
    """Names of variables that do not depend on how many layers this process has made before: each variable's
    path with Keras' per-process numbering taken out of its parts ("dense_3/kernel" -> "dense/kernel"), and "#i"
    added to the i-th repeat in model order ("dense/kernel#1"). Two instances of one architecture so share names,
    which checkpoints and `to_keras` onto a freshly built model rely on."""
    seen: dict[str, int] = {}
    out = []
    for v in variables:
        name = "/".join(re.sub(r"_\d+$", "", part) for part in v.path.split("/"))
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _is_float(v) -> bool:
    return jnp.issubdtype(jnp.dtype(v.dtype), jnp.floating)


def _is_seed(v) -> bool:
    return v.path.endswith("seed_generator_state") or "seed_generator" in v.path.rsplit("/", 1)[-1]


def _copy(v):
    # a copy: Keras' predict/fit donate the variables' buffers
    return jnp.array(np.asarray(v.value))


def from_keras(model, *, train: bool = False) -> tuple[Callable, dict]:
    """A Keras 3 model (JAX backend) as a plain JAX function and its params.

    Args:
      model: a built Keras model or layer (call it once, or give it an Input, so its variables exist).
      train: run as `model(x, training=True)` (BatchNorm batch statistics, dropout from `rng`); default False.
    Returns:
      `(fn, params)` as described in the module docstring.
    Raises:
      compiler.MissingExtraError: keras is not installed. ValueError: Keras runs on another backend, or the model
      has no variables yet (unbuilt). TypeError: `model` is not a Keras layer or model.
    """
    keras = _keras()
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"from_keras expects a Keras model or layer, got {type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"from_keras: {type(model).__name__} is not built; build it first (keras.Input, model.build(shape) or "
            "one call on an example batch) so that its variables exist"
        )
    trainable, non_trainable = list(model.trainable_variables), list(model.non_trainable_variables)
    t_names, n_names = _names(trainable), _names(non_trainable)
    params = {
        "params": {n: _copy(v) for n, v in zip(t_names, trainable)},
        "state": {n: _copy(v) for n, v in zip(n_names, non_trainable) if _is_float(v)},
    }
    # integer non-trainable variables: seed-generator states (from rng in train mode) and other constants
    fixed = {n: _copy(v) for n, v in zip(n_names, non_trainable) if not _is_float(v)}
    seeds = [n for n, v in zip(n_names, non_trainable) if not _is_float(v) and _is_seed(v)]

    def fn(params, *inputs, rng=None):
        values = []
        for i, n in enumerate(n_names):
            if n in params["state"]:
                values.append(params["state"][n])
            elif train and n in seeds:
                if rng is None:
                    raise ValueError(
                        f"from_keras: {type(model).__name__} draws random numbers in training (seed generator "
                        f"{n!r}, e.g. Dropout): pass rng=jax.random.key(seed) to fn, a new key every step"
                    )
                key = jax.random.fold_in(rng, i)
                key = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
                values.append(key.astype(fixed[n].dtype).reshape(fixed[n].shape))
            else:
                values.append(fixed[n])
        tv = [params["params"][n] for n in t_names]
        out, new = model.stateless_call(tv, values, *inputs, training=train)
        if not train:
            return out
        new_state = {n: x for n, x in zip(n_names, new) if n in params["state"]}
        return out, {"params": params["params"], "state": new_state}

    fn.__name__ = f"from_keras({type(model).__name__})"
    return fn, params


def to_keras(model, params):
    """Assign `params` (as `from_keras` made them, e.g. trained on the wafer) to `model`'s variables. Returns `model`.

    Raises:
      KeyError: a name of `params` is not a variable of `model`. ValueError: a shape differs.
    """
    _keras()
    variables = list(model.trainable_variables) + list(model.non_trainable_variables)
    names = _names(list(model.trainable_variables)) + _names(list(model.non_trainable_variables))
    by_name = dict(zip(names, variables))
    for name, value in {**dict(params.get("params", {})), **dict(params.get("state", {}))}.items():
        if name not in by_name:
            raise KeyError(f"to_keras: {name!r} is not a variable of {type(model).__name__} (has {sorted(by_name)})")
        v = by_name[name]
        x = np.asarray(value)
        if tuple(x.shape) != tuple(v.shape):
            raise ValueError(f"to_keras: {name!r} has shape {x.shape}, the variable's is {tuple(v.shape)}")
        v.assign(x.astype(v.dtype))
    return model
