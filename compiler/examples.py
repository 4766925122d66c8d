"""Example model factories for the `wafer` command (docs/cli.md), its tests and the docs.

A factory is a callable, named on the command line as MODULE:FACTORY (`compiler.examples:mlp`) or
path/to/file.py:FACTORY, called with the keyword arguments of the `model:` section of `--params params.yaml`.
It returns a dict:

  inference   {"fn": fn, "params": params, "inputs": (x, ...)}     fn(params, *inputs), e.g. a linen `apply`
              {"fn": nnx_module, "inputs": (x, ...)}                an nnx.Module called as module(*inputs)
  training    {"loss_fn": loss_fn, "params": params, "batch": example_batch, "optimizer": optax_transformation,
               "data": train batches, "eval_data": eval batches, "eval_fn": eval_fn}
              loss_fn(params, batch) -> scalar (or (scalar, aux)); "data" a `compiler.Batches` (or any iterable
              of batches shaped like "batch"); "eval_data", "eval_fn" (eval_fn(params) -> {name: number}) optional.

A tuple `(fn, params, *inputs)` or `(nnx_module, *inputs)` is accepted for inference too.

Parameter values are drawn with NumPy from the shapes (`jax.eval_shape` of the model's init): no XLA work at
factory time, so `wafer compile --validate-only` stays fast on large models.
"""

from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class MLP(nn.Module):
    """Dense layers with relu between them."""

    features: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class CNN(nn.Module):
    """Conv 3x3 -> relu -> avg pool -> conv 3x3 -> relu -> max pool -> dense."""

    channels: tuple[int, int] = (8, 16)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.channels[0], (3, 3), padding="SAME")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.channels[1], (3, 3), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


class LeNet(nn.Module):
    """LeNet-style: conv 5x5x6 - relu - avg pool - conv 5x5x16 - relu - max pool - dense 120 - 84 - 10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(10)(x)


class VGG(nn.Module):
    """VGG-style: two blocks of two 3x3 convs and a 2x2 max pool (channels c, then 2c), then dense 256 and 10."""

    channels: int = 64

    @nn.compact
    def __call__(self, x):
        for f in (self.channels, 2 * self.channels):
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x))
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


class EncoderBlock(nn.Module):
    """Post-norm Transformer encoder block with [d, d] Dense projections (the partitioner tiles a weight's last two
    axes; DenseGeneral's [d, heads, d_head] weights are tiled over (heads, d_head) and do not run per core)."""

    heads: int = 4

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dh = d // self.heads
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, self.heads, dh) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(dh).astype(x.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
        x = nn.LayerNorm()(x + nn.Dense(d, name="out")(attn))
        h = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(x)))
        return nn.LayerNorm()(x + h)


class Transformer(nn.Module):
    """`blocks` encoder blocks (the model width is the input's last axis)."""

    blocks: int = 2

    @nn.compact
    def __call__(self, x):
        for _ in range(self.blocks):
            x = EncoderBlock()(x)
        return x


def init_params(module: nn.Module, *inputs, seed: int = 0):
    """Parameters of a linen module: shapes from `jax.eval_shape(module.init)`, values from NumPy.

    Kernels ~ normal / sqrt(fan in), biases zero (LeCun-normal-like, without running the initialisers).
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _ints(v, name) -> tuple[int, ...]:
    vals = (v,) if isinstance(v, int) else tuple(v)
    if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals):
        raise ValueError(f"{name} must be a positive int or a list of them, got {v!r}")
    return vals


def mlp(batch: int = 8, d_in: int = 64, hidden=(128, 64), d_out: int = 10, seed: int = 0) -> dict:
    """An MLP d_in -> hidden... -> d_out (relu) on a [batch, d_in] input: the forward pass."""
    model = MLP((*_ints(hidden, "hidden"), d_out))
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((batch, d_in)), jnp.float32)
    return {"fn": model.apply, "params": init_params(model, x, seed=seed), "inputs": (x,)}


def cnn(batch: int = 4, size: int = 16, in_channels: int = 1, channels=(8, 16), classes: int = 10, seed: int = 0):
    """A small CNN on [batch, size, size, in_channels] images: the forward pass."""
    a, b = _ints(channels, "channels")
    model = CNN((a, b), classes)
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((batch, size, size, in_channels)), jnp.float32)
    return {"fn": model.apply, "params": init_params(model, x, seed=seed), "inputs": (x,)}


class NnxMLP(nnx.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.out = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def nnx_mlp(batch: int = 8, d_in: int = 32, d_hidden: int = 64, d_out: int = 10, seed: int = 0) -> dict:
    """A two-layer nnx MLP: the module itself is the program (no separate params)."""
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((batch, d_in)), jnp.float32)
    return {"fn": NnxMLP(d_in, d_hidden, d_out, rngs=nnx.Rngs(seed)), "inputs": (x,)}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 64] (values 0-16) and labels [1797].

    Read straight from the CSV file scikit-learn ships (importing sklearn itself takes seconds, which every `wafer
    train` run would pay); `sklearn.datasets.load_digits` when that file is not where it used to be.
    """
    found = importlib.util.find_spec("sklearn")
    for root in (found.submodule_search_locations or []) if found else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as load

    return load(return_X_y=True)


def digits(
    batch_size: int = 32, hidden=(64,), learning_rate: float = 3e-3, seed: int = 0, test_fraction: float = 0.25
) -> dict:
    """Training: an MLP classifying scikit-learn's 8x8 handwritten digits (1,797 images, bundled with sklearn).

    Returns the training contract: loss_fn (softmax cross-entropy), params, an example batch, an Adam optimizer,
    the training batches, the held-out batches and eval_fn(params) -> {"accuracy": ...} on the held-out images.
    """
    from compiler.host.data import Batches

    x, y = load_digits()
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    model = MLP((*_ints(hidden, "hidden"), 10))
    params = init_params(model, jnp.zeros((batch_size, 64)), seed=seed)

    def loss_fn(params, batch):
        logits = model.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    x_test, y_test = jnp.asarray(x[test]), jnp.asarray(y[test])

    @jax.jit
    def accuracy(params):
        return jnp.mean(jnp.argmax(model.apply(params, x_test), -1) == y_test)

    data = Batches.from_arrays(x[train], y[train], batch_size=batch_size, seed=seed)
    return {
        "loss_fn": loss_fn,
        "params": params,
        "batch": data.batch(0),
        "optimizer": optax.adam(learning_rate),
        "data": data,
        "eval_data": Batches.from_arrays(x[test], y[test], batch_size=batch_size, shuffle=False),
        "eval_fn": lambda params: {"accuracy": accuracy(params)},
    }
