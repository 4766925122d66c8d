"""Models of other frameworks as `(fn, params)`: the dispatcher `trace()` calls, the missing-extra error, and the
state-carrying wrapper that lets `compile_train` train a model whose train-mode forward updates state.

Every importer returns the same two things (DESIGN.md, "Frameworks and the cluster"):

    fn, params = compiler.from_torch(module)      # or from_keras(model), from_tf(tf_fn, *example_inputs)
    params == {"params": {name: array}, "state": {name: array}}
    fn(params, *inputs, rng=None) -> outputs                   # inference (torch eval mode, Keras training=False)
    fn(params, *inputs, rng=None) -> (outputs, new_params)     # train mode: new_params has the updated "state"

"params" are the trainable leaves (torch parameters, Keras trainable variables); "state" the framework's other
float variables (torch float buffers and frozen parameters, Keras non-trainable variables): BatchNorm's running
statistics. `rng` (a `jax.random.key` or a raw uint32[2] key) drives dropout in train mode.

Training such a model with `compile_train` needs the new state written back to the wafer each step. The Trainer
only writes back what the optimizer updates, so `stateful(loss_fn, optimizer)` routes the new state through the
gradient: the wrapped loss adds `sum((s - stop_gradient(s)) * stop_gradient(s - s_new))` over the state leaves,
which is exactly zero in value and has gradient `s - s_new` with respect to `s`; the wrapped optimizer updates
"params" with the user's optimizer (state gradients zeroed, so Adam's moments and global-norm clipping see only
the trainable leaves) and state leaves by minus that gradient, so `s + (s_new - s) = s_new` to within one rounding
of `s`. Everything stays inside `compile_train`'s tiles, SRAM and cost: the state lives on the wafer with the
weights, as BatchNorm's statistics do on the real one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

EXTRAS = {
    "torch": ("torch", "pip install -e '.[torch]'  (torch==2.13.0, the CPU build)"),
    "keras": ("keras", "pip install -e '.[keras]'  (Keras 3, run with KERAS_BACKEND=jax)"),
    "tf": ("tensorflow", "pip install -e '.[tf]' && pip install --no-deps tf2jax==0.3.8"),
    "tf2jax": (
        "tf2jax",
        "pip install --no-deps tf2jax==0.3.8  (its declared `tensorflow` dependency would pull the "
        "full TensorFlow build beside tensorflow-cpu)",
    ),
}


class MissingExtraError(ImportError):
    """An importer needs a framework that is not installed; the message names the extra and the pip command.

    Attributes:
      extra: the extra's name ("torch", "keras", "tf").
      module: the Python module that failed to import.
    """

    def __init__(self, extra: str, module: str, cause: BaseException | None = None):
        self.extra, self.module = extra, module
        _, command = EXTRAS[extra]
        super().__init__(
            f"{module!r} is not installed: it comes with the optional extra [{extra}]. Install it with: {command}"
            + (f" (import failed with: {cause})" if cause is not None else "")
        )


def require(extra: str, module: str | None = None):
    """Import the framework module of `extra` (or `module`), raising `MissingExtraError` when it is missing."""
    name = module or EXTRAS[extra][0]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingExtraError(extra, name, e) from None


def is_torch_module(obj) -> bool:
    """Whether `obj` is a `torch.nn.Module` (without importing torch when it is not loaded)."""
    torch = _loaded("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_keras_model(obj) -> bool:
    """Whether `obj` is a Keras 3 layer or model (without importing keras when it is not loaded)."""
    keras = _loaded("keras")
    return keras is not None and isinstance(obj, keras.layers.Layer)


def is_framework_model(obj) -> bool:
    """Whether `obj` is a torch module or a Keras model (what `as_function` imports)."""
    return is_torch_module(obj) or is_keras_model(obj)


def to_array(x):
    """A torch or TF tensor as a NumPy array (torch: detached, on the CPU); anything else unchanged."""
    root = type(x).__module__.split(".")[0]
    if root == "torch" and hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if root == "tensorflow" and hasattr(x, "numpy"):
        return x.numpy()
    return x


def native_forward(obj, *inputs):
    """`obj(*inputs)` run by its own framework on NumPy/JAX inputs (the reference an emulated run is checked
    against): a torch module on torch tensors, under no_grad; a Keras model with training=False. Outputs as NumPy."""
    import numpy as np

    if is_torch_module(obj):
        torch = _loaded("torch")
        with torch.no_grad():
            out = obj(*[torch.from_numpy(np.array(x)) for x in inputs])
        return jax.tree_util.tree_map(to_array, out, is_leaf=lambda x: isinstance(x, torch.Tensor))
    if is_keras_model(obj):
        return jax.tree_util.tree_map(np.asarray, obj(*inputs, training=False))
    raise TypeError(f"native_forward: {type(obj).__name__} is neither a torch module nor a Keras model")


def _loaded(name):
    import sys

    return sys.modules.get(name)


def as_function(obj) -> tuple[Callable, Any] | None:
    """A torch module or Keras model as `(fn, params)` with `fn(params, *inputs) -> outputs`; None for anything else.

    This is what `trace()` (hence `compile`) uses: the forward the framework itself runs on `obj(*inputs)`. A torch
    module runs in its current mode (`module.training`); in train mode BatchNorm normalises with the batch's
    statistics, as torch does, and the updated running statistics are not kept (an inference compile has nowhere
    to keep them; train with `compile_train`, see `stateful`). A Keras model runs with `training=False`.
    """
    if is_torch_module(obj):
        from compiler.frontend.torch_import import from_torch

        fn, params = from_torch(obj)
        if obj.training:
            return (lambda p, *xs: fn(p, *xs)[0]), params
        return fn, params
    if is_keras_model(obj):
        from compiler.frontend.keras_import import from_keras

        return from_keras(obj)
    return None


# ---- training a model whose train-mode forward updates state ---------------------------------------------------


def _split_new(out):
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ValueError(
            "stateful: loss_fn(params, batch) must return (loss, new_params) or (loss, new_params, aux), where "
            "new_params is what a train-mode imported fn returned beside its outputs"
        )
    return out[0], out[1], (out[2] if len(out) == 3 else None)


def stateful(loss_fn: Callable, optimizer: optax.GradientTransformation):
    """`(loss_fn, optimizer)` for `compile_train` that also write a train-mode forward's new state to the wafer.

    Args:
      loss_fn: `loss_fn(params, batch) -> (loss, new_params)` or `(loss, new_params, aux)`, where `params` and
        `new_params` are an importer's `{"params": ..., "state": ...}` and `new_params` is what the train-mode
        `fn` returned (e.g. `logits, new = fn(params, batch["x"]); return ce(logits, batch["y"]), new`).
      optimizer: the optax transformation for the trainable leaves (`params["params"]`).
    Returns:
      `(loss, optimizer)`: `loss(params, batch)` returns the loss (or `(loss, aux)`), equal in value to the user's;
      `optimizer` updates `params["params"]` as `optimizer` does and sets `params["state"]` to the new state.
      Pass both to `compile_train(loss, params, batch, optimizer, spec=...)`.
    """

    def loss(params, batch):
        _check(params)
        frozen = {**params, "state": jax.tree_util.tree_map(jax.lax.stop_gradient, params["state"])}
        value, new, aux = _split_new(loss_fn(frozen, batch))
        _check(new, "new_params")
        # zero in value, gradient (s - s_new) with respect to s: see the module docstring
        carry = jax.tree_util.tree_map(
            lambda s, n: jnp.sum((s - jax.lax.stop_gradient(s)) * jax.lax.stop_gradient(s - n)),
            params["state"],
            new["state"],
        )
        value = value + sum(jax.tree_util.tree_leaves(carry), jnp.zeros((), jnp.result_type(value)))
        return value if aux is None else (value, aux)

    def init(params):
        return optimizer.init(params)

    def update(grads, opt_state, params=None):
        if not (isinstance(grads, dict) and "state" in grads):
            # the compiler counts one kernel's update on a list of its tiles: all of them trainable
            return optimizer.update(grads, opt_state, params)
        zeroed = {**grads, "state": jax.tree_util.tree_map(jnp.zeros_like, grads["state"])}
        updates, opt_state = optimizer.update(zeroed, opt_state, params)
        return {**updates, "state": jax.tree_util.tree_map(jnp.negative, grads["state"])}, opt_state

    return loss, optax.GradientTransformation(init, update)


def _check(params, what="params"):
    if not (isinstance(params, dict) and set(params) == {"params", "state"}):
        raise ValueError(
            f"stateful: {what} must be an importer's {{'params': ..., 'state': ...}} dict, got "
            f"{type(params).__name__} with keys {sorted(params) if isinstance(params, dict) else '-'}"
        )
