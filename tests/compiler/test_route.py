"""Routing: lanes between rectangles, X-then-Y paths, link loads, host I/O, contention, errors."""

import time

import numpy as np
import pytest

import wafer
from compiler.plan.place import KernelDemand, PlacementParams, place
from compiler.plan.route import (
    HOST,
    RouteError,
    Routes,
    flow_lanes,
    flow_shares,
    lane_loads,
    route,
    route_with_shares,
)
from wafer import cost
from wafer.fabric import Traffic
from wafer.memory import Rect

N, E, S, W = range(4)
ROW = wafer.WaferSpec.mini(1, 10, memcpy_cols_west=0, memcpy_cols_east=0)


def reference_loads(routes: Routes) -> np.ndarray:
    """Walk every lane core by core (plain Python): the words each core sends per direction."""
    out = np.zeros((4, routes.rows, routes.cols))
    for key, lanes in routes.paths.items():
        for path in lanes:
            for (r0, c0), (r1, c1) in zip(path, path[1:]):
                d = {(0, 1): E, (0, -1): W, (1, 0): S, (-1, 0): N}[(r1 - r0, c1 - c0)]
                out[d, r0, c0] += routes.lane_words[key]
    return out


def test_one_row_by_hand():
    placement = {"a": Rect(0, 0, 1, 2), "b": Rect(0, 5, 1, 3)}
    r = route(placement, [("a", "b", 6.0), (HOST, "a", 2.0), ("b", HOST, 1.0)], ROW)
    lw = r.link_words()
    # a's east edge (col 1) sends to b's west edge (col 5): cols 1..4 carry 6 words east.
    # b's east edge (col 7) streams to the grid's east edge (col 9): cols 7, 8 carry 1 word east.
    # The host enters at col 0, which is a's west edge: no link crossed.
    np.testing.assert_array_equal(lw[E, 0], [0, 6, 6, 6, 6, 0, 0, 1, 1, 0])
    assert lw[N].sum() == lw[S].sum() == lw[W].sum() == 0
    assert r.hops == {("a", "b"): 4, (HOST, "a"): 0, ("b", HOST): 2}
    assert r.paths[("a", "b")] == [[(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]]
    assert r.max_link_words == 6.0
    # ramps: a's core (0, 1) puts the 6 words on, b's (0, 5) takes them off; a's (0, 0) takes the host's 2 in and
    # b's (0, 7) puts its 1 on (the host's ends are the edge I/O's): the busiest ramp carries 6
    ramps = r.traffic.ramp_words(1, 10)
    np.testing.assert_array_equal(ramps[0, 0], [2, 0, 0, 0, 0, 6, 0, 0, 0, 0])
    np.testing.assert_array_equal(ramps[1, 0], [0, 6, 0, 0, 0, 0, 0, 1, 0, 0])
    # one phase: max(busiest ramp 6, busiest link 6, mean link words (4 x 6 + 2 x 1) / 6 links + 4 hops)
    assert r.cycles(ROW) == 26 / 6 + 4 == cost.transfer_cycles(ROW, 6.0, 4, ramp_words=6.0, mean_words=26 / 6)


def test_westward_and_host_columns():
    spec = wafer.WaferSpec.mini(1, 12)  # 3 memcpy columns west, 2 east
    r = route({"a": Rect(0, 8, 1, 2), "b": Rect(0, 3, 1, 2)}, [("a", "b", 3.0), (HOST, "b", 5.0)], spec)
    lw = r.link_words()
    np.testing.assert_array_equal(lw[W, 0], [0, 0, 0, 0, 0, 3, 3, 3, 3, 0, 0, 0])
    np.testing.assert_array_equal(lw[E, 0], [5, 5, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert r.hops == {("a", "b"): 4, (HOST, "b"): 3}


def test_x_then_y():
    spec = wafer.WaferSpec.mini(6, 8)
    # Diagonal neighbours: out of a's east edge, X first, then Y into b's north edge.
    r = route({"a": Rect(0, 0, 1, 1), "b": Rect(3, 4, 1, 1)}, [("a", "b", 2.0)], spec)
    assert r.paths[("a", "b")] == [[(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 4), (2, 4), (3, 4)]]
    lw = r.link_words()
    assert lw[E, 0, :4].tolist() == [2, 2, 2, 2] and lw[S, :3, 4].tolist() == [2, 2, 2]
    assert lw.sum() == 2 * 7 and r.hops[("a", "b")] == 7
    # Going back north-west: X (west) along the source row first, then north.
    r = route({"a": Rect(0, 0, 1, 1), "b": Rect(3, 4, 1, 1)}, [("b", "a", 1.0)], spec)
    assert r.paths[("b", "a")] == [[(3, 4), (3, 3), (3, 2), (3, 1), (3, 0), (2, 0), (1, 0), (0, 0)]]
    lw = r.link_words()
    assert lw[W, 3, 1:5].tolist() == [1] * 4 and lw[N, 1:4, 0].tolist() == [1] * 3


def test_vertical_neighbours_use_south_edge():
    # b below a, sharing columns 2..3: one straight lane per shared column, from a's south edge.
    placement = {"a": Rect(0, 0, 2, 4), "b": Rect(4, 2, 2, 4)}
    r = route(placement, [("a", "b", 4.0)], wafer.WaferSpec.mini(6, 6))
    np.testing.assert_array_equal(r.lanes[("a", "b")], [[1, 2, 4, 2], [1, 3, 4, 3]])
    lw = r.link_words()
    assert lw[S, 1:4, 2].tolist() == [2, 2, 2] and lw[S, 1:4, 3].tolist() == [2, 2, 2]
    assert lw.sum() == 4 * 3


@pytest.mark.parametrize(
    "lanes,count",
    [("auto", 3), ("min", 4), ("single", 1)],
    ids=["auto", "min", "single"],
)
def test_lane_modes(lanes, count):
    # Side by side, rows 2..4 shared; src 4 rows high, dst 6.
    src, dst = Rect(1, 0, 4, 2), Rect(2, 5, 6, 2)
    ends = flow_lanes(src, dst, lanes=lanes)
    assert len(ends) == count
    assert np.all(ends[:, 1] == 1) and np.all(ends[:, 3] == 5)  # east edge -> west edge
    assert np.all((ends[:, 0] >= 1) & (ends[:, 0] < 5)) and np.all((ends[:, 2] >= 2) & (ends[:, 2] < 8))
    if lanes == "auto":
        assert ends[:, 0].tolist() == ends[:, 2].tolist() == [2, 3, 4]
    if lanes == "min":
        assert ends[:, 0].tolist() == [1, 2, 3, 4] and ends[:, 2].tolist() == [2, 4, 5, 7]


@pytest.mark.parametrize(
    "dst,expected",
    [
        (Rect(5, 3, 4, 2), [[0, 1, 5, 4], [1, 1, 5, 3]]),  # south-east: top row turns at the far (east) column
        (Rect(5, -4, 4, 2), [[0, 0, 5, -4], [1, 0, 5, -3]]),  # south-west
        (Rect(-6, 3, 4, 2), [[1, 1, -3, 4], [0, 1, -3, 3]]),  # north-east: bottom row turns farthest east
    ],
    ids=["south-east", "south-west", "north-east"],
)
def test_diagonal_corner_lanes(dst, expected):
    src = Rect(0, 0, 2, 2)
    np.testing.assert_array_equal(flow_lanes(src, dst), expected)
    # Corner lanes never share a link.
    shifted = {"a": Rect(src.row + 6, src.col + 4, 2, 2), "b": Rect(dst.row + 6, dst.col + 4, dst.height, dst.width)}
    r = route(shifted, [("a", "b", 4.0)], wafer.WaferSpec.mini(16, 12))
    assert r.max_link_words == 2.0


def test_corner_lanes_on_wide_rectangles():
    # 20 lanes from a tall source's east edge into a wide destination's north edge: disjoint, 1/20 each.
    r = route({"a": Rect(0, 0, 20, 5), "b": Rect(30, 10, 5, 40)}, [("a", "b", 20.0)], wafer.WaferSpec.mini(40, 60))
    assert len(r.lanes[("a", "b")]) == 20 and r.max_link_words == 1.0
    assert r.link_words().max() == 1.0


@pytest.mark.parametrize("order", ["serpentine", "rows", "columns"])
def test_words_conserved_and_match_reference(order):
    spec = wafer.WaferSpec.mini(24, 40)
    names = [f"k{i}" for i in range(9)]
    placement = place([KernelDemand(n, 1.0 + i % 3) for i, n in enumerate(names)], spec, PlacementParams(order=order))
    flows = [(HOST, names[0], 7.0)] + [(a, b, 10.0 + i) for i, (a, b) in enumerate(zip(names, names[1:]))]
    flows += [(names[-1], HOST, 3.0), (names[0], names[5], 2.5)]  # a skip connection
    r = route(placement, flows, spec)
    lw = r.link_words()
    hops_total = sum(r.lane_words[k] * (len(p) - 1) for k, ps in r.paths.items() for p in ps)
    assert lw.sum() == pytest.approx(hops_total, rel=1e-12)
    assert r.traffic.words == pytest.approx(hops_total, rel=1e-12)
    np.testing.assert_allclose(lw, reference_loads(r), rtol=1e-12)
    assert r.max_link_words == pytest.approx(lw.max())
    assert all(r.hops[k] == max(len(p) - 1 for p in ps) for k, ps in r.paths.items())
    # Each lane starts on the source's edge and ends on the destination's edge.
    for (a, b), ps in r.paths.items():
        for p in ps:
            if a != HOST:
                assert placement[a].row <= p[0][0] < placement[a].row + placement[a].height
            if b != HOST:
                rb = placement[b]
                assert rb.row <= p[-1][0] < rb.row + rb.height and rb.col <= p[-1][1] < rb.col + rb.width


def test_shared_links_add_up():
    placement = {"a": Rect(0, 0, 1, 1), "b": Rect(0, 3, 1, 1), "c": Rect(0, 6, 1, 1)}
    alone = route(placement, [("a", "c", 2.0)], ROW).link_words()
    both = route(placement, [("a", "c", 2.0), ("a", "b", 5.0)], ROW)
    np.testing.assert_array_equal(both.link_words()[E, 0, :6], [7, 7, 7, 2, 2, 2])
    assert both.max_link_words == 7.0
    # Same pair twice: one flow carrying the sum.
    twice = route(placement, [("a", "c", 1.0), ("a", "c", 1.0)], ROW)
    np.testing.assert_array_equal(twice.link_words(), alone)
    assert list(twice.hops) == [("a", "c")]


@pytest.mark.parametrize("groups", [False, True], ids=["unicast", "multicast"])
def test_route_with_shares_is_route_and_flow_shares(groups):
    spec = wafer.WaferSpec.mini(24, 40)
    names = [f"k{i}" for i in range(9)]
    placement = place([KernelDemand(n, 1.0 + i % 3) for i, n in enumerate(names)], spec, PlacementParams())
    flows = [(HOST, names[0], 7.0)] + [(a, b, 10.0 + i) for i, (a, b) in enumerate(zip(names, names[1:]))]
    flows += [(names[-1], HOST, 3.0), (names[0], names[5], 2.5), (names[0], names[2], 0.0), (names[1], names[3], 4.0)]
    g = [(s if s == names[0] else (s, d)) for s, d, _ in flows] if groups else None
    got, shares = route_with_shares(placement, flows, spec, groups=g)
    want = route(placement, flows, spec, groups=g)
    np.testing.assert_array_equal(shares, flow_shares(want, [(s, d) for s, d, _ in flows]))
    assert got.max_link_words == want.max_link_words == want.traffic.phases[0].max_link_words
    np.testing.assert_array_equal(got.link_words(), want.link_words())
    assert (shares > 1).any()


def test_traffic_is_one_phase_of_bounding_boxes():
    spec = wafer.WaferSpec.mini(10, 10)
    placement = {"a": Rect(0, 0, 2, 2), "b": Rect(0, 4, 2, 2), "c": Rect(6, 4, 2, 2)}
    r = route(placement, [("a", "b", 1.0), ("b", "c", 1.0)], spec)
    assert isinstance(r.traffic, Traffic) and len(r.traffic.phases) == 1
    phase = r.traffic.phases[0]
    # per part: the six channels (N, E, S, W links, then the ramp in and out) over the flow's bounding box
    assert [(r0, c0, w.shape) for r0, c0, w in phase.parts] == [(0, 1, (6, 2, 4)), (1, 4, (6, 6, 2))]
    assert phase.hops == 5
    np.testing.assert_array_equal(r.link_words(), r.traffic.link_words(10, 10))
    # a -> b: two lanes of 1/2 word over 3 east links each; b -> c: two lanes of 1/2 over 5 south links each; every
    # lane's ends take 1/2 on or off their ramp. Busiest link and ramp 1/2, mean link load 1/2 over the 16 links in
    # use, the longest lane 5 hops: max(1/2, 1/2 + 5)
    assert r.max_link_words == 0.5 and phase.max_ramp_words == 0.5 and phase.mean_link_words == 0.5
    assert r.traffic.cycles(spec) == r.cycles(spec) == 0.5 + 5 == cost.transfer_cycles(spec, 0.5, 5, ramp_words=0.5)
    assert route(placement, [], spec).traffic.phases == ()


def test_lane_loads_counts():
    top, left, counts = lane_loads(np.array([[2, 1, 0, 3], [2, 3, 2, 3]]))
    assert (top, left) == (0, 1) and counts.shape == (4, 3, 3)
    assert counts[E, 2].tolist() == [1, 1, 0] and counts[N, :, 2].tolist() == [0, 1, 1]
    assert counts.sum() == 4


def test_hundred_flows_on_wse2_fast():
    rng = np.random.default_rng(0)
    demands = [KernelDemand(f"k{i}", float(w)) for i, w in enumerate(10 ** rng.uniform(0, 3, 100))]
    placement = place(demands, wafer.WSE2)
    flows = [(HOST, "k0", 784.0)] + [(f"k{i}", f"k{i + 1}", 1000.0) for i in range(99)] + [("k99", HOST, 10.0)]
    t = time.perf_counter()
    r = route(placement, flows, wafer.WSE2)
    assert time.perf_counter() - t < 0.5
    assert len(r.hops) == 101 and r.max_link_words > 0


@pytest.mark.parametrize(
    "flows,match",
    [
        ([("a", "z", 1.0)], "'z', which is not in the placement"),
        ([(HOST, HOST, 1.0)], "from a kernel to itself"),
        ([("a", "a", 1.0)], "from a kernel to itself"),
        ([("a", "b", -1.0)], "words must be >= 0"),
        ([("a", "b", float("inf"))], "finite number"),
        ([("a", "b")], r"\(src, dst, words per sample\)"),
    ],
    ids=["unknown", "host-host", "self", "negative", "inf", "malformed"],
)
def test_bad_flows(flows, match):
    with pytest.raises(RouteError, match=match):
        route({"a": Rect(0, 0, 1, 1), "b": Rect(0, 2, 1, 1)}, flows, ROW)


def test_bad_placements_and_modes():
    with pytest.raises(RouteError, match="overlap"):
        route({"a": Rect(0, 0, 1, 3), "b": Rect(0, 2, 1, 2)}, [("a", "b", 1.0)], ROW)
    with pytest.raises(RouteError, match="not inside the 1x10 grid"):
        route({"a": Rect(0, 0, 1, 3), "b": Rect(0, 8, 1, 4)}, [("a", "b", 1.0)], ROW)
    with pytest.raises(RouteError, match="named 'host'"):
        route({"host": Rect(0, 0, 1, 1)}, [], ROW)
    with pytest.raises(ValueError, match="lanes must be one of"):
        route({}, [], ROW, lanes="many")
