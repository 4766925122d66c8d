"""WaferState: a pytree through jit/grad/vmap/donation, reads and writes, the dense SRAM image."""

import warnings

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import wafer
from wafer import Rect

SPEC = wafer.WaferSpec.mini(3, 4)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def make_state():
    """data [3, 4, 5] float32 on the whole grid, and w [2, 2, 2, 3] float32 on a 2x2 corner."""
    state = wafer.init(SPEC, words=5, value=rand(0, (3, 4, 5)))
    return state.allocate("w", Rect(1, 2, 2, 2), (2, 3), value=rand(1, (2, 2, 2, 3)))


def test_init():
    state = wafer.init(SPEC, words=5)
    assert state.memory.names == ("data",) and state.read("data").shape == (3, 4, 5)
    assert state.links.shape == (4, 3, 4) and state.links.dtype == jnp.float32
    assert state.busy.shape == (3, 4) and state.clock.shape == () and state.steps.dtype == jnp.int32
    assert (state.rows, state.cols) == (3, 4)
    assert wafer.init(SPEC).memory.names == ()
    assert wafer.DIRECTIONS == ("N", "E", "S", "W")
    np.testing.assert_array_equal(state.occupancy(), np.full((3, 4), 20))


def test_allocate_value_broadcasts_and_casts():
    state = wafer.init(SPEC).allocate("b", Rect(0, 1, 2, 3), (4,), "float16", value=jnp.arange(4.0))
    b = state.read("b")
    assert b.shape == (2, 3, 4) and b.dtype == jnp.float16
    np.testing.assert_array_equal(b, np.broadcast_to(np.arange(4.0), (2, 3, 4)))
    with pytest.raises(ValueError, match=r"does not broadcast to \[h, w, \*shape\] = \(2, 3, 4\)"):
        wafer.init(SPEC).allocate("b", Rect(0, 1, 2, 3), (4,), value=jnp.ones(3))


def test_read_write():
    state = make_state()
    new = rand(2, (2, 2, 2, 3))
    s2 = state.write("w", new)
    np.testing.assert_array_equal(s2.read("w"), new)
    np.testing.assert_array_equal(state.read("w"), rand(1, (2, 2, 2, 3)))  # unchanged: states are values
    # Writes cast to the allocation's dtype.
    s3 = wafer.init(SPEC).allocate("h", Rect(0, 0, 1, 1), (2,), "bfloat16").write("h", jnp.ones((1, 1, 2)))
    assert s3.read("h").dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "shape", [(2, 2, 3, 2), (2, 2, 6), (1, 2, 2, 3), (2, 2, 2, 3, 1)], ids=["transposed", "flat", "rows", "extra"]
)
def test_write_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match=r"expected shape \(2, 2, 2, 3\)"):
        make_state().write("w", jnp.ones(shape))


def test_unknown_allocation_raises():
    with pytest.raises(KeyError, match="'nope'"):
        make_state().read("nope")
    with pytest.raises(KeyError, match="'nope'"):
        make_state().write("nope", jnp.ones(1))


def test_free_drops_data():
    state = make_state().free("w")
    assert set(state.sram) == {"data"} and state.memory.names == ("data",)


def test_reserved_buffer_takes_room_but_no_data():
    state = make_state().reserve("buf", Rect(0, 0, 2, 2), (4,))
    assert state.memory["buf"].offset == 5 and "buf" not in state.sram
    assert int(state.occupancy()[0, 0]) == 4 * (5 + 4) and int(state.occupancy()[2, 0]) == 4 * 5
    for access in (lambda s: s.read("buf"), lambda s: s.write("buf", jnp.ones((2, 2, 4)))):
        with pytest.raises(KeyError, match="reserved"):
            access(state)
    np.testing.assert_array_equal(state.sram_image()[0:2, 0:2, 5:9], 0.0)
    after = state.allocate("next", Rect(1, 1, 1, 1), (1,))
    assert after.memory["next"].offset == 9  # after data (5 words) and buf (4) on core (1, 1)


# ---- transformations ---------------------------------------------------------------------------------------------


def update(state):
    data = state.read("data")
    w = state.read("w")
    return state.replace(clock=state.clock + 1).write("data", jnp.sin(data)).write("w", w * 2.0)


def test_jit_passes_state_through():
    state = make_state()
    out = jax.jit(update)(state)
    ref = update(state)
    assert out.memory == state.memory
    chex.assert_trees_all_close(out, ref, rtol=1e-6)
    same = jax.jit(lambda s: s)(state)
    chex.assert_trees_all_equal(same, state)


def test_jit_does_not_retrace_for_equal_layout():
    f = jax.jit(chex.assert_max_traces(update, n=1))
    f(make_state())
    f(make_state().write("data", rand(5, (3, 4, 5))))


def loss(state):
    return jnp.sum(jnp.tanh(state.read("data")) * 3.0) + jnp.sum(state.read("w") ** 2)


def test_grad_of_loss_of_sram():
    state = make_state()
    data, w = state.read("data"), state.read("w")
    # Integer counters (steps) take float0 gradients.
    g = jax.jit(jax.grad(loss, allow_int=True))(state)
    assert isinstance(g, wafer.WaferState) and g.memory == state.memory
    np.testing.assert_allclose(g.sram["data"], 3.0 * (1 - jnp.tanh(data) ** 2), rtol=1e-6)
    np.testing.assert_allclose(g.sram["w"], 2.0 * w, rtol=1e-6)
    np.testing.assert_array_equal(g.links, 0.0)
    # The usual form: differentiate with respect to the SRAM segments only.
    gs = jax.grad(lambda sram: loss(state.replace(sram=sram)))(state.sram)
    chex.assert_trees_all_close(gs, g.sram, rtol=1e-6)


