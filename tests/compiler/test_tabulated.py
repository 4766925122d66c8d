"""The side table (compiler/analysis/tabulated.py) gives the cost model's figures: on random integer placements of
zoo models, inference and training (pipelined and weight streaming), on specs with different leaves, the batch path
equals `jax.vmap(costmodel.predict)` bit for bit; it is the path `evaluate_placements` takes at tau = 0, and
placements it cannot read from a table (non-integer sides) are left to the cost model itself."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_zoo import MODELS, mean_square_loss

import compiler
import wafer
from compiler import costmodel as cm
from compiler.analysis import sweep, tabulated
from compiler.analysis.sweep import OUTPUTS, evaluate_placements, random_layouts

BASE = wafer.WaferSpec.mini(24, 24)
SPECS = {
    "mini": BASE,
    "other_leaves": BASE.with_(
        clock_hz=1.1e9,
        link_bits_per_cycle=16.0,
        hop_latency_cycles=3.0,
        simd_fmac_fp32=2.0,
        simd_alu_fp32=4.0,
        sram_read_bytes_per_cycle=8.0,
        instr_startup_cycles=7.0,
        edge_io_bits_per_s=2.4e11,
    ),
}


def _reference(feats, lays, spec):
    """The cost model itself: jit(vmap(predict)) on [points, kernels] (the path the table replaces)."""
    return sweep._predict_placements(
        cm.compact(feats), jax.tree.map(lambda x: np.asarray(x).T, lays), spec, tau=0.0, chunk=64
    )


def _no_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the side table was not used")

    monkeypatch.setattr(sweep, "_predict_placements", refuse)


def _table_equals_predict(feats, lays, spec, monkeypatch, *, chunk):
    """The side table's figures of layouts [kernels, points] equal vmap(predict)'s bit for bit; returns them."""
    ref = _reference(feats, lays, spec)
    with monkeypatch.context() as m:
        _no_fallback(m)
        out = evaluate_placements(feats, lays, spec, chunk=chunk, kernels_first=True)
    for k in OUTPUTS:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    return out


def _check(feats, spec, monkeypatch, *, points=300, max_side=9, seed=0):
    lays = random_layouts(feats.n, spec, points, seed=seed, max_side=max_side, kernels_first=True)
    out = _table_equals_predict(feats, lays, spec, monkeypatch, chunk=128)
    assert np.all(np.isfinite(out["samples_per_s"])) and np.all(out["samples_per_s"] > 0)


@pytest.mark.parametrize("sname", list(SPECS))
@pytest.mark.parametrize("name", list(MODELS))
def test_inference_equals_the_cost_model(name, sname, monkeypatch):
    exe = compiler.compile(*MODELS[name]().trace_args(), spec=BASE)
    _check(cm.features(exe), SPECS[sname], monkeypatch)


@pytest.mark.parametrize("mode", ["pipelined", "weight_streaming"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "encoder_block"])
def test_training_equals_the_cost_model(name, mode, monkeypatch):
    case = MODELS[name]()
    tx = compiler.compile_train(
        mean_square_loss(case), case.params, case.inputs, optax.adam(1e-3), spec=BASE, mode=mode
    )
    feats = cm.features(tx)
    assert feats.task == "training" and feats.mode == mode
    for spec in SPECS.values():
        _check(feats, spec, monkeypatch, seed=1)


class _Tied(nn.Module):
    """A Dense(5) called twice: its weights are tied between two kernels (a training step sums their gradients
    between the copies: `schedule.tied_cycles`, a route term)."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(5)
        return nn.Dense(3)(shared(nn.tanh(shared(x))))


def test_tied_weights_training_equals_the_cost_model(monkeypatch):
    model = _Tied()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    loss = lambda p, b: jnp.mean(model.apply(p, b) ** 2)  # noqa: E731
    tx = compiler.compile_train(loss, params, x, optax.sgd(0.1), spec=BASE, mode="pipelined")
    feats = cm.features(tx)
    assert feats.tie_src.shape[0] == 1
    for spec in SPECS.values():
        _check(feats, spec, monkeypatch, seed=9)


@pytest.fixture(scope="module")
def lenet():
    return cm.features(compiler.compile(*MODELS["lenet"]().trace_args(), spec=BASE))


def test_dense_and_sparse_tables_agree(lenet, monkeypatch):
    """A large batch with small sides reads a dense table, a small batch with large sides a sparse one (the
    distinct pairs): both are the cost model's figures."""
    dense = random_layouts(lenet.n, BASE, 4096, seed=2, max_side=16, kernels_first=True)
    rng = np.random.default_rng(3)
    sides = np.array([1.0, 2.0, 7.0, 23.0])  # few distinct pairs, a range too wide for a dense table
    few = random_layouts(lenet.n, BASE, 40, seed=3, max_side=20, kernels_first=True)
    few = cm.Layout(
        jnp.asarray(rng.choice(sides, few.height.shape)),
        jnp.asarray(rng.choice(sides, few.width.shape)),
        few.row,
        few.col,
    )
    assert tabulated.table_sides(23, 23)[0] ** 2 > 40 and len(tabulated.distinct_pairs(few.height, few.width)[0]) <= 16
    for lays in (dense, few):
        _table_equals_predict(lenet, lays, BASE, monkeypatch, chunk=1024)


