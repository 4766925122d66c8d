"""Pictures of a compiled program: where its kernels sit, what fills SRAM, which links carry its traffic, and
which kernel bounds the pipeline.

    from compiler import plots
    fig = plots.placement_map(exe, routes=True)       # the wafer, a labelled rectangle per kernel
    fig = plots.sram_map(state, unit="percent")       # SRAM in use per core
    fig = plots.link_map(state)                       # words sent per core, N/E/S/W (or direction="sum")
    fig = plots.kernel_cycles(exe.report)             # cycles per sample per kernel, bottleneck in red
    paths = plots.save_all(exe, state, "out/")        # placement.png, sram.png, links.png, cycles.png

Every function takes an optional `ax` to draw into (and then returns `ax.figure`) or makes its own figure, and
returns the `matplotlib.figure.Figure`; `path=` also saves it as a PNG. Figures are made with
`matplotlib.figure.Figure`, not `pyplot`, so the library never selects a backend or keeps figures alive in
pyplot's registry: scripts and servers render with Agg, notebooks display the returned figure as usual.

Scale: the full WSE-2 fabric is 757 x 996 cores. Kernels are drawn as one rectangle patch each (never as a
per-core image) and routes as a few lanes per flow, so a placement picture costs the same on any grid. Heatmaps
of per-core figures are images; grids wider than `MAX_PIXELS` per side are max-pooled first so that a single busy
core never vanishes when the image is shrunk (757 x 996 is drawn as it is).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from compiler.run.program import Program
from compiler.run.train import TrainState
from compiler.views.report import Report
from wafer.fabric import DIRECTIONS
from wafer.memory import MemoryMap
from wafer.state import WaferState

MAX_PIXELS = 1000  # heatmaps with more cores than this on a side are max-pooled
DPI = 120
FILES = ("placement.png", "sram.png", "links.png", "cycles.png")
_EMPTY = "#f2f2f2"  # cores no kernel uses
_IO = "#c8c8c8"  # the memcpy host-I/O columns


# ---- accepting what users hold -----------------------------------------------------------------------------------


def _program(x) -> Program:
    if not isinstance(x, Program):
        raise TypeError(
            "expected a compiled program (compiler.compile(...) or compiler.compile_train(...)), got "
            f"{type(x).__name__}"
        )
    return x


def _wafer_state(x):
    """The WaferState inside a TrainState, or x itself."""
    return x.wafer if isinstance(x, TrainState) else x


def _occupancy(x) -> tuple[np.ndarray, int | None]:
    """Bytes in use per core [rows, cols] and the capacity, from a state, a memory map, a program or an array."""
    x = _wafer_state(x)
    if isinstance(x, Program):
        x = x.memory
    if isinstance(x, WaferState):
        x = x.memory
    if isinstance(x, MemoryMap):
        return np.asarray(x.occupancy()), int(x.capacity_bytes)
    a = np.asarray(x)
    if a.ndim != 2:
        raise TypeError(
            f"sram_map needs a WaferState, TrainState, MemoryMap, compiled program or a [rows, cols] array; got "
            f"{type(x).__name__} of shape {a.shape}"
        )
    return a, None


def _links(x) -> tuple[np.ndarray, str]:
    """Words per core per direction [4, rows, cols] and what they count."""
    if isinstance(x, Program):  # its static traffic per call / step
        per = "training step" if x.plan.task == "training" else "call"
        return np.asarray(x.schedule.link_words(), np.float64), f"words per {per}"
    x = _wafer_state(x)
    if isinstance(x, WaferState):
        return np.asarray(x.links, np.float64), "words sent (state counters)"
    a = np.asarray(x, np.float64)
    if a.ndim != 3 or a.shape[0] != 4:
        raise TypeError(
            f"link_map needs a WaferState, TrainState, compiled program or a [4, rows, cols] array (N, E, S, W); "
            f"got {type(x).__name__} of shape {a.shape}"
        )
    return a, "words"


def _report(x):
    """A report as a dict (from a Report, a program, or a dict such as a loaded report.json)."""
    if isinstance(x, Mapping):
        d = dict(x)
    elif isinstance(x, Program):
        d = x.report.to_dict()
    elif isinstance(x, Report):
        d = x.to_dict()
    else:
        raise TypeError(f"kernel_cycles needs a Report, a compiled program or a report dict, got {type(x).__name__}")
    if not d.get("kernels"):
        raise ValueError("the report has no kernels to draw")
    return d


# ---- figure plumbing ---------------------------------------------------------------------------------------------


def _figure(ax, figsize, nrows=1, ncols=1):
    """(figure, axes) to draw into: the given ax, or a new figure with a grid of axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    if nrows == ncols == 1:
        return fig, fig.add_subplot()
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _finish(fig, path):
    if path is not None:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=fig.dpi, format="png")
    return fig


