"""Defect maps: the remap over spare rows and columns, its errors, the spec's static field, and the one rule that
charges a remapped path's extra hops, checked by hand counts on tiny grids (wafer/defects.py, docs/defects.md)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wafer
from wafer import defects, fabric

MINI = wafer.WaferSpec.mini(4, 6)


def _spec(*dead, links=(), **kw):
    return MINI.with_defects(dead_cores=list(dead), dead_links=list(links), **kw)


# ---- the remap ------------------------------------------------------------------------------------------------------


def test_one_dead_core_shifts_its_row_east_by_hand():
    rm = _spec((1, 2)).remap
    assert rm.phys_rows == 4 and rm.phys_cols == 6 + defects.default_spare_cols(6)
    np.testing.assert_array_equal(rm.row_of, [0, 1, 2, 3])
    np.testing.assert_array_equal(rm.col_of[1], [0, 1, 3, 4, 5, 6])  # the cores east of (1, 2) move one east
    np.testing.assert_array_equal(rm.col_of[[0, 2, 3]], np.tile(np.arange(6), (3, 1)))
    # row 1's link from logical col 1 to col 2 spans two physical hops; the vertical links into row 1's shifted
    # cores are one column off: a diagonal redundant link, one hop
    assert rm.link_extra_e[1].tolist() == [0, 1, 0, 0, 0, 0]
    assert not rm.link_extra_s.any()
    assert rm.remapped_links == 1 and rm.extra_link_hops == 1
    assert rm.spare_cols_used == 1 and rm.spare_rows_used == 0


def test_two_dead_cores_bend_the_columns_by_one_hop_each_way():
    rm = _spec((1, 0), (1, 1)).remap  # row 1 shifts two columns east
    np.testing.assert_array_equal(rm.col_of[1], np.arange(2, 8))
    assert rm.link_extra_e.sum() == 0  # row 1's own links stay adjacent
    assert rm.link_extra_s[0].tolist() == [1] * 6 and rm.link_extra_s[1].tolist() == [1] * 6
    assert defects.col_extra(rm, 3, 0, 3) == 2 and defects.col_extra(rm, 3, 1, 2) == 1
    assert defects.lane_extra(rm, 0, 0, 3, 4) == 2  # row 0 straight, column 4 down through row 1
    np.testing.assert_array_equal(defects.lane_hops(rm, [[0, 0, 3, 4], [1, 0, 1, 5]]), [4 + 3 + 2, 5])
    assert defects.line_extra(rm, 0, 0, 0, 4, 6) == 2 and defects.line_extra(rm, 0, 2, 0, 2, 6) == 0
    assert defects.line_extra(rm, 1, 0, 0, 4, 6) == 0


def test_extra_hops_of_paths_by_hand():
    rm = _spec((1, 2)).remap
    assert defects.row_extra(rm, 1, 0, 5) == 1 and defects.row_extra(rm, 1, 5, 0) == 1  # either direction
    assert defects.row_extra(rm, 1, 2, 5) == 0 and defects.row_extra(rm, 0, 0, 5) == 0
    assert defects.col_extra(rm, 3, 0, 3) == 0
    assert defects.lane_extra(rm, 1, 0, 3, 4) == 1  # along row 1 past the dead core, then down column 4
    np.testing.assert_array_equal(defects.lane_hops(rm, [[0, 0, 3, 4], [1, 0, 1, 5]]), [4 + 3, 5 + 1])
    assert defects.line_extra(rm, 1, 0, 0, 4, 6) == 1 and defects.line_extra(rm, 1, 2, 0, 2, 6) == 0
    assert defects.line_extra(rm, 1, 0, 2, 4, 4) == 0  # east of the dead core row 1 is straight


def test_line_extra_is_array_generic_and_jits():
    rm = _spec((1, 2)).remap
    args = [np.array([0.0, 2.0, 0.0]), np.array([0.0, 0.0, 3.0]), np.array([4.0, 2.0, 4.0]), np.array([6.0, 6, 3])]
    want = defects.line_extra(rm, 1, *args)
    np.testing.assert_array_equal(want, [1, 0, 0])
    got = jax.jit(lambda *a: defects.line_extra(rm, 1, *a))(*(jnp.asarray(a, jnp.float32) for a in args))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_dead_link_retires_its_east_or_south_core():
    a = _spec(links=[(2, 3, "E")]).remap
    b = _spec(links=[(2, 4, "W")]).remap  # the same link, named from the other end
    assert a.dead[2, 4] and a.dead.sum() == 1
    np.testing.assert_array_equal(a.col_of, b.col_of)
    s = _spec(links=[(0, 5, "S")]).remap
    assert s.dead[1, 5] and s.dead.sum() == 1
    assert _spec(links=[(0, 5, "S")]).defects.dead_links == ((0, 5, "S"),)


def test_too_many_defects_in_a_row_retires_it_with_a_spare_row():
    spec = _spec((1, 0), (1, 1), (1, 2), spare_cols=2, spare_rows=1)
    rm = spec.remap
    np.testing.assert_array_equal(rm.row_of, [0, 2, 3, 4])
    assert rm.retired_rows == (1,) and rm.spare_rows_used == 1
    assert rm.link_extra_s[0].tolist() == [1] * 6  # logical rows 0 and 1 are physical rows 0 and 2
    assert rm.link_extra_s[1:].sum() == 0


def test_a_map_the_spares_cannot_hide_raises_a_named_error():
    with pytest.raises(wafer.DefectError, match=r"rows \[1\].*spare_cols >= 3 or spare_rows >= 1") as e:
        _spec((1, 0), (1, 1), (1, 2), spare_cols=2)
    assert isinstance(e.value, wafer.SpecError) and e.value.rows == (1,) and e.value.needed_spare_cols == 3
    with pytest.raises(wafer.DefectError, match="outside the physical"):
        _spec((9, 0))
    with pytest.raises(wafer.DefectError, match="direction"):
        _spec(links=[(0, 0, "X")])
    with pytest.raises(wafer.DefectError, match="rate"):
        MINI.with_defects(rate=1.5)
    with pytest.raises(wafer.SpecError, match="DefectMap"):
        MINI.with_(defects="many")


def test_random_maps_are_deterministic_and_near_the_rate():
    big = wafer.WaferSpec.mini(64, 64)
    a = big.with_defects(rate=0.01, seed=3, spare_cols=4)
    b = big.with_defects(rate=0.01, seed=3, spare_cols=4)
    c = big.with_defects(rate=0.01, seed=4, spare_cols=4)
    assert a == b and hash(a) == hash(b) and a != c
    n = len(a.defects.dead_cores)
    assert 0.5 * 0.01 * 64 * 68 < n < 1.5 * 0.01 * 64 * 68
    assert MINI.with_defects(rate=0.0).remap.dead.sum() == 0


# ---- the spec ---------------------------------------------------------------------------------------------------


def test_spec_stays_static_hashable_and_differentiable():
    spec = _spec((1, 2))
    assert spec.rows == 4 and spec.cols == 6 and spec.cores == 24  # programs see the whole logical grid
    assert MINI.defects is None and MINI.remap is None and "defects" not in MINI.describe()
    d = spec.describe()
    json.dumps(d)
    assert d["defects"]["dead_cores"] == 1
    traces = []

    @jax.jit
    def f(s):
        traces.append(1)
        return s.clock_hz * s.hop_latency_cycles

    assert float(f(spec)) == float(f(spec)) and len(traces) == 1
    g = jax.grad(lambda s: s.hop_latency_cycles * 3.0)(spec)
    assert float(g.hop_latency_cycles) == 3.0 and g.defects == spec.defects
    assert len({spec, _spec((1, 2)), MINI}) == 2


# ---- the fabric charges the extra hops ------------------------------------------------------------------------------


def test_multicast_across_one_dead_core_costs_exactly_one_more_hop():
    row = wafer.WaferSpec.mini(1, 8)
    bad = row.with_defects(dead_cores=[(0, 3)])
    x = jnp.ones((1, 8, 1))  # one word per core: the latency term sets the cycles
    y, t = wafer.multicast(x, "row", src=0)
    assert float(t.cycles(row)) == 1 + 7 * row.hop_latency_cycles  # mean words + 7 hops
    assert float(t.cycles(bad)) - float(t.cycles(row)) == bad.hop_latency_cycles
    assert float(t.cycles(bad.with_(hop_latency_cycles=3.0))) - float(t.cycles(row.with_(hop_latency_cycles=3.0))) == 3
    np.testing.assert_array_equal(y, x)  # numerics unchanged
    # a shift by one hop only crosses the remapped link once: one extra hop too
    _, s = wafer.shift(x, "E", 1)
    assert float(s.cycles(bad)) - float(s.cycles(row)) == 1
    # a region placed beyond the dead core does not pay
    _, t4 = wafer.multicast(jnp.ones((1, 4, 1)), "row", src=0)
    assert float(t4.at(0, 4).cycles(bad)) == float(t4.at(0, 4).cycles(row))
    assert float(t4.at(0, 0).cycles(bad)) == float(t4.at(0, 0).cycles(row)) + 1


@pytest.mark.parametrize("pattern", fabric.REDUCE_PATTERNS)
@pytest.mark.parametrize("to", ["first", "last"])
def test_closed_forms_equal_the_records_with_defects(pattern, to):
    spec = wafer.WaferSpec.mini(6, 9).with_defects(dead_cores=[(1, 4), (3, 1), (4, 6), (2, 2)], spare_cols=2)
    rm = spec.remap
    for axis, shape in ((1, (3, 7, 2)), (0, (5, 4, 2))):
        x = jnp.ones(shape)
        r0, c0 = 1, 1
        h, w = shape[:2]
        n = shape[axis]
        extra = float(defects.line_extra(rm, axis, r0, c0, h, w))
        _, t = wafer.reduce(x, axis, to=to, pattern=pattern)
        words = fabric.words_per_core(x)
        want = fabric.reduce_cycles(n, words, spec, pattern=pattern, to=to, extra_hops=extra)
        np.testing.assert_allclose(float(t.at(r0, c0).cycles(spec)), want, rtol=1e-12, err_msg=f"{axis}")
        _, m = wafer.multicast(x, axis, src=to)
        want = fabric.multicast_cycles(n, words, spec, src=to, extra_hops=extra)
        np.testing.assert_allclose(float(m.at(r0, c0).cycles(spec)), want, rtol=1e-12)


def test_traffic_outside_the_grid_is_a_clear_error():
    bad = wafer.WaferSpec.mini(1, 8).with_defects(dead_cores=[(0, 3)])
    _, t = wafer.multicast(jnp.ones((1, 8, 1)), "row")
    with pytest.raises(ValueError, match="outside the 1x8 grid"):
        t.at(0, 2).cycles(bad)
