"""The `wafer` command, shaped like the Cerebras run scripts (docs/cli.md).

    wafer info --preset wse2 [--rows R --cols C] [--json]
    wafer compile MODULE:FACTORY [--preset wse2] [--validate-only | --compile-only] [--params params.yaml] [--out DIR]
    wafer train MODULE:FACTORY --mode train|eval|train_and_eval --model-dir DIR --max-steps N [--preset ...]
    wafer sweep ...
    wafer validate [CASE ...] [--execute small|all|none] [--tolerance REL]

MODULE:FACTORY names a callable in an importable module (`compiler.examples:mlp`) or in a file
(`path/to/model.py:make`); it returns a dict describing the program (the factory contract, in
compiler/examples.py and docs/cli.md). `--params` is a YAML (or JSON) file with up to four sections: `spec`
(WaferSpec fields), `placement` (PlacementParams fields), `model` (keyword arguments of the factory) and `train`
(settings of `wafer train`).

Errors in arguments, models or programs print one line, `wafer: error: ...`, on stderr and exit non-zero (2 for
bad arguments, 1 otherwise); `--debug` re-raises them with their traceback instead. Library modules (JAX, the
compiler) are imported only by the commands that need them, so `wafer info` and argument errors are quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

PRESETS = ("wse1", "wse2", "wse3", "mini")
MINI_DEFAULT = (32, 32)
PARAM_SECTIONS = ("spec", "placement", "model", "train")
TRAIN_SETTINGS = ("execution", "checkpoint_every", "eval_every", "keep", "log_every")
EXECUTIONS = ("auto", "pipelined", "weight_streaming")
FORWARD_KEYS = ("fn", "params", "inputs")
TRAIN_KEYS = ("loss_fn", "params", "batch", "optimizer", "data", "eval_data", "eval_fn")
RTOL = 1e-4  # emulated vs native, relative to max |native| (float32; summation order may differ)


class CLIError(Exception):
    """A user error: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise CLIError(f"{message} (see '{self.prog} --help')", code=2)


# ---- specs and params files --------------------------------------------------------------------------------------