def _grid_size(rows, cols, width=8.0, extra=0.0):
    """A figure size for a rows x cols grid, `width` inches wide (plus `extra` inches for a colorbar)."""
    height = min(max(width * rows / max(cols, 1), 2.5), 11.0)
    return (width + extra, height + 0.8)


def downsample(a: np.ndarray, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Max-pool a [rows, cols] map by a whole factor so no side exceeds `max_pixels` (unchanged if it fits)."""
    a = np.asarray(a)
    f = max(1, math.ceil(max(a.shape) / max_pixels))
    if f == 1:
        return a
    r, c = -(-a.shape[0] // f) * f, -(-a.shape[1] // f) * f
    padded = np.full((r, c), np.min(a) if a.size else 0, a.dtype)
    padded[: a.shape[0], : a.shape[1]] = a
    return padded.reshape(r // f, f, c // f, f).max(axis=(1, 3))


def _heatmap(ax, a, *, label, cmap="viridis", vmax=None):
    """A per-core map as an image in core coordinates; zero cores in light grey; returns the image."""
    rows, cols = a.shape
    shown = downsample(a)
    cm = colormaps[cmap].with_extremes(bad=_EMPTY)
    top = float(vmax) if vmax is not None else float(shown.max()) if shown.size else 1.0
    im = ax.imshow(
        np.ma.masked_equal(shown, 0),
        cmap=cm,
        vmin=0.0,
        vmax=top if top > 0 else 1.0,
        extent=(0, cols, rows, 0),
        interpolation="nearest",
        aspect="equal",
    )
    ax.figure.colorbar(im, ax=ax, label=label, shrink=0.85)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    return im


def defect_marks(spec) -> tuple[np.ndarray, np.ndarray]:
    """Where a defective wafer's switched-off cores show on the logical grid: (points [k, 2] of (x, y) in core
    coordinates, a dead core between two logical cores drawn on the boundary between them; retired rows [m], the y
    of the boundary each retired physical row lies on). Empty without defects."""
    rm = spec.remap if spec is not None else None
    if rm is None:
        return np.zeros((0, 2)), np.zeros(0)
    points = []
    for r, c in zip(*np.nonzero(rm.dead)):
        at = rm.logical_of(int(r), int(c))
        if at is not None:
            points.append((at[1] + 0.5, at[0] + 0.5))
    retired = [float(np.searchsorted(rm.row_of, r)) for r in rm.retired_rows]
    return np.asarray(points, np.float64).reshape(-1, 2), np.asarray(retired, np.float64)


def _draw_defects(ax, spec, handles=None):
    """Mark a defective wafer's dead cores (red crosses, where the remap skips them) and retired rows (red dashed
    lines) on a picture of the logical grid; add legend entries to `handles` when given."""
    points, retired = defect_marks(spec)
    if not len(points) and not len(retired):
        return
    size = max(2.0, min(8.0, 400.0 / max(spec.rows, spec.cols)))
    if len(points):
        ax.plot(points[:, 0], points[:, 1], "x", color="red", markersize=size, markeredgewidth=1.0, zorder=5)
    for y in retired:
        ax.axhline(y, color="red", linestyle="--", linewidth=0.8, zorder=5)
    if handles is not None:
        rm = spec.remap
        label = f"dead cores ({int(rm.dead.sum())}, remapped)"
        handles.append(Line2D([], [], marker="x", color="red", linestyle="none", label=label))
        if len(retired):
            handles.append(Line2D([], [], color="red", linestyle="--", label=f"retired rows ({len(retired)})"))


def _kernel_colors(names):
    cm = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # the strong colours first: neighbours differ clearly
    return {n: cm(order[i % 20]) for i, n in enumerate(names)}


# ---- the pictures ------------------------------------------------------------------------------------------------


def placement_map(
    exe_or_tx,
    ax=None,
    *,
    routes: bool = True,
    max_lanes: int = 4,
    labels: bool = True,
    zoom: bool | None = None,
    path=None,
):
    """The wafer with every kernel's rectangle, coloured and labelled with its name.

    Args:
      exe_or_tx: a compiled program (`compiler.compile` or `compiler.compile_train`).
      ax: a matplotlib Axes to draw into; by default a new figure.
      routes: draw the activation routes between kernels (and from/to the host at the wafer's edges).
      max_lanes: lanes drawn per flow (evenly chosen among its lanes); a flow runs on up to a rectangle's side.
      labels: write each kernel's name in its rectangle (kernels too small for a readable name are listed in the
        legend instead).
      zoom: add an inset magnifying the cores the kernels occupy; None (default): when they cover less than a
        sixteenth of the grid, as a small model on the full WSE-2 does.
      path: save the figure there as a PNG.
    Returns:
      The `Figure`. The memcpy host-I/O columns (`spec.memcpy_cols_west/east`) are hatched; cores no kernel uses
      are light grey; a kernel's rectangle is pale where its cores hold no tiles (the partitioner uses its top-left
      grid). In weight streaming every layer uses the whole wafer in turn: one rectangle lists them all.
    """
    program = _program(exe_or_tx)
    spec, placement, rts, plans = program.spec, program.placement, program.routes, program.plans
    own = ax is None
    fig, ax = _figure(ax, _grid_size(spec.rows, spec.cols))
    colors = _kernel_colors(list(placement))
    # kernels sharing one rectangle (weight streaming) are drawn once, with all their names
    shared: dict[tuple, list[str]] = {}
    for name, rect in placement.items():
        shared.setdefault(tuple(int(v) for v in rect), []).append(name)
    view = (0, 0, spec.rows, spec.cols)
    unlabelled = _draw_placement(ax, spec, shared, plans, colors, rts if routes else None, max_lanes, labels, view)
    box = _bounding_box(shared, spec)
    if zoom is None:
        zoom = (box[2] - box[0]) * (box[3] - box[1]) * 16 <= spec.cores and min(spec.rows, spec.cols) >= 32
    if zoom:
        inset = ax.inset_axes(_inset_place(box, spec))
        small = _draw_placement(inset, spec, shared, plans, colors, rts if routes else None, max_lanes, labels, box)
        unlabelled = [n for n in unlabelled if n in small]
        inset.set_xlabel("")
        inset.set_ylabel("")
        inset.tick_params(labelsize=6)
        ax.indicate_inset_zoom(inset, edgecolor="black")
    placed = sum(r[2] * r[3] for r in shared)
    working = sum(p.cores for n, p in plans.items() if n in placement) if len(shared) == len(placement) else None
    title = f"{spec.name}: {len(placement)} kernels on {placed:,} of {spec.cores:,} cores"
    if working is not None and plans:
        title += f" ({working:,} doing work)"
    ax.set_title(title)
    handles = [Patch(facecolor=_EMPTY, edgecolor="black", label="unused cores")]
    if spec.memcpy_cols_west or spec.memcpy_cols_east:
        handles.append(Patch(facecolor=_IO, edgecolor="grey", hatch="///", label="memcpy host-I/O columns"))
    if working is not None and working < placed:
        handles.append(Patch(facecolor="grey", alpha=0.4, edgecolor="black", label="rectangle cores holding no tiles"))
    _draw_defects(ax, spec, handles)
    if zoom:
        _draw_defects(inset, spec)
    for name in unlabelled[:_MAX_LEGEND]:
        handles.append(Patch(facecolor=colors[name], label=name))
    if len(unlabelled) > _MAX_LEGEND:
        handles.append(Patch(facecolor="white", label=f"and {len(unlabelled) - _MAX_LEGEND} more small kernels"))
    ncols = min(len(handles), 4)
    if own:  # below the axes, in room the layout makes for it
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=7, frameon=False)
    else:
        ax.legend(handles=handles, loc="upper right", fontsize=6, framealpha=0.8)
    return _finish(fig, path)


def _bounding_box(shared, spec) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) around every rectangle, with a margin, inside the grid."""
    r0 = min(r for r, _, _, _ in shared)
    c0 = min(c for _, c, _, _ in shared)
    r1 = max(r + h for r, _, h, _ in shared)
    c1 = max(c + w for _, c, _, w in shared)
    m = max(2, round(0.05 * max(r1 - r0, c1 - c0)))
    return max(0, r0 - m), max(0, c0 - m), min(spec.rows, r1 + m), min(spec.cols, c1 + m)


