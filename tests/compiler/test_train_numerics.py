"""Training numerics: the emulated wafer trains exactly like native Flax + optax.

Three models on real data that ships with the environment (no download): an MLP and a CNN on scikit-learn's
bundled 8x8 digits, and a character-level transformer LM on the source text of the standard library's
`json/decoder.py`. Each runs 200 steps with `compile_train` on a mini wafer (layer-pipelined: weights and
optimizer slots in SRAM, updated on their own cores) and natively (`jax.jit` of `value_and_grad` + the optax
update) on the same batches in the same order; the loss of every step and the final params agree to 1e-4
relative (float32; the summation order of padded tiles may differ). The optimizers vary across the models:
SGD with momentum, AdamW with a warmup-cosine schedule, and clip-by-global-norm chained with Adam.

Weight streaming (the host store holds weights and optimizer state, the optimizer runs off-wafer) and dropout
(masks drawn from an explicit key carried in the batch) are held to the same rule.
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import wafer
from compiler import PlacementError, compile_train

RTOL = 1e-4  # float32, 200 steps: per-step loss and final params
STEPS = 200


# ---- data ---------------------------------------------------------------------------------------------------


def digits_batches(batch: int, steps: int, *, images: bool = False, seed: int = 0) -> list[dict]:
    """`steps` batches of scikit-learn's bundled digits (pixels scaled to [0, 1]), epochs in a seeded order."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    if images:
        x = x.reshape(-1, 8, 8, 1)
    y = y.astype(np.int32)
    rng = np.random.default_rng(seed)
    per_epoch = len(x) // batch
    order = np.concatenate([rng.permutation(len(x))[: per_epoch * batch] for _ in range(-(-steps // per_epoch))])
    return [{"x": x[idx], "y": y[idx]} for idx in order[: steps * batch].reshape(steps, batch)]


def text_batches(batch: int, length: int, steps: int, *, seed: int = 0) -> tuple[int, list[dict]]:
    """(vocab, batches) of next-character prediction on the standard library's `json/decoder.py`."""
    text = pathlib.Path(json.__file__).with_name("decoder.py").read_text()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length - 1, (steps, batch))
    windows = ids[starts[..., None] + np.arange(length + 1)]  # [steps, batch, length + 1]
    return len(chars), [{"x": w[:, :-1], "y": w[:, 1:]} for w in windows]


# ---- models -------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(24)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class CharLM(nn.Module):
    """A one-layer pre-norm decoder: token + learned position embedding, causal multi-head self-attention, gelu
    MLP, final LayerNorm, head to the vocabulary.

    The key projection has no bias, as in many LMs: a key bias adds the same q . b to every score of a row, which
    softmax cancels, so its gradient is exactly zero in real arithmetic and rounding noise in float32; Adam
    normalises that noise into full-size steps, so a key bias follows a different random walk under any change of
    summation order (native JAX on another backend included) and cannot be compared to 1e-4.
    """

    vocab: int
    d_model: int = 32
    heads: int = 2
    max_len: int = 32

    @nn.compact
    def __call__(self, tokens):
        b, t = tokens.shape
        d_head = self.d_model // self.heads
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = nn.Embed(self.vocab, self.d_model)(tokens) + pos[:t]
        h = nn.LayerNorm()(x)
        q, k, v = (
            nn.Dense(self.d_model, use_bias=name != "k", name=name)(h).reshape(b, t, self.heads, d_head)
            for name in ("q", "k", "v")
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d_head).astype(np.float32)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, self.d_model)
        x = x + nn.Dense(self.d_model, name="out")(att)
        x = x + nn.Dense(self.d_model)(nn.gelu(nn.Dense(4 * self.d_model)(nn.LayerNorm()(x))))
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.Dropout(0.3)(x, deterministic=deterministic)
        return nn.Dense(10)(x)


def classifier_loss(model):
    def loss_fn(params, batch):
        logits = model.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


# ---- the two runs -------------------------------------------------------------------------------------------


def native_run(loss_fn, params, optimizer, batches):
    """Native Flax + optax: (losses [steps], final params)."""

    @jax.jit
    def step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    opt_state = optimizer.init(params)
    losses = []
    for b in batches:
        params, opt_state, loss = step(params, opt_state, b)
        losses.append(loss)
    return np.asarray(jnp.stack(losses)), params, opt_state


def emulated_run(tx, params, batches):
    """The same on the wafer: (losses [steps], final params, final TrainState)."""
    state = tx.init(params)
    losses = []
    for b in batches:
        state, metrics = tx.step(state, b)
        losses.append(metrics["loss"])
    return np.asarray(jnp.stack(losses)), tx.read_params(state), state


def rel_leaf_diff(a, b) -> float:
    """max |a - b| / max |b| over one leaf."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_same_training(emu_losses, nat_losses, emu_params, nat_params, rtol=RTOL):
    assert emu_losses.shape == nat_losses.shape
    assert np.all(np.isfinite(nat_losses))
    rel = np.abs(emu_losses - nat_losses) / np.abs(nat_losses)
    worst = int(np.argmax(rel))
    assert rel[worst] <= rtol, f"step {worst}: emulated loss {emu_losses[worst]} vs native {nat_losses[worst]}"
    paths = jax.tree_util.tree_flatten_with_path(nat_params)[0]
    assert jax.tree_util.tree_structure(emu_params) == jax.tree_util.tree_structure(nat_params)
    for (path, n), e in zip(paths, jax.tree_util.tree_leaves(emu_params)):
        assert e.shape == n.shape and e.dtype == n.dtype, jax.tree_util.keystr(path)
        assert rel_leaf_diff(e, n) <= rtol, f"{jax.tree_util.keystr(path)}: {rel_leaf_diff(e, n):.3g}"
    return float(rel.max())


# ---- cases --------------------------------------------------------------------------------------------------


def _mlp():
    model = MLP()
    batches = digits_batches(64, STEPS)
    params = model.init(jax.random.key(0), batches[0]["x"])
    return classifier_loss(model), params, batches, optax.sgd(0.1, momentum=0.9), wafer.WaferSpec.mini(8, 8)


def _cnn():
    model = CNN()
    batches = digits_batches(64, STEPS, images=True, seed=1)
    params = model.init(jax.random.key(1), batches[0]["x"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=20, decay_steps=STEPS)
    optimizer = optax.adamw(schedule, weight_decay=1e-2)
    return classifier_loss(model), params, batches, optimizer, wafer.WaferSpec.mini(12, 12)


def _lm():
    vocab, batches = text_batches(8, 32, STEPS, seed=2)
    model = CharLM(vocab=vocab)
    params = model.init(jax.random.key(2), batches[0]["x"])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
    return classifier_loss(model), params, batches, optimizer, wafer.WaferSpec.mini(16, 16)


CASES = {"mlp_digits_sgd_momentum": _mlp, "cnn_digits_adamw_cosine": _cnn, "char_lm_clip_adam": _lm}
# Cases whose 200 emulated steps equal native bit for bit on CPU (elementwise optimizers). Global-norm clipping
# sums squares over each core's tiles, padding included, in another order than over the whole leaf: ~1e-7.
BIT_IDENTICAL = ("mlp_digits_sgd_momentum", "cnn_digits_adamw_cosine")


@pytest.fixture(scope="module")
def case():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = CASES[name]()
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_pipelined_matches_native(case, name):
    loss_fn, params, batches, optimizer, spec = case(name)
    tx = compile_train(loss_fn, params, batches[0], optimizer, spec=spec, mode="pipelined")
    assert tx.mode == "pipelined"
    emu_losses, emu_params, state = emulated_run(tx, params, batches)
    nat_losses, nat_params, nat_opt = native_run(loss_fn, params, optimizer, batches)
    assert nat_losses[-1] < 0.8 * nat_losses[0]  # it learns something: the comparison is not of a flat curve
    worst = assert_same_training(emu_losses, nat_losses, emu_params, nat_params)
    params_diff = max(rel_leaf_diff(e, n) for e, n in zip(*map(jax.tree_util.tree_leaves, (emu_params, nat_params))))
    print(f"\n{name}: worst relative difference per step: loss {worst:.3g}; final params {params_diff:.3g}")
    identical = np.array_equal(emu_losses, nat_losses) and all(
        np.array_equal(e, n) for e, n in zip(*map(jax.tree_util.tree_leaves, (emu_params, nat_params)))
    )
    print(f"{name}: bit-identical to native over {STEPS} steps: {identical}")
    if name in BIT_IDENTICAL and jax.default_backend() == "cpu":
        assert identical, f"{name}: no longer bit-identical to native (compiler/run/train.py, the gradient barrier)"
    # the optimizer state held in SRAM is the native one too (momentum / mu, nu / counts)
    for e, n in zip(jax.tree_util.tree_leaves(tx.read_opt_state(state)), jax.tree_util.tree_leaves(nat_opt)):
        assert e.shape == n.shape
        assert rel_leaf_diff(e, n) <= RTOL
    assert int(state.step) == STEPS and int(state.wafer.steps) == STEPS
    assert float(state.wafer.clock) == pytest.approx(STEPS * float(tx.record.cycles(spec)), rel=1e-5)


def test_weight_streaming_matches_native(case):
    loss_fn, params, batches, optimizer, spec = case("cnn_digits_adamw_cosine")
    batches = batches[:50]
    tx = compile_train(loss_fn, params, batches[0], optimizer, spec=spec, mode="weight_streaming")
    assert tx.mode == "weight_streaming"
    emu_losses, emu_params, state = emulated_run(tx, params, batches)
    nat_losses, nat_params, _ = native_run(loss_fn, params, optimizer, batches)
    assert_same_training(emu_losses, nat_losses, emu_params, nat_params)
    # weights and optimizer state live off-wafer (the MemoryX role): no weight allocation in SRAM
    assert not any(":params/" in name for name in state.wafer.sram)


def test_auto_streams_a_model_too_big_for_the_wafer(case):
    loss_fn, params, batches, optimizer, _ = case("mlp_digits_sgd_momentum")
    # 44 usable cores of 1.5 KB (none kept for code): the MLP's weights, gradients and momentum (3 x 12,488 B) with
    # their tiling need more. Weight streaming runs a layer on the whole batch, every core holding its chunk of the
    # batch's activations: batches of 4 samples, so that one layer at a time fits.
    tiny = wafer.WaferSpec.mini(4, 16, sram_bytes_per_core=1536, code_bytes_per_core=0)
    batches = [{k: v[:4] for k, v in b.items()} for b in batches[:20]]
    with pytest.raises((wafer.SramCapacityError, PlacementError), match="weight.streaming"):
        compile_train(loss_fn, params, batches[0], optimizer, spec=tiny, mode="pipelined")
    tx = compile_train(loss_fn, params, batches[0], optimizer, spec=tiny, mode="auto")
    assert tx.mode == "weight_streaming"
    emu_losses, emu_params, _ = emulated_run(tx, params, batches)
    nat_losses, nat_params, _ = native_run(loss_fn, params, optimizer, batches)
    assert_same_training(emu_losses, nat_losses, emu_params, nat_params)


@pytest.mark.parametrize("key_kind", ["typed", "raw"])
def test_dropout_draws_the_native_masks(key_kind):
    """Dropout keys come with the batch (folded from a base key by step): both runs draw the same masks."""
    model = DropoutMLP()
    base = jax.random.key(7) if key_kind == "typed" else jax.random.PRNGKey(7)
    batches = [dict(b, key=jax.random.fold_in(base, i)) for i, b in enumerate(digits_batches(32, 60, seed=3))]
    params = model.init(jax.random.key(3), batches[0]["x"], deterministic=True)

    def loss_fn(p, b):
        logits = model.apply(p, b["x"], deterministic=False, rngs={"dropout": b["key"]})
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    optimizer = optax.adam(1e-2)
    tx = compile_train(loss_fn, params, batches[0], optimizer, spec=wafer.WaferSpec.mini(8, 8), mode="pipelined")
    emu_losses, emu_params, _ = emulated_run(tx, params, batches)
    nat_losses, nat_params, _ = native_run(loss_fn, params, optimizer, batches)
    assert_same_training(emu_losses, nat_losses, emu_params, nat_params)
    # the masks matter: the same step without dropout gives another loss
    no_drop = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, b["x"], deterministic=True), b["y"]
    ).mean()
    assert abs(float(no_drop(params, batches[0])) - float(nat_losses[0])) > 1e-3


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_compiles_onto_wse2(case, name):
    """Each model compiles for training onto the full CS-2 wafer; the report predicts its throughput."""
    loss_fn, params, batches, optimizer, _ = case(name)
    tx = compile_train(loss_fn, params, batches[0], optimizer, spec=wafer.WSE2, mode="auto")
    assert tx.mode == "pipelined"
    r = tx.report
    assert r.spec_name == wafer.WSE2.name and r.mode == "pipelined training"
    assert r.samples_per_s > 0 and r.bound in ("compute", "fabric", "I/O")
    assert all(k.forward_cycles > 0 and k.act_bytes_per_core > 0 for k in r.kernels)
    assert "bound by" in str(r)
    print(f"\n{name} on WSE-2:\n{r}")
