"""compiler: turns JAX / Flax programs into wafer programs (see ../shared/DESIGN.md, "The compiler").

    exe = compiler.compile(fn, params, *example_inputs, spec=wafer.WSE2)   # or compile(nnx_module, *inputs, spec=)
    state = exe.load(params)          # weights into their kernels' SRAM allocations
    out, state = exe(state, *inputs)  # emulated forward == fn(params, *inputs)
    exe.report, exe.placement, exe.read_params(state), exe.plan, compiler.estimate(exe, other_spec)

The pipeline, top to bottom (docs/compiler.md has the diagram):
  frontend/   trace (a flat jaxpr), precision policies, the kernel graph
  plan/       the Plan and its passes: demands, place, partition, route, lay out
  schedule.py every timing, from a plan and a spec, written once
  run/        programs: inference (fast and per-core paths) and training (pipelined, weight streaming)
  analysis/   the differentiable cost model (the schedule on a relaxed layout), sweeps, what-ifs, placement search
  views/      the report, pictures, Perfetto traces
  host/       the input pipeline and the training loop with checkpoints
  cli.py      the `wafer` command

Frameworks: compiler.from_torch / from_keras / from_tf (frontend/torch_import.py, keras_import.py, tf_import.py)
give a plain JAX function and params; to_torch / to_keras put trained params back; stateful trains a model whose
train-mode forward updates state (frontend/frameworks.py); compile and trace accept a torch module or a Keras model
directly. compiler.Estimator (host/estimator.py) is the TF / Cerebras Estimator programming model.
"""

from compiler import schedule
from compiler.analysis import costmodel
from compiler.analysis.search import (
    compare_searches,
    gradient_placement,
    random_search,
    search_placement,
    simulated_annealing,
)
from compiler.analysis.sweep import pareto_front, sweep, what_if
from compiler.errors import (
    BatchError,
    CheckpointError,
    ColorError,
    CompilerError,
    InputMismatchError,
    ParamsMismatchError,
    PlacementError,
    RouteError,
    StateMismatchError,
    UnsupportedOpError,
)
from compiler.frontend.frameworks import MissingExtraError, stateful
from compiler.frontend.graph import KINDS, SUPPORTED_PRIMITIVES, Graph, Kernel, build_graph
from compiler.frontend.keras_import import from_keras, to_keras
from compiler.frontend.precision import Policy, apply_policy, round_cb16
from compiler.frontend.tf_import import from_tf
from compiler.frontend.torch_import import UnsupportedTorchOpError, from_torch, to_torch
from compiler.frontend.trace import Traced, split_module, trace
from compiler.host.agreement import Agreement, compare_runs
from compiler.host.data import Batches, Prefetcher, prefetch
from compiler.host.estimator import Estimator, EstimatorSpec, ModeKeys
from compiler.host.fit import NonFiniteLossError, fit, latest_checkpoint, restore_checkpoint, save_checkpoint
from compiler.host.pipeline import ArraySource, InputStats, Pipeline
from compiler.plan import Plan, Storage, with_placement
from compiler.plan.legalise import legalise
from compiler.plan.partition import KernelPlan, ParamTiling
from compiler.plan.place import (
    KernelDemand,
    PlacementParams,
    balanced_bound,
    place,
    usable_region,
    validate_placement,
)
from compiler.plan.route import HOST, Routes, route
from compiler.run.cluster import WaferSplitError
from compiler.run.cluster import mesh as cluster_mesh
from compiler.run.infer import compile
from compiler.run.program import Program
from compiler.run.train import TrainState, compile_train
from compiler.views import plots, sweep_plots, trace_export
from compiler.views.report import KernelRow, Report, estimate

# The names of the programs compile and compile_train return, as earlier releases named them.
Executable = Trainer = Program

__all__ = [
    "compile",
    "compile_train",
    "estimate",
    "with_placement",
    "Program",
    "Executable",
    "Trainer",
    "TrainState",
    "WaferSplitError",
    "cluster_mesh",
    "Plan",
    "Storage",
    "schedule",
    "Policy",
    "apply_policy",
    "round_cb16",
    "CompilerError",
    "UnsupportedOpError",
    "PlacementError",
    "RouteError",
    "ColorError",
    "BatchError",
    "InputMismatchError",
    "ParamsMismatchError",
    "StateMismatchError",
    "CheckpointError",
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
    "place",
    "validate_placement",
    "balanced_bound",
    "usable_region",
    "legalise",
    "route",
    "Routes",
    "HOST",
    "KernelPlan",
    "ParamTiling",
    "Report",
    "KernelRow",
    "Batches",
    "Prefetcher",
    "prefetch",
    "Pipeline",
    "InputStats",
    "ArraySource",
    "fit",
    "compare_runs",
    "Agreement",
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
    "costmodel",
    "plots",
    "sweep_plots",
    "trace_export",
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
