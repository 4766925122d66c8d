"""Placement search: legalisation gives valid placements; the gradient method beats random search at equal budget;
its best placement compiles and the emulator charges what the search predicted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiler
import wafer
from compiler import costmodel as cm
from compiler.analysis.search import METHODS, placement_problem, random_search, score_placement, search_placement
from compiler.plan.bands import apportion
from compiler.plan.legalise import banded_plan, legalise

SPEC = wafer.WaferSpec.mini(32, 32)
BUDGET = 40


class MLP(nn.Module):
    features: tuple = (128, 128, 128, 128, 128, 10)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


@pytest.fixture(scope="module")
def program():
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    exe = compiler.compile(model.apply, params, x, spec=SPEC)
    return model, params, x, exe


@pytest.fixture(scope="module")
def prob(program):
    return placement_problem(program[3])


@pytest.fixture(scope="module")
def results(prob):
    return {m: search_placement(prob, m, budget=BUDGET, seed=0) for m in METHODS}


def _assert_legal(prob, rects):
    compiler.validate_placement(rects, prob.demands, prob.spec, reserve_io_columns=True)


def test_apportion_sums_and_bounds():
    x = apportion(100, [1.0, 2.0, 7.0], [5, 5, 5], [50, 50, 60])
    assert x.sum() == 100 and np.all(x >= 5) and x[2] >= x[1] >= x[0]
    x = apportion(10, [1.0, 1.0], [8, 8], [20, 20])  # lower bounds win over the total
    assert list(x) == [8, 8]


def test_bound_is_an_upper_bound_in_cost_model_units(prob, program):
    work = prob.work
    np.testing.assert_allclose(prob.bound, float(SPEC.clock_hz) * prob.usable / work.sum(), rtol=1e-6)
    assert program[3].report.samples_per_s <= prob.bound


@pytest.mark.parametrize("mode", ["place", "banded"])
def test_legalise_gives_valid_placements(prob, mode):
    rng = np.random.default_rng(1)
    for _ in range(5):
        areas = prob.least + (prob.usable - prob.least.sum()) * rng.dirichlet(np.ones(prob.n))
        rects, bands = legalise(prob, areas)
        _assert_legal(prob, rects)
        if mode == "banded":
            plan = banded_plan(prob, rects, bands)
            again, _ = legalise(prob, plan)
            _assert_legal(prob, again)
            assert again == rects  # rounding a legal plan gives it back


def test_every_method_returns_a_legal_placement_within_budget(prob, results):
    for method, r in results.items():
        assert r.method == method
        assert r.evaluations == BUDGET
        assert len(r.history) <= BUDGET and np.all(np.diff(r.history) >= 0)
        _assert_legal(prob, r.placement)
        assert 0 < r.samples_per_s <= prob.bound
        np.testing.assert_allclose(score_placement(prob, r.placement)["samples_per_s"], r.samples_per_s, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_beats_random_search_at_equal_budget(prob, results, seed):
    rnd = random_search(prob, budget=BUDGET, seed=seed)
    assert results["gradient"].samples_per_s > 1.05 * rnd.samples_per_s


def test_gradient_placement_compiles_and_agrees_with_the_emulator(program, prob, results):
    model, params, x, _ = program
    best = results["gradient"]
    exe = compiler.compile(model.apply, params, x, spec=SPEC, placement=best.placement)
    assert exe.placement == best.placement
    np.testing.assert_allclose(exe.report.samples_per_s, best.samples_per_s, rtol=0.02)
    pred = cm.predict(cm.features(exe), cm.layout_of(exe), SPEC)
    state = exe.load(params)
    out, state = exe(state, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(params, x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(state.clock), float(pred["call_cycles"]), rtol=0.02)


def test_bad_arguments_are_rejected(prob):
    with pytest.raises(ValueError, match="method must be one of"):
        search_placement(prob, "hill_climbing")
    with pytest.raises(ValueError, match="budget"):
        random_search(prob, budget=0)


def _load_experiment(name):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_experiment", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Flax modules are dataclasses: their module must be importable by name
    spec.loader.exec_module(mod)
    return mod


def test_placement_search_experiment_runs(capsys):
    exp = _load_experiment("placement_search")
    assert exp.main(["--budget", "30", "--models", "mlp"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("summary: gradient placement mlp")
    assert any(line.startswith("gradient") for line in out)


def test_compare_searches_table(program):
    from compiler.analysis.search import compare_searches

    df = compare_searches(program[3], budget=8)
    assert list(df["method"]) == ["heuristic", *METHODS]
    assert list(df["evaluations"]) == [1, 8, 8, 8]
    assert (df["fraction_of_bound"] > 0).all() and (df["fraction_of_bound"] <= 1).all()


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_tile_grid_snapping_gives_valid_placements_and_fewer_rows_per_grid_copy():
    model = TinyCNN()
    x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = wafer.WaferSpec.mini(64, 64)
    prob = placement_problem(compiler.compile(model.apply, params, x, spec=spec))
    rng = np.random.default_rng(0)
    wt, a, b, m = prob.grids
    a, b, m = (v.astype(int) for v in (a, b, m))
    snapped_any = False
    for _ in range(20):
        areas = prob.least + (prob.usable - prob.least.sum()) * rng.dirichlet(np.ones(prob.n))
        plain, bands = legalise(prob, areas)
        snapped, _ = legalise(prob, banded_plan(prob, plain, bands), snap=True)
        _assert_legal(prob, snapped)
        snapped_any |= snapped != plain
        # a snap never raises a weight kernel's rows of data per copy of its tile grid
        for k, name in enumerate(prob.names):
            if wt[k]:
                assert _rows_per_copy(snapped[name], a[k], b[k], m[k]) <= _rows_per_copy(plain[name], a[k], b[k], m[k])
    assert snapped_any


def _rows_per_copy(r, a, b, m):
    gh, gw = min(r.height, a), min(r.width, b)
    rr = max(min(r.height // gh, m), 1)
    rc = max(min(r.width // gw, m // rr), 1)
    return -(-m // (rr * rc))
