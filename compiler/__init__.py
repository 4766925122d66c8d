"""compiler: turns JAX / Flax programs into wafer programs (see ../shared/DESIGN.md, "The compiler").

    exe = compiler.compile(fn, params, *example_inputs, spec=wafer.WSE2)   # or compile(nnx_module, *inputs, spec=)
    state = exe.load(params)          # weights into their kernels' SRAM tiles
    out, state = exe(state, *inputs)  # emulated forward == fn(params, *inputs)
    exe.report, exe.placement, exe.read_params(state)

Passes: trace (compiler/trace.py) -> kernel graph (graph.py) -> placement (place.py) -> partition (partition.py)
-> routes (route.py) -> Executable (lower.py; per-core path in percore.py) -> report (report.py).
"""

from compiler.errors import UnsupportedOpError
from compiler.graph import KINDS, SUPPORTED_PRIMITIVES, Graph, Kernel, build_graph
from compiler.lower import Executable, PipelineRecord, compile
from compiler.partition import KernelPlan, ParamTiling
from compiler.place import (
    KernelDemand,
    PlacementError,
    PlacementParams,
    balanced_bound,
    pipeline_cycles,
    place,
    usable_region,
    validate_placement,
)
from compiler.report import KernelRow, Report
from compiler.route import HOST, RouteError, Routes, route
from compiler.trace import Traced, split_module, trace

__all__ = [
    "compile",
    "Executable",
    "PipelineRecord",
    "UnsupportedOpError",
    "trace",
    "Traced",
    "split_module",
    "build_graph",
    "Graph",
    "Kernel",
    "KINDS",
    "SUPPORTED_PRIMITIVES",
    "KernelDemand",
    "PlacementParams",
    "PlacementError",
    "place",
    "validate_placement",
    "balanced_bound",
    "pipeline_cycles",
    "usable_region",
    "route",
    "Routes",
    "RouteError",
    "HOST",
    "KernelPlan",
    "ParamTiling",
    "Report",
    "KernelRow",
]
