"""Reduction patterns, their adds, the all-to-all and the closed-form cycle functions.

Data are checked against plain jnp (values and gradients, random inputs). Link loads are counted by hand on lines of
a few cores: each expected array below lists, link by link, the words a core sends towards the root (or along the
line) in one phase. The closed forms are checked against `traffic.cycles(spec)` of the primitives on many sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wafer
from wafer import fabric
from wafer.kernel import arithmetic

DIR = {d: i for i, d in enumerate(wafer.DIRECTIONS)}
PATTERNS = wafer.fabric.REDUCE_PATTERNS
SPEC = wafer.WaferSpec.mini(8, 8)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def traffic_of(fn, x):
    box = []
    jax.eval_shape(lambda x: box.append(fn(x)[1]), x)
    return box[0]


def line_loads(phase, axis, n):
    """(plus, minus) words of one phase along the first line of the region (row 0 or column 0)."""
    (_, _, region), *_ = phase.parts
    words = phase.link_words(*region.shape[1:])
    if axis == 0:
        return words[DIR["S"], :, 0], words[DIR["N"], :, 0]
    return words[DIR["E"], 0, :], words[DIR["W"], 0, :]


# ---- data and gradients ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("axis,to", [(0, "last"), (1, "first"), (1, 2), (0, "all"), (1, "all")])
def test_reduce_data_and_grad(pattern, op, axis, to):
    x = rand(1, (5, 6, 3))
    fn = jax.jit(lambda x: wafer.reduce(x, axis, op, to=to, pattern=pattern)[0])
    ref_fn = lambda x: (jnp.sum if op == "sum" else jnp.max)(x, axis=axis, keepdims=True)
    y = fn(x)
    ref = ref_fn(x)
    if to == "all":
        ref = jnp.broadcast_to(ref, x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)  # float32: summation order may differ
    cot = rand(2, y.shape)
    g = jax.grad(lambda x: jnp.sum(fn(x) * cot))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.broadcast_to(ref_fn(x), y.shape) * cot))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_allreduce_is_reduce_to_all():
    x = rand(3, (4, 7, 2))
    for pattern in PATTERNS:
        a, ta = wafer.allreduce(x, "row", pattern=pattern)
        b, tb = wafer.reduce(x, "row", to="all", pattern=pattern)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta.link_words(4, 7), tb.link_words(4, 7))


def test_chain_is_the_default_and_unchanged():
    x = rand(4, (3, 9, 5))
    old = traffic_of(lambda x: wafer.reduce(x, "row", to=3), x)
    new = traffic_of(lambda x: wafer.reduce(x, "row", to=3, pattern="chain"), x)
    # one phase: every stream crosses one link; the longer side (cores 4..8 into core 3) is 5 dependent stages
    assert [(p.hops, p.depth) for p in old.phases] == [(p.hops, p.depth) for p in new.phases] == [(1, 5)]
    np.testing.assert_array_equal(old.link_words(3, 9), new.link_words(3, 9))


# ---- link loads counted by hand ----------------------------------------------------------------------------------

# A row of 7 cores reducing to the last (index 6), one word per core. Phases: (E loads per core, hops, depth), hops
# being the longest single stream and depth the dependent receive-combine-send stages.
BY_HAND_LAST7 = {
    # each core forwards its running sum one link on: streams of one hop, 6 stages one after another
    "chain": [([1, 1, 1, 1, 1, 1, 0], 1, 6)],
    # every core streams to core 6: the link out of core i carries the data of cores 0..i; core 0's crosses 6 links
    "star": [([1, 2, 3, 4, 5, 6, 0], 6, 1)],
    # one phase of three rounds: round 0, cores 5, 3, 1 send one hop ([0, 1, 0, 1, 0, 1, 0]); round 1, cores 4 and 0
    # two hops ([1, 1, 0, 0, 1, 1, 0]); round 2, core 2 four hops ([0, 0, 1, 1, 1, 1, 0]); the loads add up
    "tree": [([1, 2, 1, 2, 2, 3, 0], 4, 3)],
    # groups of 3 from the root: {6, 5, 4}, {3, 2, 1}, {0}; leaders 6, 3, 0. Phase 1 chains 4 -> 5 -> 6 and
    # 1 -> 2 -> 3 (one-hop streams, 2 stages); phase 2 chains the leaders 0 -> 3 -> 6 (3-hop streams, 2 stages).
    "two_phase": [([0, 1, 1, 0, 1, 1, 0], 1, 2), ([1, 1, 1, 1, 1, 1, 0], 3, 2)],
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("axis", [0, 1])
def test_reduce_links_by_hand(pattern, axis):
    shape = (7, 2) if axis == 0 else (2, 7)
    t = traffic_of(lambda x: wafer.reduce(x, axis, to="last", pattern=pattern, group=3), jnp.zeros(shape))
    assert len(t.phases) == len(BY_HAND_LAST7[pattern])
    for phase, (plus, hops, depth) in zip(t.phases, BY_HAND_LAST7[pattern]):
        got_plus, got_minus = line_loads(phase, axis, 7)
        np.testing.assert_array_equal(got_plus, plus)
        np.testing.assert_array_equal(got_minus, 0)
        assert (phase.hops, phase.depth) == (hops, depth)
        region = phase.link_words(*shape)  # the region's other line does the same
        last = region[:, -1, :] if axis == 1 else region[:, :, -1]
        np.testing.assert_array_equal(last, region[:, 0, :] if axis == 1 else region[:, :, 0])


def test_reduce_to_first_mirrors_last():
    x = jnp.zeros((1, 7))
    for pattern in PATTERNS:
        first = traffic_of(lambda x, p=pattern: wafer.reduce(x, 1, to="first", pattern=p, group=3), x)
        for phase, (plus, _, _) in zip(first.phases, BY_HAND_LAST7[pattern]):
            got_plus, got_minus = line_loads(phase, 1, 7)
            np.testing.assert_array_equal(got_minus, plus[::-1])
            np.testing.assert_array_equal(got_plus, 0)


def test_tree_to_the_middle_by_hand():
    # 6 cores, root at index 2 ("all": (6 - 1) // 2): left side cores 1, 0 (j = 1, 2), right side 3, 4, 5
    # (j = 1, 2, 3). Round 0: core 1 -> 2 (E), cores 3 -> 2 and 5 -> 4 (W). Round 1: core 0 -> 2 (E, two hops),
    # core 4 -> 2 (W, two hops). Both rounds are one phase: E [0, 1, 0, 0, 0, 0] + [1, 1, 0, 0, 0, 0], W
    # [0, 0, 0, 1, 0, 1] + [0, 0, 0, 1, 1, 0]; the longest stream 2 hops; 2 rounds on either side: 2 stages.
    # Then the result is multicast from core 2.
    t = traffic_of(lambda x: wafer.reduce(x, 1, to="all", pattern="tree"), jnp.zeros((1, 6)))
    assert len(t.phases) == 2
    got_plus, got_minus = line_loads(t.phases[0], 1, 6)
    np.testing.assert_array_equal(got_plus, [1, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(got_minus, [0, 0, 0, 2, 1, 1])
    assert (t.phases[0].hops, t.phases[0].depth) == (2, 2)
    # core 2 takes in both its rounds from each side (4 words); core 4 one partial (from 5)
    np.testing.assert_array_equal(t.phases[0].loads(1, 6)[fabric.RAMP_IN, 0], [0, 0, 4, 0, 1, 0])
    got_plus, got_minus = line_loads(t.phases[1], 1, 6)  # multicast from core 2: plain routing, no stages
    np.testing.assert_array_equal(got_plus, [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(got_minus, [0, 1, 1, 0, 0, 0])
    assert (t.phases[1].hops, t.phases[1].depth) == (3, 0)


def test_words_scale_with_dtype_and_per_core_shape():
    x16 = jnp.zeros((1, 5, 3), jnp.float16)  # 3 halves: 2 words per core
    t = traffic_of(lambda x: wafer.reduce(x, 1, to="last", pattern="star"), x16)
    np.testing.assert_array_equal(line_loads(t.phases[0], 1, 5)[0], [2, 4, 6, 8, 0])


# ---- adds ----------------------------------------------------------------------------------------------------------

# Incoming partials each core of a row of 7 adds when reducing to the last core (groups of 3 for two_phase).
ADDS_LAST7 = {
    "chain": [0, 1, 1, 1, 1, 1, 1],
    "star": [0, 0, 0, 0, 0, 0, 6],
    # core 6 in all three rounds; core 2 from core 1 (round 0) and core 0 (round 1); core 4 from core 3 (round 0)
    "tree": [0, 0, 2, 0, 1, 0, 3],
    # within groups: 6 from 5, 5 from 4, 3 from 2, 2 from 1; between leaders: 3 from 0, then 6 from 3
    "two_phase": [0, 0, 1, 2, 0, 1, 2],
}


def adds_per_core(adds, h, w):
    """Elements added per core, [h, w]."""
    out = np.zeros((h, w))
    for k in adds:
        ((_, n),) = arithmetic(k.counts).items()
        out += n * k.mask
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_adds_by_hand(pattern):
    x = rand(5, (2, 7, 4))
    _, _, adds = wafer.reduce(x, "row", to="last", pattern=pattern, group=3, return_adds=True)
    per_core = adds_per_core(adds, 2, 7)
    np.testing.assert_array_equal(per_core, np.array([ADDS_LAST7[pattern]] * 2) * 4)  # 4 elements per core
    for k in adds:  # one record per number of incoming partials, on the cores that take that many
        (partials,) = {ADDS_LAST7[pattern][c] for c in k.mask.any(axis=0).nonzero()[0]}
        n = 4 * partials
        # @fadds(mem, mem, fabin): its own fp32 operand read from SRAM (4 B), the sum written (4 B), the partial
        # taken off the ramp (one 32-bit word) per element; its start-up overlaps the wait for the partial (the
        # transfer's dependent stage holds it), so no instruction is charged
        assert k.counts == {("alu", "fp32", 4, 4, 1.0): n}
        assert k.sram_bytes == (n * 4, n * 4)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n,to", [(1, "last"), (2, "first"), (9, 4), (16, "all"), (33, "last"), (50, 7)])
def test_every_partial_is_added_once(pattern, n, to):
    adds = wafer.reduce_adds((3, n, 2), jnp.float16, "row", "max", to=to, pattern=pattern)
    assert adds_per_core(adds, 3, n).sum() == 3 * (n - 1) * 2  # n - 1 combines per line, 2 elements each
    assert all(set(arithmetic(k.counts)) == {("alu", "fp16")} for k in adds)


def test_adds_charge_the_cores_that_do_them():
    x = rand(6, (2, 7, 8))
    y, kcost = wafer.map_cores(lambda v: v * 2.0, x)
    _, traffic, adds = wafer.reduce(y, "row", to="last", pattern="star", return_adds=True)
    rec = wafer.superstep(kcost, *adds, traffic)
    busy = rec.compute_map(SPEC)
    own = kcost.cycles(SPEC)
    np.testing.assert_allclose(busy[:2, :6], own)
    # v * 2.0 over 8 fp32: one instruction of 8 x max(1/2 lane, 4 B / 16 read, 4 B / 8 written) and the task
    assert own == pytest.approx(SPEC.instr_startup_cycles + 8 * 0.5 + SPEC.task_cycles)
    # the root adds 6 incoming x 8 elements, charged by the same rules as any kernel: 48 elements at a wavelet a
    # cycle off the ramp (slower than 2 lanes), the instructions' start-up hidden behind the transfer's stages
    (root,) = adds
    assert root.counts == {("alu", "fp32", 4, 4, 1.0): 48}
    assert root.mask[:, 6].all() and not root.mask[:, :6].any()
    assert root.cycles(SPEC) == pytest.approx(48 * 1.0)
    np.testing.assert_allclose(busy[:2, 6], own + root.cycles(SPEC))
    assert rec.compute_cycles(SPEC) == pytest.approx(own + root.cycles(SPEC))
    moved = [k.at(3, 1) for k in adds]
    assert moved[0].rect == wafer.Rect(3, 1, 2, 7)


# ---- all-to-all -----------------------------------------------------------------------------------------------------

A2A = wafer.fabric.ALL_TO_ALL_PATTERNS


@pytest.mark.parametrize("pattern", A2A)
@pytest.mark.parametrize("axis", [0, 1])
def test_all_to_all_data_and_grad(pattern, axis):
    n = 5
    shape = (n, 3, n, 2) if axis == 0 else (3, n, n, 2)
    x = rand(7, shape)
    fn = jax.jit(lambda x: wafer.all_to_all(x, axis, pattern=pattern)[0])
    y = fn(x)
    xn = np.asarray(x)
    ref = np.empty_like(xn)
    for r in range(shape[0]):
        for c in range(shape[1]):
            for b in range(n):
                ref[r, c, b] = xn[r, b, c] if axis == 1 else xn[b, c, r]
    np.testing.assert_array_equal(y, ref)
    cot = rand(8, shape)
    g = jax.grad(lambda x: jnp.sum(fn(x) * cot))(x)
    np.testing.assert_array_equal(g, np.swapaxes(np.asarray(cot), axis, 2))  # the inverse permutation


# Four cores, one word per block: words on each + and - link.
A2A_BY_HAND = {
    # blocks (s -> d) crossing link i -> i+1: all s <= i < d; crossing i -> i-1: all d < i <= s
    "direct": ([3, 4, 3, 0], [0, 3, 4, 3]),
    # the eastward streams of cores 0, 1, 2 carry 3, 2, 1 blocks to the line's end
    "relay": ([3, 5, 6, 0], [0, 6, 5, 3]),
    "relay_padded": ([3, 6, 9, 0], [0, 9, 6, 3]),
}


@pytest.mark.parametrize("pattern", A2A)
def test_all_to_all_links_by_hand(pattern):
    x = jnp.zeros((2, 4, 4, 2), jnp.float16)  # a complex fp16 block packs into one word
    t = traffic_of(lambda x: wafer.all_to_all(x, "row", pattern=pattern), x)
    (phase,) = t.phases
    plus, minus = line_loads(phase, 1, 4)
    np.testing.assert_array_equal(plus, A2A_BY_HAND[pattern][0])
    np.testing.assert_array_equal(minus, A2A_BY_HAND[pattern][1])
    assert (phase.hops, phase.depth) == (3, 0)


def test_all_to_all_bad_shape():
    with pytest.raises(ValueError, match=r"one block per core of its line.*\[h, w, 4, \*block\]"):
        wafer.all_to_all(jnp.zeros((3, 4, 3)), "row")
    with pytest.raises(ValueError, match="pattern must be one of"):
        wafer.all_to_all(jnp.zeros((3, 4, 4)), "row", pattern="ring")


def test_bad_pattern_and_group():
    x = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"pattern must be one of \('chain', 'star', 'tree', 'two_phase'\)"):
        wafer.reduce(x, "row", pattern="ring")
    with pytest.raises(ValueError, match="group must be an int >= 1"):
        wafer.reduce(x, "row", pattern="two_phase", group=0)
    with pytest.raises(ValueError, match="to must be"):
        fabric.reduce_cycles(4, 1, SPEC, to="middle")


# ---- closed forms against the records ------------------------------------------------------------------------------

SPECS = [SPEC, SPEC.with_(link_bits_per_cycle=16.0, hop_latency_cycles=2.5)]


@settings(max_examples=80, derandomize=True, deadline=None)
@given(
    n=st.integers(1, 300),
    words=st.integers(1, 40),
    pattern=st.sampled_from(PATTERNS),
    to=st.sampled_from(["first", "last", "all", 0.0, 0.37, 0.5, 0.99]),
    group=st.one_of(st.none(), st.integers(1, 40)),
    spec=st.sampled_from(SPECS),
)
def test_reduce_closed_form_equals_record(n, words, pattern, to, group, spec):
    if isinstance(to, float):
        to = min(int(to * n), n - 1)
    shape = (1, n, words)
    t = traffic_of(
        lambda x: wafer.reduce(x, 1, to=to, pattern=pattern, group=group), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    closed = fabric.reduce_cycles(n, words, spec, pattern=pattern, to=to, group=group)
    assert float(closed) == pytest.approx(t.cycles(spec), rel=1e-12, abs=1e-9)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(n=st.integers(1, 300), words=st.integers(1, 8), pattern=st.sampled_from(A2A), spec=st.sampled_from(SPECS))
def test_all_to_all_closed_form_equals_record(n, words, pattern, spec):
    x = jax.ShapeDtypeStruct((1, n, n, words), jnp.float32)
    t = traffic_of(lambda x: wafer.all_to_all(x, 1, pattern=pattern), x)
    closed = fabric.all_to_all_cycles(n, words, spec, pattern=pattern)
    assert float(closed) == pytest.approx(t.cycles(spec), rel=1e-12, abs=1e-9)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(n=st.integers(1, 300), words=st.integers(1, 40), src=st.floats(0, 0.999), spec=st.sampled_from(SPECS))
def test_multicast_closed_form_equals_record(n, words, src, spec):
    s = int(src * n)
    t = traffic_of(lambda x: wafer.multicast(x, 1, src=s), jax.ShapeDtypeStruct((1, n, words), jnp.float32))
    assert float(fabric.multicast_cycles(n, words, spec, src=s)) == pytest.approx(t.cycles(spec), abs=1e-9)


def test_closed_forms_are_array_generic():
    ns = np.array([1, 2, 7, 64, 600])
    words = np.array([1, 3, 1, 16, 2])
    for pattern in PATTERNS:
        for to in ("last", "all"):
            vec = fabric.reduce_cycles(
                ns, words, SPEC, pattern=pattern, to=to, group=np.maximum(np.round(np.sqrt(ns)), 1)
            )
            one = [float(fabric.reduce_cycles(int(n), int(w), SPEC, pattern=pattern, to=to)) for n, w in zip(ns, words)]
            np.testing.assert_allclose(vec, one)
            traced = jax.jit(lambda n, w, p=pattern, t=to: fabric.reduce_cycles(n, w, SPEC, pattern=p, to=t, group=4.0))
            np.testing.assert_allclose(
                traced(ns.astype(np.float32), words.astype(np.float32)),
                fabric.reduce_cycles(ns, words, SPEC, pattern=pattern, to=to, group=4.0),
                rtol=1e-6,
            )
    for pattern in A2A:
        vec = fabric.all_to_all_cycles(ns, 2, SPEC, pattern=pattern)
        traced = jax.vmap(lambda n, p=pattern: fabric.all_to_all_cycles(n, 2.0, SPEC, pattern=p))(ns.astype(np.float32))
        np.testing.assert_allclose(traced, vec, rtol=1e-6)


def test_closed_form_gradient_wrt_spec():
    # a tree to the last of 64 cores, 4 words each, is one phase of 6 rounds: the root takes 6 x 4 = 24 words in,
    # the link next to it carries 24; the rounds move 32 x 1 + 16 x 2 + ... + 1 x 32 = 192 core-data hops over the
    # 63 links, 4 x 192 / 63 = 12.2 words per link, and the longest stream (round 5) crosses 32 links:
    # max(24, 24, 12.2 + 32) + stages, so d cycles / d hop latency = 32
    g = jax.grad(lambda lat: fabric.reduce_cycles(64.0, 4.0, SPEC.with_(hop_latency_cycles=lat), pattern="tree"))(1.0)
    assert float(g) == pytest.approx(32.0)
    # a relay all-to-all of 8 cores, 2 words a block: the last link carries 8 x 7 / 2 = 28 blocks (56 words); the
    # mean is 8 x 7 x 15 / 3 = 280 blocks over 14 links, 40 words, + 7 hops = 47; each core's ramp 14 words: the
    # busiest link bounds it, 56 x 32 / bits
    g = jax.grad(lambda bits: fabric.all_to_all_cycles(8.0, 2.0, SPEC.with_(link_bits_per_cycle=bits)))(32.0)
    assert float(g) == pytest.approx(-28 * 2 * 32 / 32.0**2)


# ---- closed forms of the adds and of the strided allreduce ---------------------------------------------------------


@pytest.mark.parametrize("pattern", ["chain", "star", "tree", "two_phase"])
@pytest.mark.parametrize(
    "n,to,group",
    [
        (1, "last", None),
        (2, "first", None),
        (9, 4, 2),
        (16, "all", None),
        (33, "last", 5),
        (50, 7, 3),
        (64, "first", 1),
    ],
)
def test_reduce_receives_and_adds_closed_forms_equal_the_records(pattern, n, to, group):
    """reduce_receives is the busiest core's incoming partials in the records; reduce_adds_cycles that core's
    adds under the cost rules (fp16 elements at 4 lanes, 2 B read and written, half a word off the ramp each)."""
    adds = wafer.reduce_adds((1, n, 6), jnp.float16, "row", "sum", to=to, pattern=pattern, group=group)
    per_core = adds_per_core(adds, 1, n)[0] / 6
    got = wafer.fabric.reduce_receives(
        float(n),
        pattern=pattern,
        to=to if isinstance(to, str) else float(to),
        group=None if group is None else float(group),
    )
    assert float(got) == (per_core.max() if n > 1 else 0.0)
    busiest = max((k.cycles(SPEC) for k in adds), default=0.0)
    cycles = wafer.fabric.reduce_adds_cycles(
        float(n),
        6.0,
        SPEC,
        dtype_class="fp16",
        itemsize=2,
        pattern=pattern,
        to=to if isinstance(to, str) else float(to),
        group=None if group is None else float(group),
    )
    assert float(cycles) == pytest.approx(busiest)
    # by hand: k partials x 6 elements x max(1/4 lane, 2/16, 2/8, 0.5 word x 32/32) = 0.5 cycle each
    assert float(cycles) == pytest.approx(per_core.max(initial=0.0) * 6 * 0.5)


def test_strided_allreduce_by_hand():
    """3 copies 4 cores apart, 10 words each: the middle copy's cores take a stream from each side (ramp 20 words);
    every link carries the 4 interleaved chains' 10 words (40); each stream crosses 4 links; 1 dependent stage each
    side. Reduce: max(20, 40, 40 + 4) + 1 x 5 = 49; multicast back: max(10, 40, 40 + 4) = 44."""
    up = max(20.0, 40.0, 40.0 + 4 * SPEC.hop_latency_cycles) + 1 * (2 * SPEC.ramp_latency_cycles + 1)
    down = max(10.0, 40.0, 40.0 + 4 * SPEC.hop_latency_cycles)
    assert float(wafer.fabric.strided_allreduce_cycles(3.0, 4.0, 10.0, SPEC)) == pytest.approx(up + down)
    assert float(wafer.fabric.strided_allreduce_cycles(1.0, 4.0, 10.0, SPEC)) == 0.0
    # with stride 1 it is the chain allreduce along a line
    for n, b in [(2, 1.0), (5, 3.0), (8, 64.0)]:
        assert float(wafer.fabric.strided_allreduce_cycles(float(n), 1.0, b, SPEC)) == pytest.approx(
            float(wafer.fabric.allreduce_cycles(float(n), b, SPEC, pattern="chain"))
        )
