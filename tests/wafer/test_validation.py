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
from wafer.kernel import arithmetic
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
    # n = 32: stages of L = 1, 2, 4, 8, 16 twiddle factors, each factor (a scalar in registers) applied by vector
    # instructions over half = n / 2L points: per component of the twiddle product a multiply (ALU) and an FMAC
    # (the other multiply fused with the add or subtract), then the butterfly's add and subtract per component.
    # So 2 FMAC and 6 ALU instructions per factor, 8 L a stage; per stage 2 x n/2 = n FMAC elements and 6 x n/2 ALU
    # ones; then the stage's reorder, one move of n points per plane (2 instructions, 2 n elements).
    # Bytes per element: a multiply reads its vector (4 B), the FMAC its two vectors (8 B), the add or subtract two
    # (8 B), each writes 4 B; a move reads and writes 4 B. In the last stage (half = 1) every operand is a
    # one-element value, a scalar in a register: nothing read from SRAM.
    n = 32
    _, kcost = wafer.map_cores(fft.fft_pencil, jnp.zeros((1, 1, n)), jnp.zeros((1, 1, n)), jnp.zeros((1, 1, 2, n // 2)))
    instructions = 8 * (1 + 2 + 4 + 8 + 16) + 2 * 5  # 258
    assert kcost.counts == {
        ("fmac", "fp32", 8, 4): 4 * n,  # stages L = 1..8
        ("fmac", "fp32", 0, 4): n,  # the last stage
        ("alu", "fp32", 4, 4): 4 * n + 5 * 2 * n,  # the multiplies of stages L = 1..8, every stage's moves
        ("alu", "fp32", 8, 4): 4 * 2 * n,  # the adds and subtracts of stages L = 1..8
        ("alu", "fp32", 0, 4): 3 * n,  # the multiplies, adds and subtracts of the last stage
        ("instr",): instructions,
        ("ops",): instructions,  # each one instruction
        ("task",): 1,
    }
    assert arithmetic(kcost.counts) == {("fmac", "fp32"): 5 * n, ("alu", "fp32"): 5 * 5 * n}  # n and 5 n a stage


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
    # the predicted cycles are the records' cycles: wider links shorten the transposes and nothing else. A transpose
    # of n = 64 moves both planes (2 words a block): its last link carries n (n - 1) / 2 blocks, 4,032 words, which
    # bound it (the mean, 64 x 63 x 127 / 3 blocks over 126 links, 2,709 words, + 63 hops; each ramp 126 words); at
    # 64 bits a cycle that link still bounds it (2,016 > 1,354.7 + 63), at half the cycles
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
    # 7 diagonals and 7 vectors of Z fp16 values (28 Z bytes, each array rounded up to whole words) and 40 bytes of
    # scalars in the 44 KB (45,056 B) left beside the 4 KB code reservation: the paper's Z = 1536 takes 43,048 B;
    # Z = 1607 takes 22,500 + 7 x 3,216 + 40 = 45,052 B and fits; Z = 1608 takes 22,512 + 7 x 3,216 + 40 = 45,064 B
    # and does not (it would in the whole 48 KB)
    spec = wafer.WaferSpec.mini(2, 2)
    state = bicgstab.make_state(spec, (2, 2, 1536))
    assert int(state.occupancy().max()) == 28 * 1536 + 40
    assert int(bicgstab.make_state(spec, (2, 2, 1607)).occupancy().max()) == 45_052
    with pytest.raises(wafer.SramCapacityError):
        bicgstab.make_state(spec, (2, 2, 1608))
    bicgstab.make_state(spec.with_(code_bytes_per_core=0), (2, 2, 1608))


def test_region_allreduce_against_jnp():
    v = jax.random.normal(jax.random.key(7), (5, 6, 2))
    for pattern in wafer.fabric.REDUCE_PATTERNS:
        total, traffic, adds = bicgstab.region_allreduce(v, pattern=pattern)
        np.testing.assert_allclose(total, jnp.broadcast_to(v.sum((0, 1)), v.shape), rtol=1e-5, atol=1e-5)
        per_core = np.zeros((5, 6))
        for k in adds:
            ((_, elements),) = arithmetic(k.counts).items()
            per_core[k.rect.rows, k.rect.cols] += elements * k.mask
        assert per_core.sum() == (5 * 6 - 1) * 2  # 29 combines of 2 words in any pattern


# ---- collectives -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", collectives.PATTERNS)
@pytest.mark.parametrize("n,b", [(2, 1), (7, 3), (64, 1), (100, 16)])
def test_model_terms_match_the_fabric_records(pattern, n, b):
    # the reference model's terms, counted from its own list of messages, against the emulator's records: E the
    # words x hops on links, N the links in use, C the most words one core takes in through its ramp (over the
    # whole collective), L the longest single message (the longest stream of any phase), D the dependent stages
    def check(terms, traffic):
        links = traffic.link_words(1, n)
        assert terms["E"] == pytest.approx(traffic.words)  # words x links crossed, all phases
        assert terms["N"] == np.count_nonzero(links)
        assert terms["C"] == pytest.approx(traffic.ramp_words(1, n)[0].max())
        assert terms["L"] == max(p.hops for p in traffic.phases)
        assert terms["D"] == traffic.depth

    check(collectives.model_terms(pattern, n, b), collectives.emulated_record(pattern, n, b).traffic)
    # the reduce half of an allreduce (to the middle core), without the multicast back
    allreduce = collectives.emulated_record(pattern, n, b, kind="allreduce").traffic
    check(collectives.model_terms(pattern, n, b, to="middle"), wafer.Traffic(allreduce.phases[:-1]))


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
