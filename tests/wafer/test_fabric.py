"""Fabric primitives: data against plain-jnp references, gradients, link counts, contention and cycles.

The data references are written with different ops than the library (roll + mask, pad + slice, one-hot
contractions). The link-count reference is a router walk: every stream starts at its source and is counted once
on each outgoing link it crosses, so forwarded words are included and a multicast stream is counted once.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import wafer
from wafer import Traffic, halo_exchange, multicast, reduce, shift

H, W, Z = 4, 5, 3
STEP = {"N": (-1, 0), "E": (0, 1), "S": (1, 0), "W": (0, -1)}
DIR = {d: i for i, d in enumerate(wafer.DIRECTIONS)}


def rand(seed, shape=(H, W, Z), dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# Cotangent weights, drawn once (drawing per output shape would compile a sampler per shape).
WEIGHTS = np.asarray(jax.random.normal(jax.random.key(99), (1 << 14,), jnp.float32))


def weighted_sum(tree, seed):
    """A random-weighted sum of every output: its gradient is the gradient for a random cotangent."""
    total, start = 0.0, 97 * seed
    for x in jax.tree_util.tree_leaves(tree):
        wts = WEIGHTS[start : start + x.size].reshape(x.shape)
        total, start = total + jnp.sum(wts.astype(x.dtype) * x), start + x.size
    return total


def assert_matches_ref(fn, ref, x, *, data_rtol=0.0, seed=99):
    """fn(x) equals ref(x) (exactly by default: both only move data) and so does the gradient of a
    random-weighted sum of the outputs (rtol 1e-6 in float32)."""
    both = lambda f: (f(x), jax.grad(lambda x: weighted_sum(f(x), seed))(x))
    (y, g), (y_ref, g_ref) = both(fn), both(ref)
    chex.assert_trees_all_close(y, y_ref, rtol=data_rtol, atol=data_rtol)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
    return y


def traffic_of(fn, x):
    """The Traffic record of `fn(x) -> (data, traffic)`, from tracing alone: traffic is fixed by shapes."""
    box = []
    jax.eval_shape(lambda x: box.append(fn(x)[1]), x)
    return box[0]


# ---- references --------------------------------------------------------------------------------------------------


def ref_shift(x, d, k, fill=0.0):
    dr, dc = STEP[d]
    h, w = x.shape[:2]
    rolled = jnp.roll(x, (dr * k, dc * k), axis=(0, 1))
    r = np.arange(h)[:, None] - dr * k
    c = np.arange(w)[None, :] - dc * k
    valid = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    return jnp.where(valid.reshape(h, w, *([1] * (x.ndim - 2))), rolled, fill)


def ref_multicast(x, axis, s):
    n = x.shape[axis]
    pick = jnp.asarray(np.eye(n)[s % n])  # one-hot over the line
    if axis == 1:
        line = jnp.einsum("rc...,c->r...", x, pick)
        return jnp.broadcast_to(line[:, None], x.shape)
    line = jnp.einsum("rc...,r->c...", x, pick)
    return jnp.broadcast_to(line[None], x.shape)


def ref_reduce(x, axis, op):
    line_last = jnp.moveaxis(x, axis, -1)
    if op == "sum":
        out = jnp.tensordot(line_last, jnp.ones(x.shape[axis], x.dtype), axes=1)
    else:  # the extreme element of the sorted line (sort is differentiable: the gradient goes to that element)
        out = jnp.sort(line_last, axis=-1)[..., -1 if op == "max" else 0]
    return jnp.expand_dims(out, axis)


def ref_halo(x, radius, fill=0.0):
    h, w = x.shape[:2]
    p = jnp.pad(x, ((radius, radius), (radius, radius)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    R = radius
    out = {
        "N": [p[R - j : R - j + h, R : R + w] for j in range(1, R + 1)],
        "S": [p[R + j : R + j + h, R : R + w] for j in range(1, R + 1)],
        "W": [p[R : R + h, R - j : R - j + w] for j in range(1, R + 1)],
        "E": [p[R : R + h, R + j : R + j + w] for j in range(1, R + 1)],
    }
    return {k: v[0] if R == 1 else jnp.stack(v) for k, v in out.items()}


def walk(h, w, streams):
    """Link loads [4, h, w] of streams (row, col, direction, hops, words), each counted once per link crossed."""
    loads = np.zeros((4, h, w))
    for r, c, d, hops, words in streams:
        dr, dc = STEP[d]
        for _ in range(hops):
            assert 0 <= r + dr < h and 0 <= c + dc < w, "a reference stream left the region"
            loads[DIR[d], r, c] += words
            r, c = r + dr, c + dc
    return loads


def cores(h, w):
    return [(r, c) for r in range(h) for c in range(w)]


def shift_streams(h, w, d, k, words):
    dr, dc = STEP[d]
    return [(r, c, d, k, words) for r, c in cores(h, w) if 0 <= r + dr * k < h and 0 <= c + dc * k < w]


def multicast_streams(h, w, axis, s, words):
    if axis == 1:
        return [st for r in range(h) for st in ((r, s, "E", w - 1 - s, words), (r, s, "W", s, words))]
    return [st for c in range(w) for st in ((s, c, "S", h - 1 - s, words), (s, c, "N", s, words))]


def reduce_streams(h, w, axis, d, words):
    out = []
    for r, c in cores(h, w):
        i = (r, c)[axis]
        if i != d:
            towards = ("S" if i < d else "N") if axis == 0 else ("E" if i < d else "W")
            out.append((r, c, towards, 1, words))
    return out


def halo_streams(h, w, radius, words):
    reach = {"N": lambda r, c: r, "S": lambda r, c: h - 1 - r, "W": lambda r, c: c, "E": lambda r, c: w - 1 - c}
    return [(r, c, d, min(radius, reach[d](r, c)), words) for r, c in cores(h, w) for d in STEP]


# ---- shift -------------------------------------------------------------------------------------------------------

SHIFTS = [(d, k) for d in "NESW" for k in (1, 2, 3)] + [("N", 4), ("S", 7), ("E", 5), ("W", 6)]


@pytest.mark.parametrize("d,k", SHIFTS, ids=[f"{d}{k}" for d, k in SHIFTS])
def test_shift_data_and_grad(d, k):
    assert_matches_ref(lambda x: shift(x, d, k)[0], lambda x: ref_shift(x, d, k), rand(0))


@pytest.mark.parametrize("d,k", SHIFTS, ids=[f"{d}{k}" for d, k in SHIFTS])
def test_shift_links(d, k):
    t = traffic_of(lambda x: shift(x, d, k), rand(0))
    expected = walk(H, W, shift_streams(H, W, d, k, Z))
    np.testing.assert_array_equal(t.link_words(H, W), expected)
    if expected.any():
        assert t.hops == k
    else:  # k >= the region's size: nothing arrives, nothing is charged
        assert t.hops == 0 and t.cycles(wafer.WSE2) == 0.0


def test_shift_fill_and_trailing_shape():
    x = rand(1, (3, 4, 2, 3))
    y, t = shift(x, "W", 1, fill=-7.0)
    np.testing.assert_array_equal(y, ref_shift(x, "W", 1, fill=-7.0))
    np.testing.assert_array_equal(t.link_words(3, 4)[DIR["W"], 0], [0, 6, 6, 6])
    y0, t0 = shift(x, "E", 0)
    assert y0 is x and t0.phases == ()


# Words per link on a 1 x 5 line, by hand: words are per-core sizes rounded up to 32-bit words.
LINE = {
    "E1": (lambda x: shift(x, "E", 1), {"E": [1, 1, 1, 1, 0]}, 1),
    "W1": (lambda x: shift(x, "W", 1), {"W": [0, 1, 1, 1, 1]}, 1),
    "E2": (lambda x: shift(x, "E", 2), {"E": [1, 2, 2, 1, 0]}, 2),
    "E3": (lambda x: shift(x, "E", 3), {"E": [1, 2, 2, 1, 0]}, 3),
    "E4": (lambda x: shift(x, "E", 4), {"E": [1, 1, 1, 1, 0]}, 4),
    "W3": (lambda x: shift(x, "W", 3), {"W": [0, 1, 2, 2, 1]}, 3),
    "mcast0": (lambda x: multicast(x, "row", src=0), {"E": [1, 1, 1, 1, 0]}, 4),
    "mcast2": (lambda x: multicast(x, "row", src=2), {"E": [0, 0, 1, 1, 0], "W": [0, 1, 1, 0, 0]}, 2),
    "mcast-1": (lambda x: multicast(x, "row", src=-1), {"W": [0, 1, 1, 1, 1]}, 4),
    # a chain reduction's streams each cross one link (its length is in the depth: dependent stages)
    "reduce-to-0": (lambda x: reduce(x, "row", to=0), {"W": [0, 1, 1, 1, 1]}, 1),
    "reduce-to-last": (lambda x: reduce(x, "row", to="last"), {"E": [1, 1, 1, 1, 0]}, 1),
    "reduce-to-1": (lambda x: reduce(x, "row", "max", to=1), {"E": [1, 0, 0, 0, 0], "W": [0, 0, 1, 1, 1]}, 1),
    # to the middle core (1 hop streams), then multicast back (2 hops)
    "allreduce": (lambda x: reduce(x, "row", to="all"), {"E": [1, 1, 1, 1, 0], "W": [0, 1, 1, 1, 1]}, 1 + 2),
    "halo1": (lambda x: halo_exchange(x, 1), {"E": [1, 1, 1, 1, 0], "W": [0, 1, 1, 1, 1]}, 1),
    "halo2": (lambda x: halo_exchange(x, 2), {"E": [1, 2, 2, 2, 0], "W": [0, 2, 2, 2, 1]}, 2),
}


@pytest.mark.parametrize("z,dtype,words", [(1, "float32", 1), (3, "float32", 3), (3, "float16", 2)], ids=str)
@pytest.mark.parametrize("case", list(LINE), ids=list(LINE))
def test_line_link_counts_by_hand(case, z, dtype, words):
    fn, per_dir, hops = LINE[case]
    _, t = fn(rand(2, (1, 5, z), dtype))
    expected = np.zeros((4, 1, 5))
    for d, v in per_dir.items():
        expected[DIR[d], 0] = np.asarray(v) * words
    np.testing.assert_array_equal(t.link_words(1, 5), expected)
    assert t.words == expected.sum()
    assert t.hops == hops


# Words each core of a 1 x 5 line takes off its ramp (in) and puts on it (out), by hand, in a core's data.
RAMPS = {
    "E1": (lambda x: shift(x, "E", 1), [0, 1, 1, 1, 1], [1, 1, 1, 1, 0]),
    "E2": (lambda x: shift(x, "E", 2), [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]),
    # the source injects its data once; every router delivers it to its own core and forwards it
    "mcast2": (lambda x: multicast(x, "row", src=2), [1, 1, 0, 1, 1], [0, 0, 1, 0, 0]),
    # a chain to core 0: each core takes its neighbour's partial sum in and sends its own on
    "reduce-to-0": (lambda x: reduce(x, "row", to=0), [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]),
    # to core 1: it takes in both sides' partial sums
    "reduce-to-1": (lambda x: reduce(x, "row", to=1), [0, 2, 1, 1, 0], [1, 0, 1, 1, 1]),
    # a star to core 4: it takes in four cores' data; a tree to core 4: in rounds from cores 3 and 2
    "star-to-last": (lambda x: reduce(x, "row", to="last", pattern="star"), [0, 0, 0, 0, 4], [1, 1, 1, 1, 0]),
    # (rounds: cores 3 and 1 send one hop, core 2 two hops, core 0 four: core 4 takes three partial sums in)
    "tree-to-last": (lambda x: reduce(x, "row", to="last", pattern="tree"), [0, 0, 1, 0, 3], [1, 1, 1, 1, 0]),
    # radius 1 halo: one stream from each neighbour, one sent each way
    "halo1": (lambda x: halo_exchange(x, 1), [1, 2, 2, 2, 1], [1, 2, 2, 2, 1]),
}


@pytest.mark.parametrize("case", list(RAMPS), ids=list(RAMPS))
def test_line_ramp_counts_by_hand(case):
    fn, ramp_in, ramp_out = RAMPS[case]
    _, t = fn(rand(2, (1, 5, 3)))  # 3 words a core
    ramps = t.ramp_words(1, 5)
    np.testing.assert_array_equal(ramps[0, 0], 3 * np.asarray(ramp_in, float))
    np.testing.assert_array_equal(ramps[1, 0], 3 * np.asarray(ramp_out, float))


def test_ramp_contention_is_charged():
    """A core taking k streams in pays for all k words (a wavelet a cycle through its ramp): a radius-1 halo on a
    region moves Z words on each link but takes 4 Z into an inner core."""
    spec = wafer.WSE2
    halo, t = halo_exchange(rand(3, (3, 3, 6)), 1)
    (phase,) = t.phases
    assert phase.max_link_words == 6 and phase.max_ramp_words == 4 * 6  # the centre core: four neighbours
    assert t.cycles(spec) == 24  # the ramp bounds it: max(24, 6, 6 + 1 hop)
    assert t.cycles(spec.with_(ramp_bits_per_cycle=128.0)) == 7  # a wide ramp: the link and the hop


# ---- multicast ---------------------------------------------------------------------------------------------------

SOURCES = [0, "first", 2, "last", -1, -2, "E", "W"]


@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("src", SOURCES, ids=[f"src={s}" for s in SOURCES])
def test_multicast(axis, src):
    x = rand(3)
    ax = {"row": 1, "col": 0}[axis]
    n = x.shape[ax]
    s = {"first": 0, "W": 0, "last": n - 1, "E": n - 1}.get(src, src) % n
    assert_matches_ref(lambda x: multicast(x, axis, src=src)[0], lambda x: ref_multicast(x, ax, s), x)
    _, t = multicast(x, axis, src=src)
    np.testing.assert_array_equal(t.link_words(H, W), walk(H, W, multicast_streams(H, W, ax, s, Z)))
    assert t.hops == max(s, n - 1 - s)


@pytest.mark.parametrize("name,index", [("row", 1), ("col", 0), ("column", 0)], ids=["row", "col", "column"])
def test_axis_names(name, index):
    x = rand(3)
    for fn in (lambda x, a: multicast(x, a, src=1), lambda x, a: reduce(x, a, "max", to=-1)):
        y, t = fn(x, name)
        y_int, t_int = fn(x, index)
        np.testing.assert_array_equal(y, y_int)
        np.testing.assert_array_equal(t.link_words(H, W), t_int.link_words(H, W))


# ---- reduce ------------------------------------------------------------------------------------------------------

TARGETS = [0, 2, -1, "all"]


@pytest.mark.parametrize("to", TARGETS, ids=[f"to={t}" for t in TARGETS])
@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("axis", ["row", "col"])
def test_reduce(axis, op, to):
    x = rand(4)
    ax = {"row": 1, "col": 0}[axis]
    n = x.shape[ax]
    ref = lambda x: ref_reduce(x, ax, op)
    if to == "all":
        ref = lambda x: jnp.broadcast_to(ref_reduce(x, ax, op), x.shape)
    y = assert_matches_ref(lambda x: reduce(x, axis, op, to=to)[0], ref, x, data_rtol=1e-6)
    assert y.shape == (x.shape if to == "all" else x.shape[:ax] + (1,) + x.shape[ax + 1 :])
    _, t = reduce(x, axis, op, to=to)
    h, w = x.shape[:2]
    if to == "all":
        d = (n - 1) // 2
        assert len(t.phases) == 2
        phases = [reduce_streams(h, w, ax, d, Z), multicast_streams(h, w, ax, d, Z)]
        for p, streams in zip(t.phases, phases):
            np.testing.assert_array_equal(p.link_words(h, w), walk(h, w, streams))
        # the chain's streams cross one link each, in max(d, n - 1 - d) dependent stages; the multicast back
        assert t.hops == 1 + max(d, n - 1 - d) and t.depth == max(d, n - 1 - d)
    else:
        d = {"last": n - 1}.get(to, to) % n
        np.testing.assert_array_equal(t.link_words(h, w), walk(h, w, reduce_streams(h, w, ax, d, Z)))
        assert t.hops == 1 and t.depth == max(d, n - 1 - d)


# ---- halo exchange -----------------------------------------------------------------------------------------------


HALOS = [(1, (H, W, Z)), (2, (H, W, Z)), (3, (3, 2, 2, 2))]


@pytest.mark.parametrize("radius,shape", HALOS, ids=[f"r{r}-{'x'.join(map(str, s))}" for r, s in HALOS])
def test_halo_exchange_data_and_grad(radius, shape):
    x = rand(6, shape)
    halo = assert_matches_ref(lambda x: halo_exchange(x, radius)[0], lambda x: ref_halo(x, radius), x)
    assert set(halo) == {"N", "E", "S", "W"}
    for side in halo:
        assert halo[side].shape == (shape if radius == 1 else (radius, *shape))


HALO_SHAPES = {"4x5x3": (H, W, Z), "1x5x2": (1, 5, 2), "3x2x2x2": (3, 2, 2, 2), "6x1": (6, 1, 1)}


@pytest.mark.parametrize("shape", list(HALO_SHAPES.values()), ids=list(HALO_SHAPES))
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_halo_exchange_links(radius, shape):
    h, w = shape[:2]
    words = int(np.prod(shape[2:]))
    t = traffic_of(lambda x: halo_exchange(x, radius), jax.ShapeDtypeStruct(shape, jnp.float32))
    np.testing.assert_array_equal(t.link_words(h, w), walk(h, w, halo_streams(h, w, radius, words)))
    assert len(t.phases) == 1  # all four directions at once
    assert t.hops == max(min(radius, h - 1), min(radius, w - 1))


def test_halo_fill():
    x = rand(7, (3, 3, 1))
    halo, _ = halo_exchange(x, 1, fill=5.0)
    np.testing.assert_array_equal(halo["N"][0], 5.0)
    np.testing.assert_array_equal(halo["W"][:, 0], 5.0)
    np.testing.assert_array_equal(halo["S"][:2], x[1:])


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: shift(x, "S", 2)[0],
        lambda x: multicast(x, "col", src=1)[0],
        lambda x: reduce(x, "row", "sum", to="all")[0],
        lambda x: halo_exchange(x, 2)[0]["E"] * halo_exchange(x, 1)[0]["N"],
    ],
    ids=["shift", "multicast", "allreduce", "halo-product"],
)
def test_check_grads(fn):
    check_grads(jax.jit(fn), (rand(8, (3, 4, 2)),), order=2, modes=("fwd", "rev"))


# ---- traffic records: contention, sequencing, placement, cycles --------------------------------------------------


def line_traffic():
    x = rand(9, (1, 5, 3))
    return shift(x, "E", 1)[1], multicast(x, "row", src=0)[1]  # both load the E links with 3 words


def test_concurrent_transfers_share_links():
    a, b = line_traffic()
    spec = wafer.WSE2
    both = a | b
    assert len(both.phases) == 1
    np.testing.assert_array_equal(both.link_words(1, 5)[DIR["E"], 0], [6, 6, 6, 6, 0])
    assert both.hops == 4  # the longer route sets the latency
    assert a.cycles(spec) == 3 + 1 and b.cycles(spec) == 3 + 4
    assert both.cycles(spec) == 6 + 4  # contention: the shared links carry both streams
    # Traffic on disjoint links does not contend on links; a core taking in both streams takes both on its ramp
    x = rand(9, (1, 5, 3))
    c = shift(x, "W", 1)[1]
    assert (a | c).phases[0].max_link_words == 3 and (a | c).phases[0].max_ramp_words == 6
    assert (a | c).cycles(spec) == 6 and a.cycles(spec) == c.cycles(spec) == 4


def test_sequential_transfers_add():
    a, b = line_traffic()
    spec = wafer.WSE2
    seq = a + b
    assert len(seq.phases) == 2 and seq.hops == 5
    assert seq.cycles(spec) == a.cycles(spec) + b.cycles(spec) == 11
    np.testing.assert_array_equal(seq.link_words(1, 5), (a | b).link_words(1, 5))
    assert Traffic.none().cycles(spec) == 0.0 and (a + Traffic.none()).cycles(spec) == a.cycles(spec)


def test_concurrent_with_different_phase_counts():
    x = rand(10, (1, 5, 1))
    a = reduce(x, "row", to="all")[1]  # 2 phases
    b = shift(x, "E", 1)[1]  # 1 phase, runs alongside the first
    both = a | b
    assert len(both.phases) == 2
    np.testing.assert_array_equal(both.phases[0].link_words(1, 5)[DIR["E"], 0], [2, 2, 1, 1, 0])
    np.testing.assert_array_equal(both.phases[1].link_words(1, 5), a.phases[1].link_words(1, 5))
    # phase 0: the middle core takes in 3 words (both sides' sums and the shift's word): max(3, 2 on the busiest
    # link, 8 link words over 6 links + 1 hop) + 2 dependent stages x (2 T_R + 1); phase 1: multicast back, 1 + 2
    assert both.cycles(wafer.WSE2) == (3 + 2 * 5) + (1 + 2)


def test_traffic_at_offsets_regions():
    x = rand(11, (2, 3, 2))
    t = shift(x, "S", 1)[1]
    grid = t.at(1, 2).link_words(4, 6)
    expected = np.zeros((4, 4, 6))
    expected[:, 1:3, 2:5] = t.link_words(2, 3)
    np.testing.assert_array_equal(grid, expected)
    assert expected[DIR["S"], 1, 2:5].tolist() == [2, 2, 2]
    assert t.at(1, 2).cycles(wafer.WSE2) == t.cycles(wafer.WSE2)
    with pytest.raises(ValueError, match="outside the 4x6 grid"):
        t.at(3, 0).link_words(4, 6)
    # Two placed regions contend only where they overlap.
    apart = t.at(0, 0) | t.at(2, 3)
    assert apart.cycles(wafer.WSE2) == t.cycles(wafer.WSE2)
    overlapping = t.at(0, 0) | t.at(0, 1)
    assert overlapping.phases[0].max_link_words == 4
    np.testing.assert_array_equal(overlapping.link_words(2, 4)[DIR["S"], 0], [2, 4, 4, 2])


@pytest.mark.parametrize(
    "bits,latency", [(32.0, 1.0), (16.0, 3.0), (64.0, 0.0), (8.0, 2.5)], ids=["wse2", "narrow", "wide", "slow"]
)
def test_cycles_formula(bits, latency):
    spec = wafer.WaferSpec.mini(4, 5, link_bits_per_cycle=bits, hop_latency_cycles=latency)
    x = rand(12)
    for t in (shift(x, "E", 2)[1], multicast(x, "col", src=1)[1], halo_exchange(x, 2)[1], reduce(x, 1, to="all")[1]):
        expected = 0.0
        for p in t.phases:
            link = p.link_words(H, W)
            mean = link.sum() / np.count_nonzero(link)
            stream = max(link.max() * 32 / bits, mean * 32 / bits + p.hops * latency)
            expected += max(p.loads(H, W)[4:].max() * 32 / spec.ramp_bits_per_cycle, stream) + p.depth * 5
        assert t.cycles(spec) == pytest.approx(expected, rel=1e-12)
    # shift E by 2 of 3 words: the busiest link carries 2 streams of 3 words; every core takes 3 in; the E links
    # carry 3, 6, 6, 3 words (mean 4.5); 2 hops.
    assert shift(x, "E", 2)[1].cycles(spec) == pytest.approx(
        max(3 * 32 / spec.ramp_bits_per_cycle, 6 * 32 / bits, 4.5 * 32 / bits + 2 * latency)
    )


def test_traffic_cycles_grad_wrt_spec():
    # latency-bound: every E link of a row carries the 3 words (mean 3), 4 hops: max(3 ramp, 3 link, 3 + 4)
    t = multicast(rand(13), "row", src=0)[1]
    g = jax.grad(t.cycles)(wafer.WaferSpec.mini(H, W))
    np.testing.assert_allclose(g.hop_latency_cycles, t.hops, rtol=1e-6)
    np.testing.assert_allclose(g.link_bits_per_cycle, -3 * 32 / 32.0**2, rtol=1e-6)  # d(3 x 32 / bits) / d bits
    assert float(g.ramp_bits_per_cycle) == 0.0
    # ramp-bound: a core of the 4 x 5 region takes up to 7 streams of 3 words in (21 words), while its busiest link
    # carries 2 streams (6 words): neither the links nor the hops set the time
    t = halo_exchange(rand(13), 2)[1]
    assert t.phases[0].max_ramp_words == 21 and t.phases[0].max_link_words == 6
    g = jax.grad(t.cycles)(wafer.WaferSpec.mini(H, W))
    assert float(g.hop_latency_cycles) == 0.0 and float(g.link_bits_per_cycle) == 0.0
    np.testing.assert_allclose(g.ramp_bits_per_cycle, -7 * 3 * 32 / 32.0**2, rtol=1e-6)


# ---- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: shift(x, "up"), "direction"),
        (lambda x: shift(x, "E", -1), "non-negative int"),
        (lambda x: shift(x, "E", 1.5), "non-negative int"),
        (lambda x: shift(x[0, 0], "E"), "core-grid array"),
        (lambda x: multicast(x, "diagonal"), "axis"),
        (lambda x: multicast(x, "row", src=5), "multicast src"),
        (lambda x: multicast(x, "row", src=-6), "multicast src"),
        (lambda x: multicast(x, "row", src="middle"), "multicast src"),
        (lambda x: reduce(x, "row", "prod"), "op"),
        (lambda x: reduce(x, "col", to=4), "reduce `to`"),
        (lambda x: halo_exchange(x, 0), "radius"),
    ],
    ids=[
        "bad-direction",
        "negative-k",
        "fractional-k",
        "not-a-grid",
        "bad-axis",
        "src-too-big",
        "src-too-negative",
        "src-name",
        "bad-op",
        "to-too-big",
        "radius-0",
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(rand(14))
