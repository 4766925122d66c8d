"""`compiler.compile`: hand placements are validated and honoured; models that do not fit and primitives without
a kernel are refused with errors that say what and where."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_zoo import MODELS

import compiler
import wafer

SPEC = wafer.WaferSpec.mini(16, 16)
THIS_FILE = __file__


@pytest.fixture(scope="module")
def mlp():
    """The zoo's 3-layer MLP (dense_0, dense_1, dense_2) and its native output."""
    case = MODELS["mlp"]()
    return case, case.run()


def _compile_mlp(case, placement, **kw):
    return compiler.compile(*case.trace_args(), spec=SPEC, placement=placement, **kw)


# ---- hand placement ---------------------------------------------------------------------------------------------

GOOD = {"dense_0": (0, 3, 4, 6), "dense_1": (4, 3, 3, 5), "dense_2": (8, 10, 2, 2)}


def test_hand_placement_is_honoured(mlp):
    case, want = mlp
    exe = _compile_mlp(case, GOOD)
    assert {k: tuple(v) for k, v in exe.placement.items()} == GOOD
    assert all(isinstance(v, wafer.Rect) for v in exe.placement.values())
    assert {k.name: k.rect for k in exe.report.kernels} == GOOD
    for path in ("fast", "per_core"):
        out, state = exe(exe.load(case.params), *case.inputs, path=path)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)
        # weights sit in the rectangles given
        for name, (r, c, h, w) in GOOD.items():
            for t in exe.plans[name].params:
                a = state.memory[f"{name}:{t.path}"]
                assert r <= a.rect.row and a.rect.row + a.rect.height <= r + h
                assert c <= a.rect.col and a.rect.col + a.rect.width <= c + w


def test_with_placement_is_the_compile_with_that_placement(mlp):
    """`compiler.with_placement` lays an existing plan out again: the same plan, report and figures a compile with
    that placement gives, and a bad placement is refused as compile refuses it."""
    case, _ = mlp
    auto = compiler.compile(*case.trace_args(), spec=SPEC)
    plan = compiler.with_placement(auto, GOOD)
    direct = _compile_mlp(case, GOOD)
    assert plan.placement == direct.placement
    assert compiler.estimate(plan).to_dict() == direct.report.to_dict()
    assert compiler.estimate(compiler.with_placement(plan, auto.placement)).to_dict() == auto.report.to_dict()
    with pytest.raises(compiler.PlacementError):
        compiler.with_placement(auto, {**GOOD, "dense_1": (0, 3, 3, 5)})  # overlaps dense_0


def test_hand_placement_accepts_rects(mlp):
    case, _ = mlp
    exe = _compile_mlp(case, {k: wafer.Rect(*v) for k, v in GOOD.items()})
    assert exe.placement == {k: wafer.Rect(*v) for k, v in GOOD.items()}


BAD = {
    "overlap": ({**GOOD, "dense_1": (2, 5, 3, 5)}, ["dense_0", "dense_1", "overlap"]),
    "missing": ({k: v for k, v in GOOD.items() if k != "dense_2"}, ["dense_2"]),
    "unknown": ({**GOOD, "dense_7": (12, 0, 1, 1)}, ["dense_7", "dense_0", "dense_1", "dense_2"]),
    "outside": ({**GOOD, "dense_2": (14, 14, 4, 4)}, ["dense_2", "16x16"]),
    "negative": ({**GOOD, "dense_2": (-1, 10, 2, 2)}, ["dense_2"]),
    "empty": ({**GOOD, "dense_2": (8, 10, 0, 2)}, ["dense_2"]),
    "malformed": ({**GOOD, "dense_2": (8, 10, 2)}, ["dense_2"]),
}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_hand_placement(mlp, bad):
    case, _ = mlp
    placement, words = BAD[bad]
    with pytest.raises(compiler.PlacementError) as info:
        _compile_mlp(case, placement)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert info.value.kernel in placement or info.value.kernel in GOOD


# ---- too large for the wafer --------------------------------------------------------------------------------


