"""Pictures of a sweep (compiler/sweep.py): throughput against each swept parameter, Pareto fronts of throughput
against cores used and against peak SRAM per core, and placement maps of the best and worst points.

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas; pyplot and its global backend are never
touched), so this works headless and inside notebooks alike. Every function returns the Figure; `sweep_figures`
writes them all as PNG files.
"""

from __future__ import annotations

import os
import textwrap

import matplotlib
import matplotlib.cm
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from compiler.analysis.sweep import pareto_front


def _feasible(df):
    return df[df["feasible"] & np.isfinite(df["samples_per_s"])]


def plot_throughput(df, param: str) -> Figure:
    """Predicted samples/s of every feasible point against one swept parameter, with the best per value."""
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    d = _feasible(df)
    values = list(dict.fromkeys(d[param].tolist()))
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    pos = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    x = np.array([pos[v] for v in d[param]])
    ax.scatter(x, d["samples_per_s"], s=8, alpha=0.35, color="tab:blue", label="points")
    best = d.groupby(param, sort=False)["samples_per_s"].max()
    bx = np.array([pos[v] for v in best.index])
    order = np.argsort(bx)
    ax.plot(bx[order], best.values[order], "o-", color="tab:red", label="best")
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    elif len(values) > 2 and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel("predicted samples/s")
    ax.set_title(f"throughput vs {param}")
    ax.legend(fontsize=8)
    return fig


def plot_pareto(df, x: str = "cores") -> Figure:
    """Throughput against `x` ("cores" or "peak_sram_bytes"): every feasible point and the Pareto front (fewer x,
    more samples/s)."""
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    d = _feasible(df)
    ax.scatter(d[x], d["samples_per_s"], s=8, alpha=0.35, color="0.5", label="points")
    front = pareto_front(df, x=x)
    ax.step(front[x], front["samples_per_s"], where="post", color="tab:red")
    ax.scatter(front[x], front["samples_per_s"], s=16, color="tab:red", label="Pareto front")
    ax.set_xlabel({"cores": "active cores", "peak_sram_bytes": "peak SRAM per core (bytes)"}.get(x, x))
    ax.set_ylabel("predicted samples/s")
    ax.set_title(f"Pareto front: throughput vs {x}")
    ax.legend(fontsize=8)
    return fig


def plot_placement(placement, spec, *, title: str = "", values=None, label: str = "cycles/sample") -> Figure:
    """A placement map: each kernel's rectangle on the core grid, coloured by `values` [kernels] (e.g. cycles per
    sample) when given, else by pipeline position."""
    fig = Figure(figsize=(6, 6 * spec.rows / max(spec.cols, 1) + 0.8), layout="constrained")
    ax = fig.add_subplot()
    names = list(placement)
    cmap = matplotlib.colormaps["viridis"]
    v = np.arange(len(names), dtype=float) if values is None else np.asarray(values, float)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    norm = lambda x: 0.5 if hi <= lo else (x - lo) / (hi - lo)
    for name, val in zip(names, v):
        r, c, h, w = (int(t) for t in placement[name])
        ax.add_patch(Rectangle((c, r), w, h, facecolor=cmap(norm(val)), edgecolor="k", linewidth=0.5))
        if h * w > 0.004 * spec.rows * spec.cols:
            ax.text(c + w / 2, r + h / 2, name, ha="center", va="center", fontsize=6, color="w")
    ax.set_xlim(0, spec.cols)
    ax.set_ylim(spec.rows, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("core column")
    ax.set_ylabel("core row")
    ax.set_title(title or f"placement on {spec.name}")
    if values is not None:
        sm = matplotlib.cm.ScalarMappable(cmap=cmap)
        sm.set_clim(lo, hi)
        fig.colorbar(sm, ax=ax, label=label, shrink=0.8)
    return fig


def sweep_figures(df, spec, out_dir: str, *, prefix: str = "sweep") -> list[str]:
    """Write every sweep picture as PNG under `out_dir`: throughput vs each swept parameter, the two Pareto fronts,
    and placement maps of the best and worst feasible points. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, f"{prefix}_{name}.png")
        fig.savefig(p, dpi=110)
        paths.append(p)

    for param in df.attrs.get("swept", []):
        if df[param].nunique() > 1:
            save(plot_throughput(df, param), f"throughput_vs_{param}")
    d = _feasible(df)
    if len(d):
        save(plot_pareto(df, "cores"), "pareto_cores")
        save(plot_pareto(df, "peak_sram_bytes"), "pareto_sram")
        placements = df.attrs.get("placements", {})
        for tag, row in (("best", d.loc[d["samples_per_s"].idxmax()]), ("worst", d.loc[d["samples_per_s"].idxmin()])):
            rects = placements.get(int(row["placement_id"]))
            if rects is None:
                continue
            sw = [
                f"{p}={row[p]:g}" if isinstance(row[p], float) else f"{p}={row[p]}" for p in df.attrs.get("swept", [])
            ]
            title = f"{tag}: {row['samples_per_s']:,.0f} samples/s\n" + "\n".join(textwrap.wrap(", ".join(sw), 70))
            save(plot_placement(rects, spec, title=title), f"placement_{tag}")
    return paths