def _inset_place(box, spec) -> list[float]:
    """Where the zoomed inset goes, in axes coordinates: the corner farthest from the region it magnifies."""
    r, c = (box[0] + box[2]) / 2 / spec.rows, (box[1] + box[3]) / 2 / spec.cols
    x = 0.04 if c > 0.5 else 0.4
    y = 0.4 if r > 0.5 else 0.04  # axes y runs upwards; rows run down the picture
    return [x, y, 0.56, 0.56]


def _draw_placement(ax, spec, shared, plans, colors, rts, max_lanes, labels, view) -> list[str]:
    """Draw the grid, I/O columns, kernels and routes into `ax` showing `view` = (row0, col0, row1, col1).

    Returns the kernels whose name did not fit their rectangle at a readable size.
    """
    r0, c0, r1, c1 = view
    ax.add_patch(Rectangle((0, 0), spec.cols, spec.rows, facecolor=_EMPTY, edgecolor="black", linewidth=0.8))
    io = []
    if spec.memcpy_cols_west:
        io.append((0, spec.memcpy_cols_west))
    if spec.memcpy_cols_east:
        io.append((spec.cols - spec.memcpy_cols_east, spec.memcpy_cols_east))
    for col, w in io:
        ax.add_patch(Rectangle((col, 0), w, spec.rows, facecolor=_IO, edgecolor="grey", hatch="///", linewidth=0.3))
    # points per core on paper (equal aspect: the tighter side decides), so labels fit their rectangles
    fig = ax.figure
    bbox = ax.get_position()
    pt = min(bbox.width * fig.get_figwidth() * 72 / (c1 - c0), bbox.height * fig.get_figheight() * 72 / (r1 - r0))
    unlabelled = []
    for (row, col, h, w), names in shared.items():
        color = colors[names[0]]
        grid = plans[names[0]].grid if len(names) == 1 and names[0] in plans else (h, w)
        ax.add_patch(Rectangle((col, row), w, h, facecolor=color, edgecolor="black", linewidth=0.6, alpha=0.4))
        # the cores that do the kernel's work (the top-left of its rectangle); the rest of it holds no tiles
        ax.add_patch(Rectangle((col, row), grid[1], grid[0], facecolor=color, edgecolor="none", alpha=0.9))
        if not labels:
            continue
        text = names[0] if len(names) == 1 else f"{len(names)} layers, one at a time:\n" + ", ".join(names[:8])
        if len(names) > 8:
            text += ", ..."
        across, up = min(_label_fit(text, w * pt, h * pt), 11.0), min(_label_fit(text, h * pt, w * pt), 11.0)
        size, rotation = (across, 0) if across >= up else (up, 90)  # horizontal unless vertical reads larger
        if size < _MIN_FONT:
            unlabelled.append(names[0])
            continue
        ax.text(
            col + w / 2,
            row + h / 2,
            text,
            ha="center",
            va="center",
            rotation=rotation,
            fontsize=size,
            clip_on=True,
            path_effects=[patheffects.withStroke(linewidth=2, foreground="white")],
        )
    if rts is not None:
        _draw_routes(ax, rts, colors, max_lanes)
    ax.set_xlim(c0, c1)
    ax.set_ylim(r1, r0)
    ax.set_aspect("equal")
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    return unlabelled