def _big_dense(k: int, n: int, batch: int = 2):
    model = nn.Dense(n)
    x = jnp.ones((batch, k), jnp.float32)
    # shapes only: compiling needs no values, and 4096 x 4096 random weights would cost seconds to draw
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    return model.apply, params, x


def _numbers(msg):
    return {int(s.replace(",", "")) for s in re.findall(r"\d[\d,]*", msg)}


@pytest.mark.parametrize(
    "spec, kw",
    [
        (wafer.WaferSpec.mini(2, 2), {"placement_params": compiler.PlacementParams(reserve_io_columns=False)}),
        (wafer.WaferSpec.mini(4, 8), {}),
        (wafer.WaferSpec.mini(2, 2), {"placement": {"dense_0": (0, 0, 2, 2)}}),
    ],
    ids=["mini2x2", "mini4x8", "hand"],
)
def test_model_too_large_for_the_wafer(spec, kw):
    fn, params, x = _big_dense(4096, 4096)
    with pytest.raises((wafer.SramCapacityError, compiler.PlacementError)) as info:
        compiler.compile(fn, params, x, spec=spec, **kw)
    msg = str(info.value)
    assert "dense_0" in msg and "cores" in msg and "bytes" in msg
    weight_bytes = (4096 * 4096 + 4096) * 4
    assert weight_bytes in _numbers(msg), msg  # the weights' size
    # what one core holds for data: its SRAM less the code's reservation
    assert spec.data_bytes_per_core == spec.sram_bytes_per_core - spec.code_bytes_per_core == 48 * 1024 - 4096
    assert spec.data_bytes_per_core in _numbers(msg), msg


def test_tile_too_large_for_a_core():
    """Enough cores in total, but the tiling puts a whole 20000 x 1 column on one core: SramCapacityError
    naming the kernel, the core and the bytes."""
    fn, params, x = _big_dense(20000, 1, batch=1)
    spec = wafer.WaferSpec.mini(8, 8)
    with pytest.raises(wafer.SramCapacityError) as info:
        compiler.compile(fn, params, x, spec=spec, placement={"dense_0": (2, 3, 1, 4)})
    e = info.value
    assert "dense_0" in str(e)
    assert e.core == (2, 3)
    # its first core: the whole weight column and the bias's one word, and (a weight kernel's core holds its own
    # input chunk and partial result) the sample's 20000 inputs and its one output
    assert e.bytes_needed == (20000 + 1) * 4 + (20000 + 1) * 4 > e.bytes_free
    assert e.capacity == e.bytes_free == spec.data_bytes_per_core  # the SRAM less the code's 4 KB
    assert str(e.bytes_needed) in str(e) and "(2, 3)" in str(e)


def test_attention_projections_fit_their_rectangle():
    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128)(x))
            return nn.LayerNorm()(x + nn.Dense(128)(nn.gelu(nn.Dense(512)(x))))

    model = Encoder()
    x = jnp.ones((16, 64, 128), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    exe = compiler.compile(model.apply, params, x, spec=wafer.WaferSpec.mini(64, 64))
    assert exe.memory.occupancy().max() <= exe.spec.sram_bytes_per_core


# ---- unsupported primitives -------------------------------------------------------------------------------------


def _qr_model(params, x):
    q, _ = jnp.linalg.qr(x @ params)  # LINE: qr
    return q


def _fft_model(params, x):
    y = jnp.fft.fft(x @ params)  # LINE: fft
    return jnp.abs(y)


def _line_of(marker):
    with open(THIS_FILE) as f:
        for i, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# LINE: {marker}"):
                return i
    raise AssertionError(marker)


@pytest.mark.parametrize("fn, primitive", [(_qr_model, "qr"), (_fft_model, "fft")], ids=["qr", "fft"])
def test_unsupported_primitive(fn, primitive):
    w, x = jnp.eye(4), jnp.ones((4, 4))
    with pytest.raises(compiler.UnsupportedOpError) as info:
        compiler.compile(fn, w, x, spec=SPEC)
    e = info.value
    assert e.primitive == primitive
    where = f"{THIS_FILE}:{_line_of(primitive)}"
    assert e.source == where
    assert f"'{primitive}'" in str(e) and where in str(e)
    assert isinstance(e, wafer.UnsupportedPrimitiveError)