def test_points_first_layouts_and_one_placement(lenet, monkeypatch):
    """[points, kernels] layouts read the table too; one placement has as many side pairs as a table would
    tabulate, so it goes to the cost model (the same figures)."""
    lays = random_layouts(lenet.n, BASE, 300, seed=4, max_side=12)
    ref = _reference(lenet, jax.tree.map(lambda x: np.asarray(x).T, lays), BASE)
    with monkeypatch.context() as m:
        _no_fallback(m)
        out = evaluate_placements(lenet, lays, BASE)
    one_lay = jax.tree.map(lambda x: x[:, 7:8], jax.tree.map(lambda x: np.asarray(x).T, lays))
    assert tabulated.evaluate(cm.compact(lenet), one_lay, BASE) is None
    one = evaluate_placements(lenet, jax.tree.map(lambda x: x[7:8], lays), BASE)
    for k in OUTPUTS:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
        np.testing.assert_array_equal(one[k], ref[k][7:8], err_msg=k)


def test_non_integer_sides_go_to_the_cost_model(lenet):
    lays = random_layouts(lenet.n, BASE, 320, seed=5, max_side=12, kernels_first=True)
    h = np.asarray(lays.height).copy()
    h[3, ::5] += 0.5  # every fifth placement has one kernel of non-integer height
    lays = cm.Layout(jnp.asarray(h), lays.width, lays.row, lays.col)
    raw = tabulated.evaluate(cm.compact(lenet), lays, BASE)
    assert not raw["valid"][::5].any() and raw["valid"][1:5].all()
    out = evaluate_placements(lenet, lays, BASE, kernels_first=True)
    ref = _reference(lenet, lays, BASE)
    for k in OUTPUTS:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_agrees_with_unbatched_predict(lenet):
    """Point by point against `costmodel.predict` called on one layout (a separately compiled program)."""
    lays = random_layouts(lenet.n, BASE, 16, seed=6, max_side=10, kernels_first=True)
    out = evaluate_placements(lenet, lays, BASE, kernels_first=True)
    for i in range(16):
        lay = jax.tree.map(lambda x, i=i: x[:, i], lays)
        ref = cm.predict(lenet, lay, BASE)
        for k in OUTPUTS:
            np.testing.assert_allclose(out[k][i], float(ref[k]), rtol=1e-6, err_msg=k)


def test_batched_spec_and_relaxed_temperature_use_the_cost_model(lenet):
    lays = random_layouts(lenet.n, BASE, 16, seed=7, max_side=10)
    clocks = np.linspace(0.5e9, 1.5e9, 16)
    specs = sweep.stack_specs([BASE.with_(clock_hz=float(c)) for c in clocks])
    out = evaluate_placements(lenet, lays, specs)
    fast = evaluate_placements(lenet, lays, BASE)
    np.testing.assert_allclose(out["samples_per_s"] / fast["samples_per_s"], clocks / float(BASE.clock_hz), rtol=1e-5)
    warm = evaluate_placements(lenet, lays, BASE, tau=10.0)
    assert np.all(warm["bottleneck_cycles"] >= fast["bottleneck_cycles"] * (1 - 1e-6))


def test_program_key_separates_programs_and_specs(lenet):
    mlp = cm.features(compiler.compile(*MODELS["mlp"]().trace_args(), spec=BASE))
    keys = {
        tabulated.program_key(cm.compact(lenet), BASE),
        tabulated.program_key(cm.compact(mlp), BASE),
        tabulated.program_key(cm.compact(lenet), BASE.with_(clock_hz=1e9)),
    }
    assert len(keys) == 3
    assert tabulated.program_key(cm.compact(lenet), BASE) in keys


def test_defective_wafer_uses_the_cost_model(lenet):
    """With a defect map a kernel's figures depend on where its rectangle lies: no table, the cost model itself."""
    spec = BASE.with_defects(rate=0.02, seed=0)
    lays = random_layouts(lenet.n, spec, 400, seed=8, max_side=8, kernels_first=True)
    out = evaluate_placements(lenet, lays, spec, kernels_first=True)
    ref = _reference(lenet, lays, spec)
    for k in OUTPUTS:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    with pytest.raises(ValueError, match="perfect wafer"):
        tabulated.dense_table(cm.compact(lenet), spec, 8, 8)
