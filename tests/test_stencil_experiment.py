"""experiments/stencil.py: the emulated stencils match plain jnp, and the report follows the cost rules."""

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


def _compute_by_hand(spec) -> float:
    """One core's column update by hand (wafer/kernel.py, wafer/cost.py): 9 vector instructions over Z elements --
    2 Z-shift moves (read 4 B, write 4 B per element), 5 adds of two columns (read 8, write 4), alpha x sum (read 4,
    write 4) on the fp32 ALU (2 lanes), and the FMAC c0 x u + (alpha x sum) (read 8, write 4) at 1 fp32 lane -- each
    instruction paying its start-up, plus the task."""
    alu = lambda read, write: max(
        1 / spec.simd_alu_fp32,
        read / spec.sram_read_bytes_per_cycle,  # noqa: E731
        write / spec.sram_write_bytes_per_cycle,
    )
    fmac = max(1 / spec.simd_fmac_fp32, 8 / spec.sram_read_bytes_per_cycle, 4 / spec.sram_write_bytes_per_cycle)
    elements = 3 * Z * alu(4, 4) + 5 * Z * alu(8, 4) + Z * fmac
    return elements + 9 * spec.instr_startup_cycles + spec.task_cycles


def _comm_by_hand(spec) -> float:
    """Halo exchange of radius 1: every link carries one Z-word column over one hop, and every core's ramp takes in
    its four neighbours' columns (4 Z words at a wavelet a cycle)."""
    word = 32 / spec.link_bits_per_cycle
    return max(4 * Z * 32 / spec.ramp_bits_per_cycle, Z * word, Z * word + spec.hop_latency_cycles)


def test_report_follows_the_cost_rules(report):
    spec = wafer.WaferSpec.mini(16, 16)
    cores = spec.rows * spec.cols
    assert report["comm_cycles"] == pytest.approx(_comm_by_hand(spec)) and report["comm_cycles"] == 4 * Z
    assert report["busiest_link_words"] == Z
    # WSE-2 figures: 3 Z x 0.5 + 5 Z x 0.5 + Z x 1 = 5 Z element cycles, 9 x 14.3 start-ups, a 10-cycle task
    assert report["compute_cycles"] == pytest.approx(_compute_by_hand(spec))
    assert report["compute_cycles"] == pytest.approx(5 * Z + 9 * 14.3 + 10)
    assert report["cycles"] == max(report["compute_cycles"], report["comm_cycles"])  # spec.overlap is on
    assert report["us_per_step"] == pytest.approx(report["cycles"] / spec.clock_hz * 1e6)
    assert report["flops_analytic"] == 8 * Z * cores
    assert report["flops_counted"] == (8 * Z + 2 * Z) * cores  # the analytic 8 Z plus the 2 Z shift moves
    assert report["wafer_clock"] == pytest.approx(STEPS * report["cycles"], rel=1e-6)  # (float32 clock)
    assert report["wafer_steps"] == STEPS
    achieved = report["flops_analytic"] / (report["cycles"] / spec.clock_hz)
    assert report["peak_fraction"] == pytest.approx(achieved / spec.peak_flops("fp32"))
    assert 0 < report["peak_fraction"] <= 1
    assert report["words_per_core"] == Z and report["sram_bytes_per_core"] == 4 * Z
    assert report["sram_occupancy"] == pytest.approx(4 * Z / spec.sram_bytes_per_core)


@pytest.mark.parametrize(
    "overrides,bound",
    [
        ({"overlap": False}, "sum"),
        ({"link_bits_per_cycle": 16.0, "hop_latency_cycles": 3.0}, "compute"),
        ({"link_bits_per_cycle": 1.0}, "comm"),  # slow links: communication bounds
    ],
    ids=["serialised", "half-width-links", "slow-links"],
)
def test_cycles_respond_to_the_spec(overrides, bound):
    spec = wafer.WaferSpec.mini(6, 6, **overrides)
    run, record_of = stencil.make_run(spec, 0.1, 2)
    run.lower(wafer.init(spec, words=Z))  # tracing builds the record
    record = record_of()
    comm, compute = _comm_by_hand(spec), _compute_by_hand(spec)
    assert record.comm_cycles(spec) == pytest.approx(comm)
    total = {"sum": compute + comm, "compute": compute, "comm": comm}[bound]
    assert record.cycles(spec) == pytest.approx(total)
    assert (comm > compute) == (bound == "comm")


def test_high_order_stencil_matches_native():
    """Radius 4 (25 points, as Jacquelin et al.'s wave-equation kernel): the emulated step equals the jnp one."""
    spec = wafer.WaferSpec.mini(9, 10)
    u = stencil.initial_field(spec, 12, seed=4)
    state = wafer.init(spec, words=12, value=u)
    step = stencil.make_step(spec, 0.02, radius=4)
    state, record = jax.jit(lambda s: wafer.step(s, spec, step))(state)
    want = np.asarray(stencil.native_step(jnp.asarray(u), 0.02, radius=4))
    np.testing.assert_allclose(np.asarray(state.read("data")), want, rtol=1e-6, atol=1e-6)
    assert stencil.flops_per_point(4) == 26


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
    assert "serialised" in out and "total 174.7" in out  # 5 Z + 9 x 14.3 + 10 compute, then 4 Z of ramp


def test_main_reports_sram_overflow(capsys):
    words = wafer.WaferSpec.mini(2, 2).sram_words_per_core + 1
    assert stencil.main(["--rows", "2", "--cols", "2", "--z", str(words), "--steps", "1"]) == 2
    assert "SRAM allocation 'data'" in capsys.readouterr().err


@pytest.mark.slow
def test_main_full_wse2(capsys):
    assert stencil.main(["--preset", "wse2", "--z", "4", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "757 x 996 cores" in out and "OK" in out
