"""The `wafer` command (compiler/cli.py), end to end: subprocesses of `python -m compiler.cli` (the console script
`wafer` runs the same `main`), and bad inputs in process, each of which must give one `wafer: error:` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compiler import cli, plots

MINI = ["--preset", "mini", "--rows", "16", "--cols", "16"]


def wafer_cmd(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_error_line(stderr: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("wafer: error: "), stderr
    assert "Traceback" not in stderr


# ---- end to end ----------------------------------------------------------------------------------------------------


def test_info(tmp_path):
    r = wafer_cmd("info", "--preset", "wse2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["rows"], d["cols"], d["name"]) == (757, 996, "WSE-2")
    assert d["cores"] == 757 * 996


def test_compile_validate_only(tmp_path):
    r = wafer_cmd("compile", "compiler.examples:mlp", *MINI, "--validate-only", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "validated compiler.examples:mlp" in r.stdout and "dense_0" in r.stdout
    assert not (tmp_path / "wafer_out").exists()  # validation writes nothing


def test_sweep_writes_table_and_pictures(tmp_path):
    out = tmp_path / "sw"
    args = ("--sweep", "area_exponent=0.5,1.0", "--sweep", "clock_hz=0.85e9,1.1e9", "--out", str(out), "--quiet")
    r = wafer_cmd("sweep", "compiler.examples:mlp", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "best:" in r.stdout and "4 points" in r.stdout
    import pandas as pd

    df = pd.read_csv(out / "sweep.csv")
    assert len(df) == 4 and {"area_exponent", "clock_hz", "samples_per_s"} <= set(df.columns)
    fast, slow = df[df.clock_hz > 1e9].samples_per_s.max(), df[df.clock_hz < 1e9].samples_per_s.max()
    assert fast > slow
    assert (out / "sweep_pareto_cores.png").stat().st_size > 0


def test_compile_only_writes_report_pictures_and_trace(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("spec:\n  clock_hz: 1.1e9\nplacement:\n  area_rule: equal\nmodel:\n  hidden: [32]\n")
    out = tmp_path / "out"
    r = wafer_cmd(
        "compile", "compiler.examples:mlp", "--compile-only", "--params", str(params), "--out", str(out), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "Compile report" in r.stdout and "WSE-2" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert [k["name"] for k in report["kernels"]] == ["dense_0", "dense_1"]
    assert report["spec"]["clock_hz"] == 1.1e9 and report["clock_hz"] == 1.1e9
    assert set(report["placement"]) == {"dense_0", "dense_1"}
    for name in plots.FILES:
        assert (out / name).stat().st_size > 5_000, name
    trace = json.loads((out / "trace.json").read_text())
    assert any(e["ph"] == "X" and e["name"] == "sample 0" for e in trace["traceEvents"])


def test_train_resumes_from_its_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    common = ["compiler.examples:digits", *MINI, "--model-dir", str(model_dir), "--quiet"]
    r = wafer_cmd("train", *common, "--max-steps", "2", "--mode", "train_and_eval", "--no-pictures", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "step 2 of 2" in r.stdout and "eval_accuracy" in r.stdout
    assert (model_dir / "report.json").exists() and not (model_dir / "placement.png").exists()
    r = wafer_cmd("train", *common, "--max-steps", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "checkpoint of step 2" in r.stdout and "step 4 of 4" in r.stdout
    assert (model_dir / "placement.png").exists()
    history = json.loads((model_dir / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # steps 1-2 from the first run's checkpoint
    assert "eval_accuracy" in history[1]
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["2", "4"]


def test_bad_model_gives_one_line_and_nonzero_exit(tmp_path):
    params = tmp_path / "big.yaml"
    params.write_text("model:\n  hidden: [4096, 4096]\n")
    r = wafer_cmd(
        "compile",
        "compiler.examples:mlp",
        "--preset",
        "mini",
        "--rows",
        "8",
        "--cols",
        "8",
        "--params",
        str(params),
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert_one_error_line(r.stderr)
    assert "PlacementError" in r.stderr or "SramCapacityError" in r.stderr


# ---- in process: errors, eval, helpers -----------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """run(*args) -> (exit status, stdout, stderr) of cli.main in the test process, in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def go(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return go


@pytest.mark.parametrize(
    "args, code, words",
    [
        pytest.param(["info", "--preset", "wse9"], 2, "invalid choice", id="unknown-preset"),
        pytest.param(["compile", "no_such_module:f"], 1, "cannot import module 'no_such_module'", id="no-module"),
        pytest.param(["compile", "compiler.examples:nope"], 1, "has no factory 'nope'", id="no-factory"),
        pytest.param(["compile", "compiler.examples"], 1, "MODULE:FACTORY", id="no-colon"),
        pytest.param(["compile", "missing.py:f"], 1, "no such file", id="no-file"),
        pytest.param(["compile", "compiler.examples:MLP"], 1, "raised TypeError", id="factory-raises"),
        pytest.param(["compile", "compiler.examples:init_params"], 1, "raised TypeError", id="not-a-factory"),
        pytest.param(
            ["compile", "compiler.examples:mlp", *MINI[:2], "--rows", "2", "--cols", "2"],
            1,
            "no usable columns",
            id="tiny-wafer",
        ),
        pytest.param(["compile", "compiler.examples:mlp", "--params", "nope.yaml"], 1, "does not exist", id="params"),
        pytest.param(
            ["compile", "compiler.examples:mlp", "--validate-only", "--compile-only"], 2, "not allowed", id="exclusive"
        ),
        pytest.param(
            ["train", "compiler.examples:mlp", "--model-dir", "m", "--max-steps", "1"],
            1,
            "describes a forward pass",
            id="train-forward",
        ),
        pytest.param(["train", "compiler.examples:digits", "--model-dir", "m"], 2, "--max-steps", id="no-steps"),
        pytest.param(
            ["train", "compiler.examples:digits", *MINI, "--model-dir", "m", "--mode", "eval"],
            1,
            "no checkpoint",
            id="eval-before-train",
        ),
        pytest.param(
            ["train", "compiler.examples:digits", "--model-dir", "m", "--max-steps", "0"],
            2,
            "positive integer",
            id="zero-steps",
        ),
        pytest.param(["sweep", "compiler.examples:mlp"], 2, "--sweep", id="sweep-no-axes"),
        pytest.param(["sweep", "compiler.examples:mlp", "--sweep", "nope=1,2"], 2, "nope", id="sweep-bad-field"),
        pytest.param([], 2, "no command", id="no-command"),
    ],
)
def test_bad_inputs_give_one_error_line(run, args, code, words):
    status, _, err = run(*args)
    assert status == code
    assert_one_error_line(err)
    assert words in err


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param("spec:\n  speed: 3\n", "unknown WaferSpec fields ['speed']", id="spec-field"),
        pytest.param("spec:\n  clock_hz: -1\n", "WaferSpec.clock_hz", id="spec-value"),
        pytest.param("placement:\n  area_rule: biggest\n", "area_rule", id="placement-value"),
        pytest.param("placement:\n  size: 3\n", "unknown PlacementParams fields", id="placement-field"),
        pytest.param("compile:\n  x: 1\n", "unknown sections ['compile']", id="section"),
        pytest.param("model:\n  width: 3\n", "unexpected keyword argument 'width'", id="model-kwarg"),
        pytest.param("model: [1, 2]\n", "must be a mapping", id="not-a-mapping"),
        pytest.param("spec: {rows: [\n", "cannot parse", id="yaml-syntax"),
    ],
)
def test_bad_params_files(run, tmp_path, text, words):
    (tmp_path / "p.yaml").write_text(text)
    status, _, err = run("compile", "compiler.examples:mlp", "--validate-only", "--params", "p.yaml")
    assert status != 0
    assert_one_error_line(err)
    assert words in err


