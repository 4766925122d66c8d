"""Precision policies (compiler/precision.py): cb16 rounding, `apply_policy`, and compiled programs under a policy.

References are independent of the code under test: cb16 against a NumPy enumeration of all 65,536 bit patterns;
`apply_policy(fn)` and the compiled programs against models written by hand in plain jnp, whose matmuls are
`jnp.dot(policy.round(a), policy.round(b), preferred_element_type=float32)` followed by `policy.round`, trained
natively with optax on float32 master weights (the policy's own recipe).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_zoo import EXPECTED_KINDS, MODELS
from sklearn.datasets import load_digits

import compiler
import wafer
from compiler.frontend import precision as P
from compiler.frontend.trace import split_module
from wafer.kernel import arithmetic

POLICIES = [P.FP16, P.BF16, P.CB16]
IDS = ["fp16", "bf16", "cb16"]
SPEC = wafer.WaferSpec.mini(8, 8)


# ---- a NumPy cb16 reference ------------------------------------------------------------------------------------


def cb16_table() -> np.ndarray:
    """float64 values of the 65,536 cb16 patterns (sign | exponent(6) << 9 | mantissa(9)), from the format's
    definition: bias 31, subnormals at exponent 0, infinities and NaNs at exponent 63."""
    bits = np.arange(1 << 16)
    s, e, m = bits >> 15, (bits >> 9) & 0x3F, bits & 0x1FF
    mag = np.where(e == 0, m / 512.0 * 2.0**-30, (1.0 + m / 512.0) * 2.0 ** (e.astype(np.float64) - 31))
    mag = np.where(e == 63, np.where(m == 0, np.inf, np.nan), mag)
    return np.where(s == 1, -mag, mag)


TABLE = cb16_table()
# the non-negative finite values in pattern order (increasing), and 2**32 where the infinity pattern sits: rounding
# to it (past CB16_MAX + half an ulp, or the tie there, which goes to the even pattern 0x7e00) means overflow
GRID = np.append(TABLE[:0x7E00], 2.0**32)


def round_reference(x: np.ndarray) -> np.ndarray:
    """Nearest cb16 value of each float32 (ties to the even pattern), as float64; overflow to inf; NaN stays."""
    with np.errstate(invalid="ignore"):  # signalling NaNs among the random bit patterns
        x = x.astype(np.float64)
    a = np.where(np.isnan(x), 0.0, np.abs(x))
    hi = np.clip(np.searchsorted(GRID, a), 1, len(GRID) - 1)
    lo = hi - 1
    dlo, dhi = a - GRID[lo], GRID[hi] - a
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    mag = np.where(pick == 0x7E00, np.inf, GRID[pick])
    mag = np.where(a >= 2.0**32, np.inf, mag)
    return np.where(np.isnan(x), np.nan, np.copysign(mag, x))


def same_values(got, want) -> bool:
    """Bitwise equal as float32 (signed zeros distinguished), NaN where NaN."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    nan = np.isnan(want)
    return bool(
        np.array_equal(np.isnan(got), nan) and np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    )


