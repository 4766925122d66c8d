"""Training state on the wafer: where weights, gradients, optimizer slots and activations live, the padding of
uneven tiles, the training report, modes and their errors, the jitted step (no retrace, TrainState through jit),
and a range of optax transformations.

The models are small MLPs on scikit-learn's bundled digits, with uneven widths (13, 10) so tiles must pad.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import wafer
from compiler import PlacementError, TrainState, compile_train

RTOL = 1e-4
SPEC = wafer.WaferSpec.mini(8, 8)


class MLP(nn.Module):
    features: tuple[int, ...] = (13, 10)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def digits(batch: int, steps: int, seed: int = 0) -> list[dict]:
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))[: batch * steps].reshape(steps, batch)
    return [{"x": x[i], "y": y[i]} for i in idx]


MODEL = MLP()
BATCHES = digits(32, 8)
PARAMS = MODEL.init(jax.random.key(0), BATCHES[0]["x"])


def loss_fn(params, batch):
    logits = MODEL.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def native(optimizer, batches, params=PARAMS):
    @jax.jit
    def step(p, o, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    o = optimizer.init(params)
    losses = []
    for b in batches:
        params, o, loss = step(params, o, b)
        losses.append(float(loss))
    return losses, params, o


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_trees_close(a, b, rtol=RTOL):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        assert np.shape(x) == np.shape(y), jax.tree_util.keystr(path)
        assert rel(x, y) <= rtol, f"{jax.tree_util.keystr(path)}: {rel(x, y):.3g}"


ADAMW = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=0.1)


@pytest.fixture(scope="module")
def adamw_tx():
    return compile_train(loss_fn, PARAMS, BATCHES[0], ADAMW, spec=SPEC, mode="pipelined")


# ---- SRAM holds the weights and the optimizer slots -----------------------------------------------------------


def test_sram_holds_weights_and_optimizer_slots(adamw_tx):
    tx = adamw_tx
    state = tx.init(PARAMS)
    assert_trees_close(tx.read_params(state), PARAMS, rtol=0)
    assert_trees_close(tx.read_opt_state(state), ADAMW.init(PARAMS), rtol=0)
    weights = {n: np.asarray(v) for n, v in state.wafer.sram.items() if "#" not in n}
    assert len(weights) == len(jax.tree_util.tree_leaves(PARAMS))

    for b in BATCHES[:3]:
        state, _ = tx.step(state, b)
    _, nat_params, nat_opt = native(ADAMW, BATCHES[:3])
    assert_trees_close(tx.read_params(state), nat_params)
    emu_opt = tx.read_opt_state(state)
    assert_trees_close(emu_opt, nat_opt)
    adam = emu_opt[0]  # ScaleByAdamState(count, mu, nu) of the chain
    assert int(adam.count) == 3
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(adam.nu))

    # the weights were written back in place: same allocations, same shapes, new values; stored blocked (the leaf
    # itself), their per-core view the tiles
    for name, before in weights.items():
        alloc = state.wafer.memory[name]
        after = np.asarray(state.wafer.sram[name])
        assert after.shape == before.shape == alloc.stored_shape
        assert state.wafer.read(name).shape == alloc.array_shape
        assert not np.array_equal(after, before), name
    # Adam's two slots are SRAM allocations with data beside their weights
    for name in weights:
        for slot in ("#opt0", "#opt1"):
            assert state.wafer.sram[name + slot].shape == weights[name].shape


def test_memory_layout_per_kernel(adamw_tx):
    tx = adamw_tx
    memory = tx.init(PARAMS).wafer.memory
    assert memory is tx.memory or memory.allocations == tx.memory.allocations
    row_of = {r.name: r for r in tx.report.kernels}
    for name, plan in tx.plans.items():
        rect = tx.placement[name]
        mine = [a for a in memory.allocations if a.name.startswith(f"{name}:")]
        for a in mine:  # every allocation of a kernel lies on its own rectangle: weights stay put
            assert a.rect.row >= rect.row and a.rect.col >= rect.col
            assert a.rect.row + a.rect.height <= rect.row + rect.height
            assert a.rect.col + a.rect.width <= rect.col + rect.width
        names = [a.name for a in mine]
        for t in plan.params:
            base = f"{name}:{t.path}"
            assert {base, base + "#grad", base + "#opt0", base + "#opt1"} <= set(names), names
        acts = [a for a in mine if a.name.endswith("activations")]
        assert len(acts) == 1, names
        # activations (stream buffer and backward stash) are counted per core, as the report says
        assert acts[0].nbytes == row_of[name].act_bytes_per_core > 0
    occ = memory.occupancy()
    assert occ.max() <= SPEC.sram_bytes_per_core
    assert tx.report.peak_sram_bytes_per_core <= SPEC.sram_bytes_per_core


def test_padding_stays_zero(adamw_tx):
    tx = adamw_tx
    state = tx.init(PARAMS)
    for b in BATCHES:
        state, _ = tx.step(state, b)
    padded = 0
    for plan in tx.plans.values():
        for t in plan.params:
            pad = np.asarray(t.tile_array(jnp.ones(t.shape, t.dtype))) == 0  # True where a tile is padding
            padded += int(pad.sum())
            base = f"{plan.name}:{t.path}"
            for name in (base, base + "#opt0", base + "#opt1"):
                values = np.asarray(state.wafer.read(name))  # the per-core view
                assert np.all(values[pad] == 0), name
                assert np.any(values[~pad] != 0), name
    assert padded > 0, "the test needs uneven tiles: change the widths or the wafer"


# ---- the step is one jitted function ----------------------------------------------------------------------


def test_step_traces_once_and_state_is_a_pytree():
    traces = []

    def counted(p, b):
        traces.append(1)
        return loss_fn(p, b)

    optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    tx = compile_train(counted, PARAMS, BATCHES[0], optimizer, spec=SPEC, mode="pipelined")
    state = tx.init(PARAMS)
    state, _ = tx.step(state, BATCHES[0])
    after_first = len(traces)
    for b in BATCHES[1:4]:
        state, m = tx.step(state, b)
    assert len(traces) == after_first, "tx.step retraced"
    assert tx.step._cache_size() == 1

    # TrainState goes through jit and scan: four steps in one jitted scan equal four calls of tx.step
    assert isinstance(jax.jit(lambda s: s)(state), TrainState)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *BATCHES[4:8])

    @jax.jit
    def four(s, bs):
        return jax.lax.scan(tx.step, s, bs)

    scanned, ms = four(jax.tree_util.tree_map(jnp.copy, state), stacked)
    for b in BATCHES[4:8]:
        state, m = tx.step(state, b)
    assert_trees_close(tx.read_params(scanned), tx.read_params(state), rtol=1e-6)
    assert float(ms["loss"][-1]) == pytest.approx(float(m["loss"]), rel=1e-6)
    assert int(scanned.step) == int(state.step) == 8
    assert float(scanned.wafer.clock) == pytest.approx(float(state.wafer.clock), rel=1e-6)


# ---- any optax transformation -------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "nesterov": optax.sgd(0.05, momentum=0.9, nesterov=True),
    "rmsprop": optax.rmsprop(1e-2),
    "lion": optax.lion(1e-3, weight_decay=1e-2),
    "adamw_schedule_clip": optax.chain(
        optax.clip_by_global_norm(0.1), optax.adamw(optax.exponential_decay(1e-2, 2, 0.5), weight_decay=0.1)
    ),
    "clip_scale_by_schedule": optax.chain(
        optax.clip(0.05), optax.scale_by_schedule(optax.linear_schedule(0.1, 0.0, 6)), optax.scale(-1.0)
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_optax_transformations(name):
    optimizer = OPTIMIZERS[name]
    batches = BATCHES[:6]
    tx = compile_train(loss_fn, PARAMS, batches[0], optimizer, spec=SPEC, mode="pipelined")
    state = tx.init(PARAMS)
    losses = []
    for b in batches:
        state, m = tx.step(state, b)
        losses.append(float(m["loss"]))
    nat_losses, nat_params, nat_opt = native(optimizer, batches)
    np.testing.assert_allclose(losses, nat_losses, rtol=RTOL)
    assert_trees_close(tx.read_params(state), nat_params)
    assert_trees_close(tx.read_opt_state(state), nat_opt)


def test_shape_dependent_optimizer_needs_update_on_params():
    optimizer = optax.adafactor(1e-2, min_dim_size_to_factor=8)
    with pytest.raises(ValueError, match="update_on='params'"):
        compile_train(loss_fn, PARAMS, BATCHES[0], optimizer, spec=SPEC, mode="pipelined")
    tx = compile_train(loss_fn, PARAMS, BATCHES[0], optimizer, spec=SPEC, mode="pipelined", update_on="params")
    state = tx.init(PARAMS)
    for b in BATCHES[:3]:
        state, _ = tx.step(state, b)
    _, nat_params, _ = native(optimizer, BATCHES[:3])
    assert_trees_close(tx.read_params(state), nat_params)


def test_aux_output():
    def with_aux(p, b):
        logits = MODEL.apply(p, b["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == b["y"])}

    tx = compile_train(with_aux, PARAMS, BATCHES[0], optax.sgd(0.1), spec=SPEC, mode="pipelined")
    state, m = tx.step(tx.init(PARAMS), BATCHES[0])
    assert float(m["loss"]) == pytest.approx(float(loss_fn(PARAMS, BATCHES[0])), rel=1e-5)
    assert 0.0 <= float(m["aux"]["accuracy"]) <= 1.0


# ---- modes and errors ---------------------------------------------------------------------------------------


def test_auto_mode_picks_pipelined_when_it_fits():
    tx = compile_train(loss_fn, PARAMS, BATCHES[0], optax.adam(1e-3), spec=SPEC, mode="auto")
    assert tx.mode == "pipelined" and tx.report.mode == "pipelined training"


def test_pipelined_too_big_raises_and_auto_streams():
    # 44 usable cores of 4 KB, 256 B of each kept for code: 3,840 B of data
    small = wafer.WaferSpec.mini(4, 16, sram_bytes_per_core=4096, code_bytes_per_core=256)
    model = MLP((256, 10))  # 66 KB of weights: with Adam's gradient and two slots, 264 KB
    # weight streaming runs a layer on the whole batch, each core holding its chunk of the batch's activations: a
    # batch of 4 samples, so that one layer at a time fits
    batch = {k: v[:4] for k, v in BATCHES[0].items()}
    params = jax.eval_shape(model.init, jax.random.key(0), batch["x"])
    fn = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b["x"]), b["y"]).mean()
    with pytest.raises((wafer.SramCapacityError, PlacementError), match="weight.streaming") as err:
        compile_train(fn, params, batch, optax.adam(1e-3), spec=small, mode="pipelined")
    assert "dense_0" in str(err.value)
    tx = compile_train(fn, params, batch, optax.adam(1e-3), spec=small, mode="auto")
    assert tx.mode == "weight_streaming"
    assert tx.report.peak_sram_bytes_per_core <= small.data_bytes_per_core == 3840
    # a layer that does not fit the whole wafer cannot stream either: 12 cores of 3,840 B of data < 64 KB of one layer
    tiny = wafer.WaferSpec.mini(4, 8, sram_bytes_per_core=4096, code_bytes_per_core=256)
    with pytest.raises(wafer.SramCapacityError, match="dense_0"):
        compile_train(fn, params, batch, optax.adam(1e-3), spec=tiny, mode="auto")


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_train(loss_fn, PARAMS, BATCHES[0], optax.sgd(0.1), spec=SPEC, mode="streaming")
    with pytest.raises(ValueError, match="update_on"):
        compile_train(loss_fn, PARAMS, BATCHES[0], optax.sgd(0.1), spec=SPEC, update_on="leaves")
    with pytest.raises(ValueError, match="scalar"):
        compile_train(lambda p, b: MODEL.apply(p, b["x"]), PARAMS, BATCHES[0], optax.sgd(0.1), spec=SPEC)


# ---- the training report ------------------------------------------------------------------------------------


def _check_report(tx, spec):
    r = tx.report
    assert r.spec_name == spec.name and "training" in r.mode
    assert len(r.kernels) == len(tx.graph.kernels)
    for k in r.kernels:
        assert k.forward_cycles > 0 and k.backward_cycles > 0, k.name
        assert k.act_bytes_per_core > 0, k.name
    assert 0 < r.samples_per_s < float("inf")
    assert r.bound in ("compute", "fabric", "I/O")
    assert 0 < r.compute_utilization <= 1
    assert 0 < r.active_cores <= spec.cores
    text = str(r)
    assert "bound by" in text and "fwd cyc" in text and "upd cyc" in text
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {"forward_cycles", "backward_cycles", "update_cycles", "io_cycles"} <= set(d["kernels"][0])
    return r


def test_pipelined_report(adamw_tx):
    tx = adamw_tx
    r = _check_report(tx, SPEC)
    with_weights = {name for name, p in tx.plans.items() if p.params}
    # dense_0 reads the data (no input cotangent to compute), dense_1 the hidden activations
    assert list(tx.plan.features.dx) == [0.0, 1.0]
    for k in r.kernels:
        s = tx.schedule.kernel(k.name)
        # the backward is the kernel's own program (its VJP's, and the anchor's weight and input cotangents), its
        # compute and communication overlapping: not a multiple of the forward
        assert k.backward_cycles == s["backward"] == max(s["bwd_compute"], s["bwd_comm"]) > 0
        assert k.forward_cycles == s["forward"] == max(s["compute"], s["comm"])
        assert (k.update_cycles > 0) == (k.name in with_weights), k.name
        assert k.io_cycles == 0
    # the counters of a step are the report's: the clock advances by the step's cycles
    state, _ = tx.step(tx.init(PARAMS), BATCHES[0])
    assert float(state.wafer.clock) == pytest.approx(r.latency_cycles, rel=1e-6)
    assert r.samples_per_s == pytest.approx(SPEC.clock_hz * r.batch / r.latency_cycles, rel=1e-9)
    assert float(state.wafer.busy.max()) > 0 and float(state.wafer.links.sum()) > 0


def test_weight_streaming_report_io_by_hand():
    spec = wafer.WSE2
    assert spec.edge_io_bits_per_s == 1.2e12  # 12 x 100 GbE
    tx = compile_train(loss_fn, PARAMS, BATCHES[0], optax.adam(1e-3), spec=spec, mode="weight_streaming")
    r = _check_report(tx, spec)
    assert "streaming" in r.mode and "I/O cyc" in str(r)
    for k in r.kernels:
        assert k.update_cycles == 0  # the optimizer runs off-wafer
    # dense_0 holds Dense_0: kernel [64, 13] and bias [13], float32, streamed in once per pass
    nbytes = (64 * 13 + 13) * 4
    assert r.kernel("dense_0").io_cycles == pytest.approx(nbytes * 8 / 1.2e12 * spec.clock_hz, rel=1e-9)
    assert r.kernel("dense_0").io_cycles == pytest.approx(19.1533333, rel=1e-6)  # 27,040 bits / 1.2 Tb/s x 850 MHz
    assert r.kernel("dense_1").io_cycles == pytest.approx((13 * 10 + 10) * 4 * 8 / 1.2e12 * spec.clock_hz)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_wse2_pipelined_report(optimizer):
    opt = optax.sgd(0.1) if optimizer == "sgd" else optax.adam(1e-3)
    tx = compile_train(loss_fn, PARAMS, BATCHES[0], opt, spec=wafer.WSE2, mode="auto")
    assert tx.mode == "pipelined"
    _check_report(tx, wafer.WSE2)
