"""Per-core programs: map_cores output, instruction counts (arithmetic, SRAM bytes per instruction, instructions
issued, tasks) and kernel cycles by hand under wafer/cost.py's rules."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import wafer
from wafer import cost
from wafer.kernel import arithmetic, count

SPEC = wafer.WSE2
F32, F16, BF16 = jnp.float32, jnp.float16, jnp.bfloat16


def rand(seed, shape, dtype=F32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def sds(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def counts_of(fn, *args):
    """The arithmetic of a count: {(op class, dtype class): elements}."""
    return arithmetic(count(fn, *args))


# ---- map_cores ---------------------------------------------------------------------------------------------------


def dense(x, w, b):
    return jnp.tanh(w @ x + b)


def test_map_cores_equals_vmapped_reference():
    h, w, k, n = 3, 4, 5, 6
    x, wt, b = rand(0, (h, w, k)), rand(1, (h, w, n, k)), rand(2, (h, w, n))
    out, kc = jax.jit(lambda *a: wafer.map_cores(dense, *a))(x, wt, b)
    ref = jnp.stack([jnp.stack([dense(x[r, c], wt[r, c], b[r, c]) for c in range(w)]) for r in range(h)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, jax.vmap(jax.vmap(dense))(x, wt, b), rtol=1e-6, atol=1e-6)
    assert kc.rect == wafer.Rect(0, 0, h, w)
    # w @ x: n * k FMACs; + b: n ALU adds (only a mul feeding an add fuses); tanh: n special.
    assert arithmetic(kc.counts) == {("fmac", "fp32"): n * k, ("alu", "fp32"): n, ("special", "fp32"): n}
    # w [6, 5] @ x [5]: 5 FMAC instructions along w's columns (against 6 dot products), the add, tanh's sequence
    assert kc.counts[("instr",)] == 5 + 1 + wafer.kernel.SPECIAL_INSTRUCTIONS and kc.counts[("task",)] == 1


def test_map_cores_pytrees_and_origin():
    h, w = 2, 3
    tree = {"a": rand(3, (h, w, 4)), "b": (rand(4, (h, w)), rand(5, (h, w, 2, 4)))}

    def fn(t):
        a, (s, m) = t["a"], t["b"]
        return {"y": m @ a * s, "z": jnp.sum(a)}

    out, kc = wafer.map_cores(fn, tree, origin=(5, 7))
    ref = jax.vmap(jax.vmap(fn))(tree)
    np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-6)
    np.testing.assert_allclose(out["z"], ref["z"], rtol=1e-6)
    assert out["y"].shape == (h, w, 2) and out["z"].shape == (h, w)
    assert kc.rect == wafer.Rect(5, 7, h, w) and kc.at(1, 1).rect == wafer.Rect(6, 8, h, w)
    # m [2, 4] @ a [4]: 2 dot products of length 4 (reading both vectors, accumulating in a register); * s (a
    # one-element scalar in a register): 2 elements read and written; sum(a): 4 read into a scalar
    assert kc.counts == {
        ("fmac", "fp32", 8, 0): 8,
        ("alu", "fp32", 4, 4): 2,
        ("alu", "fp32", 4, 0): 4,
        ("instr",): 2 + 1 + 1,
        ("ops",): 3,
        ("task",): 1,
    }
    assert kc.sram_bytes == (8 * 8 + 2 * 4 + 4 * 4, 2 * 4)


@pytest.mark.parametrize(
    "args",
    [(jnp.ones((2, 3, 1)), jnp.ones((3, 2, 1))), (jnp.ones((2, 3)), jnp.ones(3)), ()],
    ids=["mismatched-grid", "not-a-grid", "no-args"],
)
def test_map_cores_bad_arguments(args):
    with pytest.raises(ValueError, match="map_cores"):
        wafer.map_cores(lambda *a: a[0], *args)


# ---- instruction counts ------------------------------------------------------------------------------------------


def fused(x, y, z):
    return x * y + z


def unfused(x, y, z):
    m = x * y  # two uses: the product must be kept, so no FMAC
    return m + z + m


def conv_nchw(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID")


def conv_nhwc_same(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def scan_body_fmac(c):
    return lax.scan(lambda c, _: (c * 2.0 + 1.0, None), c, None, length=7)[0]


COUNT_CASES = {
    "add": (lambda x, y: x + y, (sds(8), sds(8)), {("alu", "fp32"): 8}),
    "add-fp16": (lambda x, y: x + y, (sds(8, dtype=F16), sds(8, dtype=F16)), {("alu", "fp16"): 8}),
    "add-int": (lambda x, y: x + y, (sds(8, dtype=jnp.int32), sds(8, dtype=jnp.int32)), {("alu", "int"): 8}),
    "fmac": (fused, (sds(8), sds(8), sds(8)), {("fmac", "fp32"): 8}),
    "fmac-bf16": (fused, (sds(8, dtype=BF16),) * 3, {("fmac", "fp16"): 8}),
    "mul-two-uses": (unfused, (sds(8), sds(8), sds(8)), {("alu", "fp32"): 24}),
    "mul-broadcast-add": (lambda x, y, z: (x * y)[None] + z, (sds(4), sds(4), sds(3, 4)), {("alu", "fp32"): 16}),
    "dot": (lambda a, b: a @ b, (sds(3, 5), sds(5, 4)), {("fmac", "fp32"): 3 * 4 * 5}),
    "dot-batched": (
        lambda a, b: jnp.einsum("bik,bkj->bij", a, b),
        (sds(2, 3, 5), sds(2, 5, 4)),
        {("fmac", "fp32"): 2 * 3 * 4 * 5},
    ),
    "dot-fp16": (lambda a, b: a @ b, (sds(3, 5, dtype=F16), sds(5, 4, dtype=F16)), {("fmac", "fp16"): 60}),
    "dot-mixed": (
        lambda a, b: jnp.dot(a, b, preferred_element_type=F32),
        (sds(3, 5, dtype=F16), sds(5, 4, dtype=F16)),
        {("fmac", "mixed"): 60},
    ),
    "conv-nchw": (conv_nchw, (sds(1, 3, 6, 7), sds(4, 3, 2, 3)), {("fmac", "fp32"): (4 * 5 * 5) * (3 * 2 * 3)}),
    "conv-nhwc-same": (conv_nhwc_same, (sds(2, 5, 5, 3), sds(3, 3, 3, 4)), {("fmac", "fp32"): (2 * 5 * 5 * 4) * 27}),
    "exp": (jnp.exp, (sds(6),), {("special", "fp32"): 6}),
    "div": (lambda x, y: x / y, (sds(6), sds(6)), {("special", "fp32"): 6}),
    "reduce_sum": (lambda x: jnp.sum(x, axis=1), (sds(4, 6),), {("alu", "fp32"): 24}),
    "reduce_max-fp16": (lambda x: jnp.max(x), (sds(4, 6, dtype=F16),), {("alu", "fp16"): 24}),
    "free-moves": (lambda x: x.reshape(2, 6)[:, 1:].astype(F16), (sds(12),), {}),
    "square": (lambda x: x**2, (sds(8),), {("alu", "fp32"): 8}),  # one multiply, like x * x and lax.square
    "lax-square": (lax.square, (sds(8),), {("alu", "fp32"): 8}),
    "cube": (lambda x: x**3, (sds(8),), {("alu", "fp32"): 16}),  # square-and-multiply
    "pow4": (lambda x: x**4, (sds(8),), {("alu", "fp32"): 16}),
    "pow7": (lambda x: x**7, (sds(8),), {("alu", "fp32"): 32}),
    "transpose": (lambda x: x.T, (sds(3, 4),), {("alu", "fp32"): 12}),
    # jnp.split/unstack/stack/tile are primitives of their own in recent JAX.
    "split": (lambda x: jnp.split(x, 3)[1] * 2.0, (sds(12),), {("alu", "fp32"): 4}),
    "unstack": (lambda x: jnp.unstack(x)[0] * 2.0, (sds(3, 4),), {("alu", "fp32"): 4}),
    "stack": (lambda x, y: jnp.stack([x, y]), (sds(4), sds(4)), {("alu", "fp32"): 8}),
    "tile": (lambda x: jnp.tile(x, 3), (sds(4),), {("alu", "fp32"): 12}),
    "cummin": (lambda x: lax.cummin(x), (sds(5),), {("alu", "fp32"): 5}),
    "scatter-mul": (lambda x: x.at[1].mul(2.0), (sds(5),), {("alu", "fp32"): 5}),
    "scan": (scan_body_fmac, (sds(5),), {("fmac", "fp32"): 7 * 5}),
    "fori": (lambda x: lax.fori_loop(0, 3, lambda i, c: jnp.exp(c), x), (sds(4),), {("special", "fp32"): 12}),
    "nested-jit": (lambda x: jax.jit(lambda y: y + 1.0)(x) * 3.0, (sds(4),), {("alu", "fp32"): 8}),
}


@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
def test_counts(case):
    fn, args, expected = COUNT_CASES[case]
    counts = counts_of(fn, *args)
    if case == "fori":  # the loop counter's increment is one int ALU op per iteration
        expected = {**expected, ("alu", "int"): 3}
    assert counts == expected


def test_scan_multiplies_body_counts():
    body = lambda c: jnp.tanh(c * 2.0 + 1.0) + c
    once = counts_of(body, sds(5))
    for n in (1, 4, 9):
        looped = counts_of(lambda c, n=n: lax.scan(lambda c, _: (body(c), None), c, None, length=n)[0], sds(5))
        assert looped == {key: n * v for key, v in once.items()}


def test_cond_charges_the_costlier_branch():
    fn = lambda p, x: lax.cond(p, lambda x: jnp.exp(x) * 2.0, lambda x: x + 1.0, x)
    assert counts_of(fn, sds(dtype=jnp.bool_), sds(4)) == {("special", "fp32"): 4, ("alu", "fp32"): 4}


def test_fp16_vs_fp32_lanes():
    """Same program, same element counts; the SIMD width of the dtype sets the cycles."""
    for fn, n_args, cls in ((lambda x, y: x + y, 2, "alu"), (fused, 3, "fmac")):
        c32 = counts_of(fn, *(sds(64),) * n_args)
        c16 = counts_of(fn, *(sds(64, dtype=F16),) * n_args)
        assert c32 == {(cls, "fp32"): 64} and c16 == {(cls, "fp16"): 64}
        ratio = cost.compute_cycles(SPEC, c32) / cost.compute_cycles(SPEC, c16)  # pure arithmetic keys
        assert ratio == SPEC.simd_width(cls, "fp16") / SPEC.simd_width(cls, "fp32")
    # WSE-2: fp16 FMAC 4 lanes, fp32 add 2 lanes (published), fp32 FMAC 1 lane (assumed).
    assert cost.compute_cycles(SPEC, counts_of(fused, *(sds(64, dtype=F16),) * 3)) == 16
    assert cost.compute_cycles(SPEC, counts_of(lambda x, y: x + y, sds(64), sds(64))) == 32


def test_mixed_precision_dot_uses_mixed_lanes():
    a, b = sds(8, 16, dtype=F16), sds(16, 4, dtype=F16)
    mixed = counts_of(lambda a, b: jnp.dot(a, b, preferred_element_type=F32), a, b)
    half = counts_of(lambda a, b: jnp.dot(a, b), a, b)
    assert mixed == {("fmac", "mixed"): 512} and half == {("fmac", "fp16"): 512}
    assert cost.compute_cycles(SPEC, mixed) == 512 / 2 and cost.compute_cycles(SPEC, half) == 512 / 4


# ---- unsupported primitives --------------------------------------------------------------------------------------


def with_while(x):
    return lax.while_loop(lambda c: jnp.sum(c) < 10.0, lambda c: c * 2.0, x)


def with_top_k(x):
    return lax.top_k(x, 2)[0]


@pytest.mark.parametrize("fn,primitive", [(with_while, "while"), (with_top_k, "top_k")], ids=["while", "top_k"])
def test_unsupported_primitive_names_primitive_and_source(fn, primitive):
    with pytest.raises(wafer.UnsupportedPrimitiveError) as info:
        wafer.map_cores(fn, jnp.ones((2, 2, 4)))
    e = info.value
    assert isinstance(e, NotImplementedError)
    assert e.primitive == primitive
    here = os.path.basename(__file__)
    assert here in e.source and here in str(e) and f"'{primitive}'" in str(e)
    line = int(e.source.rsplit(":", 1)[1])
    with open(__file__) as f:
        assert primitive.split("_")[0] in f.readlines()[line - 1]  # the line that calls it


# ---- SRAM bytes and cycles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn,args,read,write",
    [
        (lambda x, y: x + y, (sds(8), sds(8)), 64, 32),
        (lambda x, y: x + y, (sds(8, dtype=F16), sds(8, dtype=F16)), 32, 16),
        # 12 dot products of length 5 reading two 2-byte operands, accumulated in registers
        (lambda a, b: jnp.dot(a, b, preferred_element_type=F32), (sds(3, 5, dtype=F16), sds(5, 4, dtype=F16)), 240, 0),
        # sum into a register (jnp.sum widens bf16 to float32 first: 24 B read), x * 2 (12 B in, 12 B out)
        (lambda x: (jnp.sum(x), x * 2), (sds(2, 3, dtype=BF16),), 24 + 12, 12),
    ],
    ids=["add-f32", "add-f16", "mixed-dot", "two-outputs"],
)
def test_sram_bytes(fn, args, read, write):
    assert wafer.kernel.sram_bytes(count(fn, *args)) == (read, write)


# Every instruction reads its vector operands from SRAM and writes its result there (memory to memory).
FULL_CASES = {
    # 8 fp32 adds: two 4-byte operands in, 4 out per element, one instruction
    "add": (lambda x, y: x + y, (sds(8), sds(8)), {("alu", "fp32", 8, 4): 8, ("instr",): 1}),
    # a scalar operand (a literal, or a one-element value) lives in a register: not read from SRAM
    "scale": (lambda x: x * 2.0, (sds(8),), {("alu", "fp32", 4, 4): 8, ("instr",): 1}),
    # a broadcast operand is read element by element (a stride-0 descriptor)
    "bias": (lambda x, b: x + b[None], (sds(3, 4), sds(4)), {("alu", "fp32", 8, 4): 12, ("instr",): 1}),
    # x * y + z: one FMAC instruction reading three vectors
    "fmac": (fused, (sds(8), sds(8), sds(8)), {("fmac", "fp32", 12, 4): 8, ("instr",): 1}),
    "fmac-fp16": (fused, (sds(8, dtype=F16),) * 3, {("fmac", "fp16", 6, 2): 8, ("instr",): 1}),
    # [32, 1] @ [1, 8]: along the longer free axis (32 rows): 1 x min(32, 8) = 8 instructions, each reading the
    # 32-vector and the accumulator, writing the accumulator; dot products would take 32 x 8 = 256
    "outer": (lambda a, b: a @ b, (sds(32, 1), sds(1, 8)), {("fmac", "fp32", 8, 4): 256, ("instr",): 8}),
    # [3, 5] @ [5, 4]: dot products of length 5 (3 x 4 = 12 instructions) beat 5 x min(3, 4) = 15
    "dot": (lambda a, b: a @ b, (sds(3, 5), sds(5, 4)), {("fmac", "fp32", 8, 0): 60, ("instr",): 12}),
    # mixed, [4, 16] @ [16, 8]: 16 x min(4, 8) = 64 instructions along the 8 columns (16-bit W row and fp32
    # accumulator read, accumulator written) against 32 dot products of length 16: the dot products
    "dot-mixed": (
        lambda a, b: jnp.dot(a, b, preferred_element_type=F32),
        (sds(4, 16, dtype=F16), sds(16, 8, dtype=F16)),
        {("fmac", "mixed", 4, 0): 512, ("instr",): 32},
    ),
    # [64, 2] @ [2, 8] mixed: 2 x 8 = 16 instructions along the 64 rows (reading x's column and the accumulator)
    "outer-mixed": (
        lambda a, b: jnp.dot(a, b, preferred_element_type=F32),
        (sds(64, 2, dtype=F16), sds(2, 8, dtype=F16)),
        {("fmac", "mixed", 6, 4): 1024, ("instr",): 16},
    ),
    # a reduction to a scalar: one instruction accumulating in a register
    "sum": (lambda x: jnp.sum(x), (sds(24),), {("alu", "fp32", 4, 0): 24, ("instr",): 1}),
    # [4, 6] summed over its rows: 4 outputs, 6 each: 4 instructions into registers (4 x 4 <= 24)
    "sum-rows": (lambda x: jnp.sum(x, axis=1), (sds(4, 6),), {("alu", "fp32", 4, 0): 24, ("instr",): 4}),
    # [6, 8] summed over its columns: acc[:] += x[i, :], 6 instructions over 8 outputs
    "sum-cols": (lambda x: jnp.sum(x, axis=0), (sds(6, 8),), {("alu", "fp32", 8, 4): 48, ("instr",): 6}),
    # a move reads and writes each element
    "transpose": (lambda x: x.T, (sds(3, 4),), {("alu", "fp32", 4, 4): 12, ("instr",): 1}),
    # a special function: special_cycles per element and a sequence of SPECIAL_INSTRUCTIONS instructions
    "exp": (jnp.exp, (sds(6),), {("special", "fp32", 4, 4): 6, ("instr",): wafer.kernel.SPECIAL_INSTRUCTIONS}),
    # views are free
    "free-moves": (lambda x: x.reshape(2, 6)[:, 1:].astype(F16), (sds(12),), {}),
}


@pytest.mark.parametrize("case", list(FULL_CASES), ids=list(FULL_CASES))
def test_full_counts_by_hand(case):
    fn, args, expected = FULL_CASES[case]
    ops = {("ops",): 1} if expected else {}  # each case is one vector operation (its instructions are above)
    assert count(fn, *args) == {**expected, **ops, ("task",): 1}  # one map_cores program is one task


def test_cycles_by_hand():
    """Per instruction: start-up + elements x max(1 / lanes, read / SRAM read, write / SRAM write); per task."""
    spec = SPEC  # 16 B read and 8 B written per cycle [LIE]; fp32 add 2 lanes, fp32 FMAC 1, fp16 FMAC 4
    s, t = spec.instr_startup_cycles, spec.task_cycles
    # fp32 add of 8: 2 lanes -> 0.5 per element; reads 8 B (0.5), writes 4 B (0.5): 4 + start-up + the task
    _, kc = wafer.map_cores(lambda x, y: x + y, rand(0, (2, 2, 8)), rand(1, (2, 2, 8)))
    assert kc.cycles(spec) == s + 8 * 0.5 + t
    # with SDK-style ports (8 B read, 4 B written) the same add is SRAM-bound: 1 per element
    assert kc.cycles(spec.with_(sram_read_bytes_per_cycle=8.0, sram_write_bytes_per_cycle=4.0)) == s + 8 + t
    # fp16 FMAC of 64 reading three 2-byte vectors: 4 lanes (0.25), reads 6 B (0.375): SRAM-bound, 24 + s
    _, kc = wafer.map_cores(fused, *(rand(i, (1, 1, 64), F16) for i in range(3)))
    assert kc.cycles(spec) == s + 64 * 0.375 + t
    # fp32 4x4 @ 4x4: 16 dot products of length 4 (16 instructions) beat 4 x 4; 64 FMACs at 1 lane
    _, kc = wafer.map_cores(lambda a, b: a @ b, rand(2, (1, 1, 4, 4)), rand(3, (1, 1, 4, 4)))
    assert kc.cycles(spec) == 16 * s + 64 + t and kc.flops == 128
    assert kc.cycles(spec.with_(simd_fmac_fp32=8.0)) == 16 * s + 64 * 0.5 + t  # then reading 8 B / 16 bounds it
    # exp of 10: special_cycles per element and the sequence's start-ups
    _, kc = wafer.map_cores(jnp.exp, rand(4, (1, 1, 10)))
    n = wafer.kernel.SPECIAL_INSTRUCTIONS
    assert kc.cycles(spec) == n * s + 10 * spec.special_cycles + t
    assert kc.cycles(spec.with_(special_cycles=0.1)) == n * s + 10 * 0.5 + t  # its 4 B written / 8 bound it


def test_fabric_operand_runs_at_the_ramp():
    """An instruction taking an operand off the ramp runs at most a wavelet a cycle (`cost.unit_cycles`)."""
    key = ("alu", "fp32", 4, 4, 1.0)  # @fadds(mem, mem, fabin): own operand from SRAM, the other off the ramp
    assert cost.unit_cycles(SPEC, key) == 1.0
    assert cost.unit_cycles(SPEC.with_(ramp_bits_per_cycle=64.0), key) == 0.5
    assert cost.unit_cycles(SPEC, key[:4]) == 0.5  # from SRAM only: the 2 lanes


def test_kernel_cycles_grad_wrt_spec():
    _, kc = wafer.map_cores(lambda a, b: a @ b, rand(2, (1, 1, 4, 4)), rand(3, (1, 1, 4, 4)))
    g = jax.grad(kc.cycles)(SPEC)
    np.testing.assert_allclose(g.simd_fmac_fp32, -64.0, rtol=1e-6)  # d(64 / s) / ds at s = 1
    np.testing.assert_allclose(g.instr_startup_cycles, 16.0, rtol=1e-6)  # 16 instructions
    np.testing.assert_allclose(g.task_cycles, 1.0, rtol=1e-6)
    np.testing.assert_allclose(g.sram_read_bytes_per_cycle, 0.0, atol=0)  # not the bound


def test_matmul_loop_is_one_rule_for_numbers_and_arrays():
    """The compiler calls matmul_loop on arrays of per-core tiles; counting calls it on numbers: same answers."""
    from wafer.kernel import matmul_loop

    rng = np.random.default_rng(0)
    rows, cols, depth = (rng.integers(1, 40, 64).astype(float) for _ in range(3))
    got = matmul_loop(rows, cols, depth, 2.0, 4.0, 4.0)
    for i in range(64):
        want = matmul_loop(int(rows[i]), int(cols[i]), int(depth[i]), 2, 4, 4)
        assert tuple(float(g[i]) for g in got) == tuple(float(v) for v in want)
    # by hand: 3 x 5 times 5 x 7: along the longer free axis (7), 5 x 3 = 15 instructions reading the 4-byte W row
    # and the accumulator, writing it; 10 x 100 times 100 x 1: 10 dot products (not 100 instructions along a free
    # axis of 1), reading both operands, accumulating in a register
    assert matmul_loop(3, 7, 5, 2, 4, 4) == (15, 8, 4)
    assert matmul_loop(10, 1, 100, 4, 4, 4) == (10, 8, 0)
    jr = jnp.asarray(rows)
    assert np.allclose(np.asarray(matmul_loop(jr, jnp.asarray(cols), jnp.asarray(depth), 2.0, 4.0, 4.0)[0]), got[0])