_MIN_FONT = 5.0  # smaller labels go to the legend
_MAX_LEGEND = 30


def _label_fit(text: str, along_pt: float, across_pt: float) -> float:
    """The font size (points) at which `text` fits a box `along_pt` long (the text's direction), `across_pt` high."""
    lines = text.split("\n")
    longest = max(len(line) for line in lines)
    return min(along_pt / (0.62 * max(longest, 1)), across_pt / (1.3 * len(lines)))


def _draw_routes(ax, rts, colors, max_lanes):
    for (src, dst), lanes in rts.lanes.items():
        lanes = np.asarray(lanes)
        if not len(lanes):
            continue
        pick = np.unique(np.linspace(0, len(lanes) - 1, min(max_lanes, len(lanes))).round().astype(int))
        host = "host" in (src, dst)
        color = "dimgrey" if host else colors.get(src, "black")
        for r0, c0, r1, c1 in lanes[pick]:
            xs = [c0 + 0.5, c1 + 0.5, c1 + 0.5]
            ys = [r0 + 0.5, r0 + 0.5, r1 + 0.5]
            ax.plot(xs, ys, color=color, linewidth=0.8, linestyle="--" if host else "-", alpha=0.9)
            ax.plot([c1 + 0.5], [r1 + 0.5], marker=".", color=color, markersize=3)