def cb16_inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    every_bit_pattern = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    in_range = (rng.choice([-1.0, 1.0], 200_000) * 2.0 ** rng.uniform(-42, 33, 200_000)).astype(np.float32)
    finite = TABLE[:0x7E00]
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact: 11 significant bits at most
    near = np.concatenate([np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    return np.concatenate([every_bit_pattern, in_range, mids, -mids, near, finite.astype(np.float32)])


# ---- cb16 --------------------------------------------------------------------------------------------------------


def test_cb16_patterns_decode_to_the_format_definition():
    assert same_values(P.cb16_values(), TABLE)
    assert P.CB16_MAX == TABLE[0x7DFF] == (2 - 2**-9) * 2**31
    assert P.CB16_MIN_NORMAL == TABLE[0x0200] == 2**-30
    assert P.CB16_MIN_SUBNORMAL == TABLE[0x0001] == 2**-39


def test_round_cb16_is_nearest_ties_to_even_bit_exactly():
    x = cb16_inputs()
    got = jax.jit(P.round_cb16)(x)
    assert got.dtype == jnp.float32
    assert same_values(got, round_reference(x))


def test_round_cb16_edge_cases():
    ulp_at_max = 2.0**22  # 2**(31 - 9)
    cases = [
        (0.0, 0.0),
        (-0.0, -0.0),
        (np.inf, np.inf),
        (-np.inf, -np.inf),
        (P.CB16_MAX, P.CB16_MAX),
        (-P.CB16_MAX, -P.CB16_MAX),
        (P.CB16_MAX + ulp_at_max / 4, P.CB16_MAX),  # below the midpoint
        (P.CB16_MAX + ulp_at_max / 2, np.inf),  # the tie goes to the even pattern, which is infinity
        (-(P.CB16_MAX + ulp_at_max / 2), -np.inf),
        (3.0e38, np.inf),
        (P.CB16_MIN_NORMAL, P.CB16_MIN_NORMAL),
        (P.CB16_MIN_NORMAL - 2.0**-40, P.CB16_MIN_NORMAL),  # tie between 511 and 512 subnormal steps: even wins
        (P.CB16_MIN_NORMAL - 2.0**-39, P.CB16_MIN_NORMAL - 2.0**-39),  # the largest subnormal
        (P.CB16_MIN_SUBNORMAL, P.CB16_MIN_SUBNORMAL),
        (2.0**-40, 0.0),  # half the smallest subnormal: tie to even (zero)
        (-(2.0**-40), -0.0),
        (1.5 * 2.0**-40, P.CB16_MIN_SUBNORMAL),
        (3 * 2.0**-40, 2 * P.CB16_MIN_SUBNORMAL),  # tie between 1 and 2 steps: even (2)
        (1.0 + 2.0**-10, 1.0),  # tie between 1 and 1 + 2**-9: even (1)
        (1.0 + 3 * 2.0**-10, 1.0 + 2 * 2.0**-9),  # tie between odd 1 and even 2 steps
        (2.0 - 2.0**-11, 2.0),  # rounding carries into the exponent
        (1e-45, 0.0),  # float32 subnormals
        (-1e-45, -0.0),
    ]
    x = np.array([c[0] for c in cases], np.float32)
    want = np.array([c[1] for c in cases], np.float32)
    assert same_values(jax.jit(P.round_cb16)(x), want)
    assert np.isnan(P.round_cb16(jnp.float32(jnp.nan)))


@pytest.mark.parametrize("storage, dtype", [("float16", jnp.float16), ("bfloat16", jnp.bfloat16)], ids=["fp16", "bf16"])
def test_round_to_is_the_cast_round_trip(storage, dtype):
    """`round_to` (reduce_precision, which XLA keeps) gives exactly `astype(fmt).astype(float32)` (which XLA's GPU
    backend may drop as excess precision), subnormals, overflow and NaN included."""
    rng = np.random.default_rng(1)
    special = [65504, 65519.99, 65520, 2**-24, 2**-25, 3 * 2**-25, 2**-14 - 2**-25, -0.0, np.inf, np.nan, 3.4e38]
    x = np.concatenate(
        [
            rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            (rng.choice([-1.0, 1.0], 100_000) * 2.0 ** rng.uniform(-30, 20, 100_000)).astype(np.float32),
            np.array(special, np.float32),
        ]
    )
    got = jax.jit(lambda x: P.round_to(x, storage))(x)
    assert same_values(got, jax.jit(lambda x: x.astype(dtype).astype(jnp.float32))(x))


def test_cb16_encoding_round_trips_every_pattern():
    patterns = np.arange(1 << 16, dtype=np.uint16)
    values = P.decode_cb16(patterns)
    back = np.asarray(P.encode_cb16(values))
    finite_or_inf = ~np.isnan(TABLE)
    np.testing.assert_array_equal(back[finite_or_inf], patterns[finite_or_inf])
    assert np.all((back[~finite_or_inf] & 0x7FFF) == 0x7F00)  # NaNs encode as the quiet NaN
    x = cb16_inputs()
    assert same_values(P.decode_cb16(P.encode_cb16(x)), round_reference(x))


def test_cb16_gradient_rounds_the_cotangent_like_a_cast():
    x = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32)
    c = jnp.float32(1.0) + jnp.arange(64, dtype=jnp.float32) * 2.0**-13  # not on the 16-bit grids
    for policy in POLICIES:
        g = jax.jit(jax.grad(lambda x, policy=policy: jnp.sum(policy.round(x) * c)))(x)
        assert same_values(g, policy.round(c)), policy.name
    cast = jax.jit(jax.grad(lambda x: jnp.sum(x.astype(jnp.bfloat16).astype(jnp.float32) * c)))(x)
    assert same_values(cast, P.BF16.round(c))  # what JAX gives for the cast round trip: not an identity
    # cb16 rounds like the formats JAX has: vmap and jit work
    assert same_values(jax.jit(jax.vmap(P.round_cb16))(x.reshape(8, 8)), P.round_cb16(x).reshape(8, 8))


# ---- policies ----------------------------------------------------------------------------------------------------


def test_policy_presets():
    assert P.Policy() == P.FP32 == compiler.Policy.FP32 == P.Policy.of(None) == P.Policy.of("fp32")
    assert P.Policy.of("bf16") == P.Policy.BF16 == P.Policy("bfloat16")
    assert P.Policy.of("float16") is not None and P.Policy.of(P.CB16) is P.CB16
    assert [p.storage_bytes for p in (P.FP32, P.FP16, P.BF16, P.CB16)] == [4, 2, 2, 2]
    assert [p.dtype_class for p in (P.FP32, P.FP16, P.BF16, P.CB16)] == ["fp32", "mixed", "mixed", "mixed"]
    assert all(p.accumulate == "float32" for p in (P.FP32, P.FP16, P.BF16, P.CB16))
    assert P.FP16.sram_dtype == jnp.float16 and P.BF16.sram_dtype == jnp.bfloat16 and P.CB16.sram_dtype == jnp.uint16
    assert SPEC.simd_width("fmac", P.BF16.dtype_class) == 2 * SPEC.simd_width("fmac", P.FP32.dtype_class)
    x = jnp.array([1 + 2.0**-9, 70000.0, 1e-6], jnp.float32)
    np.testing.assert_array_equal(P.FP16.round(x), x.astype(jnp.float16).astype(jnp.float32))
    np.testing.assert_array_equal(P.BF16.round(x), x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(P.FP32.round(x), x)
    for p in POLICIES:
        assert same_values(p.load(p.store(x)), p.round(x))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(storage="int8"), "storage must be one of"),
        (dict(storage="bf16"), "Perhaps you meant 'bfloat16'"),
        (dict(storage="float16", accumulate="float16"), "accumulate must be 'float32'"),
    ],
    ids=["format", "alias", "accumulate"],
)
def test_policy_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        P.Policy(**bad)
    with pytest.raises(ValueError, match="policy must be"):
        P.Policy.of("fp8")


