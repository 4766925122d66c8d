"""Small models for compiler tests (and anyone else's): each factory returns a `Case` (fn, params, inputs).

`fn(params, *inputs)` runs the model; for an nnx model `fn` is the module itself, `params` is None and the model
runs as `fn(*inputs)` (the compiler splits it). Shapes are small (batch 2-4, widths 8-32) and include uneven sizes
(10, 13) on purpose, so partitioning must pad. Everything is deterministic: values come from fixed NumPy seeds.

`MODELS` maps a name to its factory; `EXPECTED_KINDS` gives the kernel kinds `compiler.build_graph` should
produce, in order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Case(NamedTuple):
    """A model ready to trace: `fn(params, *inputs)`, or `fn(*inputs)` when `fn` is an nnx module."""

    fn: Any
    params: Any
    inputs: tuple

    @property
    def is_module(self) -> bool:
        return isinstance(self.fn, nnx.Module)

    def trace_args(self) -> tuple:
        """Arguments for `compiler.trace` / `compiler.compile`: (fn, params, *inputs) or (module, *inputs)."""
        return (self.fn, *self.inputs) if self.is_module else (self.fn, self.params, *self.inputs)

    def run(self):
        """The native output."""
        return self.fn(*self.inputs) if self.is_module else self.fn(self.params, *self.inputs)


def _linen_case(module: nn.Module, *inputs, seed: int = 0) -> Case:
    # Flax's own init runs the model and its truncated-normal initialisers op by op: seconds per model on CPU.
    # The shapes come from eval_shape (no compute); the values from NumPy (no XLA compile at all).
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return Case(module.apply, init_like(shapes, seed), tuple(inputs))


def init_like(shapes, seed: int = 0):
    """Deterministic values for a pytree of shapes, chosen by leaf name so every layer does something visible.

    Kernels and embeddings: normal / sqrt(fan_in); biases: 0.1 normal; norm scales: 1 + 0.1 normal; BatchNorm
    means: 0.1 normal; variances: 0.5 + |normal|; anything else: 0.02 normal.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        z = rng.standard_normal(s.shape)
        if name in ("kernel", "embedding"):
            z = z / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))
        elif name == "bias" or name == "mean":
            z = 0.1 * z
        elif name == "scale":
            z = 1.0 + 0.1 * z
        elif name == "var":
            z = 0.5 + np.abs(z)
        else:
            z = 0.02 * z
        return jnp.asarray(z, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def mean_square_loss(case: Case):
    """loss(params, batch) = sum over the case's outputs of mean(out ** 2) in float32: a training loss for any zoo
    case (batch = its inputs)."""

    def loss(params, batch):
        out = case.fn(params, *batch)
        return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(out))

    return loss


def _normal(seed: int, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ---------------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Dense -> relu -> Dense -> relu -> Dense."""

    features: tuple[int, ...] = (13, 10, 8)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def mlp(batch: int = 4, d_in: int = 12, features: tuple[int, ...] = (13, 10, 8)) -> Case:
    """A 3-layer MLP on [batch, d_in]."""
    return _linen_case(MLP(features), _normal(1, (batch, d_in)))


# ---------------------------------------------------------------------------------------------------- CNNs


class LeNet(nn.Module):
    """Conv 5x5 -> relu -> avg pool -> Conv 5x5 -> relu -> max pool -> Dense -> relu -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (5, 5), padding="VALID")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(10, (5, 5), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(13)(x))
        return nn.Dense(10)(x)


def lenet(batch: int = 2, size: int = 20) -> Case:
    """LeNet-style CNN on [batch, size, size, 1] images."""
    return _linen_case(LeNet(), _normal(2, (batch, size, size, 1)))


class BasicBlock(nn.Module):
    """ResNet basic block in inference mode: conv-BN-relu-conv-BN, projection shortcut, add, relu."""

    features: int = 12
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.BatchNorm(use_running_average=True)
        y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


