"""What evolves: `WaferState`, the whole wafer as a frozen pytree.

SRAM is stored segmented by allocation: `state.sram[name]` is one array `[h, w, *shape]` over that
allocation's rectangle of cores. Only allocated cores and words take host memory, so the full 757 x 996 grid
fits on a laptop when programs use a few KB per core, and a step that updates several allocations updates
several small arrays in place (donated) rather than copying one dense `[rows, cols, words]` array, which was
measured at 6-17x the native cost of an MLP training step (../shared/DESIGN.md). `state.sram_image()` builds
that dense view on demand, for pictures, inspection and tests, never in a hot path.

An allocation with a blocked layout (wafer/layout.py; a compiled program's weights, gradients and optimizer
slots) is kept as the whole tensor, unpadded, core (i, j) owning block (i, j): `state.sram[name]` is that tensor,
which a program's fast path reads and writes with no copy, and `state.read(name)` its per-core view
`[h, w, *shape]`, a reshape/transpose taken on demand (the per-core path, `sram_image()`, pictures, tests).

Counters: `links[d, r, c]` is the number of 32-bit words core (r, c) has sent on its outgoing link in
direction d (0=N, 1=E, 2=S, 3=W), forwarded traffic included; `busy[r, c]` the cycles core (r, c) spent
computing; `clock` the wafer's elapsed cycles; `steps` the supersteps run. The traffic of a program is fixed by
its shapes, so it is counted when tracing and charged once per step (or once per `wafer.run` of many steps),
never per fabric operation (see wafer/step.py). Counters are float32: exact up to 2**24 per entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wafer.memory import MemoryMap, Rect
from wafer.spec import WaferSpec


@struct.dataclass
class WaferState:
    """The wafer's SRAM contents and counters.

    Attributes:
      sram: {allocation name: the stored array: [h, w, *shape], or a blocked layout's tensor}.
      links: [4, rows, cols] float32, words sent per core per direction (N, E, S, W).
      busy: [rows, cols] float32, compute cycles per core.
      clock: [] float32, elapsed wafer cycles.
      steps: [] int32, supersteps run.
      memory: the static SRAM layout (a `MemoryMap`).
    """

    sram: dict
    links: jax.Array
    busy: jax.Array
    clock: jax.Array
    steps: jax.Array
    memory: MemoryMap = struct.field(pytree_node=False)

    @property
    def rows(self) -> int:
        return self.memory.rows

    @property
    def cols(self) -> int:
        return self.memory.cols

    # ---- allocations ---------------------------------------------------------------------------------------

    def allocate(self, name: str, rect, shape, dtype="float32", *, value=None, offset=None, layout=None) -> WaferState:
        """A new state with allocation `name` on `rect` holding a per-core array of `shape`.

        Args:
          value: initial contents `[h, w, *shape]` (broadcastable), or with a `layout` the tensor `layout.shape`;
            zeros by default.
          layout: a `wafer.layout.Blocked` layout: stored as one tensor, viewed per core by `read`.
        Raises:
          SramCapacityError: it does not fit; ValueError: bad name, rectangle, offset or layout.
        """
        memory = self.memory.allocate(name, rect, shape, dtype, offset, layout)
        alloc = memory[name]
        if value is None:
            data = jnp.zeros(alloc.stored_shape, alloc.dtype)
        else:
            value = jnp.asarray(value)
            try:
                data = jnp.broadcast_to(value, alloc.stored_shape).astype(alloc.dtype)
            except ValueError as e:
                what = "[h, w, *shape]" if layout is None else "the blocked tensor"
                raise ValueError(
                    f"allocation {name!r}: value of shape {value.shape} does not broadcast to "
                    f"{what} = {alloc.stored_shape}"
                ) from e
        return self.replace(sram={**self.sram, name: data}, memory=memory)

    def reserve(self, name: str, rect, shape, dtype="float32", *, offset=None) -> WaferState:
        """A new state with SRAM reserved for `name` but no data kept for it.

        For buffers whose contents the emulator does not need to keep between steps (a compiled program's
        activation buffers): they take their room in every core's SRAM, count in the occupancy map and the
        capacity checks, and read as zeros in `sram_image()`, but cost no host memory.
        """
        return self.replace(memory=self.memory.allocate(name, rect, shape, dtype, offset))

    def free(self, name: str) -> WaferState:
        memory = self.memory.free(name)
        return self.replace(sram={k: v for k, v in self.sram.items() if k != name}, memory=memory)

    def read(self, name: str) -> jax.Array:
        """The per-core array `[h, w, *shape]` of allocation `name` (a blocked one's per-core view)."""
        alloc = self.memory[name]
        if name not in self.sram:
            raise KeyError(f"SRAM allocation {name!r} is reserved (a buffer) and holds no data")
        return alloc.per_core(self.sram[name])

    def write(self, name: str, value) -> WaferState:
        """A new state with allocation `name` replaced by `value` (cast to its dtype): the per-core array
        `[h, w, *shape]`, or for a blocked allocation also its tensor `layout.shape` (stored as it is)."""
        alloc = self.memory[name]
        if name not in self.sram:
            raise KeyError(f"SRAM allocation {name!r} is reserved (a buffer) and holds no data")
        value = jnp.asarray(value)
        if tuple(value.shape) == alloc.array_shape:
            value = alloc.from_per_core(value)
        elif tuple(value.shape) != alloc.stored_shape:
            also = "" if alloc.layout is None else f" or the blocked tensor {alloc.stored_shape}"
            raise ValueError(
                f"write to allocation {name!r}: expected shape {alloc.array_shape} "
                f"([h, w, *shape]){also}, got {tuple(value.shape)}"
            )
        return self.replace(sram={**self.sram, name: value.astype(alloc.dtype)})

    # ---- views ---------------------------------------------------------------------------------------------

    def sram_image(self, dtype=jnp.float32) -> jax.Array:
        """The dense per-core SRAM view `[rows, cols, words]` of every allocation.

        `words` is the highest word in use on any core. Each allocation's elements are laid out as 32-bit words
        at its offset (16-bit elements packed two to a word, little-endian) and the image is bitcast to
        `dtype`, so float32 allocations read back as their values. Unallocated words are zero. A 16-bit
        `dtype` gives `[rows, cols, words, 2]` (lax.bitcast_convert_type splits each word).
        """
        words = int(self.memory.high_water().max()) if self.memory.allocations else 0
        image = jnp.zeros((self.rows, self.cols, words), jnp.uint32)
        for a in self.memory.allocations:
            if a.name not in self.sram:  # reserved buffers read as zeros
                continue
            raw = _as_words(a.per_core(self.sram[a.name]), a.words)
            image = image.at[a.rect.rows, a.rect.cols, a.offset : a.end].set(raw)
        return jax.lax.bitcast_convert_type(image, dtype)

    def occupancy(self) -> np.ndarray:
        """Bytes of SRAM in use per core, `[rows, cols]`."""
        return self.memory.occupancy()

    def seconds(self, spec: WaferSpec):
        """Elapsed wafer time at the spec's clock."""
        return self.clock / spec.clock_hz


def _as_words(x: jax.Array, words: int) -> jax.Array:
    """[h, w, *shape] -> [h, w, words] uint32, packing sub-word elements and zero-padding the tail."""
    h, w = x.shape[:2]
    flat = x.reshape(h, w, -1)
    itemsize = flat.dtype.itemsize
    if flat.dtype == jnp.bool_:
        flat, itemsize = flat.astype(jnp.uint8), 1
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(itemsize)
    if uint is None:
        raise ValueError(f"sram_image: unsupported element size {itemsize} bytes ({x.dtype})")
    flat = jax.lax.bitcast_convert_type(flat, uint)
    per_word = 4 // itemsize
    n = flat.shape[-1]
    flat = jnp.pad(flat, ((0, 0), (0, 0), (0, words * per_word - n)))
    if per_word == 1:
        return flat
    flat = flat.reshape(h, w, words, per_word).astype(jnp.uint32)
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * (8 * itemsize)
    return jnp.sum(flat << shifts, axis=-1, dtype=jnp.uint32)


def init(spec: WaferSpec, words: int = 0, dtype="float32", *, value=None) -> WaferState:
    """A fresh wafer: zeroed counters and, if `words > 0`, one whole-grid allocation named "data".

    Args:
      spec: the wafer.
      words: elements per core of the "data" allocation ([rows, cols, words] of `dtype`).
      value: its initial contents (broadcastable to [rows, cols, words]); zeros by default.
    """
    memory = MemoryMap(spec.rows, spec.cols, spec.data_bytes_per_core)  # the code keeps the rest
    state = WaferState(
        sram={},
        links=jnp.zeros((4, spec.rows, spec.cols), jnp.float32),
        busy=jnp.zeros((spec.rows, spec.cols), jnp.float32),
        clock=jnp.zeros((), jnp.float32),
        steps=jnp.zeros((), jnp.int32),
        memory=memory,
    )
    if words:
        state = state.allocate("data", Rect(0, 0, spec.rows, spec.cols), (words,), dtype, value=value)
    return state