def load_params(path) -> dict:
    """The sections of a params file (YAML, or JSON): {"spec": {}, "placement": {}, "model": {}, "train": {}}."""
    out = {k: {} for k in PARAM_SECTIONS}
    if path is None:
        return out
    if not os.path.isfile(path):
        raise CLIError(f"params file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # JSON is YAML's subset that needs no parser beyond the standard library
        data = json.loads(text)
    except Exception as e:
        raise CLIError(f"cannot parse params file {path}: {' '.join(str(e).split())}") from None
    if data is None:
        return out
    if not isinstance(data, dict):
        raise CLIError(f"params file {path} must hold a mapping with sections {list(PARAM_SECTIONS)}")
    unknown = [k for k in data if k not in PARAM_SECTIONS]
    if unknown:
        raise CLIError(f"params file {path}: unknown sections {unknown}; the sections are {list(PARAM_SECTIONS)}")
    for k, v in data.items():
        if v is None:
            continue
        if not isinstance(v, dict):
            raise CLIError(f"params file {path}: section {k!r} must be a mapping of names to values, got {v!r}")
        out[k] = dict(v)
    bad = [k for k in out["train"] if k not in TRAIN_SETTINGS]
    if bad:
        raise CLIError(f"params file {path}: unknown train settings {bad}; they are {list(TRAIN_SETTINGS)}")
    return out


def make_spec(preset: str, rows: int | None = None, cols: int | None = None, overrides: dict | None = None):
    """A WaferSpec: a preset, its grid resized by rows/cols, fields overridden (a params file's `spec` section)."""
    import wafer

    preset = preset.lower()
    if preset not in PRESETS:
        raise CLIError(f"unknown preset {preset!r}; the presets are {list(PRESETS)}", code=2)
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(wafer.WaferSpec)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise CLIError(f"unknown WaferSpec fields {unknown} in the params file; the fields are {list(fields)}")
    for k, v in overrides.items():  # YAML reads 1e9 (no dot) as a string
        if isinstance(v, str) and k != "name":
            try:
                overrides[k] = float(v)
            except ValueError:
                pass
        elif fields[k].type == "int" and isinstance(v, float) and v.is_integer():
            overrides[k] = int(v)
    rows = rows if rows is not None else overrides.pop("rows", None)
    cols = cols if cols is not None else overrides.pop("cols", None)
    overrides.pop("rows", None), overrides.pop("cols", None)
    if preset == "mini":
        r, c = rows or MINI_DEFAULT[0], cols or MINI_DEFAULT[1]
        return wafer.WaferSpec.mini(r, c, **overrides)
    base = {"wse1": wafer.WSE1, "wse2": wafer.WSE2, "wse3": wafer.WSE3}[preset]
    if rows is not None or cols is not None:
        r, c = rows or base.rows, cols or base.cols
        base = base.with_(rows=r, cols=c, name=f"{base.name}-{r}x{c}")
    return base.with_(**overrides) if overrides else base


def make_placement_params(section: dict):
    from compiler.plan.place import PlacementParams

    fields = [f.name for f in dataclasses.fields(PlacementParams)]
    unknown = [k for k in section if k not in fields]
    if unknown:
        raise CLIError(f"unknown PlacementParams fields {unknown} in the params file; the fields are {fields}")
    section = {k: (math.inf if v in ("inf", ".inf") else v) for k, v in section.items()}
    return PlacementParams(**section)


def describe_spec(spec) -> str:
    d = spec.describe()
    head = (
        f"{spec.name}: {spec.rows} x {spec.cols} = {spec.cores:,} cores, {spec.sram_bytes_per_core // 1024} KB SRAM "
        f"per core ({spec.sram_bytes_total / 1e9:.2f} GB), {float(spec.clock_hz) / 1e6:,.0f} MHz, "
        f"dense fp16 peak {float(spec.peak_flops('fp16')) / 1e15:.2f} PFLOP/s"
    )
    width = max(len(k) for k in d)
    lines = [head, ""]
    for k, v in d.items():
        shown = (
            f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{v:.6g}" if isinstance(v, float) else v
        )
        lines.append(f"  {k:<{width}}  {shown}")
    return "\n".join(lines)


# ---- factories -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """What a factory describes: a forward pass or a training setup."""

    target: str
    kind: str  # "forward" or "train"
    fn: Any = None
    params: Any = None
    inputs: tuple = ()
    loss_fn: Any = None
    batch: Any = None
    optimizer: Any = None
    data: Any = None
    eval_data: Any = None
    eval_fn: Any = None

    @property
    def is_module(self) -> bool:
        from flax import nnx

        from compiler.frontend import frameworks

        return isinstance(self.fn, nnx.Module) or frameworks.is_framework_model(self.fn)

    def forward_args(self) -> tuple:
        """Arguments of `compiler.compile` / `compiler.trace`: (fn, params, *inputs) or (module, *inputs)."""
        return (self.fn, *self.inputs) if self.is_module else (self.fn, self.params, *self.inputs)


def _import_module(name: str):
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise CLIError(f"cannot import {name}: no such file")
        mod_name = "_wafer_user_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, os.path.dirname(path))  # the file's own imports of its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise CLIError(f"importing {name} failed: {_describe_exception(e)}") from e
        return module
    if os.getcwd() not in sys.path:  # as `python -m` would: modules in the working directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise CLIError(f"cannot import module {name!r}: no module named {e.name!r}") from e
        raise CLIError(f"importing module {name!r} failed: {_describe_exception(e)}") from e
    except Exception as e:
        raise CLIError(f"importing module {name!r} failed: {_describe_exception(e)}") from e


def load_factory(target: str):
    """The callable named by MODULE:FACTORY or path/to/file.py:FACTORY."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise CLIError(
            f"expected MODULE:FACTORY or path/to/file.py:FACTORY, got {target!r} (e.g. compiler.examples:mlp)"
        )
    obj = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(
                n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n)) and n[0].islower()
            )
            raise CLIError(f"{module_name} has no factory {attr!r}; callables there: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target} is a {type(obj).__name__}, not a callable factory")
    return obj


def load_program(target: str, model_kwargs: dict) -> Program:
    """Call the factory with `model_kwargs` and check what it returns against the contract."""
    factory = load_factory(target)
    try:
        out = factory(**model_kwargs)
    except Exception as e:
        raise CLIError(f"factory {target} raised {_describe_exception(e)}") from e
    if isinstance(out, tuple):
        from flax import nnx

        from compiler.frontend import frameworks

        if out and (isinstance(out[0], nnx.Module) or frameworks.is_framework_model(out[0])):
            out = {"fn": out[0], "inputs": out[1:]}  # an nnx, torch or Keras module and its inputs
        elif len(out) >= 2:
            out = {"fn": out[0], "params": out[1], "inputs": out[2:]}
    if not isinstance(out, dict):
        raise CLIError(
            f"factory {target} returned {type(out).__name__}; it must return a dict {{'fn', 'params', 'inputs'}} "
            "(inference) or {'loss_fn', 'params', 'batch', 'optimizer', ...} (training); see docs/cli.md"
        )
    if "loss_fn" in out:
        unknown = [k for k in out if k not in TRAIN_KEYS]
        missing = [k for k in ("params", "batch", "optimizer") if out.get(k) is None]
        if unknown or missing:
            what = f"unknown keys {unknown}" if unknown else f"no {missing}"
            raise CLIError(f"factory {target} returned a training dict with {what}; its keys are {list(TRAIN_KEYS)}")
        return Program(target, "train", **out)
    unknown = [k for k in out if k not in FORWARD_KEYS]
    if unknown or "fn" not in out or "inputs" not in out:
        raise CLIError(
            f"factory {target} returned a dict with keys {sorted(out)}; inference needs {list(FORWARD_KEYS)} "
            f"('params' may be omitted for an nnx.Module), training {list(TRAIN_KEYS)}"
        )
    inputs = out["inputs"]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    inputs = _as_arrays(inputs)
    prog = Program(target, "forward", fn=out["fn"], params=out.get("params"), inputs=inputs)
    if not callable(prog.fn):
        raise CLIError(f"factory {target}: 'fn' must be callable, got {type(prog.fn).__name__}")
    if prog.params is None and not prog.is_module:
        raise CLIError(f"factory {target}: 'params' is missing ('fn' is not an nnx.Module)")
    return prog


def _as_arrays(tree):
    """Torch (or TF) tensors of a factory's inputs as NumPy arrays: the compiler traces JAX arrays."""
    import jax

    from compiler.frontend import frameworks

    return jax.tree_util.tree_map(frameworks.to_array, tree)


def _describe_exception(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    head, sep, _ = msg.partition(" Supported primitives:")  # UnsupportedOpError's list of ~150 names
    if sep:
        msg = f"{head} (compiler.SUPPORTED_PRIMITIVES lists the supported ones)"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ---- compiling -----------------------------------------------------------------------------------------------------


def _setup(args, *, need_train: bool = False):
    params = load_params(getattr(args, "params", None))
    spec = make_spec(args.preset, args.rows, args.cols, params["spec"])
    placement = make_placement_params(params["placement"])
    prog = load_program(args.target, params["model"])
    if need_train and prog.kind != "train":
        raise CLIError(
            f"factory {args.target} describes a forward pass; `wafer train` needs a training dict with "
            f"{list(TRAIN_KEYS[:4])} (see docs/cli.md)"
        )
    return params, spec, placement, prog


def _execution(args, params) -> str:
    ex = getattr(args, "execution", None) or params["train"].get("execution", "auto")
    if ex not in EXECUTIONS:
        raise CLIError(f"execution must be one of {list(EXECUTIONS)}, got {ex!r}")
    return ex


def compile_program(prog: Program, spec, placement, execution: str = "auto", wafers: int = 1):
    """An Executable (forward) or a Trainer (training; on `wafers` wafers data-parallel) for the program."""
    import compiler

    if prog.kind == "train":
        return compiler.compile_train(
            prog.loss_fn,
            prog.params,
            prog.batch,
            prog.optimizer,
            spec=spec,
            mode=execution,
            placement_params=placement,
            wafers=wafers,
        )
    return compiler.compile(*prog.forward_args(), spec=spec, placement_params=placement)


def validate(prog: Program, spec, placement, execution: str = "auto") -> str:
    """Trace, build the kernel graph, place, partition and lay out SRAM (no lowering); a summary."""
    from compiler import plan as planning

    if prog.kind == "train":
        plan = compile_program(prog, spec, placement, execution).plan  # its layout: gradient and optimizer slots
    else:
        plan = planning.build(planning.trace_program(*prog.forward_args(), spec=spec, placement_params=placement))
    streaming = plan.mode == "weight_streaming"
    mode = f"{plan.mode} training" if plan.task == "training" else "layer-pipelined inference"
    occ = plan.memory.occupancy()
    kinds: dict[str, int] = {}
    for k in plan.graph.kernels:
        kinds[k.kind] = kinds.get(k.kind, 0) + 1
    plans = plan.kernels
    cores = max(p.cores for p in plans.values()) if streaming else sum(p.cores for p in plans.values())
    lines = [
        f"validated {prog.target} for {mode} on {spec.name}: {len(plan.graph.kernels)} kernels "
        f"({', '.join(f'{n} {k}' for k, n in kinds.items())})",
        f"{'kernel':<16}{'kind':<12}{'rectangle':<20}{'cores':>9}{'SRAM B/core':>13}",
    ]
    for name, p in plans.items():
        lines.append(f"{name:<16}{p.kind:<12}{str(plan.placement[name]):<20}{p.cores:>9,}{p.sram_bytes:>13,}")
    lines += [
        f"cores in use     {cores:,} of {spec.cores:,}",
        f"peak SRAM        {int(occ.max()):,} of {spec.data_bytes_per_core:,} data bytes per core",
        "fits: yes (not lowered; run with --compile-only for the report and pictures)",
    ]
    return "\n".join(lines)


def write_outputs(prog_or_target, compiled, out_dir, state=None, *, pictures: bool = True) -> list[str]:
    """report.json, report.txt, trace.json and the pictures of a compiled program into `out_dir`."""
    from compiler.views import plots
    from compiler.views.trace_export import chrome_trace

    os.makedirs(out_dir, exist_ok=True)
    report = compiled.report
    d = report.to_dict()
    d["target"] = prog_or_target
    d["spec"] = compiled.spec.describe()
    d["placement"] = {k: list(map(int, v)) for k, v in compiled.placement.items()}
    written = []
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
    written.append(path)
    path = os.path.join(out_dir, "report.txt")
    with open(path, "w") as f:
        f.write(str(report) + "\n")
    written.append(path)
    written.append(os.path.join(out_dir, "trace.json"))
    chrome_trace(compiled, written[-1])
    if pictures:
        written += list(plots.save_all(compiled, state, out_dir).values())
    return written


def _check_close(what: str, got, want) -> str:
    import jax
    import numpy as np

    got = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(got)]
    want = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(want)]
    scale = max((float(np.max(np.abs(w))) for w in want if w.size), default=0.0) or 1.0
    err = max((float(np.max(np.abs(g - w))) for g, w in zip(got, want) if w.size), default=0.0)
    line = f"{what}: emulated vs native JAX, max |difference| {err:.3g} ({err / scale:.3g} of max |native|)"
    if not err / scale <= RTOL:
        raise CLIError(f"{line} exceeds the tolerance {RTOL:g}; this is a compiler bug, please report it")
    return line


