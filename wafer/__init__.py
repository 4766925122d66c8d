"""wafer: the Cerebras wafer-scale engine as jitted JAX state.

A machine, not a model library: a spec (`WaferSpec`, presets `WSE1`, `WSE2`, `WSE3`), a state (`WaferState`:
SRAM segmented by allocation, link and compute counters, the clock), an SRAM allocator, fabric primitives
(shift, multicast, reduce and allreduce in several patterns, all-to-all, halo exchange), per-core programs
(`map_cores`) and one set of cost rules (`wafer.cost`). Research code can program it directly; the `compiler`
package builds on it.
"""

from wafer import cluster, cost, defects, fabric, kernel, layout, mesh
from wafer.cluster import ClusterSpec
from wafer.defects import DefectError, DefectMap, Remap
from wafer.errors import SpecError, SramCapacityError, UnsupportedPrimitiveError, WaferError
from wafer.fabric import (
    DIRECTIONS,
    Traffic,
    all_to_all,
    allreduce,
    halo_exchange,
    multicast,
    reduce,
    reduce_adds,
    shift,
)
from wafer.kernel import KernelCost, map_cores
from wafer.layout import Blocked
from wafer.memory import Allocation, MemoryMap, Rect
from wafer.mesh import make_mesh, shard
from wafer.spec import WSE1, WSE2, WSE3, WaferSpec
from wafer.state import WaferState, init
from wafer.step import Superstep, charge, run, step, superstep

__all__ = [
    "WSE1",
    "WSE2",
    "WSE3",
    "WaferSpec",
    "ClusterSpec",
    "WaferState",
    "init",
    "DIRECTIONS",
    "Allocation",
    "Blocked",
    "MemoryMap",
    "Rect",
    "SramCapacityError",
    "SpecError",
    "DefectError",
    "DefectMap",
    "Remap",
    "defects",
    "WaferError",
    "Traffic",
    "shift",
    "multicast",
    "reduce",
    "allreduce",
    "reduce_adds",
    "all_to_all",
    "halo_exchange",
    "KernelCost",
    "UnsupportedPrimitiveError",
    "map_cores",
    "Superstep",
    "superstep",
    "charge",
    "step",
    "run",
    "make_mesh",
    "shard",
    "cost",
    "cluster",
    "fabric",
    "kernel",
    "layout",
    "mesh",
]
