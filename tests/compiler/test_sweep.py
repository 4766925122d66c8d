"""Sweeps over placement knobs x hardware x model sizes, batched evaluation, what-ifs, plots and the rate helper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import compiler
import wafer
from compiler import costmodel as cm
from compiler import sweep_plots
from compiler.analysis.sweep import (
    evaluate_placements,
    placements_per_second,
    random_layouts,
    stack_specs,
    sweep,
    what_if,
)

SPEC = wafer.WaferSpec.mini(24, 24)


class MLP(nn.Module):
    width: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def model(width):
    m = MLP(width)
    x = jax.ShapeDtypeStruct((8, 24), jnp.float32)
    return m.apply, jax.eval_shape(m.init, jax.random.key(0), x), x


PLACEMENT = {"fraction": [0.5, 1.0], "area_exponent": [0.5, 1.0]}
HARDWARE = {"clock_hz": [0.85e9, 1.1e9], "hop_latency_cycles": [1.0, 3.0], "sram_bytes_per_core": [24576, 49152]}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "mlp.csv"
    df = sweep(model, SPEC, sizes=[16, 48], placement=PLACEMENT, hardware=HARDWARE, progress=False, path=str(path))
    return df, path


def test_sweep_rows_columns_and_csv(table):
    df, path = table
    assert len(df) == 2 * 2 * 2 * 2 * 2 * 2
    for col in ["size", *PLACEMENT, *HARDWARE]:
        assert col in df.columns and col in df.attrs["swept"]
    for col in ("samples_per_s", "bottleneck_cycles", "latency_cycles", "latency_s", "cores", "peak_sram_bytes"):
        assert col in df.columns
    assert df["feasible"].all() and (df["samples_per_s"] > 0).all()
    assert df.duplicated(subset=df.attrs["swept"]).sum() == 0
    back = pd.read_csv(path)
    assert len(back) == len(df) and list(back.columns) == list(df.columns)
    np.testing.assert_allclose(back["samples_per_s"], df["samples_per_s"], rtol=1e-6)
    for pid in df["placement_id"].unique():
        assert set(df.attrs["placements"][pid]) == {"dense_0", "dense_1", "dense_2"}


def test_throughput_scales_with_clock_and_not_with_hop_latency(table):
    df, _ = table
    keys = [c for c in df.attrs["swept"] if c != "clock_hz"]
    piv = df.pivot_table(index=keys, columns="clock_hz", values="samples_per_s")
    np.testing.assert_allclose(piv[1.1e9] / piv[0.85e9], 1.1 / 0.85, rtol=1e-5)
    keys = [c for c in df.attrs["swept"] if c != "hop_latency_cycles"]
    piv = df.pivot_table(index=keys, columns="hop_latency_cycles", values="samples_per_s")
    assert (piv[3.0] <= piv[1.0] * (1 + 1e-6)).all()


def test_sweep_points_agree_with_the_compiler(table):
    df, _ = table
    row = df[(df["size"] == 48) & (df["fraction"] == 1.0) & (df["area_exponent"] == 1.0)].iloc[0]
    spec = SPEC.with_(
        clock_hz=row["clock_hz"],
        hop_latency_cycles=row["hop_latency_cycles"],
        sram_bytes_per_core=int(row["sram_bytes_per_core"]),
    )
    exe = compiler.compile(*model(48), spec=spec, placement=df.attrs["placements"][row["placement_id"]])
    np.testing.assert_allclose(row["samples_per_s"], exe.report.samples_per_s, rtol=0.02)
    np.testing.assert_allclose(row["latency_cycles"], exe.report.latency_cycles, rtol=0.02)


def test_evaluate_matches_predict_point_by_point():
    exe = compiler.compile(*model(32), spec=SPEC)
    feats = cm.features(exe)
    lays = random_layouts(feats.n, SPEC, 37, seed=3, max_side=8)
    clocks = np.linspace(0.5e9, 1.5e9, 37)
    specs = stack_specs([SPEC.with_(clock_hz=float(c)) for c in clocks])
    out = evaluate_placements(feats, lays, specs, chunk=16)
    for i in (0, 17, 36):
        lay = jax.tree.map(lambda a, i=i: a[i], lays)
        ref = cm.predict(feats, lay, SPEC.with_(clock_hz=float(clocks[i])))
        # float32 ceil of quotients: XLA's fusion may reassociate a division and move a value across an integer
        # (one cycle per batch of 8), so 1e-3 rather than float32 reassociation's 1e-5
        np.testing.assert_allclose(out["samples_per_s"][i], float(ref["samples_per_s"]), rtol=1e-3)
        np.testing.assert_allclose(out["latency_cycles"][i], float(ref["latency_cycles"]), rtol=1e-3)


def test_what_if_signs_and_order():
    exe = compiler.compile(*model(48), spec=SPEC)
    wi = what_if(exe).set_index("parameter")
    assert wi.loc["clock_hz", "derivative"] > 0
    np.testing.assert_allclose(wi.loc["clock_hz", "elasticity"], 1.0, rtol=1e-4)
    assert wi.loc["hop_latency_cycles", "derivative"] <= 0
    assert wi.loc["sram_bytes_per_core", "method"] == "finite difference"
    assert np.isfinite(wi.loc["sram_bytes_per_core", "elasticity"])
    e = wi["elasticity"].abs().to_numpy()
    assert np.all(e[:-1] >= e[1:])
    # an elasticity predicts the effect of a small change of that figure
    thr = exe.report.samples_per_s
    link = wi.loc["link_bits_per_cycle"]
    faster = compiler.compile(*model(48), spec=SPEC.with_(link_bits_per_cycle=32.0 * 1.01), placement=exe.placement)
    np.testing.assert_allclose(faster.report.samples_per_s / thr - 1, 0.01 * link["elasticity"], atol=2e-3)


def test_bad_axes_are_rejected():
    with pytest.raises(ValueError, match="not a PlacementParams field"):
        sweep(model(16), SPEC, placement={"fractoin": [0.5]}, progress=False)
    with pytest.raises(ValueError, match="not a WaferSpec figure"):
        sweep(model(16), SPEC, hardware={"clock": [1e9]}, progress=False)


def test_plots_are_written(table, tmp_path):
    df, _ = table
    paths = sweep_plots.sweep_figures(df, SPEC, str(tmp_path), prefix="t")
    names = {p.split("/")[-1] for p in paths}
    assert {"t_pareto_cores.png", "t_pareto_sram.png", "t_placement_best.png", "t_placement_worst.png"} <= names
    assert "t_throughput_vs_clock_hz.png" in names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


def test_placements_per_second_helper():
    exe = compiler.compile(*model(32), spec=SPEC)
    r = placements_per_second(cm.features(exe), SPEC, points=2048, chunk=512, repeats=2)
    assert r["placements_per_s"] > 0 and r["points"] == 2048 and r["kernels"] == 3


def test_sweep_and_bench_experiments_run(tmp_path, capsys):
    import importlib.util
    import pathlib
    import sys

    def load(name):
        path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_experiment", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # Flax modules are dataclasses: their module must be importable by name
        spec.loader.exec_module(mod)
        return mod

    argv = ["--quick", "--spec", "mini", "--sizes", "32,64", "--out", str(tmp_path), "--no-progress"]
    assert load("sweep").main(argv) == 0
    assert (tmp_path / "mlp.csv").exists() and len(list(tmp_path.glob("*.png"))) >= 5
    assert load("bench_sweep").main(["--points", "4096", "--chunk", "1024", "--repeats", "2", "--emulated", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("placements/s = ") and int(last.split("=")[1]) > 0


def test_sweep_of_one_program_has_no_size_column():
    df = sweep(model(16), SPEC, hardware={"link_bits_per_cycle": [16.0, 32.0]}, progress=False)
    assert "size" not in df.columns and len(df) == 2
    assert df.attrs["swept"] == ["link_bits_per_cycle"]
    assert df["samples_per_s"].iloc[1] >= df["samples_per_s"].iloc[0]