def run_once(prog: Program, compiled):
    """Run the compiled program once on the example data and check it against native JAX; (state, line)."""
    if prog.kind == "train":
        state = compiled.init(prog.params)
        state, metrics = compiled.step(state, prog.batch)
        native = prog.loss_fn(prog.params, prog.batch)
        native = native[0] if compiled.has_aux else native
        return state, _check_close("first training step's loss", metrics["loss"], native)
    state = compiled.load(prog.params)
    out, state = compiled(state, *prog.inputs)
    native = _native(prog)
    return state, _check_close("forward pass", out, native)


def _native(prog: Program):
    """The program run natively: nnx modules called, torch/Keras models by their own framework."""
    from compiler.frontend import frameworks

    if frameworks.is_framework_model(prog.fn):
        return frameworks.native_forward(prog.fn, *prog.inputs)
    return prog.fn(*prog.inputs) if prog.is_module else prog.fn(prog.params, *prog.inputs)


# ---- commands ------------------------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    params = load_params(args.params)
    spec = make_spec(args.preset, args.rows, args.cols, params["spec"])
    print(json.dumps(spec.describe(), indent=2) if args.json else describe_spec(spec))
    return 0


def cmd_compile(args) -> int:
    params, spec, placement, prog = _setup(args)
    execution = _execution(args, params)
    if args.validate_only:
        print(validate(prog, spec, placement, execution))
        return 0
    t = time.perf_counter()
    compiled = compile_program(prog, spec, placement, execution)
    seconds = time.perf_counter() - t
    state, check = (None, None) if args.compile_only else run_once(prog, compiled)
    written = write_outputs(prog.target, compiled, args.out, state, pictures=not args.no_pictures)
    print(compiled.report)
    print(f"\ncompiled {prog.target} onto {spec.name} in {seconds:.2f} s")
    if check:
        print(check)
    print(f"wrote {', '.join(os.path.basename(p) for p in written)} to {args.out}")
    return 0