def test_debug_reraises(run):
    with pytest.raises(cli.CLIError):
        run("compile", "compiler.examples:nope", "--debug")


def test_factory_in_a_file_and_tuple_contract(run, tmp_path):
    (tmp_path / "model.py").write_text(
        "import jax.numpy as jnp\n"
        "def make(n=4):\n"
        "    return (lambda p, x: jnp.tanh(x @ p['w']), {'w': jnp.ones((n, 3))}, jnp.ones((2, n)))\n"
    )
    status, out, err = run("compile", "model.py:make", *MINI, "--out", "o", "--no-pictures")
    assert status == 0, err
    assert "forward pass: emulated vs native JAX" in out
    assert sorted(os.listdir(tmp_path / "o")) == ["report.json", "report.txt", "trace.json"]


def test_compile_runs_training_programs_and_checks_the_loss(run):
    status, out, err = run("compile", "compiler.examples:digits", *MINI, "--out", "o", "--no-pictures")
    assert status == 0, err
    assert "pipelined training" in out and "first training step's loss: emulated vs native JAX" in out


def test_eval_mode_after_training(run, tmp_path):
    common = ["compiler.examples:digits", *MINI, "--model-dir", "m", "--quiet"]
    assert run("train", *common, "--max-steps", "1")[0] == 0
    status, out, err = run("train", *common, "--mode", "eval")
    assert status == 0, err
    assert out.startswith("eval at step 1: loss ")
    d = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert d["step"] == 1 and 0.0 <= d["accuracy"] <= 1.0 and d["loss"] > 0


