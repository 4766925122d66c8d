"""The calibration programs (wafer.validation): numerics against plain JAX, cost records from shapes equal to the
records of runs on data, the Luczynski model's terms against the fabric's records, the table and `wafer validate`.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wafer
from wafer import validation
from wafer.validation import bicgstab, cases, collectives, fft


def complex_input(n, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (n, n, n)) + 1j * jax.random.normal(k2, (n, n, n))).astype(jnp.complex64)


# ---- FFT -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 8, 64])
def test_fft_pencil_against_jnp(n):
    x = complex_input(n)[0, 0]
    re, im = jax.jit(fft.fft_pencil)(jnp.real(x), jnp.imag(x), jnp.asarray(fft.twiddles(n)))
    ref = jnp.fft.fft(x)
    np.testing.assert_allclose(re + 1j * im, ref, rtol=0, atol=2e-6 * np.log2(n) * float(jnp.max(jnp.abs(ref))))


def test_fft_pencil_counts_by_hand():
    # per stage: the twiddle product (one multiply and one FMAC per component over n/2 points), one add and one
    # subtract per component over n/2 points, and the reorder of n points per component: n FMACs and 5 n ALU ops
    n = 32
    _, kcost = wafer.map_cores(fft.fft_pencil, jnp.zeros((1, 1, n)), jnp.zeros((1, 1, n)), jnp.zeros((1, 1, 2, n // 2)))
    assert kcost.counts == {("fmac", "fp32"): n * 5, ("alu", "fp32"): 5 * n * 5}


@pytest.mark.parametrize("n", [8, 16, 32])
def test_fft3d_against_fftn(n):
    x = complex_input(n, seed=n)
    spec = wafer.WSE2  # as the validation table runs it (the jitted steps are shared)
    y, state, recs = fft.run(spec, x)
    ref = jnp.fft.fftn(x)
    # complex64, three passes of log2(n) radix-2 stages: a few ulps of max |X| per stage
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * 3 * np.log2(n) * float(jnp.max(jnp.abs(ref))))
    assert list(recs) == ["fft_z", "transpose_rows", "fft_y", "transpose_cols", "fft_x"]
    assert float(state.clock) == pytest.approx(fft.predicted_cycles(spec, n, recs=recs))
    assert int(state.steps) == 5


def test_fft3d_gradient_against_fftn():
    n = 4
    x = complex_input(n, seed=3)
    w = complex_input(n, seed=4)
    spec = wafer.WaferSpec.mini(n, n)

    def loss(fn, re, im):
        y = fn(re + 1j * im)
        return jnp.sum(jnp.real(y * jnp.conj(w)))

    emulated = lambda z: fft.run(spec, z)[0]
    args = (jnp.real(x), jnp.imag(x))
    g = jax.grad(lambda *a: loss(emulated, *a), argnums=(0, 1))(*args)
    g_ref = jax.grad(lambda *a: loss(jnp.fft.fftn, *a), argnums=(0, 1))(*args)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_fft_records_from_shapes_equal_records_of_a_run():
    n = 16
    spec = wafer.WaferSpec.mini(n, n)
    _, _, ran = fft.run(spec, complex_input(n))
    shaped = fft.records(spec, n)
    for name in ran:
        assert float(ran[name].cycles(spec)) == float(shaped[name].cycles(spec))
    # a transpose moves both planes (2 words per complex point) as the relay all-to-all's closed form says
    assert float(shaped["transpose_rows"].cycles(spec)) == pytest.approx(
        float(wafer.fabric.all_to_all_cycles(n, 2, spec, pattern="relay"))
    )


def test_fft_predictions_follow_the_rules():
    # the predicted cycles are the records' cycles: wider links shorten the transposes and nothing else
    n = 64
    base = fft.records(wafer.WSE2, n)
    wide = wafer.WSE2.with_(link_bits_per_cycle=64.0)
    delta = fft.predicted_cycles(wafer.WSE2, n, recs=base) - fft.predicted_cycles(wide, n, recs=base)
    assert delta == pytest.approx(2 * n * (n - 1) / 2 * 2 * (1 - 0.5))


def test_fft_bad_n():
    with pytest.raises(ValueError, match="power of two"):
        fft.make_state(wafer.WSE2, 12)
    with pytest.raises(ValueError, match="needs 32 x 32 cores"):
        fft.make_state(wafer.WaferSpec.mini(16, 16), 32)


# ---- BiCGStab ------------------------------------------------------------------------------------------------------


def test_bicgstab_iterates_against_reference():
    # both precisions against the plain-jnp BiCGStab (cases.BICGSTAB_RTOL: float32 1e-5, float16 1e-2 of max |x|),
    # and the records of the run equal the records from shapes
    recs = cases._bicgstab_check((6, 5, 8), wafer.WaferSpec.mini(8, 8), iterations=4)
    assert list(recs) == ["rho", "p_v", "r0v", "s_t", "ts_tt", "x_r"]
    assert cases.BICGSTAB_RTOL == {"float32": 1e-5, "float16": 1e-2}


def test_bicgstab_detects_wrong_numbers(monkeypatch):
    true_reference = bicgstab.reference
    monkeypatch.setattr(bicgstab, "reference", lambda coef, b, k: true_reference(coef, b, k) * 1.001)
    with pytest.raises(cases.ValidationError, match="iterates differ from the reference"):
        cases._bicgstab_check((6, 5, 8), wafer.WaferSpec.mini(8, 8), iterations=1)  # steps compiled above


def test_bicgstab_converges():
    # the reference solver on a diagonally dominant system: the residual falls (a check that the algorithm is right)
    mesh = (6, 5, 8)
    coef, b = bicgstab.problem(jax.random.key(2), mesh, "float32")
    xs = bicgstab.reference(coef, b, 8)
    pad = lambda u: jnp.pad(u, ((1, 1), (1, 1), (0, 0)))
    u = xs[-1]
    below, above = bicgstab.z_neighbours(u)
    p = pad(u)
    au = bicgstab.stencil(coef, u, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:], below, above)
    assert float(jnp.linalg.norm(au - b) / jnp.linalg.norm(b)) < 1e-3


def test_bicgstab_gradient_against_reference():
    mesh = (4, 3, 4)
    coef, b = bicgstab.problem(jax.random.key(5), mesh, "float32")
    w = jax.random.normal(jax.random.key(6), mesh)
    spec = wafer.WaferSpec.mini(4, 4)
    g = jax.grad(lambda b: jnp.sum(w * bicgstab.run(spec, coef, b, 1, dtype="float32", jit=False)[0][-1]))(b)
    g_ref = jax.grad(lambda b: jnp.sum(w * bicgstab.reference(coef, b, 1)[-1]))(b)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))


def test_bicgstab_paper_size_from_shapes():
    recs = bicgstab.records(wafer.WSE1, bicgstab.PAPER_MESH)
    assert list(recs) == ["rho", "p_v", "r0v", "s_t", "ts_tt", "x_r"]
    cycles = sum(float(r.cycles(wafer.WSE1)) for r in recs.values())
    pflops = bicgstab.predicted_pflops(wafer.WSE1, recs=recs)
    assert pflops == pytest.approx(46 * 600 * 595 * 1536 / (cycles / wafer.WSE1.clock_hz) / 1e15)
    # the halo exchanges carry a column of 1536 fp16 values (768 words) on every link
    assert recs["p_v"].traffic.phases[0].max_link_words == 768


def test_bicgstab_column_is_what_fits():
    # 7 diagonals and 7 vectors of Z fp16 values (28 Z bytes) and 40 bytes of scalars: Z = 1536 fits in 48 KB,
    # Z = 1800 does not
    bicgstab.make_state(wafer.WaferSpec.mini(2, 2), (2, 2, 1536))
    with pytest.raises(wafer.SramCapacityError):
        bicgstab.make_state(wafer.WaferSpec.mini(2, 2), (2, 2, 1800))


def test_region_allreduce_against_jnp():
    v = jax.random.normal(jax.random.key(7), (5, 6, 2))
    for pattern in wafer.fabric.REDUCE_PATTERNS:
        total, traffic, adds = bicgstab.region_allreduce(v, pattern=pattern)
        np.testing.assert_allclose(total, jnp.broadcast_to(v.sum((0, 1)), v.shape), rtol=1e-5, atol=1e-5)
        per_core = np.zeros((5, 6))
        for k in adds:
            per_core[k.rect.rows, k.rect.cols] += next(iter(k.counts.values())) * k.mask
        assert per_core.sum() == (5 * 6 - 1) * 2  # 29 combines of 2 words in any pattern


# ---- collectives -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", collectives.PATTERNS)
@pytest.mark.parametrize("n,b", [(2, 1), (7, 3), (64, 1), (100, 16)])
def test_model_terms_match_the_fabric_records(pattern, n, b):
    terms = collectives.model_terms(pattern, n, b)
    rec = collectives.emulated_record(pattern, n, b)
    links = rec.traffic.link_words(1, n)
    assert terms["E"] == pytest.approx(rec.traffic.words)
    assert terms["C"] == pytest.approx(links.max())
    assert terms["N"] == np.count_nonzero(links)
    assert terms["D"] == rec.traffic.depth
    middle = collectives.model_terms(pattern, n, b, to="middle")
    reduce_part = collectives.emulated_record(pattern, n, b, kind="allreduce").traffic.phases[:-1]
    assert middle["E"] == pytest.approx(sum(w.sum() for p in reduce_part for _, _, w in p.parts))


def test_model_formula_by_hand():
    # chain of 64 cores, 1 word: E = 63, N = 63, L = 1, C = 1, D = 63 -> max(1, 1 + 1) + 5 x 63 with T_R = 2
    assert collectives.model_terms("chain", 64, 1) == {"E": 63, "N": 63, "L": 1, "C": 1, "D": 63}
    assert collectives.model_cycles("chain", 64, 1, t_r=2.0) == 2 + 5 * 63
    # star of 8 cores, 4 words: C = 7 x 4 on the root's link, E = 4 (1 + ... + 7), L = 7, D = 1
    assert collectives.model_cycles("star", 8, 4, t_r=1.0) == max(28, 4 * 28 / 7 + 7) + 3
    with pytest.raises(ValueError, match="pattern must be one of"):
        collectives.model_terms("ring", 8, 1)


def test_collective_numerics():
    for pattern in collectives.PATTERNS:
        for kind in ("reduce", "allreduce"):
            assert collectives.check_numerics(pattern, 64, 8, kind=kind) < 1e-5


# ---- the table and the command ------------------------------------------------------------------------------------


def test_run_table():
    df = validation.run(["fft3d-n32", "bicgstab", "reduce-tree-n64-b1"], execute="none")
    assert tuple(df.columns) == validation.COLUMNS
    assert list(df.case) == ["fft3d-n32", "bicgstab-cs1", "reduce-tree-n64-b1"]
    np.testing.assert_allclose(df.error, df.predicted / df.published - 1)
    assert (df.within_tolerance == (df.error.abs() <= 0.10)).all()
    assert df.published[0] == 13_633 and df.unit[1] == "PFLOP/s" and df.published[1] == 0.86
    assert df.predicted[0] == pytest.approx(fft.predicted_cycles(wafer.WSE2, 32))
    on_data = validation.run(["fft3d-n32", "reduce-tree-n64-b1"], execute="small", tolerance=100.0)
    np.testing.assert_array_equal(on_data.predicted, df.predicted[[0, 2]])  # data runs cost what shapes say
    assert on_data.within_tolerance.all()


def test_run_rejects_bad_names_and_modes():
    with pytest.raises(ValueError, match=r"unknown validation case\(s\) \['fft4d'\]"):
        validation.run(["fft4d"])
    with pytest.raises(ValueError, match="execute must be one of"):
        validation.run(execute="some")


def test_main_exit_code(capsys):
    assert validation.main(["fft3d-n64", "--execute", "none", "--tolerance", "10"]) == 0
    out = capsys.readouterr().out
    assert "fft3d-n64" in out and "mean |error|" in out and "worst |error|" in out
    assert validation.main(["fft3d-n64", "--execute", "none", "--tolerance", "0"]) == 1


def test_wafer_validate_command(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "compiler.cli", "validate", "fft3d-n32", "reduce-chain-n64-b1", "--execute", "none"]
    ok = subprocess.run([*cmd, "--tolerance", "100"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "fft3d-n32" in ok.stdout and "reduce-chain-n64-b1" in ok.stdout
    bad = subprocess.run([*cmd, "--tolerance", "0"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    unknown = subprocess.run(cmd[:4] + ["nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unknown.returncode == 1 and unknown.stderr.startswith("wafer: error:")
    assert "unknown validation case(s) ['nope']" in unknown.stderr
