"""experiments/stencil.py: the emulated 7-point stencil matches plain jnp, and its report follows the cost rules."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wafer

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "stencil.py"
_SPEC = importlib.util.spec_from_file_location("stencil_experiment", _PATH)
stencil = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(stencil)

Z, STEPS = 8, 5


def _reference_step(u: np.ndarray, alpha: float) -> np.ndarray:
    """The Jacobi step written point by point in float64, zero outside the domain."""
    X, Y, Zn = u.shape
    p = np.zeros((X + 2, Y + 2, Zn + 2))
    p[1:-1, 1:-1, 1:-1] = u
    out = np.empty((X, Y, Zn))
    for i, j, k in np.ndindex(X, Y, Zn):
        c = p[i + 1, j + 1, k + 1]
        nb = p[i, j + 1, k + 1] + p[i + 2, j + 1, k + 1] + p[i + 1, j, k + 1]
        nb += p[i + 1, j + 2, k + 1] + p[i + 1, j + 1, k] + p[i + 1, j + 1, k + 2]
        out[i, j, k] = c + alpha * (nb - 6 * c)
    return out


def test_native_step_is_the_dirichlet_7_point_stencil():
    u = np.random.default_rng(0).uniform(-1, 1, (3, 4, 5)).astype(np.float32)
    got = np.asarray(stencil.native_step(jnp.asarray(u), 0.1))
    np.testing.assert_allclose(got, _reference_step(u.astype(np.float64), 0.1), rtol=1e-6, atol=1e-6)


def test_one_superstep_equals_native_step():
    spec = wafer.WaferSpec.mini(5, 7)
    u = stencil.initial_field(spec, Z, seed=3)
    state = wafer.init(spec, words=Z, value=u)
    state = jax.jit(lambda s: wafer.step(s, spec, stencil.make_step(spec, 0.1))[0])(state)
    want = np.asarray(stencil.native_step(jnp.asarray(u), 0.1))
    np.testing.assert_allclose(np.asarray(state.read("data")), want, rtol=1e-6, atol=1e-7)
    assert int(state.steps) == 1


@pytest.fixture(scope="module")
def report():
    return stencil.run_experiment(wafer.WaferSpec.mini(16, 16), z=Z, steps=STEPS, seed=1)


def test_emulated_matches_native(report):
    assert report["ok"]
    assert report["max_abs_err"] <= 1e-5 * report["max_abs_u"]
    assert report["max_abs_u"] > 0.1  # the field has not decayed to nothing, so the check means something


def test_report_follows_the_cost_rules(report):
    spec = wafer.WaferSpec.mini(16, 16)
    cores = spec.rows * spec.cols
    # Halo exchange of radius 1: every link carries one Z-word column, over one hop.
    assert report["comm_cycles"] == Z * 32 / spec.link_bits_per_cycle + spec.hop_latency_cycles
    assert report["busiest_link_words"] == Z
    # Per core: 5 adds + 1 multiply + 2 Z-shift moves on the fp32 ALU (2 lanes), one fp32 FMAC (1 lane);
    # SRAM: 5 columns read (20 Z bytes at 8 B/cycle), one written (4 Z bytes at 4 B/cycle): compute bounds.
    alu, fmac = 8 * Z, Z
    compute = alu / spec.simd_alu_fp32 + fmac / spec.simd_fmac_fp32
    sram = max(5 * 4 * Z / spec.sram_read_bytes_per_cycle, 4 * Z / spec.sram_write_bytes_per_cycle)
    assert report["compute_cycles"] == max(compute, sram) == 5 * Z
    assert report["cycles"] == max(report["compute_cycles"], report["comm_cycles"])  # spec.overlap is on
    assert report["us_per_step"] == pytest.approx(report["cycles"] / spec.clock_hz * 1e6)
    assert report["flops_analytic"] == 8 * Z * cores
    assert report["flops_counted"] == (alu + 2 * fmac) * cores  # the analytic 8 Z plus the 2 Z shift moves
    assert report["wafer_clock"] == STEPS * report["cycles"]
    assert report["wafer_steps"] == STEPS
    achieved = report["flops_analytic"] / (report["cycles"] / spec.clock_hz)
    assert report["peak_fraction"] == pytest.approx(achieved / spec.peak_flops("fp32"))
    assert 0 < report["peak_fraction"] <= 1
    assert report["words_per_core"] == Z and report["sram_bytes_per_core"] == 4 * Z
    assert report["sram_occupancy"] == pytest.approx(4 * Z / spec.sram_bytes_per_core)


@pytest.mark.parametrize(
    "overrides,comm,total",
    [
        ({"overlap": False}, Z + 1, 5 * Z + Z + 1),
        ({"link_bits_per_cycle": 16.0, "hop_latency_cycles": 3.0}, 2 * Z + 3, 5 * Z),
        ({"link_bits_per_cycle": 4.0}, 8 * Z + 1, 8 * Z + 1),  # slow links: communication bounds
    ],
    ids=["serialised", "half-width-links", "slow-links"],
)
def test_cycles_respond_to_the_spec(overrides, comm, total):
    spec = wafer.WaferSpec.mini(6, 6, **overrides)
    run, record_of = stencil.make_run(spec, 0.1, 2)
    run.lower(wafer.init(spec, words=Z))  # tracing builds the record
    record = record_of()
    assert record.comm_cycles(spec) == comm
    assert record.cycles(spec) == total


def test_run_traces_once():
    spec = wafer.WaferSpec.mini(4, 4)
    run, _ = stencil.make_run(spec, 0.1, 2)
    traces = []
    counted = jax.jit(lambda s: (traces.append(1), run(s))[1], donate_argnums=0)
    state = wafer.init(spec, words=4)
    for _ in range(3):
        state = counted(state)
    assert len(traces) == 1
    assert int(state.steps) == 6


def test_main_prints_the_report(capsys):
    assert stencil.main(["--rows", "8", "--cols", "8", "--z", "4", "--steps", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    for key in (
        "8 x 8 cores",
        "Z = 4",
        "3 steps",
        "words/core",
        "occupancy",
        "cycles/step",
        "compute",
        "comm",
        "time/step",
        "FLOPs/step",
        "of fp32 peak",
        "busiest link",
        "max |emulated - jnp|",
        "OK",
        "wall time",
    ):
        assert key in out, key


def test_main_no_overlap(capsys):
    assert stencil.main(["--rows", "4", "--cols", "5", "--z", "4", "--steps", "2", "--no-overlap"]) == 0
    out = capsys.readouterr().out
    assert "serialised" in out and "total 25.0" in out  # 5 Z compute + (Z + 1) comm


def test_main_reports_sram_overflow(capsys):
    words = wafer.WaferSpec.mini(2, 2).sram_words_per_core + 1
    assert stencil.main(["--rows", "2", "--cols", "2", "--z", str(words), "--steps", "1"]) == 2
    assert "SRAM allocation 'data'" in capsys.readouterr().err


@pytest.mark.slow
def test_main_full_wse2(capsys):
    assert stencil.main(["--preset", "wse2", "--z", "4", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "757 x 996 cores" in out and "OK" in out