# ---- apply_policy against hand-written models --------------------------------------------------------------------


def mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def mlp_native(p, x, policy):
    """The MLP under `policy`, written by hand: stored params, 16-bit matmul operands, fp32 accumulation, stored
    matmul results."""
    r = policy.round
    p = jax.tree_util.tree_map(r, p)
    h = r(jnp.dot(r(x), p["w1"], preferred_element_type=jnp.float32))
    h = jax.nn.relu(h + p["b1"])
    return r(jnp.dot(r(h), p["w2"], preferred_element_type=jnp.float32)) + p["b2"]


def mlp_params(d_in=16, d_hidden=32, d_out=8, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    return {
        "w1": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
        "b1": 0.1 * jax.random.normal(k2, (d_hidden,)),
        "w2": jax.random.normal(k3, (d_hidden, d_out)) / np.sqrt(d_hidden),
        "b2": 0.1 * jax.random.normal(k4, (d_out,)),
    }


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_apply_policy_matches_the_hand_written_model(policy):
    p, x = mlp_params(), jax.random.normal(jax.random.key(1), (32, 16))
    emulated = jax.jit(compiler.apply_policy(mlp, policy))
    native = jax.jit(lambda p, x: mlp_native(p, x, policy))
    assert same_values(emulated(p, x), native(p, x))
    assert not np.array_equal(emulated(p, x), mlp(p, x))  # the policy does something
    ge = jax.jit(jax.grad(lambda p, x: jnp.sum(compiler.apply_policy(mlp, policy)(p, x) ** 2)))(p, x)
    gn = jax.jit(jax.grad(lambda p, x: jnp.sum(mlp_native(p, x, policy) ** 2)))(p, x)
    for k in p:
        assert same_values(ge[k], gn[k]), k


def test_apply_policy_rounds_convolutions_and_loop_bodies():
    policy = P.CB16
    r = policy.round
    dn = ("NHWC", "HWIO", "NHWC")
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    p = {"k": 0.3 * jax.random.normal(k1, (3, 3, 2, 4)), "w": 0.3 * jax.random.normal(k2, (4, 4))}
    x = jax.random.normal(k3, (2, 6, 6, 2))

    def net(p, x):
        y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=dn)
        y = jnp.tanh(y).mean(axis=(1, 2))  # [2, 4]

        def step(h, _):
            return jnp.tanh(h @ p["w"]), None

        return jax.lax.scan(step, y, None, length=3)[0]

    def native(p, x):
        p = jax.tree_util.tree_map(r, p)
        y = jax.lax.conv_general_dilated(
            r(x), p["k"], (1, 1), "SAME", dimension_numbers=dn, preferred_element_type=jnp.float32
        )
        y = jnp.tanh(r(y)).mean(axis=(1, 2))
        for _ in range(3):
            y = jnp.tanh(r(jnp.dot(r(y), p["w"], preferred_element_type=jnp.float32)))
        return y

    emulated = compiler.apply_policy(net, policy)
    np.testing.assert_allclose(jax.jit(emulated)(p, x), jax.jit(native)(p, x), rtol=1e-6, atol=1e-7)
    ge, gn = jax.jit(jax.grad(lambda p: emulated(p, x).sum()))(p), jax.jit(jax.grad(lambda p: native(p, x).sum()))(p)
    for k in p:
        np.testing.assert_allclose(ge[k], gn[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_apply_policy_float32_is_the_function_itself():
    assert compiler.apply_policy(mlp, None) is mlp
    assert compiler.apply_policy(mlp, "fp32") is mlp


def test_apply_policy_keeps_random_layers_and_their_masks():
    p, x = mlp_params(), jax.random.normal(jax.random.key(1), (32, 16))

    def dropped(p, x, key):
        keep = jax.random.bernoulli(key, 0.7, (32, 32))
        h = jnp.where(keep, jax.nn.relu(x @ p["w1"] + p["b1"]) / 0.7, 0.0)
        return h @ p["w2"]

    def native(p, x, key):
        r = P.BF16.round
        keep = jax.random.bernoulli(key, 0.7, (32, 32))
        h = jax.nn.relu(r(jnp.dot(r(x), r(p["w1"]), preferred_element_type=jnp.float32)) + r(p["b1"]))
        h = jnp.where(keep, h / 0.7, 0.0)
        return r(jnp.dot(r(h), r(p["w2"]), preferred_element_type=jnp.float32))

    key = jax.random.key(5)
    assert same_values(jax.jit(compiler.apply_policy(dropped, "bf16"))(p, x, key), jax.jit(native)(p, x, key))


# ---- compiled inference ------------------------------------------------------------------------------------------

HAND = {"dense_0": (0, 0, 4, 4), "dense_1": (4, 4, 2, 2)}  # tiles [4, 8] + 2 bias values; [16, 4] + 2 values


@pytest.fixture(scope="module")
def compiled():
    p, x = mlp_params(), jax.random.normal(jax.random.key(1), (32, 16))
    exes = {
        name: compiler.compile(mlp, p, x, spec=SPEC, placement=HAND, policy=policy)
        for name, policy in [("fp32", None), *zip(IDS, POLICIES)]
    }
    return p, x, exes


@pytest.mark.parametrize("name", IDS)
def test_compiled_program_runs_the_policy(compiled, name):
    p, x, exes = compiled
    exe, policy = exes[name], P.Policy.of(name)
    state = exe.load(p)
    out, state = exe(state, x)
    assert same_values(out, jax.jit(lambda p, x: mlp_native(p, x, policy))(p, x))
    want_dtype = {"fp16": jnp.float16, "bf16": jnp.bfloat16, "cb16": jnp.uint16}[name]
    assert all(a.dtype == want_dtype for a in state.sram.values())  # weights in SRAM in the 16-bit format
    back = exe.read_params(state)
    for k in p:
        assert back[k].dtype == jnp.float32 and same_values(back[k], policy.round(p[k])), k
    if name == "cb16":
        with pytest.raises(ValueError, match="per-core path"):
            exe(exe.load(p), x, path="per_core")
    else:  # the per-core path runs the kernels literally on the 16-bit tiles, with the same answer
        per_core, _ = exe(exe.load(p), x, path="per_core")
        assert same_values(per_core, out)
    assert exe.report.mode.endswith(f"({policy})")


# By hand on HAND (32 samples, one row of x each; rows not split over grid copies): a core of dense_0 (W1 [16, 32] on
# 4x4: tile 4 x 8) holds per sample its 4-element input chunk and its 8-element partial result, one of dense_1 (W2
# [32, 8] on 2x2: tile 16 x 4) 16 and 4. Under a policy the input chunk is 16-bit and the partial sums stay fp32 (the
# accumulation's): activation bytes per core 4 x ceil(words per sample).
ACT_BYTES = {"dense_0": (4 * (4 + 8), 4 * (4 // 2 + 8)), "dense_1": (4 * (16 + 4), 4 * (16 // 2 + 4))}
# Per sample a core multiplies its [1, K/gh] chunk by its tile (wafer/kernel.py's loop rule): dense_0 [1, 4] @ [4, 8]:
# along the 8 columns, 4 instructions (fewer than 8 dot products) reading a weight row and the accumulator, writing
# the accumulator: fp32 8 + 4 bytes per element (1 FMAC lane: 1 cycle), 16-bit weights 2 + 4 (2 lanes, write-bound:
# 4 / 8 = 1/2 cycle); dense_1 [1, 16] @ [16, 4]: 4 dot products (fewer than 16 instructions) reading both operands:
# fp32 8 bytes (1 cycle), 16-bit 2 + 2 (lanes-bound: 1/2 cycle). (instructions, FMACs) per sample:
ANCHOR = {"dense_0": (4, 4 * 8), "dense_1": (4, 16 * 4)}


@pytest.mark.parametrize("name", IDS)
def test_compiled_sram_halves_and_matmuls_run_mixed(compiled, name):
    _, _, exes = compiled
    ref, exe = exes["fp32"], exes[name]
    assert ref.placement == exe.placement
    for k32, k16 in zip(ref.report.kernels, exe.report.kernels):
        assert k16.weight_bytes_per_core * 2 == k32.weight_bytes_per_core  # weights stored 16-bit
        assert (k32.act_bytes_per_core, k16.act_bytes_per_core) == ACT_BYTES[k32.name]
        assert k16.compute_cycles_per_sample < k32.compute_cycles_per_sample
    f32, f16 = ref.plan.features, exe.plan.features
    assert f32.fmac_class == ("fp32", "fp32") and f16.fmac_class == ("mixed", "mixed")  # the anchors' FMACs
    assert f16.acc_class == f32.acc_class == ("fp32", "fp32")  # partial sums added in fp32
    for i, kernel in enumerate(ref.plan.names):
        c32 = dict(zip(f32.keys, ref.schedule.kernels["counts"][i]))  # per-core counts of each kernel, its anchor's
        c16 = dict(zip(f16.keys, exe.schedule.kernels["counts"][i]))  # matmul apart: the bias add and relu
        assert c16 == c32 and not any(key[0] == "fmac" for key, v in c32.items() if v)
        instr, fmacs = ANCHOR[kernel]
        per_sample32 = instr * SPEC.instr_startup_cycles + fmacs * 1.0
        per_sample16 = instr * SPEC.instr_startup_cycles + fmacs * 0.5  # simd_fmac_mixed = 2 on WSE-2
        assert ref.schedule.kernels["anchor"][i] == pytest.approx(32 * per_sample32, rel=1e-12)
        assert exe.schedule.kernels["anchor"][i] == pytest.approx(32 * per_sample16, rel=1e-12)
    # the fullest core: dense_1's, its tile and bias slice (16 x 4 + 2 values) and its activations
    assert ref.report.peak_sram_bytes_per_core == 4 * (16 * 4 + 2) + ACT_BYTES["dense_1"][0]
    assert exe.report.peak_sram_bytes_per_core == 2 * (16 * 4 + 2) + ACT_BYTES["dense_1"][1]


def test_float32_default_is_unchanged(compiled):
    p, x, exes = compiled
    again = compiler.compile(mlp, p, x, spec=SPEC, placement=HAND, policy="fp32")
    assert again.report.to_dict() == exes["fp32"].report.to_dict()
    assert exes["fp32"].report.mode == "layer-pipelined inference"
    out, state = exes["fp32"](exes["fp32"].load(p), x)
    assert all(a.dtype == jnp.float32 for a in state.sram.values())
    np.testing.assert_allclose(out, mlp(p, x), rtol=1e-6)


@pytest.mark.parametrize(
    "name, policy",
    [("lenet", "bf16"), ("encoder_block", "fp16"), ("decoder_lm", "cb16"), ("nnx_mlp", "bf16"), ("rnn", "cb16")],
)
def test_zoo_models_compile_under_a_policy(name, policy):
    """Convolutions, attention, embeddings, an nnx module and a scan: the same kernels as in float32, matmuls
    counted mixed, and the emulated forward is `apply_policy` of the model."""
    case = MODELS[name]()
    exe = compiler.compile(*case.trace_args(), spec=wafer.WaferSpec.mini(16, 16), policy=policy)
    assert tuple(k.kind for k in exe.graph.kernels) == EXPECTED_KINDS[name]
    assert all(
        ("fmac", "mixed") in arithmetic(k.counts)
        for k in exe.graph.kernels
        if k.kind in ("dense", "matmul", "conv", "scan")
    )
    out, _ = exe(exe.load(), *case.inputs)
    fn, params = split_module(case.fn) if case.is_module else (case.fn, case.params)
    want = jax.jit(compiler.apply_policy(fn, policy))(params, *case.inputs)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- training ----------------------------------------------------------------------------------------------------


def digits(batch: int, steps: int, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(-(-batch * steps // len(x)))])
    idx = order[: batch * steps].reshape(steps, batch)
    return [{"x": x[i], "y": y[i]} for i in idx]


def digits_loss(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, b["x"]), b["y"]).mean()


def digits_loss_native(p, b, policy):
    return optax.softmax_cross_entropy_with_integer_labels(mlp_native(p, b["x"], policy), b["y"]).mean()


def train_both(policy, optimizer, batches, params, loss=digits_loss, native_loss=digits_loss_native, **kw):
    """Per-step losses of compile_train under `policy` and of the native reference, and both final params."""
    tx = compiler.compile_train(loss, params, batches[0], optimizer, spec=SPEC, policy=policy, **kw)
    state = tx.init(params)

    @jax.jit
    def native_step(p, o, b):
        value, g = jax.value_and_grad(native_loss)(p, b, policy)
        u, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, u), o, value

    p, o = params, optimizer.init(params)
    emulated, native = [], []
    for b in batches:
        state, metrics = tx.step(state, b)
        p, o, value = native_step(p, o, b)
        emulated.append(float(metrics["loss"]))
        native.append(float(value))
    return tx, np.array(emulated), np.array(native), tx.read_params(state), p


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_training_matches_native_under_the_same_policy(policy):
    """50 steps of Adam on the digits; the emulated wafer and native JAX agree step by step (measured: bit for bit).

    Where XLA compiles the optimizer arithmetic of the two programs differently (the emulator updates each core's
    tiles, the native run whole arrays), a one-ulp float32 difference can move a weight across a 16-bit rounding
    boundary and the runs then drift apart chaotically: with Adam at lr=1e-2 we measured per-step loss differences
    up to 1e-3 relative for bf16 over 60 steps, none with lr=1e-3 or SGD. The bound here is the 1e-4 of the issue.
    """
    batches = digits(32, 50)
    params = mlp_params(64, 32, 10, seed=3)
    tx, emulated, native, pe, pn = train_both(policy, optax.adam(1e-3), batches, params)
    assert np.max(np.abs(emulated - native) / np.abs(native)) <= 1e-4
    assert native[-5:].mean() < 0.9 * native[:5].mean()  # it learns
    for k in params:
        np.testing.assert_allclose(pe[k], pn[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(jax.jit(digits_loss)(params, batches[0])) != emulated[0]  # the policy matters


def test_training_sram_and_cycles_under_a_policy():
    batches = digits(32, 1)
    params = mlp_params(64, 32, 10, seed=3)
    hand = {"dense_0": (0, 0, 4, 4), "dense_1": (4, 4, 2, 2)}
    txs = {
        name: compiler.compile_train(
            digits_loss, params, batches[0], optax.adam(1e-3), spec=SPEC, placement=hand, policy=pol
        )
        for name, pol in [("fp32", None), ("bf16", P.BF16)]
    }
    r32, r16 = txs["fp32"].report, txs["bf16"].report
    assert r16.mode == "pipelined training (bf16 storage, fp32 accumulation)" and r32.mode == "pipelined training"
    for k32, k16 in zip(r32.kernels, r16.kernels):
        # float32 master weights, gradients and optimizer state: the weight side is float32 training's
        assert k16.weight_bytes_per_core == k32.weight_bytes_per_core
        # 16-bit activations: the stream buffer and the backward stash halve (labels stay int32)
        assert k16.act_bytes_per_core < k32.act_bytes_per_core
        assert k16.forward_cycles < k32.forward_cycles and k16.update_cycles == k32.update_cycles
    # dense_0 (W1 [64, 32] on 4x4: tiles 16 x 8): per sample a core holds its 16-element input chunk and its 8-element
    # partial result (fp32 sums), in two buffers (act_copies 2), and stashes the inputs of the 3 samples between its
    # forward and its backward (2 x the kernels after it + 1): 4 x (2 x (16 + 8) + 3 x 16) bytes in float32,
    # 4 x (2 x (16 / 2 + 8) + 3 x 16 / 2) with 16-bit activations
    assert r32.kernels[0].act_bytes_per_core == 4 * (2 * (16 + 8) + 3 * 16) == 384
    assert r16.kernels[0].act_bytes_per_core == 4 * (2 * (8 + 8) + 3 * 8) == 224
    state = txs["bf16"].init(params)
    assert all(a.dtype == jnp.float32 for a in state.wafer.sram.values())
    # weight streaming: 16-bit weights stream in (the float32 masters stay in the host store), the same step
    streams = {
        name: compiler.compile_train(
            digits_loss, params, batches[0], optax.adam(1e-3), spec=SPEC, mode="weight_streaming", policy=pol
        )
        for name, pol in [("fp32", None), ("bf16", P.BF16)]
    }
    stream_bytes = {name: list(tx.plan.features.stream_bytes) for name, tx in streams.items()}
    assert [2 * b for b in stream_bytes["bf16"]] == stream_bytes["fp32"]
    _, metrics = streams["bf16"].step(streams["bf16"].init(params), batches[0])
    _, want = txs["bf16"].step(txs["bf16"].init(params), batches[0])
    assert float(metrics["loss"]) == float(want["loss"])


class DropoutMLP(nn.Module):
    """Dense -> relu -> Dropout -> Dense; with `policy`, the native model under it: each Dense's matmul rounds its
    operands, accumulates in float32 and rounds its result (params are rounded by the caller)."""

    policy: P.Policy | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        dot = jax.lax.dot_general
        if self.policy is not None:
            r = self.policy.round

            def dot(a, b, dims, precision=None, preferred_element_type=None):
                return r(jax.lax.dot_general(r(a), r(b), dims, precision, preferred_element_type=jnp.float32))

        x = nn.relu(nn.Dense(32, dot_general=dot)(x))
        x = nn.Dropout(0.3)(x, deterministic=deterministic)
        return nn.Dense(10, dot_general=dot)(x)


def test_dropout_trains_with_explicit_keys_and_native_masks_under_a_policy():
    """The dropout key comes with the batch (folded from a base key by step); both runs draw the same masks."""
    base = jax.random.key(7)
    batches = [dict(b, key=jax.random.fold_in(base, i)) for i, b in enumerate(digits(32, 10, seed=1))]
    params = DropoutMLP().init(jax.random.key(3), batches[0]["x"], deterministic=True)

    def loss(p, b, deterministic=False):
        logits = DropoutMLP().apply(p, b["x"], deterministic=deterministic, rngs={"dropout": b["key"]})
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    def native(p, b, policy):
        p = jax.tree_util.tree_map(policy.round, p)
        logits = DropoutMLP(policy).apply(p, b["x"], deterministic=False, rngs={"dropout": b["key"]})
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    _, emulated, nat, _, _ = train_both(P.BF16, optax.sgd(0.1), batches, params, loss=loss, native_loss=native)
    assert np.max(np.abs(emulated - nat) / np.abs(nat)) <= 1e-4
    # the masks matter: without dropout the first step's loss differs
    plain = compiler.apply_policy(lambda p, b: loss(p, b, deterministic=True), "bf16")
    assert float(jax.jit(plain)(params, batches[0])) != emulated[0]
