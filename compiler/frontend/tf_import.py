"""TensorFlow programs as plain JAX functions: `fn, params = compiler.from_tf(tf_fn, *example_inputs)`.

How: tf2jax (DeepMind's converter, from PyPI) parses the graph of `tf_fn`'s concrete function for the example
inputs' shapes and dtypes and emits the same computation in `jax.numpy`/`lax`; TF variables become a flat dict of
arrays. tf2jax 0.3.8 declares the full `tensorflow` package as a dependency; this project installs it with
`--no-deps` beside `tensorflow-cpu` (and `dm-tree`), which provides the same `tensorflow` module.

Accepted: a `tf.function`; a plain Python function of tensors (wrapped in `tf.function`); a Keras model on the
TensorFlow backend (called as `model(*inputs, training=train)`). Params: `{"params": {name: array}, "state":
{name: array}}`: trainable TF variables in "params", float non-trainable ones in "state"; other variables
(integer counters) are constants. `fn(params, *inputs) -> outputs`; with `train=True`,
`fn(params, *inputs) -> (outputs, new_params)` with the values the function assigned to variables in "state" (a
BatchNorm's moving statistics; use it for a `tf.function` that assigns variables too).
Inputs have the example inputs' shapes (TF's graph is specialised to them). TF's random ops (dropout in training)
are not converted here: train TF models' dropout-free, or import them in inference.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from compiler.frontend.frameworks import require


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up banner is noise in a user's output
    return require("tf", "tensorflow")


def from_tf(tf_fn, *example_inputs, train: bool = False) -> tuple[Callable, dict]:
    """A TensorFlow function or TF-backend Keras model as a plain JAX function and its params.

    Args:
      tf_fn: a `tf.function`, a Python function of tensors, or a Keras model on the TensorFlow backend.
      *example_inputs: arrays (NumPy, JAX or TF) of the shapes and dtypes `fn` will be called with.
      train: call a Keras model with `training=True`; `fn` then returns `(outputs, new_params)` (also for a
        `tf.function`, whose variable assignments it then returns).
    Returns:
      `(fn, params)`, see the module docstring.
    Raises:
      compiler.MissingExtraError: tensorflow or tf2jax is not installed. ValueError: no example inputs.
    """
    tf = _tf()
    tf2jax = require("tf2jax")
    if not example_inputs:
        raise ValueError(
            "from_tf(tf_fn, *example_inputs): example inputs are needed (TF's graph is traced for their shapes)"
        )
    target = tf_fn
    if _is_keras_model(tf_fn):
        model = tf_fn
        target = tf.function(lambda *xs: model(*xs, training=train))
    elif not hasattr(tf_fn, "get_concrete_function"):
        if not callable(tf_fn):
            raise TypeError(f"from_tf expects a tf.function, a function or a Keras model, got {type(tf_fn).__name__}")
        target = tf.function(tf_fn)
    examples = [np.asarray(x) for x in example_inputs]
    jax_fn, variables = tf2jax.convert(target, *examples)
    trainable, state, consts = {}, {}, {}
    for name, v in variables.items():
        x = jnp.array(np.array(v))  # a copy: TF may update the variable in place
        if getattr(v, "trainable", True) and jnp.issubdtype(x.dtype, jnp.floating):
            trainable[name] = x
        elif jnp.issubdtype(x.dtype, jnp.floating):
            state[name] = x
        else:
            consts[name] = x
    params = {"params": trainable, "state": state}

    def fn(params, *inputs, rng=None):
        flat = {**params["params"], **params["state"], **consts}
        out, updated = jax_fn(flat, *inputs)
        new_state = {k: jnp.asarray(updated[k]) if k in updated else v for k, v in params["state"].items()}
        if train:
            return out, {"params": params["params"], "state": new_state}
        return out

    fn.__name__ = f"from_tf({getattr(tf_fn, '__name__', type(tf_fn).__name__)})"
    return fn, params


def _is_keras_model(obj) -> bool:
    import sys

    for name in ("keras", "tf_keras"):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(obj, mod.layers.Layer):
            return True
    return False