def cmd_train(args) -> int:
    from compiler.host import estimator  # a model_fn(features, labels, mode, params): the Estimator runs it

    if estimator.is_model_fn(factory := load_factory(args.target)):
        if args.wafers != 1 or args.workers or args.against_native:
            raise CLIError(
                "--wafers, --workers and --against-native train a training factory; an Estimator model_fn trains "
                "on one wafer from its input_fn",
                code=2,
            )
        params = load_params(getattr(args, "params", None))
        return estimator.cli_train(args, factory, params, make_spec(args.preset, args.rows, args.cols, params["spec"]))
    params, spec, placement, prog = _setup(args, need_train=True)
    settings = params["train"]
    training = args.mode in ("train", "train_and_eval")
    evaluating = args.mode in ("eval", "train_and_eval")
    if training and args.max_steps is None:
        raise CLIError(f"--mode {args.mode} needs --max-steps N (the step the run is to reach)", code=2)
    if training and prog.data is None:
        raise CLIError(f"factory {prog.target} gives no 'data' to train on (a compiler.Batches or iterable of batches)")
    if evaluating and prog.eval_data is None and prog.eval_fn is None:
        raise CLIError(f"--mode {args.mode}: factory {prog.target} gives neither 'eval_data' nor 'eval_fn'")
    import compiler

    tx = compile_program(prog, spec, placement, _execution(args, params), wafers=args.wafers)
    if args.workers and not isinstance(prog.data, compiler.Batches):
        raise CLIError(
            f"--workers needs the factory's 'data' to be a compiler.Batches; {prog.target} gives a "
            f"{type(prog.data).__name__}, which is read as it is",
            code=2,
        )
    ckpt = os.path.join(args.model_dir, "checkpoints")
    os.makedirs(args.model_dir, exist_ok=True)
    evaluate = _evaluator(prog, tx, spec, placement) if evaluating else None
    setting = lambda name, default: (
        getattr(args, name) if getattr(args, name) is not None else settings.get(name, default)
    )
    if training:
        write_outputs(prog.target, tx, args.model_dir, pictures=False)
        if not args.quiet:
            print(tx.report, flush=True)
        last = compiler.latest_checkpoint(ckpt)
        if last is not None:  # fit resumes from it (and says so when it shows progress)
            print(f"{args.model_dir} holds a checkpoint of step {last}: continuing from it to step {args.max_steps}")
        state, history = compiler.fit(
            tx,
            tx.init(prog.params),
            prog.data,
            steps=args.max_steps,
            eval_fn=(lambda s: evaluate(tx.read_params(s))) if evaluate else None,
            eval_every=setting("eval_every", None),
            checkpoint_dir=ckpt,
            checkpoint_every=setting("checkpoint_every", 100),
            keep=setting("keep", 3),
            progress=not args.quiet,
            log_every=settings.get("log_every", 10),
            workers=args.workers,
        )
        with open(os.path.join(args.model_dir, "history.json"), "w") as f:
            json.dump(history, f)
        drawn = state if args.wafers == 1 else None  # pictures of one wafer's layout (the wafers hold the same)
        write_outputs(prog.target, tx, args.model_dir, drawn, pictures=not args.no_pictures)
        step = int(state.step)
        last = history[-1] if history else {}
        figures = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
        print(f"step {step} of {args.max_steps}: {figures or 'nothing to train'}; checkpoints in {ckpt}")
        if args.against_native:
            return against_native(prog, tx.read_params(state), history, evaluate, args.max_steps)
        return 0
    # eval only: the latest checkpoint's params
    step = compiler.latest_checkpoint(ckpt)
    if step is None:
        raise CLIError(f"no checkpoint in {ckpt} to evaluate; train first (--mode train or train_and_eval)")
    state, _ = compiler.restore_checkpoint(ckpt, tx.init(prog.params))
    figures = evaluate(tx.read_params(state))
    with open(os.path.join(args.model_dir, "eval.json"), "w") as f:
        json.dump({"step": step, **figures}, f)
    print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    return 0