def test_vmap_over_stacked_states():
    states = [make_state().write("data", rand(10 + i, (3, 4, 5))) for i in range(3)]
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    assert batch.read("data").shape == (3, 3, 4, 5) and batch.memory == states[0].memory
    out = jax.vmap(update)(batch)
    for i, s in enumerate(states):
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], out), update(s), rtol=1e-6)


def test_jit_with_donation():
    state = make_state()
    expected = update(update(make_state()))  # built from separate buffers: the donated ones are consumed
    f = jax.jit(update, donate_argnums=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" would fail here
        out = f(f(state))  # chained, as a training loop does
    assert state.read("data").is_deleted() and state.read("w").is_deleted()
    chex.assert_trees_all_close(out, expected, rtol=1e-6)


# ---- the dense image ---------------------------------------------------------------------------------------------


def test_sram_image_float32():
    state = make_state().allocate("v", Rect(0, 0, 2, 3), (2,), value=rand(3, (2, 3, 2)))
    data, w, v = (np.asarray(state.read(n)) for n in ("data", "w", "v"))
    mem = state.memory
    assert (mem["data"].offset, mem["w"].offset, mem["v"].offset) == (0, 5, 11)
    expected = np.zeros((3, 4, 13), np.float32)
    expected[:, :, 0:5] = data
    expected[1:3, 2:4, 5:11] = w.reshape(2, 2, 6)
    expected[0:2, 0:3, 11:13] = v
    image = jax.jit(lambda s: s.sram_image())(state)
    assert image.shape == (3, 4, 13) and image.dtype == jnp.float32
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize(
    "dtype,n",
    [(jnp.float16, 5), (jnp.bfloat16, 5), (jnp.float16, 4), (jnp.int8, 7), (jnp.int32, 3)],
    ids=["float16-odd", "bfloat16-odd", "float16-even", "int8", "int32"],
)
def test_sram_image_packs_and_round_trips(dtype, n):
    """Sub-word elements are packed little-endian into 32-bit words; the bits match NumPy's byte view."""
    x = (rand(4, (2, 3, n)) * 50).astype(dtype)
    state = wafer.init(SPEC, words=2).allocate("x", Rect(1, 1, 2, 3), (n,), dtype, value=x)
    words = state.memory["x"].words
    offset = state.memory["x"].offset
    assert offset == 2 and words == -(-n * np.dtype(dtype).itemsize // 4)
    bits = np.asarray(state.sram_image(jnp.uint32))
    assert bits.shape == (3, 4, offset + words)
    # The reference: NumPy's little-endian bytes of each core's elements, zero-padded to whole words.
    xb = np.asarray(x).reshape(6, -1).view(np.uint8).reshape(6, -1)
    xb = np.pad(xb, ((0, 0), (0, 4 * words - xb.shape[1])))
    ref = xb.view("<u4").reshape(2, 3, words)
    np.testing.assert_array_equal(bits[1:3, 1:4, offset:], ref)
    np.testing.assert_array_equal(bits[0, :, offset:], 0)  # unallocated words stay zero
    np.testing.assert_array_equal(bits[:, 0, offset:], 0)
    # Round trip: unpack the words back to elements, bit for bit.
    back = bits[1:3, 1:4, offset:].reshape(6, -1).view(np.uint8)[:, : n * np.dtype(dtype).itemsize]
    back = back.copy().view(np.dtype(dtype)).reshape(2, 3, n)
    np.testing.assert_array_equal(back.view(np.uint8), np.asarray(x).view(np.uint8))


def test_sram_image_reinterprets_as_float16():
    x = rand(6, (3, 4, 4)).astype(jnp.float16)
    state = wafer.init(SPEC, words=4, dtype="float16", value=x)
    image = state.sram_image(jnp.float16)  # [rows, cols, words, 2]: two halves per word
    np.testing.assert_array_equal(image.reshape(3, 4, 4), x)
    assert ml_dtypes.bfloat16 == jnp.bfloat16  # NumPy and JAX share the 16-bit float types used above


def test_seconds():
    state = make_state().replace(clock=jnp.float32(1700.0))
    np.testing.assert_allclose(state.seconds(SPEC), 1700.0 / 850e6, rtol=1e-6)


# ---- the whole WSE-2 ---------------------------------------------------------------------------------------------


def test_full_wse2_grid_halo_step():
    """A Jacobi step on all 757 x 996 cores with 4 words each, against plain jnp."""
    spec = wafer.WSE2
    x = rand(7, (spec.rows, spec.cols, 4))
    state = wafer.init(spec, words=4, value=x)
    assert state.read("data").shape == (757, 996, 4)

    def jacobi(state):
        halo, traffic = wafer.halo_exchange(state.read("data"))
        new, kc = wafer.map_cores(lambda n, s, e, w: 0.25 * (n + s + e + w), halo["N"], halo["S"], halo["E"], halo["W"])
        return state.write("data", new), wafer.superstep(kc, traffic)

    out, record = jax.jit(lambda s: wafer.step(s, spec, jacobi))(state)
    p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    ref = 0.25 * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2])
    np.testing.assert_allclose(out.read("data"), ref, rtol=1e-6, atol=1e-6)
    # Every core sends its 4 words on each link that leads to a neighbour.
    links = np.asarray(out.links)
    np.testing.assert_array_equal(links[1, :, :-1], 4.0)  # E
    np.testing.assert_array_equal(links[1, :, -1], 0.0)
    np.testing.assert_array_equal(links[0, 1:], 4.0)  # N
    np.testing.assert_array_equal(links[0, 0], 0.0)
    assert int(out.steps) == 1
    np.testing.assert_allclose(out.clock, record.cycles(spec), rtol=1e-6)
    np.testing.assert_allclose(out.busy, record.compute_cycles(spec), rtol=1e-6)