def sram_map(state_or_memory, spec=None, ax=None, *, unit: str = "bytes", path=None):
    """SRAM in use per core, as a heatmap with a colorbar.

    Args:
      state_or_memory: a `WaferState`, a `TrainState`, a `MemoryMap`, a compiled program (its SRAM layout) or an
        array `[rows, cols]` of bytes.
      spec: the wafer; gives the capacity (otherwise taken from the memory map) and the title.
      ax: a matplotlib Axes to draw into; by default a new figure.
      unit: "bytes" or "percent" (of the capacity per core).
      path: save the figure there as a PNG.
    Returns:
      The `Figure`. Empty cores are light grey.
    """
    if unit not in ("bytes", "percent"):
        raise ValueError(f"unit must be 'bytes' or 'percent', got {unit!r}")
    occ, capacity = _occupancy(state_or_memory)
    if spec is None and isinstance(state_or_memory, Program):
        spec = state_or_memory.spec
    if spec is not None:
        capacity = int(spec.data_bytes_per_core)
    if unit == "percent" and capacity is None:
        raise ValueError("unit='percent' needs the capacity: pass spec= (or a state or memory map)")
    rows, cols = occ.shape
    fig, ax = _figure(ax, _grid_size(rows, cols, extra=1.2))
    values = occ.astype(np.float64)
    if unit == "percent":
        values = 100.0 * values / capacity
        _heatmap(ax, values, label="% of SRAM per core", vmax=100.0)
    else:
        label = "bytes per core" + (f" (capacity {capacity:,})" if capacity else "")
        _heatmap(ax, values, label=label, cmap="viridis")
    name = spec.name if spec is not None else f"{rows}x{cols} grid"
    peak = int(occ.max()) if occ.size else 0
    title = f"{name}: SRAM in use, peak {peak:,} bytes per core"
    if capacity:
        title += f" ({100 * peak / capacity:.1f}% of {capacity:,})"
    ax.set_title(title)
    if spec is not None and (spec.rows, spec.cols) == (rows, cols):
        _draw_defects(ax, spec)
    return _finish(fig, path)


def link_map(state, direction: str | None = None, ax=None, *, path=None):
    """Words sent per core on its outgoing links, per direction or summed.

    Args:
      state: a `WaferState` or `TrainState` (its link counters: everything charged so far), a compiled program (its
        static traffic per call or training step) or an array `[4, rows, cols]` (N, E, S, W).
      direction: None for four panels N, E, S, W (one colour scale); "sum" for their total; "N", "E", "S" or "W"
        for one. With `ax` given, None means "sum" (one Axes holds one map).
      ax: a matplotlib Axes to draw into; by default a new figure.
      path: save the figure there as a PNG.
    Returns:
      The `Figure`.
    """
    words, what = _links(state)
    spec = state.spec if isinstance(state, Program) else None
    if direction is None and ax is not None:
        direction = "sum"
    if direction is not None and direction not in (*DIRECTIONS, "sum"):
        raise ValueError(f"direction must be None, 'sum' or one of {DIRECTIONS}, got {direction!r}")
    _, rows, cols = words.shape
    if direction is not None:
        fig, ax = _figure(ax, _grid_size(rows, cols, extra=1.2))
        a = words.sum(axis=0) if direction == "sum" else words[DIRECTIONS.index(direction)]
        _heatmap(ax, a, label=what, cmap="magma_r")
        which = "all directions" if direction == "sum" else f"{direction} links"
        ax.set_title(f"link load, {which}: busiest core {a.max():,.0f}")
        _draw_defects(ax, spec)
        return _finish(fig, path)
    w, h = _grid_size(rows, cols, width=6.0, extra=1.0)
    fig, axes = _figure(None, (2 * w, 2 * h - 0.8), 2, 2)
    top = float(words.max()) or 1.0
    for d, ax_d in zip(DIRECTIONS, axes.flat):
        a = words[DIRECTIONS.index(d)]
        _heatmap(ax_d, a, label=what, cmap="magma_r", vmax=top)
        ax_d.set_title(f"{d} links: busiest core {a.max():,.0f}")
        _draw_defects(ax_d, spec)
    fig.suptitle(f"link load per core and direction ({what})")
    return _finish(fig, path)