@pytest.mark.parametrize("preset, rows, cols", [("wse1", 633, 633), ("wse3", 762, 1172), ("mini", 32, 32)])
def test_make_spec(preset, rows, cols):
    spec = cli.make_spec(preset)
    assert (spec.rows, spec.cols) == (rows, cols)
    resized = cli.make_spec(preset, 10, 12, {"clock_hz": "1.1e9", "name": "x"})
    assert (resized.rows, resized.cols, resized.clock_hz, resized.name) == (10, 12, 1.1e9, "x")


def test_info_text(run):
    status, out, _ = run("info", "--preset", "mini", "--rows", "8", "--cols", "4")
    assert status == 0
    assert out.startswith("mini-8x4: 8 x 4 = 32 cores")


def test_unsupported_op_gives_one_line_naming_the_primitive_and_source(run, tmp_path):
    (tmp_path / "fft_model.py").write_text(
        "import jax.numpy as jnp\n"
        "def make():\n"
        "    return (lambda p, x: jnp.fft.fft(x @ p).real, jnp.ones((4, 4)), jnp.ones((2, 4)))\n"
    )
    status, _, err = run("compile", "fft_model.py:make", *MINI, "--validate-only")
    assert status == 1
    assert_one_error_line(err)
    assert "UnsupportedOpError" in err and "'fft'" in err and "fft_model.py:3" in err
    assert len(err) < 400


def test_train_on_two_wafers_with_input_workers(run, tmp_path):
    common = ["compiler.examples:digits", *MINI, "--model-dir", "m", "--quiet", "--no-pictures", "--max-steps", "2"]
    status, out, err = run("train", *common, "--wafers", "2", "--workers", "1")
    assert status == 0, err
    d = json.loads((tmp_path / "m" / "report.json").read_text())
    assert d["wafers"] == 2 and d["interconnect_cycles_per_step"] > 0
    assert "step 2 of 2" in out
    status, _, err = run("train", *common, "--wafers", "7")
    assert status != 0 and "does not split over 7 wafers" in err


def test_train_against_native_compares_the_runs_step_by_step(run, monkeypatch):
    common = ["compiler.examples:digits", *MINI, "--model-dir", "m", "--quiet", "--no-pictures", "--against-native"]
    status, out, err = run("train", *common, "--max-steps", "12", "--mode", "train_and_eval")
    assert status == 0, err
    assert "bit-identical: every one of the 12 steps' losses equals native's exactly" in out
    assert "final accuracy: emulated" in out and out.rstrip().endswith("agreement: OK")
    # a resumed run is compared from step 1: the history holds the steps before the checkpoint
    status, out, err = run("train", *common, "--max-steps", "20")
    assert status == 0, err
    assert "every one of the 20 steps" in out
    # a native run that drifts from step 3 on: not bit-identical, and the early bound (1e-6) fails
    real = cli.native_training

    def drifting(prog, steps):
        losses, params = real(prog, steps)
        return losses[:2] + [x * (1 + 1e-3) for x in losses[2:]], params

    monkeypatch.setattr(cli, "native_training", drifting)
    status, out, err = run("train", *common, "--max-steps", "24")
    assert status == 1, err
    assert "bit-identical for the first 2 of 24 steps" in out and "(bound 1e-06): FAILED" in out
    assert out.rstrip().endswith("agreement: FAILED")
