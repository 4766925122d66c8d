"""Supersteps: cycles, charging counters, and `run` against repeated `step`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wafer
from wafer import Rect, Superstep, Traffic

ROWS, COLS = 4, 6
SPEC = wafer.WaferSpec.mini(ROWS, COLS)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def make_state():
    state = wafer.init(SPEC, words=3, value=rand(0, (ROWS, COLS, 3)))
    return state.allocate("acc", Rect(1, 1, 2, 3), (3,), value=rand(1, (2, 3, 3)))


def smooth(state):
    """A Jacobi-like update of "data" on the whole grid, then an accumulation into "acc" on its 2x3 rectangle."""
    x = state.read("data")
    halo, traffic = wafer.halo_exchange(x)
    new, k1 = wafer.map_cores(
        lambda x, n, s, e, w: 0.5 * x + 0.125 * (n + s + e + w), x, halo["N"], halo["S"], halo["E"], halo["W"]
    )
    acc, k2 = wafer.map_cores(lambda a, v: a + jnp.tanh(v) * 0.5, state.read("acc"), new[1:3, 1:4], origin=(1, 1))
    return state.write("data", new).write("acc", acc), wafer.superstep(k1, k2, traffic)


# ---- superstep cycles --------------------------------------------------------------------------------------------

# The kernel of `records`: a 4x4 fp32 matmul per core, as 16 FMAC instructions along b's rows (4 x min(4, 4), no more
# than the 16 dot products), each over 4 elements reading 8 B (b's row, the accumulator) and writing 4 B: 1 lane, a
# cycle an element, is slower than 8 B / 16 read or 4 B / 8 written. 16 start-ups, 64 elements, one task: 302.8.
KERNEL = 16 * SPEC.instr_startup_cycles + 64 * 1.0 + SPEC.task_cycles
# Its transfer: 32 words shifted 3 hops east along a row of 6. The E links carry [1, 2, 3, 2, 1, 0] streams, the
# busiest 96 words; the mean over the 5 links in use, 32 x 9 / 5 = 57.6, + 3 hops is less, and no core takes more
# than its 32 words in: 96 cycles.
SHIFT = 3 * 32


def records():
    """A compute-bound kernel (KERNEL cycles) and a shift (SHIFT cycles); four shifts in turn outlast the kernel."""
    _, kc = wafer.map_cores(lambda a, b: a @ b, rand(2, (2, 2, 4, 4)), rand(3, (2, 2, 4, 4)))
    _, t = wafer.shift(rand(4, (1, 6, 32)), "E", 3)
    assert kc.cycles(SPEC) == pytest.approx(KERNEL, rel=1e-12) and t.cycles(SPEC) == SHIFT
    assert SHIFT < KERNEL < 4 * SHIFT
    return kc, t


@pytest.mark.parametrize("overlap,expected", [(True, KERNEL), (False, KERNEL + SHIFT)], ids=["overlap", "no-overlap"])
def test_superstep_cycles(overlap, expected):
    kc, t = records()
    spec = SPEC.with_(overlap=overlap)
    rec = wafer.superstep(kc, t)
    assert rec.compute_cycles(spec) == pytest.approx(KERNEL, rel=1e-12) and rec.comm_cycles(spec) == SHIFT
    assert rec.cycles(spec) == pytest.approx(expected, rel=1e-12)
    assert rec.seconds(spec) == pytest.approx(expected / 850e6)
    # Communication-bound: four sequential shifts (4 x 96 = 384 > 302.8).
    slow = wafer.superstep(kc, t + t + t + t)
    assert slow.cycles(spec) == pytest.approx(4 * SHIFT if overlap else KERNEL + 4 * SHIFT, rel=1e-12)


def test_superstep_compute_max_over_cores():
    kc, _ = records()
    cheap = wafer.map_cores(lambda x: x + 1.0, rand(5, (2, 2, 4)))[1]
    c = cheap.cycles(SPEC)
    # one fp32 add of 4: 4 x max(1/2 lane, 4 B / 16 read, 4 B / 8 written) = 2, a start-up and the task
    assert c == pytest.approx(SPEC.instr_startup_cycles + 2 + SPEC.task_cycles, rel=1e-12)
    k = kc.cycles(SPEC)
    # Disjoint regions run concurrently: the slowest core sets the time.
    assert wafer.superstep(kc, cheap.at(2, 2)).compute_cycles(SPEC) == k
    # Kernels sharing cores run one after the other there.
    assert wafer.superstep(kc, cheap.at(1, 1)).compute_cycles(SPEC) == k + c
    m = wafer.superstep(kc, cheap.at(1, 1)).compute_map(SPEC)
    assert m.shape == (ROWS, COLS) and m[1, 1] == k + c and m[0, 0] == k and m[2, 2] == c and m[3, 5] == 0
    # Records compose with |, and superstep() accepts records of any kind.
    a, b = wafer.superstep(kc), wafer.superstep(cheap.at(2, 2))
    assert (a | b).compute_cycles(SPEC) == wafer.superstep(a, b).compute_cycles(SPEC) == k
    assert wafer.superstep().cycles(SPEC) == 0.0
    with pytest.raises(TypeError, match="KernelCost, Traffic or Superstep"):
        wafer.superstep(kc, 3.0)


def test_superstep_flops():
    kc, t = records()
    assert wafer.superstep(kc, t).flops == 4 * 2 * 64  # 4 cores x 64 FMAC x 2


def test_superstep_cycles_grad_wrt_spec():
    kc, t = records()
    rec = wafer.superstep(kc, t + t + t + t)  # communication-bound with overlap
    # each shift: the busiest link's 96 x 32 / bits (the hops do not set it): d / d bits = -96 x 32 / 32^2 = -3
    g = jax.grad(rec.cycles)(SPEC)
    np.testing.assert_allclose(g.link_bits_per_cycle, 4 * -3.0, rtol=1e-6)
    np.testing.assert_allclose(g.hop_latency_cycles, 0.0, atol=0)
    np.testing.assert_allclose(g.simd_fmac_fp32, 0.0, atol=0)
    np.testing.assert_allclose(g.instr_startup_cycles, 0.0, atol=0)
    g = jax.grad(rec.cycles)(SPEC.with_(overlap=False))
    np.testing.assert_allclose(g.link_bits_per_cycle, 4 * -3.0, rtol=1e-6)
    np.testing.assert_allclose(g.simd_fmac_fp32, -64.0, rtol=1e-6)  # d(64 / lanes) / d lanes at 1 lane
    np.testing.assert_allclose(g.instr_startup_cycles, 16.0, rtol=1e-6)  # 16 instructions


# ---- charge --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_charge(n):
    kc, t = records()
    rec = wafer.superstep(kc.at(1, 1), t.at(3, 0))
    state = wafer.charge(make_state(), SPEC, rec, n)
    expected_links = np.zeros((4, ROWS, COLS), np.float32)
    expected_links[1, 3] = n * 32 * np.array([1, 2, 3, 2, 1, 0])  # E links of row 3: 3-hop routes overlap
    np.testing.assert_array_equal(state.links, expected_links)
    np.testing.assert_array_equal(state.links, n * t.at(3, 0).link_words(ROWS, COLS))
    expected_busy = np.zeros((ROWS, COLS), np.float32)
    expected_busy[1:3, 1:3] = n * KERNEL
    np.testing.assert_allclose(state.busy, expected_busy, rtol=1e-6)  # float32 counters
    assert float(state.clock) == pytest.approx(n * KERNEL, rel=1e-6) and int(state.steps) == n
    # The SRAM is untouched.
    chex.assert_trees_all_equal(state.sram, make_state().sram)


def test_charge_accumulates_and_handles_empty_records():
    kc, t = records()
    rec = wafer.superstep(kc, t)
    state = wafer.charge(wafer.charge(make_state(), SPEC, rec), SPEC.with_(overlap=False), rec)
    assert float(state.clock) == pytest.approx(KERNEL + (KERNEL + SHIFT), rel=1e-6) and int(state.steps) == 2
    empty = wafer.charge(state, SPEC, Superstep())
    assert float(empty.clock) == float(state.clock) and int(empty.steps) == 3
    np.testing.assert_array_equal(empty.links, state.links)
    np.testing.assert_array_equal(empty.busy, state.busy)


# ---- step and run ------------------------------------------------------------------------------------------------


def test_step_charges_its_record():
    state = make_state()
    out, rec = jax.jit(lambda s: wafer.step(s, SPEC, smooth))(state)
    assert isinstance(rec, Superstep) and len(rec.kernels) == 2
    ref_state, _ = smooth(state)
    np.testing.assert_allclose(out.read("data"), ref_state.read("data"), rtol=1e-6)
    np.testing.assert_allclose(out.read("acc"), ref_state.read("acc"), rtol=1e-6)
    np.testing.assert_array_equal(out.links, rec.traffic.link_words(ROWS, COLS))
    np.testing.assert_allclose(out.busy, rec.compute_map(SPEC), rtol=1e-6)
    # The "acc" kernel shares cores with the smoothing kernel: those cores are the slowest.
    assert rec.compute_cycles(SPEC) == pytest.approx(float(out.busy[1, 1]), rel=1e-6)  # float32 counters
    assert float(out.busy[1, 1]) > float(out.busy[0, 0])
    assert float(out.clock) == pytest.approx(rec.cycles(SPEC), rel=1e-6) and int(out.steps) == 1


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_run_equals_repeated_step(n, overlap):
    spec = SPEC.with_(overlap=overlap)
    step = jax.jit(lambda s: wafer.step(s, spec, smooth)[0])
    seq = make_state()
    for _ in range(n):
        seq = step(seq)
    ran, rec = jax.jit(lambda s: wafer.run(s, spec, smooth, n))(make_state())
    for name in ("data", "acc"):
        np.testing.assert_array_equal(ran.read(name), seq.read(name), err_msg=name)  # bit-identical
    np.testing.assert_array_equal(ran.links, seq.links)
    np.testing.assert_array_equal(ran.busy, seq.busy)
    assert float(ran.clock) == float(seq.clock) == pytest.approx(n * rec.cycles(spec), rel=1e-6)  # float32 clock
    assert int(ran.steps) == int(seq.steps) == n
    assert ran.memory == seq.memory


def test_run_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run3(state):
        return wafer.run(state, SPEC, smooth, 3)[0]

    a = run3(make_state())
    b = run3(a)  # a fresh state with the same layout: no retrace
    assert int(b.steps) == 6
    c = run3(make_state().write("data", rand(9, (ROWS, COLS, 3))))
    assert int(c.steps) == 3


def test_run_traces_the_step_once():
    traced = chex.assert_max_traces(smooth, n=1)
    jax.jit(lambda s: wafer.run(s, SPEC, traced, 10))(make_state())


def test_run_zero_steps_and_bad_n():
    state = make_state()
    out, rec = wafer.run(state, SPEC, smooth, 0)
    chex.assert_trees_all_equal(out, state)  # nothing runs, nothing is charged
    assert rec.cycles(SPEC) == smooth(state)[1].cycles(SPEC)  # scan traces the step even for n == 0
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="non-negative int"):
            wafer.run(state, SPEC, smooth, bad)


@pytest.mark.parametrize(
    "returned",
    [lambda: Traffic.none(), lambda: records()[0], lambda: None, lambda: 3.0],
    ids=["traffic", "kernel-cost", "none", "float"],
)
def test_step_fn_must_return_superstep(returned):
    bad = lambda s: (s, returned())
    with pytest.raises(TypeError, match=r"must return \(state, Superstep\)"):
        wafer.step(make_state(), SPEC, bad)
    with pytest.raises(TypeError, match=r"must return \(state, Superstep\)"):
        wafer.run(make_state(), SPEC, bad, 2)
