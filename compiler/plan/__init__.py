"""The plan: what compile decides (a frozen `Plan`), and the passes that decide it.

features.py   the static facts of every kernel (the schedule's and the partition rule's inputs)
place.py      PlacementParams, KernelDemand and the banded floorplan; hand placements validated
bands.py      apportioning sizes and laying bands out (serpentine): shared by the floorplan and the legaliser
legalise.py   continuous targets to valid placements, with tile-grid snapping (the placement searches)
partition.py  the partition rule: tilings, per-core work and SRAM on a rectangle
route.py      streams between rectangles, their lanes, link loads and hops
plan.py       the Plan and its passes: trace, graph, demands, place, partition, route, lay out
"""

from compiler.plan.plan import (
    MODES,
    PASSES,
    TASKS,
    Plan,
    Storage,
    build,
    demands_pass,
    graph_pass,
    layout_pass,
    partition_pass,
    place_pass,
    route_pass,
    trace_program,
    with_placement,
)

__all__ = [
    "MODES",
    "PASSES",
    "TASKS",
    "Plan",
    "Storage",
    "build",
    "demands_pass",
    "graph_pass",
    "layout_pass",
    "partition_pass",
    "place_pass",
    "route_pass",
    "trace_program",
    "with_placement",
]
