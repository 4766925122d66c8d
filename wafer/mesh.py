"""Scale-out on an existing engine: placing a wafer's state on a JAX device mesh.

The core grid is split over a 2D device mesh with axes ("rows", "cols"): every core-grid array (SRAM
allocations `[h, w, ...]`, link and busy counters) is sharded along its core-row and core-column axes with a
`NamedSharding`, and XLA's SPMD partitioner turns the fabric primitives' shifts, broadcasts and sums into
collective permutes, all-gathers and all-reduces between devices. The exchange engine is XLA's, not ours.

XLA requires each sharded axis to divide evenly by its mesh axis. We never pad or drop cores to force that:
an array axis that does not divide is replicated along that mesh axis instead (its computation is then
repeated on those devices), and `make_mesh` picks the device grid that splits the wafer's grid into the most
distinct shards (WSE-2's 757 rows are prime, so 4 devices become a 1 x 4 mesh over its 996 columns).

Numerics: shifts, multicasts, halo exchanges and elementwise per-core programs compute exactly what they compute
on one device, so a stencil is bit-identical sharded or not. A float `reduce` along a sharded axis is summed per
device and then across devices, which may round differently from one device's order (within float32 rtol).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wafer.state import WaferState

AXES = ("rows", "cols")


def mesh_shape(rows: int, cols: int, devices: int) -> tuple[int, int]:
    """The device grid (dr, dc), dr * dc == devices, that `make_mesh` uses for a rows x cols core grid.

    Among the factorisations of `devices`, prefer the one that splits the core grid into the most distinct
    shards (a mesh axis counts only if it divides its grid axis; the others replicate), then the one with the
    shortest cuts between shards (the least neighbour traffic crossing devices), then the one with fewer rows.
    """
    for name, v in (("rows", rows), ("cols", cols), ("devices", devices)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mesh_shape: {name} must be an int >= 1, got {v!r}")
    best = None
    for dr in range(1, devices + 1):
        if devices % dr:
            continue
        dc = devices // dr
        er = dr if rows % dr == 0 else 1  # effective splits: an axis that does not divide is replicated
        ec = dc if cols % dc == 0 else 1
        cut = (er - 1) * cols + (ec - 1) * rows
        key = (er * ec, -cut)
        if best is None or key > best[0]:
            best = (key, dr, dc)
    return best[1], best[2]


def make_mesh(spec, devices=None, *, shape: tuple[int, int] | None = None) -> Mesh:
    """A ("rows", "cols") mesh over `devices` (default: all of `jax.devices()`).

    Args:
      spec: the wafer (its rows and cols choose the mesh shape).
      devices: the devices to use.
      shape: (dr, dc) to force a mesh shape; dr * dc must equal the number of devices. By default
        `mesh_shape(spec.rows, spec.cols, len(devices))`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices given")
    n = len(devices)
    if shape is None:
        dr, dc = mesh_shape(spec.rows, spec.cols, n)
    else:
        dr, dc = (int(s) for s in shape)
        if dr < 1 or dc < 1 or dr * dc != n:
            raise ValueError(f"make_mesh: shape {tuple(shape)} must be positive with dr * dc == {n} devices")
    return Mesh(np.array(devices, dtype=object).reshape(dr, dc), AXES)


def _check_mesh(mesh: Mesh):
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"expected a mesh with axes {AXES} (see wafer.make_mesh), got {tuple(mesh.axis_names)}")


def grid_sharding(mesh: Mesh, shape, grid_axes=(0, 1)) -> NamedSharding:
    """NamedSharding of an array whose axes `grid_axes` are core rows and columns.

    A grid axis is sharded over its mesh axis only if it divides evenly; otherwise it is replicated.
    """
    _check_mesh(mesh)
    spec = [None] * len(shape)
    for ax, name in zip(grid_axes, AXES):
        if shape[ax] % mesh.shape[name] == 0:
            spec[ax] = name
    return NamedSharding(mesh, P(*spec))


def shard(state: WaferState, mesh: Mesh) -> WaferState:
    """Place every core-grid array of `state` on `mesh` (SRAM allocations, link and busy counters).

    A blocked allocation (wafer/layout.py) is sharded along the axes of its tensor that run along the core grid.

    Scalars (clock, steps) are replicated. Jitted steps keep the placement: their outputs come back sharded
    the same way, so `shard` is called once, before the first step.
    """
    _check_mesh(mesh)
    put = lambda x, axes: jax.device_put(x, grid_sharding(mesh, x.shape, axes))
    return state.replace(
        sram={k: put(v, state.memory[k].grid_axes) for k, v in state.sram.items()},
        links=put(state.links, (1, 2)),
        busy=put(state.busy, (0, 1)),
        clock=jax.device_put(state.clock, NamedSharding(mesh, P())),
        steps=jax.device_put(state.steps, NamedSharding(mesh, P())),
    )
