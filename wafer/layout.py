"""Blocked storage: an allocation kept as one whole tensor whose blocks are its cores' tiles.

A weight split over a rectangle of `gh x gw` cores is, per core, a tile `[*lead, ta, tb]`: core (i, j) holds rows
`i*ta:(i+1)*ta` and columns `j*tb:(j+1)*tb` of the last two axes (zero beyond the tensor's edge). Kept as the
per-core array `[gh, gw, *lead, ta, tb]`, every use of the whole weight (a matmul, an optimizer update) has to
reassemble it: a transpose fused with a slice, measured at 1.4-1.7x the native cost of an MLP forward on CPU
(docs/performance.md). A *blocked* allocation stores the tensor itself, `[*lead, a, b]`, unpadded: the per-core
view is a pad, reshape and transpose of it, taken only where per-core tiles are wanted (the per-core path,
`sram_image()`, pictures, tests), and the fast path reads and writes the tensor with no copy. The padding of
uneven tiles is implicit: it reads as zeros in the per-core view, takes its room in SRAM (the allocation's
per-core shape is the full tile), and never needs to be kept at zero.

Kinds (how the tensor maps onto the cores):
  matrix  the last two axes in blocks `[ta, tb]` over the rectangle's rows and columns; leading axes whole. With
          `axes=(rows, cols)`, the tensor viewed as the matrix `[prod rows, prod cols]` (its axes `rows` flattened
          into the matrix's rows, `cols` into its columns, each in the order given) in blocks `[ta, tb]`: a weight
          of several contracted and free axes (an attention projection `[d, heads, head_dim]`) held as the matrix
          a matmul multiplies by, still stored as the tensor itself.
  vector  the flattened tensor in runs of `t` elements, core by core in row-major order.
  scalar  one element on a 1 x 1 rectangle.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

KINDS = ("matrix", "vector", "scalar")


@dataclasses.dataclass(frozen=True)
class Blocked:
    """The blocked layout of one allocation (module docstring).

    Attributes:
      shape: the stored tensor's shape (no padding).
      kind: "matrix", "vector" or "scalar".
      axes: a matrix's view (rows, cols): the tensor's axes flattened into the matrix's rows and its columns,
        together every axis once; None: the last two axes, leading axes whole.
    """

    shape: tuple[int, ...]
    kind: str = "matrix"
    axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.kind not in KINDS:
            raise ValueError(f"blocked layout kind must be one of {KINDS}, got {self.kind!r}")
        if self.axes is not None:
            rows, cols = (tuple(int(a) for a in ax) for ax in self.axes)
            object.__setattr__(self, "axes", (rows, cols))
            if self.kind != "matrix" or sorted(rows + cols) != list(range(len(self.shape))) or not rows or not cols:
                raise ValueError(
                    f"a matrix view of a tensor {self.shape} needs (rows, cols) axes, each axis once and both "
                    f"non-empty; got {self.axes} for kind {self.kind!r}"
                )

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The shape the blocks cut: `[*lead, a, b]` (a view's `[a, b]`)."""
        if self.axes is None:
            return self.shape
        rows, cols = self.axes
        return (math.prod(self.shape[a] for a in rows), math.prod(self.shape[a] for a in cols))

    def _as_matrix(self, x):
        if self.axes is None:
            return x
        rows, cols = self.axes
        return jnp.transpose(x, rows + cols).reshape(self.matrix_shape)

    def _from_matrix(self, x):
        if self.axes is None:
            return x
        rows, cols = self.axes
        perm = rows + cols
        x = x.reshape([self.shape[a] for a in perm])
        return jnp.transpose(x, [perm.index(a) for a in range(len(perm))])

    def check(self, grid: tuple[int, int], tile: tuple[int, ...]) -> str | None:
        """Why the tensor does not fit tiles `tile` on `grid` cores (None when it does)."""
        gh, gw = grid
        if self.kind == "scalar":
            ok = grid == (1, 1) and math.prod(tile) == 1 and math.prod(self.shape) == 1
            return None if ok else f"a scalar needs one element on a 1x1 rectangle, got {grid} cores of {tile}"
        if self.kind == "vector":
            if len(tile) != 1 or math.prod(self.shape) > gh * gw * tile[0]:
                return f"{math.prod(self.shape)} elements do not fit {gh}x{gw} cores of tiles {tile}"
            return None
        shape = self.matrix_shape
        if len(shape) < 2 or len(tile) != len(shape) or tuple(tile[:-2]) != shape[:-2]:
            return f"a matrix {self.shape} needs tiles [*{list(shape[:-2])}, ta, tb], got {tile}"
        (a, b), (ta, tb) = shape[-2:], tile[-2:]
        if a > gh * ta or b > gw * tb:
            return f"a matrix {self.shape} does not fit {gh}x{gw} cores of tiles {tile}"
        return None

    def to_cores(self, x, grid: tuple[int, int], tile: tuple[int, ...]):
        """The per-core view: `[*shape]` -> `[gh, gw, *tile]`, zeros where a tile runs past the tensor."""
        gh, gw = grid
        if self.kind == "scalar":
            return jnp.reshape(x, (1, 1))
        if self.kind == "vector":
            (t,) = tile
            flat = jnp.pad(jnp.ravel(x), (0, gh * gw * t - math.prod(self.shape)))
            return flat.reshape(gh, gw, t)
        x = self._as_matrix(x)
        *lead, a, b = self.matrix_shape
        ta, tb = tile[-2:]
        n = len(lead)
        x = jnp.pad(x, [(0, 0)] * n + [(0, gh * ta - a), (0, gw * tb - b)])
        x = x.reshape(*lead, gh, ta, gw, tb)
        return jnp.transpose(x, (n, n + 2, *range(n), n + 1, n + 3))

    def from_cores(self, t):
        """The stored tensor from its per-core view: `[gh, gw, *tile]` -> `[*shape]` (padding dropped)."""
        if self.kind == "scalar":
            return jnp.reshape(t, self.shape)
        if self.kind == "vector":
            return jnp.ravel(t)[: math.prod(self.shape)].reshape(self.shape)
        gh, gw = t.shape[:2]
        *lead, a, b = self.matrix_shape
        ta, tb = t.shape[-2:]
        n = len(lead)
        # [gh, gw, *lead, ta, tb] -> [*lead, gh, ta, gw, tb]
        x = jnp.transpose(t, (*range(2, 2 + n), 0, 2 + n, 1, 3 + n)).reshape(*lead, gh * ta, gw * tb)
        return self._from_matrix(x[..., :a, :b])

    @property
    def grid_axes(self) -> tuple[int, ...]:
        """Axes of the stored tensor that run along the core rows and columns (for sharding over a device mesh)."""
        # vectors and scalars are a few words per core: left whole (replicated) on every device
        if self.kind != "matrix":
            return ()
        # a view: the first axis of each group varies slowest along its matrix axis, so it follows the cores
        return (self.axes[0][0], self.axes[1][0]) if self.axes else (len(self.shape) - 2, len(self.shape) - 1)