def resnet_block(batch: int = 2, size: int = 8, channels: int = 8, features: int = 12) -> Case:
    """A ResNet basic block in inference mode (BatchNorm with non-trivial running statistics)."""
    return _linen_case(BasicBlock(features), _normal(3, (batch, size, size, channels)))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (one filter per channel, stride 2) -> relu -> pointwise 1x1 conv -> relu."""

    channels: int = 6
    features: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.channels, (3, 3), strides=(2, 2), feature_group_count=self.channels)(x)
        x = nn.relu(x)
        return nn.relu(nn.Conv(self.features, (1, 1))(x))


def depthwise(batch: int = 2, size: int = 9, channels: int = 6) -> Case:
    """A depthwise-separable conv block on [batch, size, size, channels]."""
    return _linen_case(DepthwiseSeparable(channels), _normal(4, (batch, size, size, channels)))


# ---------------------------------------------------------------------------------------------------- attention


class EncoderBlock(nn.Module):
    """Post-norm Transformer encoder block: self-attention with a padding mask, LayerNorm, gelu MLP, LayerNorm."""

    heads: int = 2
    d_model: int = 16
    d_ff: int = 32

    @nn.compact
    def __call__(self, x, mask):
        attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.d_model)
        x = nn.LayerNorm()(x + attn(x, x, mask=mask))
        h = nn.Dense(self.d_ff)(x)
        h = nn.Dense(self.d_model)(nn.gelu(h))
        return nn.LayerNorm()(x + h)


def encoder_block(batch: int = 2, length: int = 5, d_model: int = 16) -> Case:
    """An encoder block on [batch, length, d_model] with a padding mask [batch, 1, length, length]."""
    x = _normal(5, (batch, length, d_model))
    valid = jnp.arange(length)[None, :] < jnp.array([length, length - 2])[:batch, None]
    mask = nn.make_attention_mask(valid, valid)
    return _linen_case(EncoderBlock(d_model=d_model), x, mask)


class CausalSelfAttention(nn.Module):
    """Hand-written multi-head causal self-attention."""

    heads: int
    d_model: int

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        d_head = self.d_model // self.heads
        q, k, v = (nn.Dense(self.d_model, name=n)(x).reshape(b, t, self.heads, d_head) for n in ("q", "k", "v"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d_head).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(x.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, self.d_model)
        return nn.Dense(self.d_model, name="out")(out)


class DecoderLM(nn.Module):
    """A one-layer pre-norm decoder language model: token + learned position embedding, causal attention, gelu MLP,
    final LayerNorm, head to the vocabulary."""

    vocab: int = 13
    d_model: int = 16
    heads: int = 2
    max_len: int = 8

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = nn.Embed(self.vocab, self.d_model)(tokens) + pos[:t]
        x = x + CausalSelfAttention(self.heads, self.d_model)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(2 * self.d_model)(nn.LayerNorm()(x)))
        x = x + nn.Dense(self.d_model)(h)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def decoder_lm(batch: int = 2, length: int = 6, vocab: int = 13) -> Case:
    """A decoder LM on int32 tokens [batch, length], logits [batch, length, vocab]."""
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, vocab, (batch, length)), jnp.int32)
    return _linen_case(DecoderLM(vocab=vocab), tokens)


# ---------------------------------------------------------------------------------------------------- norms


class RMSNormMLP(nn.Module):
    """Pre-norm residual MLP: x + Dense(gelu(Dense(RMSNorm(x))))."""

    d_ff: int = 24

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.d_ff)(nn.RMSNorm()(x))
        return x + nn.Dense(x.shape[-1])(nn.gelu(h))


def rmsnorm(batch: int = 3, d_model: int = 10) -> Case:
    """An RMSNorm pre-norm MLP block on [batch, d_model]; the norm comes before any matmul."""
    return _linen_case(RMSNormMLP(), _normal(7, (batch, d_model)))


# ---------------------------------------------------------------------------------------------------- nnx, plain JAX


class NNXNet(nnx.Module):
    """nnx: Linear -> relu -> LayerNorm -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(d_hidden, rngs=rngs)
        self.fc2 = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.norm(nnx.relu(self.fc1(x))))


def nnx_mlp(batch: int = 4, d_in: int = 10, d_hidden: int = 13, d_out: int = 8) -> Case:
    """An nnx module (params None: the module carries its state)."""
    return Case(NNXNet(d_in, d_hidden, d_out, rngs=nnx.Rngs(8)), None, (_normal(9, (batch, d_in)),))


def plain_jax(batch: int = 4, d_in: int = 8, d_out: int = 10) -> Case:
    """A plain-JAX function of a params dict: tanh(x @ w + b), then a jitted softmax."""

    def fn(params, x):
        return jax.jit(jax.nn.softmax)(jnp.tanh(x @ params["w"] + params["b"]))

    params = {"w": _normal(10, (d_in, d_out)) / d_in**0.5, "b": jnp.zeros((d_out,))}
    return Case(fn, params, (_normal(11, (batch, d_in)),))


def rnn(batch: int = 2, length: int = 5, d_in: int = 8, d_hidden: int = 10) -> Case:
    """An Elman RNN written with lax.scan over time, then a dense readout of the last state."""

    def fn(params, xs):
        def cell(h, x):
            h = jnp.tanh(x @ params["wx"] + h @ params["wh"] + params["b"])
            return h, h

        h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], d_hidden)), xs)
        return h @ params["wo"]

    params = {
        "wx": _normal(12, (d_in, d_hidden)) * 0.3,
        "wh": _normal(13, (d_hidden, d_hidden)) * 0.3,
        "b": jnp.zeros((d_hidden,)),
        "wo": _normal(14, (d_hidden, 4)),
    }
    return Case(fn, params, (_normal(15, (length, batch, d_in)),))


MODELS = {
    "mlp": mlp,
    "lenet": lenet,
    "resnet_block": resnet_block,
    "depthwise": depthwise,
    "encoder_block": encoder_block,
    "decoder_lm": decoder_lm,
    "rmsnorm": rmsnorm,
    "nnx_mlp": nnx_mlp,
    "plain_jax": plain_jax,
    "rnn": rnn,
}
"""Name -> factory returning a `Case`."""

EXPECTED_KINDS = {
    "mlp": ("dense", "dense", "dense"),
    "lenet": ("conv", "pool", "conv", "pool", "dense", "dense"),
    "resnet_block": ("conv", "conv", "conv"),
    "depthwise": ("conv", "conv"),
    "encoder_block": ("dense", "dense", "dense", "matmul", "matmul", "dense", "dense", "dense"),
    "decoder_lm": ("embed", "dense", "dense", "dense", "matmul", "matmul", "dense", "dense", "dense", "dense"),
    "rmsnorm": ("elementwise", "dense", "dense"),
    "nnx_mlp": ("dense", "dense"),
    "plain_jax": ("dense",),
    "rnn": ("scan", "dense"),
}
"""Name -> the kernel kinds of its graph, in program order."""