def native_training(prog: Program, steps: int):
    """Train `prog` natively (its loss_fn and optax optimizer, jitted) from its params on the batches `fit` gave the
    emulated run, steps 1 .. `steps`; returns (per-step losses, params)."""
    import jax
    import optax

    import compiler
    from compiler.host import fit as fit_mod

    opt = prog.optimizer

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            out = prog.loss_fn(p, batch)
            return out[0] if isinstance(out, tuple) else out

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    data = prog.data
    if isinstance(data, compiler.Batches):
        data = compiler.Pipeline(data)
    params, opt_state, losses = prog.params, opt.init(prog.params), []
    for batch, _ in fit_mod._batches(data, 0, steps, None):
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
    if len(losses) != steps:
        raise CLIError(f"the native run's data ran out after {len(losses)} steps; the emulated run took {steps}")
    return losses, params


def against_native(prog: Program, params, history: list, evaluate, steps: int) -> int:
    """`wafer train --against-native`: train natively on the same batches and compare the runs with
    `compiler.compare_runs` (bit-identity, the first steps within 1e-6, the learning curve, the final evaluation
    figures when the run evaluates; docs/fidelity.md). Exit status 1 when they disagree beyond the stated bounds."""
    import compiler

    losses = [row["loss"] for row in history]
    if len(losses) != steps:
        raise CLIError(f"the run's history holds {len(losses)} steps, not {steps}; cannot compare it step by step")
    native_losses, native_params = native_training(prog, steps)
    final = native_final = None
    if evaluate is not None:  # both param sets through the same evaluator: any difference is the params'
        final, native_final = evaluate(params), evaluate(native_params)
    agreement = compiler.compare_runs(losses, native_losses, final, native_final)
    print(f"against native JAX + optax over {steps} steps (same initial params, batches and optimizer):")
    for line in agreement.lines():
        print(f"  {line}")
    print("agreement: " + ("OK" if agreement.ok else "FAILED"))
    return 0 if agreement.ok else 1


