"""compiler: turns JAX / Flax programs into wafer programs (see ../shared/DESIGN.md, "The compiler").

    exe = compiler.compile(fn, params, *example_inputs, spec=wafer.WSE2)   # or compile(nnx_module, *inputs, spec=)
    state = exe.load(params)          # weights into their kernels' SRAM tiles
    out, state = exe(state, *inputs)  # emulated forward == fn(params, *inputs)
    exe.report, exe.placement, exe.read_params(state)

Training: compiler.compile_train (train.py), the host loop compiler.fit with checkpoints (host.py, data.py),
precision policies (precision.py). Research: the differentiable cost model (costmodel.py), compiler.sweep and
compiler.what_if (sweep.py), placement search (search.py), pictures (plots.py), traces (trace_export.py), the
`wafer` command (cli.py).

Frameworks (compiler/frontend/): compiler.from_torch / from_keras / from_tf give a plain JAX function and params
(to_torch / to_keras put trained params back; stateful trains a model whose train-mode forward updates state);
compile and trace accept a torch module or a Keras model directly. compiler.Estimator (host/estimator.py) is the
TF / Cerebras Estimator programming model.

Passes: trace (compiler/trace.py) -> kernel graph (graph.py) -> placement (place.py) -> partition (partition.py)
-> routes (route.py) -> Executable (lower.py; per-core path in percore.py) -> report (report.py).
"""

from compiler.data import Batches, Prefetcher, prefetch
from compiler.errors import UnsupportedOpError
from compiler.frontend import (
    MissingExtraError,
    UnsupportedTorchOpError,
    from_keras,
    from_tf,
    from_torch,
    stateful,
    to_keras,
    to_torch,
)
from compiler.graph import KINDS, SUPPORTED_PRIMITIVES, Graph, Kernel, build_graph
from compiler.host import (
    Estimator,
    EstimatorSpec,
    ModeKeys,
    NonFiniteLossError,
    fit,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
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
from compiler.precision import Policy, apply_policy, round_cb16
from compiler.report import KernelRow, Report
from compiler.route import HOST, RouteError, Routes, route
from compiler.search import compare_searches, gradient_placement, random_search, search_placement, simulated_annealing

# Bound last: `compiler.sweep` is the function (DESIGN.md's API); the module stays importable as compiler.sweep
# through `from compiler.sweep import ...`.
from compiler.sweep import pareto_front, sweep, what_if  # noqa: E402, I001
from compiler.trace import Traced, split_module, trace
from compiler.train import Trainer, TrainState, compile_train

__all__ = [
    "Policy",
    "apply_policy",
    "round_cb16",
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
    "compile_train",
    "Trainer",
    "TrainState",
    "Batches",
    "Prefetcher",
    "prefetch",
    "fit",
    "NonFiniteLossError",
    "latest_checkpoint",
    "save_checkpoint",
    "restore_checkpoint",
    "sweep",
    "what_if",
    "pareto_front",
    "search_placement",
    "gradient_placement",
    "random_search",
    "simulated_annealing",
    "compare_searches",
    "from_torch",
    "to_torch",
    "from_keras",
    "to_keras",
    "from_tf",
    "stateful",
    "MissingExtraError",
    "UnsupportedTorchOpError",
    "Estimator",
    "EstimatorSpec",
    "ModeKeys",
]
