"""Blocked allocations: stored as the whole tensor, read per core as a reshape/transpose of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wafer
from wafer import Blocked, Rect

SPEC = wafer.WaferSpec.mini(4, 5)


def per_core_reference(x, grid, tile):
    """[*lead, a, b] -> [gh, gw, *lead, ta, tb] by explicit loops over cores (zeros past the edge)."""
    gh, gw = grid
    *lead, ta, tb = tile
    out = np.zeros((gh, gw, *tile), x.dtype)
    for i in range(gh):
        for j in range(gw):
            block = x[..., i * ta : (i + 1) * ta, j * tb : (j + 1) * tb]
            out[i, j, ..., : block.shape[-2], : block.shape[-1]] = block
    return out


@pytest.mark.parametrize(
    "shape,grid,tile",
    [((6, 10), (2, 5), (3, 2)), ((7, 9), (3, 4), (3, 3)), ((2, 5, 7), (2, 3), (2, 3, 3))],
    ids=["even", "uneven", "lead-axis"],
)
def test_matrix_per_core_view_is_the_blocks(shape, grid, tile):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    layout = Blocked(shape, "matrix")
    assert layout.check(grid, tile) is None
    t = layout.to_cores(jnp.asarray(x), grid, tile)
    np.testing.assert_array_equal(t, per_core_reference(x, grid, tile))
    np.testing.assert_array_equal(layout.from_cores(t), x)


def test_vector_and_scalar_views():
    v = Blocked((7,), "vector")
    t = v.to_cores(jnp.arange(7.0), (2, 2), (2,))
    np.testing.assert_array_equal(t.reshape(-1), [0, 1, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(v.from_cores(t), np.arange(7.0))
    s = Blocked((), "scalar")
    assert s.to_cores(jnp.float32(3.0), (1, 1), ()).shape == (1, 1)
    assert s.from_cores(jnp.ones((1, 1))).shape == ()


def test_blocked_allocation_read_write_image():
    x = jax.random.normal(jax.random.key(0), (5, 7))
    state = wafer.init(SPEC).allocate("w", Rect(1, 1, 2, 3), (3, 3), value=x, layout=Blocked((5, 7)))
    alloc = state.memory["w"]
    assert alloc.stored_shape == (5, 7) and alloc.array_shape == (2, 3, 3, 3)
    assert state.sram["w"].shape == (5, 7)  # stored as the tensor itself
    tiles = state.read("w")
    np.testing.assert_array_equal(tiles, per_core_reference(np.asarray(x), (2, 3), (3, 3)))
    # the dense image holds the per-core tiles, padding as zeros
    image = np.asarray(state.sram_image())
    np.testing.assert_array_equal(image[1:3, 1:4, :9], np.asarray(tiles).reshape(2, 3, 9))
    # writes take the per-core view or the tensor
    s2 = state.write("w", 2 * tiles)
    np.testing.assert_allclose(s2.sram["w"], 2 * x)
    s3 = state.write("w", 3 * x)
    np.testing.assert_allclose(s3.read("w"), 3 * tiles)
    with pytest.raises(ValueError, match="blocked tensor"):
        state.write("w", jnp.ones((5, 8)))


def test_blocked_layout_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="does not fit"):
        wafer.init(SPEC).allocate("w", Rect(0, 0, 2, 2), (2, 2), layout=Blocked((5, 4)))
    with pytest.raises(ValueError, match="kind"):
        Blocked((3,), "diagonal")


@pytest.mark.parametrize(
    "shape,axes", [((5, 3, 4), ((0,), (1, 2))), ((3, 4, 5), ((0, 1), (2,))), ((4, 6), ((1,), (0,)))], ids=str
)
def test_matrix_view_blocks_the_viewed_matrix(shape, axes):
    """A matrix view (axes flattened into the matrix's rows and columns) blocks transpose(x).reshape(K, N) and
    round-trips to the tensor itself; the tensor is what is stored."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    lay = Blocked(shape, "matrix", axes)
    rows, cols = axes
    m = np.transpose(np.asarray(x), rows + cols).reshape(lay.matrix_shape)
    k, n = lay.matrix_shape
    grid, tile = (2, 3), (-(-k // 2), -(-n // 3))
    assert lay.check(grid, tile) is None
    tiles = lay.to_cores(x, grid, tile)
    np.testing.assert_array_equal(tiles, Blocked((k, n)).to_cores(jnp.asarray(m), grid, tile))
    np.testing.assert_array_equal(lay.from_cores(tiles), x)
    state = wafer.init(SPEC).allocate("w", Rect(1, 1, *grid), tile, layout=lay)
    state = state.write("w", x)
    assert state.sram["w"].shape == shape
    np.testing.assert_array_equal(state.read("w"), tiles)
    with pytest.raises(ValueError, match="each axis once"):
        Blocked(shape, "matrix", (rows, ()))
