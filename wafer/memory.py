"""SRAM allocator: named allocations on rectangles of cores at word offsets.

Each core of the wafer has a private SRAM (48 KB = 12,288 32-bit words on WSE-2 [SDK]). A program's storage is
a set of *allocations*: an allocation covers a rectangle of cores and, on every core of it, the same range of
word offsets, holding a per-core array of a fixed shape and dtype. The layout is static: it is decided when a
program is built (as jax-md fixes a neighbour list's capacity), checked against the spec's capacity then, and
never changes inside jit. `MemoryMap` is that layout; `WaferState` carries it as a static field and holds the
data, one array `[h, w, *shape]` per allocation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from wafer.errors import SramCapacityError
from wafer.layout import Blocked

WORD_BYTES = 4


class Rect(NamedTuple):
    """A rectangle of cores: top-left `(row, col)` and size `height x width`."""

    row: int
    col: int
    height: int
    width: int

    @property
    def cores(self) -> int:
        return self.height * self.width

    @property
    def rows(self) -> slice:
        return slice(self.row, self.row + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.col, self.col + self.width)

    def overlaps(self, other: Rect) -> bool:
        return (
            self.row < other.row + other.height
            and other.row < self.row + self.height
            and self.col < other.col + other.width
            and other.col < self.col + self.width
        )

    def inside(self, rows: int, cols: int) -> bool:
        return (
            self.row >= 0
            and self.col >= 0
            and self.height >= 1
            and self.width >= 1
            and self.row + self.height <= rows
            and self.col + self.width <= cols
        )

    def __str__(self) -> str:
        return f"{self.height}x{self.width}@({self.row},{self.col})"


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One named allocation: the same per-core array on every core of `rect`, at word `offset`.

    Attributes:
      name: unique name.
      rect: the cores it covers.
      offset: first 32-bit word on each core.
      shape: per-core array shape; the state holds `[rect.height, rect.width, *shape]`, or, when `layout` is
        given, the whole tensor `layout.shape` whose blocks are the per-core arrays (wafer/layout.py).
      dtype: NumPy dtype name of the elements.
      layout: None (stored per core) or a `Blocked` layout (stored as one tensor, viewed per core on demand).
    """

    name: str
    rect: Rect
    offset: int
    shape: tuple[int, ...]
    dtype: str
    layout: Blocked | None = None

    @property
    def nbytes(self) -> int:
        """Bytes per core, rounded up to whole words (SRAM is word-addressed)."""
        return self.words * WORD_BYTES

    @property
    def words(self) -> int:
        """32-bit words per core."""
        return words_for(self.shape, self.dtype)

    @property
    def end(self) -> int:
        return self.offset + self.words

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The per-core view's shape, `[h, w, *shape]`."""
        return (self.rect.height, self.rect.width, *self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the array the state keeps: the per-core view, or a blocked layout's tensor."""
        return self.array_shape if self.layout is None else self.layout.shape

    def per_core(self, x):
        """The per-core view `[h, w, *shape]` of the stored array `x` (a reshape/transpose for blocked layouts)."""
        if self.layout is None:
            return x
        return self.layout.to_cores(x, (self.rect.height, self.rect.width), self.shape)

    def from_per_core(self, t):
        """The stored array of a per-core view `t` `[h, w, *shape]` (inverse of `per_core`, padding dropped)."""
        return t if self.layout is None else self.layout.from_cores(t)

    @property
    def grid_axes(self) -> tuple[int, ...]:
        """Axes of the stored array along the core rows and columns."""
        return (0, 1) if self.layout is None else self.layout.grid_axes


def words_for(shape, dtype) -> int:
    """32-bit words needed for one core's array of `shape` and `dtype`."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return -(-nbytes // WORD_BYTES)


@dataclasses.dataclass(frozen=True)
class MemoryMap:
    """The static layout of every core's SRAM: a tuple of non-overlapping allocations.

    Immutable: `allocate` and `free` return new maps.
    """

    rows: int
    cols: int
    capacity_bytes: int
    allocations: tuple[Allocation, ...] = ()

    @property
    def capacity_words(self) -> int:
        return self.capacity_bytes // WORD_BYTES

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.allocations)

    def __contains__(self, name: str) -> bool:
        return any(a.name == name for a in self.allocations)

    def __getitem__(self, name: str) -> Allocation:
        for a in self.allocations:
            if a.name == name:
                return a
        raise KeyError(f"no SRAM allocation named {name!r}; allocations are {list(self.names)}")

    def allocate(
        self,
        name: str,
        rect: Rect | tuple,
        shape: tuple[int, ...],
        dtype="float32",
        offset: int | None = None,
        layout: Blocked | None = None,
    ) -> MemoryMap:
        """A new map with one more allocation.

        Args:
          name: unique name.
          rect: `Rect(row, col, height, width)` (or a 4-tuple) inside the grid.
          shape: per-core array shape.
          dtype: element dtype.
          offset: word offset on each core; by default the lowest offset free on every core of `rect`.
          layout: a `Blocked` layout to store the allocation as one tensor (wafer/layout.py); per core by default.

        Raises:
          ValueError: duplicate name, rectangle outside the grid, an explicit offset overlapping another
            allocation, or a blocked tensor that does not fit the tiles.
          SramCapacityError: the allocation does not fit.
        """
        rect = Rect(*(int(v) for v in rect))
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype).name
        if name in self:
            raise ValueError(f"an SRAM allocation named {name!r} already exists; free it first or pick another name")
        if not rect.inside(self.rows, self.cols):
            raise ValueError(
                f"allocation {name!r}: rectangle {rect} is not inside the {self.rows}x{self.cols} "
                f"core grid (rows 0..{self.rows - 1}, cols 0..{self.cols - 1}, sizes >= 1)"
            )
        if any(s < 0 for s in shape):
            raise ValueError(f"allocation {name!r}: per-core shape must be non-negative, got {shape}")
        if layout is not None:
            why = layout.check((rect.height, rect.width), shape)
            if why:
                raise ValueError(f"allocation {name!r}: blocked layout: {why}")
        words = words_for(shape, dtype)
        busy = sorted((a.offset, a.end) for a in self.allocations if a.rect.overlaps(rect))
        if offset is None:
            offset = 0
            for lo, hi in busy:
                if lo >= offset + words:
                    break
                offset = max(offset, hi)
        else:
            offset = int(offset)
            if offset < 0:
                raise ValueError(f"allocation {name!r}: offset must be >= 0 words, got {offset}")
            for a in self.allocations:
                if a.rect.overlaps(rect) and offset < a.end and a.offset < offset + words:
                    raise ValueError(
                        f"allocation {name!r} at words [{offset}, {offset + words}) overlaps allocation "
                        f"{a.name!r} at words [{a.offset}, {a.end}) on cores {rect} & {a.rect}"
                    )
        if offset + words > self.capacity_words:
            occ = self.occupancy()[rect.rows, rect.cols]
            r, c = np.unravel_index(int(np.argmax(occ)), occ.shape)
            core = (rect.row + int(r), rect.col + int(c))
            free = self.capacity_bytes - int(occ[r, c])
            detail = ""
            if free >= words * WORD_BYTES:
                detail = (
                    f"the free space is fragmented: the lowest offset free on all of {rect} is word "
                    f"{offset}, and {offset + words} words exceed {self.capacity_words}"
                )
            raise SramCapacityError(name, core, words * WORD_BYTES, free, self.capacity_bytes, detail)
        alloc = Allocation(name, rect, offset, shape, dtype, layout)
        return dataclasses.replace(self, allocations=self.allocations + (alloc,))

    def free(self, name: str) -> MemoryMap:
        self[name]  # raises KeyError naming the allocations
        return dataclasses.replace(self, allocations=tuple(a for a in self.allocations if a.name != name))

    def occupancy(self) -> np.ndarray:
        """Bytes in use on each core, `[rows, cols]` int64."""
        occ = np.zeros((self.rows, self.cols), np.int64)
        for a in self.allocations:
            occ[a.rect.rows, a.rect.cols] += a.nbytes
        return occ

    def high_water(self) -> np.ndarray:
        """Highest word offset in use on each core, `[rows, cols]` int64 (occupancy including gaps)."""
        hw = np.zeros((self.rows, self.cols), np.int64)
        for a in self.allocations:
            v = hw[a.rect.rows, a.rect.cols]
            hw[a.rect.rows, a.rect.cols] = np.maximum(v, a.end)
        return hw