def _evaluator(prog: Program, tx, spec, placement):
    """evaluate(params) -> {"loss": mean loss over eval_data on the emulated wafer, **eval_fn(params)}.

    The loss runs as a compiled forward program (`compiler.compile` of the loss on the example batch); eval
    batches must have the example batch's shapes. When that forward program does not fit the wafer (a model
    trained by weight streaming), the loss is computed natively.
    """
    import jax

    import compiler
    import wafer

    loss = (lambda p, b: prog.loss_fn(p, b)[0]) if tx.has_aux else prog.loss_fn
    exe = None
    if prog.eval_data is not None:
        try:
            exe = compiler.compile(loss, prog.params, prog.batch, spec=spec, placement_params=placement)
        except (wafer.SramCapacityError, compiler.PlacementError):
            exe = None
    native = jax.jit(loss)

    def batches():
        data = prog.eval_data
        if hasattr(data, "iterate") and hasattr(data, "steps_per_epoch"):
            return data.iterate(0, data.steps_per_epoch)
        return iter(data)

    def evaluate(params) -> dict:
        figures = {}
        if prog.eval_data is not None:
            total, n = 0.0, 0
            state = exe.load(params) if exe is not None else None
            for b in batches():
                if exe is not None:
                    value, state = exe(state, b)
                else:
                    value = native(params, b)
                total, n = total + float(value), n + 1
            if n == 0:
                raise CLIError(f"factory {prog.target}: 'eval_data' holds no batches")
            figures["loss"] = total / n
        if prog.eval_fn is not None:
            figures.update({k: float(v) for k, v in prog.eval_fn(params).items()})
        return figures

    return evaluate


