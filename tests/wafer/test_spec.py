"""WaferSpec: presets, validation, hashing, and jit/grad/vmap over its leaves."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wafer
from wafer import cost

# ---- presets ---------------------------------------------------------------------------------------------------

# Figures from ../shared/DESIGN.md, "Hardware facts".
PRESET_FIGURES = {
    "WSE1": dict(rows=633, cols=633, sram_bytes_per_core=48 * 1024, simd_fmac_fp16=4.0),
    "WSE2": dict(
        rows=757,
        cols=996,
        sram_bytes_per_core=48 * 1024,
        sram_banks=8,
        router_colors=24,
        reserved_colors=6,
        code_bytes_per_core=4 * 1024,
        memcpy_cols_west=3,
        memcpy_cols_east=2,
        simd_fmac_fp16=4.0,
        simd_fmac_mixed=2.0,
        simd_alu_fp32=2.0,
        clock_hz=850e6,
        link_bits_per_cycle=32.0,
        ramp_bits_per_cycle=32.0,
        hop_latency_cycles=1.0,
        ramp_latency_cycles=2.0,
        # two 64-bit reads and one 64-bit write per cycle [LIE]
        sram_read_bytes_per_cycle=16.0,
        sram_write_bytes_per_cycle=8.0,
        instr_startup_cycles=14.3,
        task_cycles=10.0,
        edge_io_bits_per_s=1.2e12,
        overlap=True,
    ),
    "WSE3": dict(
        rows=762, cols=1172, sram_bytes_per_core=48 * 1024, simd_fmac_fp16=8.0, simd_fmac_mixed=4.0, simd_alu_fp32=4.0
    ),
}


@pytest.mark.parametrize("preset", list(PRESET_FIGURES), ids=list(PRESET_FIGURES))
def test_preset_figures(preset):
    spec = getattr(wafer, preset)
    for field, expected in PRESET_FIGURES[preset].items():
        assert getattr(spec, field) == expected, field
    assert spec.cores == spec.rows * spec.cols
    assert spec.sram_words_per_core == 12 * 1024
    assert spec.data_bytes_per_core == 44 * 1024  # 4 KB kept for code


def test_wse2_totals_match_public_figures():
    # 757 x 996 programmer-visible cores of the marketed 850,000; ~37 GB of the marketed 40 GB.
    assert wafer.WSE2.cores == 753_972
    assert wafer.WSE2.sram_bytes_total == 753_972 * 48 * 1024
    np.testing.assert_allclose(wafer.WSE2.sram_bytes_total, 40e9, rtol=0.1)
    np.testing.assert_allclose(wafer.WSE2.peak_flops("fp16"), 753_972 * 4 * 2 * 850e6, rtol=1e-12)


def test_simd_width_lookup():
    s = wafer.WSE2
    assert s.simd_width("fmac", "fp16") == 4.0
    assert s.simd_width("fmac", "mixed") == 2.0
    assert s.simd_width("alu", "fp32") == 2.0
    assert s.simd_width("alu", "mixed") == s.simd_alu_fp32
    with pytest.raises(ValueError, match="op_class"):
        s.simd_width("special", "fp32")


def test_describe_is_json_serialisable():
    d = wafer.WSE3.describe()
    json.dumps(d)
    assert d["rows"] == 762 and d["cores"] == 762 * 1172 and d["name"] == "WSE-3"


# ---- hashing and jit ---------------------------------------------------------------------------------------------


def test_hashable_and_equal_by_value():
    a = wafer.WaferSpec.mini(4, 4)
    b = wafer.WaferSpec.mini(4, 4)
    assert a == b and hash(a) == hash(b)
    assert a != a.with_(clock_hz=1.1e9)
    assert len({a, b, wafer.WSE2}) == 2


def test_static_jit_argument_caches_by_value():
    traces = []

    def f(spec, x):
        traces.append(spec.name)
        return x * spec.clock_hz

    jf = jax.jit(f, static_argnums=0)
    x = jnp.float32(2.0)
    np.testing.assert_allclose(jf(wafer.WaferSpec.mini(2, 3), x), 2.0 * 850e6, rtol=1e-6)
    jf(wafer.WaferSpec.mini(2, 3), x)  # equal spec: cache hit
    np.testing.assert_allclose(jf(wafer.WaferSpec.mini(2, 3, clock_hz=1e9), x), 2e9, rtol=1e-6)
    assert traces == ["mini-2x3", "mini-2x3"]


def test_traced_spec_argument_under_jit():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(spec):
        return cost.transfer_cycles(spec, 10.0, 3)

    np.testing.assert_allclose(f(wafer.WSE2), 13.0, rtol=1e-6)
    np.testing.assert_allclose(f(wafer.WSE2.with_(hop_latency_cycles=2.0)), 16.0, rtol=1e-6)


# ---- validation ------------------------------------------------------------------------------------------------

BAD_VALUES = {
    "rows=0": ("rows", 0),
    "rows=2.5": ("rows", 2.5),
    "rows=True": ("rows", True),
    "cols=-1": ("cols", -1),
    "sram_bytes_per_core=6": ("sram_bytes_per_core", 6),
    "sram_bytes_per_core=0": ("sram_bytes_per_core", 0),
    "sram_banks=0": ("sram_banks", 0),
    "router_colors=0": ("router_colors", 0),
    "reserved_colors=24": ("reserved_colors", 24),  # every colour reserved: none left to route
    "code_bytes_per_core=6": ("code_bytes_per_core", 6),
    "code_bytes_per_core=48K": ("code_bytes_per_core", 48 * 1024),  # no room left for data
    "memcpy_cols_west=-1": ("memcpy_cols_west", -1),
    "clock_hz=0": ("clock_hz", 0),
    "clock_hz='fast'": ("clock_hz", "fast"),
    "simd_fmac_fp16=0": ("simd_fmac_fp16", 0),
    "simd_alu_int=-2": ("simd_alu_int", -2.0),
    "special_cycles=-1": ("special_cycles", -1.0),
    "instr_startup_cycles=-1": ("instr_startup_cycles", -1.0),
    "task_cycles=-1": ("task_cycles", -1.0),
    "sram_read_bytes_per_cycle=0": ("sram_read_bytes_per_cycle", 0.0),
    "link_bits_per_cycle=0": ("link_bits_per_cycle", 0),
    "hop_latency_cycles=-1": ("hop_latency_cycles", -1.0),
    "ramp_bits_per_cycle=0": ("ramp_bits_per_cycle", 0),
    "ramp_latency_cycles=-1": ("ramp_latency_cycles", -1.0),
    "edge_io_bits_per_s=True": ("edge_io_bits_per_s", True),
    "overlap='yes'": ("overlap", "yes"),
    "overlap=1": ("overlap", 1),
}


@pytest.mark.parametrize("field,value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"WaferSpec\.{field}\b"):
        wafer.WaferSpec(**{field: value})
    with pytest.raises(ValueError, match=rf"WaferSpec\.{field}\b"):
        wafer.WSE2.with_(**{field: value})


def test_mini_and_overrides():
    s = wafer.WaferSpec.mini(3, 5)
    assert (s.rows, s.cols, s.name) == (3, 5, "mini-3x5")
    # Everything but the grid is WSE-2.
    for f in dataclasses.fields(s):
        if f.name not in ("rows", "cols", "name"):
            assert getattr(s, f.name) == getattr(wafer.WSE2, f.name), f.name
    t = wafer.WaferSpec.mini(2, 2, clock_hz=1.1e9, overlap=False, name="fast")
    assert (t.clock_hz, t.overlap, t.name) == (1.1e9, False, "fast")
    with pytest.raises(ValueError, match="rows"):
        wafer.WaferSpec.mini(0, 4)
    with pytest.raises(ValueError, match="link_bits_per_cycle"):
        wafer.WaferSpec.mini(2, 2, link_bits_per_cycle=0.0)


def test_static_fields_are_not_leaves():
    leaves = jax.tree_util.tree_leaves(wafer.WSE2)
    assert 757 not in leaves and 996 not in leaves and 48 * 1024 not in leaves
    assert 850e6 in leaves and all(isinstance(x, float) for x in leaves)


# ---- grad and vmap over leaves -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [0, 3, 17], ids=lambda h: f"hops={h}")
def test_grad_transfer_cycles_wrt_hop_latency_is_hops(hops):
    words = 10.0
    g = jax.grad(lambda s: cost.transfer_cycles(s, words, hops))(wafer.WSE2)
    assert isinstance(g, wafer.WaferSpec)
    np.testing.assert_allclose(g.hop_latency_cycles, hops, rtol=1e-6)
    # d/d link_bits of words * 32 / link_bits = -words * 32 / link_bits**2.
    np.testing.assert_allclose(g.link_bits_per_cycle, -words * 32 / 32.0**2, rtol=1e-6)
    np.testing.assert_allclose(g.clock_hz, 0.0, atol=0)


def test_grad_compute_cycles_wrt_simd_widths():
    counts = {("fmac", "fp16"): 400.0, ("alu", "fp32"): 60.0, ("special", "fp32"): 5.0}
    g = jax.grad(lambda s: cost.compute_cycles(s, counts))(wafer.WSE2)
    np.testing.assert_allclose(g.simd_fmac_fp16, -400.0 / 4.0**2, rtol=1e-6)
    np.testing.assert_allclose(g.simd_alu_fp32, -60.0 / 2.0**2, rtol=1e-6)
    np.testing.assert_allclose(g.special_cycles, 5.0, rtol=1e-6)
    np.testing.assert_allclose(g.simd_fmac_fp32, 0.0, atol=0)


def test_grad_seconds_wrt_clock():
    g = jax.grad(lambda s: cost.seconds(s, 1000.0))(wafer.WSE2)
    np.testing.assert_allclose(g.clock_hz, -1000.0 / 850e6**2, rtol=1e-5)


def test_vmap_over_stacked_specs():
    latencies = [1.0, 2.0, 4.0]
    bits = [32.0, 16.0, 64.0]
    specs = [wafer.WSE2.with_(hop_latency_cycles=h, link_bits_per_cycle=b) for h, b in zip(latencies, bits)]
    batch = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]), *specs)
    assert batch.rows == 757 and batch.hop_latency_cycles.shape == (3,)
    out = jax.vmap(lambda s: cost.transfer_cycles(s, 8.0, 5))(batch)
    expected = [cost.transfer_cycles(s, 8.0, 5) for s in specs]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert expected == [13.0, 26.0, 24.0]
    # and the gradient per spec, vmapped
    g = jax.vmap(jax.grad(lambda s: cost.transfer_cycles(s, 8.0, 5)))(batch)
    np.testing.assert_allclose(g.hop_latency_cycles, [5.0, 5.0, 5.0], rtol=1e-6)
