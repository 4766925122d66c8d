"""Scale-out on an existing engine: placing a wafer's state on a JAX device mesh.

The core grid is split over a 2D device mesh with axes ("rows", "cols"): every core-grid array (SRAM
allocations `[h, w, ...]`, link and busy counters) is sharded along its core-row and core-column axes with a
`NamedSharding`, and XLA's SPMD partitioner turns the fabric primitives' shifts, broadcasts and sums into
collective permutes, all-gathers and all-reduces between devices. The exchange engine is XLA's, not ours.

XLA requires each sharded axis to divide evenly by its mesh axis. We never pad or drop cores to force that:
an array axis that does not divide is replicated along that mesh axis instead (its computation is then
repeated on those devices), and `make_mesh` picks the device grid that divides the wafer's grid best
(WSE-2's 757 rows are prime, so 4 devices become a 1 x 4 mesh over its 996 columns).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wafer.state import WaferState

AXES = ("rows", "cols")


def make_mesh(spec, devices=None) -> Mesh:
    """A ("rows", "cols") mesh over `devices` (default: all), shaped to divide spec.rows x spec.cols best.

    Among factorisations dr x dc of the device count, prefer the one whose axes divide the grid evenly, then
    the squarest.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    best = None
    for dr in range(1, n + 1):
        if n % dr:
            continue
        dc = n // dr
        even = (spec.rows % dr == 0) + (spec.cols % dc == 0)
        key = (even, -abs(np.log(dr / dc)))
        if best is None or key > best[0]:
            best = (key, dr, dc)
    _, dr, dc = best
    return Mesh(np.array(devices).reshape(dr, dc), AXES)


def grid_sharding(mesh: Mesh, shape, grid_axes=(0, 1)) -> NamedSharding:
    """NamedSharding of an array whose axes `grid_axes` are core rows and columns.

    A grid axis is sharded over its mesh axis only if it divides evenly; otherwise it is replicated.
    """
    spec = [None] * len(shape)
    for ax, name in zip(grid_axes, AXES):
        if shape[ax] % mesh.shape[name] == 0:
            spec[ax] = name
    return NamedSharding(mesh, P(*spec))


def shard(state: WaferState, mesh: Mesh) -> WaferState:
    """Place every core-grid array of `state` on `mesh` (SRAM allocations, link and busy counters)."""
    put = lambda x, axes: jax.device_put(x, grid_sharding(mesh, x.shape, axes))
    return state.replace(
        sram={k: put(v, (0, 1)) for k, v in state.sram.items()},
        links=put(state.links, (1, 2)),
        busy=put(state.busy, (0, 1)),
        clock=jax.device_put(state.clock, NamedSharding(mesh, P())),
        steps=jax.device_put(state.steps, NamedSharding(mesh, P())),
    )