def _sweep_axis(text: str):
    """ "field=v1,v2,..." -> (field, [values]) with numbers parsed."""
    field, eq, values = text.partition("=")
    if not eq or not values:
        raise CLIError(f"--sweep takes FIELD=V1,V2,... (e.g. clock_hz=0.85e9,1.1e9), got {text!r}", code=2)

    def num(v):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    return field.strip(), [num(v.strip()) for v in values.split(",")]


def cmd_sweep(args) -> int:
    """Sweep PlacementParams knobs x spec figures for a forward program with the batched cost model."""
    import dataclasses

    from compiler.analysis.sweep import sweep
    from compiler.plan.place import PlacementParams
    from compiler.views.sweep_plots import sweep_figures

    params, spec, placement, prog = _setup(args)
    if prog.kind == "train":
        raise CLIError(f"`wafer sweep` sweeps a forward program; factory {prog.target} describes training", code=2)
    knobs = {f.name for f in dataclasses.fields(PlacementParams)}
    figures = {f.name for f in dataclasses.fields(type(spec))}
    axes_p, axes_h = {}, {}
    for text in args.sweep or []:
        field, values = _sweep_axis(text)
        if field in knobs:
            axes_p[field] = values
        elif field in figures:
            axes_h[field] = values
        else:
            raise CLIError(f"--sweep {field}: not a PlacementParams field {sorted(knobs)} nor a WaferSpec field", 2)
    if not axes_p and not axes_h:
        raise CLIError("give at least one --sweep FIELD=V1,V2,... (a PlacementParams or WaferSpec field)", code=2)
    model = (prog.fn, *prog.inputs) if prog.is_module else (prog.fn, prog.params, *prog.inputs)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep.csv")
    df = sweep(
        model, spec, placement=axes_p, hardware=axes_h, base_params=placement, progress=not args.quiet, path=path
    )
    written = [path] + sweep_figures(df, spec, args.out)
    best = df.sort_values("samples_per_s", ascending=False).iloc[0]
    swept = list(df.attrs.get("swept", []))
    print(df[swept + ["samples_per_s", "cores", "peak_sram_bytes", "feasible"]].to_string(max_rows=20))
    print(f"\nbest: {', '.join(f'{k}={best[k]}' for k in swept)}: {best['samples_per_s']:,.0f} samples/s")
    print(f"wrote {len(df)} points: {', '.join(os.path.basename(p) for p in written)} to {args.out}")
    return 0


def cmd_validate(args) -> int:
    """`wafer validate`: the table of wafer.validation; exit 1 when a case is outside its tolerance."""
    from wafer import validation

    tolerance = [] if args.tolerance is None else ["--tolerance", str(args.tolerance)]
    return validation.main([*args.cases, "--execute", args.execute, *tolerance])