def kernel_cycles(report, ax=None, *, path=None):
    """Cycles per sample of every kernel as bars, the pipeline's bottleneck in red.

    Args:
      report: a `Report` (`exe.report`, `tx.report`), a compiled program, or a report dict (e.g. report.json).
      ax: a matplotlib Axes to draw into; by default a new figure.
      path: save the figure there as a PNG.
    Returns:
      The `Figure`. Inference: one bar per kernel with its compute and communication cycles marked (a kernel
      costs the larger when the spec overlaps them, their sum otherwise). Training: forward and backward cycles
      per sample stacked. The dashed line is the slowest kernel's cycles per sample; in inference a dotted line
      marks the pipeline's pace when a stream or the edge I/O sets it instead.
    """
    d = _report(report)
    ks = d["kernels"]
    names = [k["name"] for k in ks]
    x = np.arange(len(ks))
    width = min(max(6.0, 0.35 * len(ks) + 2.0), 24.0)
    fig, ax = _figure(ax, (width, 4.5))
    batch = max(int(d.get("batch", 1)), 1)
    worst = d.get("bottleneck")
    training = "training" in d.get("mode", "")
    edge = ["red" if n == worst else "black" for n in names]
    if training:
        fwd = np.array([k["forward_cycles"] for k in ks]) / batch
        bwd = np.array([k["backward_cycles"] for k in ks]) / batch
        ax.bar(x, fwd, color="tab:blue", edgecolor=edge, label="forward")
        ax.bar(x, bwd, bottom=fwd, color="tab:orange", edgecolor=edge, label="backward")
        tops = fwd + bwd
    else:
        tops = np.array([k["cycles_per_sample"] for k in ks])
        colors = ["tab:red" if n == worst else "tab:blue" for n in names]
        ax.bar(x, tops, color=colors, edgecolor="black", linewidth=0.5, label="cycles per sample")
        ax.scatter(x, [k["compute_cycles_per_sample"] for k in ks], marker="_", s=200, color="black", label="compute")
        ax.scatter(x, [k["comm_cycles_per_sample"] for k in ks], marker="x", s=20, color="dimgrey", label="fabric")
    if worst in names:
        i = names.index(worst)
        ax.axhline(tops[i], color="red", linestyle="--", linewidth=0.8, label=f"slowest kernel: {worst}")
    pace = d.get("cycles_per_sample", 0.0)
    if not training and pace > float(np.max(tops, initial=0.0)) * (1 + 1e-9):
        # a stream or the edge I/O paces the pipeline, not a kernel
        ax.axhline(pace, color="black", linestyle=":", linewidth=1.0, label=f"pace ({d.get('bound', '')})")
    ax.set_xticks(x, names, rotation=90 if len(ks) > 8 else 0, fontsize=8 if len(ks) > 8 else 9)
    ax.set_ylabel("cycles per sample")
    ax.set_xlabel("kernel")
    rate = d.get("samples_per_s", 0.0)
    ax.set_title(
        f"{d.get('spec_name', '')}: {d.get('mode', '')}, batch {batch}\n"
        f"bottleneck {worst}, {rate:,.0f} samples/s predicted",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return _finish(fig, path)


def save_all(exe, state=None, out_dir=".", *, routes: bool = True) -> dict[str, str]:
    """Write placement.png, sram.png, links.png and cycles.png of a compiled program into `out_dir`.

    Args:
      exe: a compiled program.
      state: a `WaferState` or `TrainState` the program ran on: its SRAM layout and link counters are drawn;
        without it, the program's SRAM layout and its static link traffic per call (or step).
      out_dir: created if missing.
      routes: draw routes on the placement picture.
    Returns:
      {picture name: path}.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {f: os.path.join(out_dir, f) for f in FILES}
    placement_map(exe, routes=routes, path=paths["placement.png"])
    sram_map(exe if state is None else state, exe.spec, path=paths["sram.png"])
    links = exe
    if state is not None and np.asarray(_wafer_state(state).links).any():
        links = state
    link_map(links, path=paths["links.png"])
    kernel_cycles(exe.report, path=paths["cycles.png"])
    return paths