# ---- the parser ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    wafer_args = _Parser(add_help=False)
    g = wafer_args.add_argument_group("wafer")
    g.add_argument("--preset", default="wse2", type=str.lower, choices=PRESETS, help="the wafer (default wse2)")
    g.add_argument("--rows", type=_positive, help="resize the preset's core grid: rows")
    g.add_argument("--cols", type=_positive, help="resize the preset's core grid: columns")
    g.add_argument(
        "--params", metavar="FILE", help="YAML/JSON file with sections spec, placement, model, train (docs/cli.md)"
    )

    target = _Parser(add_help=False)
    target.add_argument("target", metavar="MODULE:FACTORY", help="e.g. compiler.examples:mlp or path/to/file.py:make")
    target.add_argument(
        "--execution", choices=EXECUTIONS, help="training programs: pipelined, weight_streaming or auto (default)"
    )

    parser = _Parser(
        prog="wafer",
        description="Compile, train and inspect JAX/Flax programs on an emulated Cerebras wafer.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("info", parents=[common, wafer_args], help="print a wafer's figures")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser(
        "compile",
        parents=[common, target, wafer_args],
        help="compile a program: validate, report, pictures and a trace",
        description="Compile a program. Without --validate-only or --compile-only it also runs once on the "
        "emulated wafer and checks the result against native JAX.",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--validate-only", action="store_true", help="trace, build kernels, place and check SRAM; no lowering"
    )
    how.add_argument("--compile-only", action="store_true", help="compile and write the outputs; do not run")
    p.add_argument("--out", default="wafer_out", metavar="DIR", help="output directory (default ./wafer_out)")
    p.add_argument("--no-pictures", action="store_true", help="skip the PNG pictures")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser(
        "train",
        parents=[common, target, wafer_args],
        help="train / evaluate with checkpoints and resume",
        description="Train, evaluate or both; checkpoints and reports go to --model-dir, and a run resumes from "
        "the latest checkpoint there.",
    )
    p.add_argument("--mode", default="train", choices=("train", "eval", "train_and_eval"))
    p.add_argument("--model-dir", required=True, metavar="DIR", help="checkpoints, report, history, pictures")
    p.add_argument("--max-steps", type=_positive, metavar="N", help="the step the run is to reach")
    p.add_argument("--checkpoint-every", type=_positive, metavar="N", help="steps between checkpoints (100)")
    p.add_argument("--eval-every", type=_positive, metavar="N", help="train_and_eval: steps between evaluations")
    p.add_argument("--keep", type=_positive, metavar="N", help="checkpoints to keep (3)")
    p.add_argument("--quiet", action="store_true", help="no report or progress bar")
    p.add_argument("--no-pictures", action="store_true", help="skip the PNG pictures")
    p.add_argument("--wafers", type=_positive, default=1, metavar="N", help="wafers training data-parallel (1)")
    p.add_argument("--workers", type=_non_negative, default=0, metavar="N", help="input worker processes (0: a thread)")
    p.add_argument(
        "--against-native",
        action="store_true",
        help="then train natively (jax + optax) on the same batches and compare the runs; exit 1 if they disagree",
    )
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "sweep", parents=[common, wafer_args, target], help="sweep placement knobs x spec figures (cost model)"
    )
    p.add_argument("--sweep", action="append", metavar="FIELD=V1,V2", help="a PlacementParams or WaferSpec field")
    p.add_argument("--out", default="out/sweep", metavar="DIR", help="sweep.csv and the pictures (out/sweep)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser(
        "validate", parents=[common], help="calibration cases: predicted vs published figures (docs/fidelity.md)"
    )
    p.add_argument("cases", nargs="*", metavar="CASE", help="case names or prefixes (default: every case)")
    p.add_argument("--execute", choices=("small", "all", "none"), default="small", help="run data: small (default)")
    p.add_argument("--tolerance", type=float, metavar="REL", help="override every case's tolerance (default 0.1)")
    p.set_defaults(run=cmd_validate)
    return parser


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def main(argv=None) -> int:
    """Run the `wafer` command; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError(
                "no command given; the commands are info, compile, train, sweep, validate (see 'wafer --help')", 2
            )
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("wafer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `wafer info | head`: the reader left; stop quietly (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if debug:
            raise
        message = " ".join(str(e).split()) if isinstance(e, CLIError) else _describe_exception(e)
        print(f"wafer: error: {message}", file=sys.stderr)
        return e.code if isinstance(e, CLIError) else 1


if __name__ == "__main__":
    sys.exit(main())
