"""Placement search: gradient descent on the relaxed cost model, legalised; random search and simulated annealing.

A *legaliser* (compiler/plan/legalise.py) turns a continuous target into a valid placement (disjoint rectangles
inside the usable grid, each with its kernel's minimum cores and sides) and the exact cost model
(`costmodel.predict`, tau = 0: the emulator's figures) scores it. Targets come in two forms, both rounded faithfully
(the legaliser does not optimise; its one rule beyond rounding is tile-grid snapping, below):   areas        [n]
cores per kernel: `compiler.place` with `KernelDemand(work=area)` and
`PlacementParams(area_rule="work", area_exponent=1)` gives each kernel about its area in a banded
floorplan; the bands it made are the *structure* (`Bands`: kernel groups, one per horizontal band).   BandedPlan
within a structure: each band's height, each kernel's width and the fraction of its band's height                it
fills. `legalise_banded` apportions band heights to the usable rows and widths within each band to
the usable width (largest remainder, lower bounds from the minimum sizes; no upper bound from
max_cores, since a conv may need a rectangle larger than the cores it uses to hold whole copies of its
tile grid), bands serpentine (west->east, then east->west) as compiler.place lays them. Tile-grid snapping
(`snap=True`; every search method legalises with it, `legalise` defaults to off): a weight kernel (dense, conv)
speeds up only at whole numbers of rows of data per copy of its tile grid, ceil(m / groups), with groups = rr *
min(cols, floor(m / rr)) for rr rows and cols columns of copies of its a x b grid: a step function, not monotone in
the rectangle's height (a conv with m = 32 has 30 groups at rr = 6 but 32 at rr = 4 or 8), that the straight-through
ceil/floor gradient does not see and that rounding a target to the nearest rectangle rarely lands on. So after
rounding, each weight kernel whose full grid fits its band is reshaped, within the cores its rounded rectangle has
and the band's height, to the smallest rectangle of whole grid copies (rr * a) x (rc * b) that needs fewer rows of
data per copy, or as many with fewer cores (narrowest first; such a kernel may then read slightly more activation
bytes per core), taking its width from the band's other kernels (snaps that only save cores are dropped first when
the widths do not fit). An areas target is placed by compiler.place, then snapped within its bands. Snapping spends
no evaluation: a legalisation is scored once, snapped.

The methods:
  gradient             DOSA-style [Hegde et al., MICRO 2023] and Mind Mappings-style [Hegde et al., ASPLOS 2021]:
                       Adam (optax) on the *relaxed* model, then legalisation, repeated. Parameters are logits of a
                       BandedPlan: band heights = rows * softmax(u), widths = width * softmax(v) within each band,
                       fill = min(1, 1.05 sigmoid(r)). The relaxed model is the cost model at those (continuous)
                       rectangles, rounded with straight-through round / ceil / floor (exact values, identity
                       gradients), maxima relaxed by log-sum-exp at temperature tau (5% -> 0.5% of the last legal
                       bottleneck, geometric over the budget); the loss is log(bottleneck cycles) plus penalties on
                       per-core SRAM above capacity and on areas under the SRAM minimum. Every `steps_per_round` steps
                       the plan is legalised in its structure, and its areas afresh by compiler.place; a better fresh
                       structure replaces the current one (Adam restarts there). The best legal point is returned.
  random               areas `least + (usable - sum(least)) * Dirichlet(1)`, legalised by compiler.place.
  simulated_annealing  the gradient method's parameters, Gaussian perturbations of all logits (sigma 0.3 -> 0.02),
                       legalised in the current structure (afresh by compiler.place with probability 0.1), Metropolis
                       acceptance on -log(samples/s) with temperature 0.05 -> 0.002, geometric schedules.
Gradient and annealing start from the same point: equal shares of the cores above the SRAM minima, placed by
compiler.place.

Budget accounting (equal budgets compare equal counts): one evaluation is one gradient step of the relaxed model
(value and gradient at one candidate) or one legalisation scored by the exact model. Random search and annealing
spend every evaluation on a legalisation; the gradient method spends most on relaxed steps (two legalisations per
round). Wall time is reported beside the counts: a jitted relaxed step costs less than a legalisation
(compiler.place's dynamic programme runs on the host), so at equal counts the gradient method also takes less wall
time, once its step is compiled (a one-off XLA compile of a second or two).

With snapping the gradient method reaches the bound on the VGG-style CNN of experiments/placement_search.py (its
relaxed steps grow the bottleneck conv's rectangle to hold the next whole multiple of its grid, and the snap makes
that rectangle the right shape) where random search's Dirichlet areas, snapped the same way, stay near 52% (seeds
0-3): a rectangle must both be large enough and sit in a band tall enough for the good shape. Simulated annealing,
in the gradient method's space, reaches the bound too on three of those four seeds. Without snapping every method
stalled near 52%. Dense kernels whose grid is taller than a band (the MLP's 8192-row weights) are never snapped.

Upper bound (`placement_problem(...).bound`, samples/s): every usable core busy on an equal share of the work,
where a kernel's work is its cycles per sample on one core under the same cost model: `clock * usable / sum(work)`,
and no more than `clock * max_cores / work` for a kernel whose speed-up stops at `max_cores`
(`compiler.balanced_bound` with these works). The cost model charges a kernel on c cores at least work / c (up to
the rounding of a weightless kernel's cores to whole rows), so no placement exceeds it; it ignores communication,
tile padding and packing, so none reaches it exactly either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compiler import schedule
from compiler.analysis import costmodel as cm
from compiler.analysis.sweep import evaluate_placements
from compiler.errors import PlacementError
from compiler.plan import Plan, demands_pass
from compiler.plan import features as ft
from compiler.plan.legalise import BandedPlan, Bands, Floor, banded_plan, legalise
from compiler.plan.place import KernelDemand, PlacementParams, balanced_bound, place, usable_region
from compiler.plan.plan import per_sample_cycles

METHODS = ("gradient", "simulated_annealing", "random")


# ---- the problem ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PlacementProblem(Floor):
    """What a placement search needs to know of a program on a wafer: what legalisation needs (`Floor`: the
    demands, whose `work` is each kernel's cycles per sample on one core under the cost model, the wafer, the usable
    region, the tile grids for snapping) and the cost model's features and the balanced upper bound (module
    docstring), samples/s."""

    feats: ft.Features | None = None
    bound: float = math.inf

    @functools.cached_property
    def work(self) -> np.ndarray:
        return np.array([d.work for d in self.demands], np.float64)

    def equal_areas(self) -> np.ndarray:
        """Every kernel the same share of the cores above its minimum."""
        return self.least + (self.usable - self.least.sum()) / self.n


def placement_problem(program_or_plan, spec=None, *, reserve_io_columns: bool = True) -> PlacementProblem:
    """The placement problem of a compiled program (or a plan built to its demands) on `spec` (default its own)."""
    plan = program_or_plan if isinstance(program_or_plan, Plan) else program_or_plan.plan
    spec = plan.spec if spec is None else spec
    feats = cm.compact(cm.features(plan))
    n = feats.n
    one = cm.Layout(jnp.ones(n), jnp.ones(n), jnp.zeros(n), jnp.zeros(n))
    work = np.asarray(_predict(feats, one, spec)["cycles_per_sample"], np.float64)
    base = demands_pass(plan.replace(spec=spec)).demands
    ds = tuple(
        KernelDemand(
            d.name,
            float(max(w, 1e-9)),
            min_cores=d.min_cores,
            max_cores=d.max_cores,
            min_height=d.min_height,
            min_width=d.min_width,
        )
        for d, w in zip(base, work)
    )
    params = PlacementParams(reserve_io_columns=reserve_io_columns)
    region = usable_region(spec, params)
    if sum(d.least_cores for d in ds) > region.cores:
        raise PlacementError(
            f"the kernels need at least {sum(d.least_cores for d in ds):,} cores for their SRAM but {spec.name} has "
            f"{region.cores:,} usable; use a larger wafer or a smaller model"
        )
    bound = float(spec.clock_hz) * balanced_bound(ds, spec, params)
    f = plan.features
    grids = (np.asarray(f.anchor) == ft.WEIGHT, *(np.asarray(x, np.float64) for x in (f.a, f.b, f.m)))
    return PlacementProblem(
        demands=ds,
        spec=spec,
        region=region,
        reserve_io_columns=reserve_io_columns,
        grids=grids,
        feats=feats,
        bound=bound,
    )


@functools.partial(jax.jit, static_argnums=2)
def _predict(feats, lay, spec):
    return cm.predict(feats, lay, spec)


def score_placement(prob: PlacementProblem, placement) -> dict:
    """Exact figures of a legal placement: samples_per_s, bottleneck_cycles, cores, peak_sram_bytes, feasible
    (its per-core SRAM fits); `score` is samples_per_s when feasible, else 0. Scored as sweeps score placements
    (`evaluate_placements`: its integer sides through the side table of compiler/analysis/tabulated.py)."""
    lay = jax.tree.map(lambda x: np.asarray(x)[:, None], schedule.layout_of(placement, prob.names))
    out = evaluate_placements(prob.feats, lay, prob.spec, kernels_first=True)
    out = {k: v[0] for k, v in out.items()}
    peak = float(out["peak_sram_bytes"])
    feasible = peak <= prob.spec.data_bytes_per_core
    thr = float(out["samples_per_s"])
    return dict(
        samples_per_s=thr,
        bottleneck_cycles=float(out["bottleneck_cycles"]),
        cores=int(out["cores"]),
        peak_sram_bytes=peak,
        feasible=feasible,
        score=thr if feasible else 0.0,
    )


# ---- results --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
    """The best legal placement a method found.

    Attributes:
      method: "gradient", "random", "simulated_annealing" or "heuristic" (`compiler.place`'s default).
      placement: {kernel name: Rect}, valid.
      samples_per_s: its exact predicted throughput (0 if none was feasible).
      bound: the problem's balanced upper bound, samples/s.
      evaluations: evaluations spent (module docstring).
      wall_s: seconds taken.
      history: best samples/s found after each evaluation that scored a legal placement, [legalisations].
      areas: the target areas [n] of the best point.
    """

    method: str
    placement: dict
    samples_per_s: float
    bound: float
    evaluations: int
    wall_s: float
    history: np.ndarray
    areas: np.ndarray

    @property
    def fraction_of_bound(self) -> float:
        return self.samples_per_s / self.bound if self.bound > 0 else 0.0


class _Tracker:
    def __init__(self, prob, method, snap=True):
        self.snap = snap
        self.prob, self.method = prob, method
        self.best, self.best_rects, self.best_areas = -1.0, None, None
        self.history, self.evals, self.t0 = [], 0, time.perf_counter()

    def score(self, target):
        """Legalise `target` (areas or a BandedPlan; tile-grid snapped unless the tracker was made with
        snap=False) and score it exactly: one evaluation.
        Returns (score, rects, bands); score 0 and rects None when nothing legal came of it."""
        self.evals += 1
        try:
            rects, bands = legalise(self.prob, target, snap=self.snap)
        except PlacementError:
            self.history.append(max(self.best, 0.0))
            return 0.0, None, None
        s = score_placement(self.prob, rects)["score"]
        if s > self.best:
            self.best, self.best_rects = s, rects
            self.best_areas = np.array([rects[n].cores for n in self.prob.names], np.float64)
        self.history.append(max(self.best, 0.0))
        return s, rects, bands

    def result(self) -> SearchResult:
        if self.best_rects is None:
            raise PlacementError(f"{self.method}: no legal placement found in {self.evals} evaluations")
        return SearchResult(
            self.method,
            self.best_rects,
            float(max(self.best, 0.0)),
            self.prob.bound,
            self.evals,
            time.perf_counter() - self.t0,
            np.asarray(self.history),
            self.best_areas,
        )


# A kernel's fill of its band is min(1, _FILL_SLACK * sigmoid(r)) (straight-through at the clip), so fill = 1 is
# reached at a finite logit, where the gradient can still bring it down.
_FILL_SLACK = 1.05


def _plan_arrays(theta, band_id, n_bands, rows, width):
    """(band heights [n] (first n_bands used), widths [n], fill [n], heights [n]) of logits theta = (u, v, r):
    heights rows * softmax(u) over the bands, widths width * softmax(v) within each band."""
    u, v, r = theta
    n = v.shape[0]
    u = jnp.where(jnp.arange(n) < n_bands, u, -jnp.inf)
    band_h = rows * jax.nn.softmax(u)
    vmax = jax.ops.segment_max(v, band_id, num_segments=n)[band_id]
    e = jnp.exp(v - vmax)
    w = width * e / jax.ops.segment_sum(e, band_id, num_segments=n)[band_id]
    f = _FILL_SLACK * jax.nn.sigmoid(r)
    fill = f + jax.lax.stop_gradient(jnp.minimum(f, 1.0) - f)
    return band_h, w, fill, fill * band_h[band_id]


def _theta_of(plan: BandedPlan):
    n = len(plan.widths)
    u = np.zeros(n, np.float32)
    u[: len(plan.band_heights)] = np.log(np.maximum(plan.band_heights, 1e-6))
    v = np.log(np.maximum(plan.widths, 1e-6)).astype(np.float32)
    f = np.clip(plan.fill / _FILL_SLACK, 1e-4, 1.0 / _FILL_SLACK + 1e-4)
    r = np.log(f / (1.0 - f)).astype(np.float32)
    return (jnp.asarray(u), jnp.asarray(v), jnp.asarray(r))


def _plan_of(prob: PlacementProblem, theta, bands: Bands) -> BandedPlan:
    ids = bands.band_ids(prob.n)
    nb = len(bands.groups)
    band_h, w, fill, _ = _plan_arrays(
        tuple(jnp.asarray(t) for t in theta), jnp.asarray(ids), nb, prob.region.height, prob.region.width
    )
    return BandedPlan(bands, np.asarray(band_h, np.float64)[:nb], np.asarray(w, np.float64), np.asarray(fill))


def _start(prob: PlacementProblem, tr: _Tracker, init):
    """Score the starting areas (legalised by compiler.place): (score, bands, theta) of the first legal point."""
    areas0 = prob.equal_areas() if init is None else np.asarray(init, np.float64)
    s, rects, bands = tr.score(areas0)
    if rects is None:
        raise PlacementError(f"{tr.method}: the starting areas have no legal placement")
    return s, bands, _theta_of(banded_plan(prob, rects, bands))


# ---- baselines ------------------------------------------------------------------------------------------------


def random_search(prob: PlacementProblem, *, budget: int = 300, seed: int = 0) -> SearchResult:
    """Random search: `budget` area vectors from a flat Dirichlet above the minimum sizes, each legalised by
    `compiler.place`, tile-grid snapped (as every method's) and scored exactly."""
    _check_budget(budget, 1)
    rng = np.random.default_rng(seed)
    tr = _Tracker(prob, "random")
    free = prob.usable - prob.least.sum()
    for _ in range(budget):
        tr.score(prob.least + free * rng.dirichlet(np.ones(prob.n)))
    return tr.result()


def simulated_annealing(
    prob: PlacementProblem,
    *,
    budget: int = 300,
    seed: int = 0,
    t_start: float = 0.05,
    t_end: float = 0.002,
    sigma_start: float = 0.3,
    sigma_end: float = 0.02,
    replace_prob: float = 0.1,
    init=None,
) -> SearchResult:
    """Simulated annealing in the gradient method's space (band-height, width and fill logits of a band structure),
    cost -log(samples/s), Metropolis acceptance, geometric schedules.

    Args:
      prob: the problem. budget: evaluations (legalisations). seed: NumPy seed.
      t_start, t_end: Metropolis temperature (in units of log throughput).
      sigma_start, sigma_end: scale of the Gaussian perturbation of the logits.
      replace_prob: probability that a proposal's areas are legalised afresh by `compiler.place` (a new band
        structure) rather than rounded in the current structure.
      init: starting areas [n]; default equal shares.
    """
    _check_budget(budget, 1)
    rng = np.random.default_rng(seed)
    tr = _Tracker(prob, "simulated_annealing")
    s, bands, theta = _start(prob, tr, init)
    cost = -math.log(s) if s > 0 else math.inf
    theta = tuple(np.asarray(t, np.float64) for t in theta)
    for it in range(1, budget):
        frac = it / max(budget - 1, 1)
        temp = t_start * (t_end / t_start) ** frac
        sigma = sigma_start * (sigma_end / sigma_start) ** frac
        th_new = tuple(t + sigma * rng.standard_normal(t.shape) for t in theta)
        plan = _plan_of(prob, th_new, bands)
        fresh = rng.random() < replace_prob
        s_new, rects, b_new = tr.score(plan.areas if fresh else plan)
        if rects is not None and fresh:
            th_new = tuple(np.asarray(t, np.float64) for t in _theta_of(banded_plan(prob, rects, b_new)))
        c_new = -math.log(s_new) if s_new > 0 else math.inf
        if c_new <= cost or (math.isfinite(c_new) and rng.random() < math.exp(-(c_new - cost) / temp)):
            theta, cost, bands = th_new, c_new, b_new
    return tr.result()


def heuristic_placement(prob: PlacementProblem, program=None) -> SearchResult:
    """The compiler's own placement (`compiler.place` with default PlacementParams on the compiler's demands), scored
    exactly: one evaluation."""
    tr = _Tracker(prob, "heuristic")
    if program is not None:
        plan = program if isinstance(program, Plan) else program.plan
        ds = demands_pass(plan.replace(spec=prob.spec)).demands
    else:
        ds = prob.demands
    rects = place(ds, prob.spec, PlacementParams(reserve_io_columns=prob.reserve_io_columns))
    tr.evals = 1
    tr.best, tr.best_rects = score_placement(prob, rects)["score"], rects
    tr.best_areas = np.array([rects[n].cores for n in prob.names], np.float64)
    tr.history = [tr.best]
    return tr.result()


# ---- gradient placement ---------------------------------------------------------------------------------------


def _relaxed_loss(theta, band_id, n_bands, tau, feats, spec, least, rows, width, cap):
    _, w, _, h = _plan_arrays(theta, band_id, n_bands, rows, width)
    hr = jnp.maximum(cm.st_round(h), 1.0)
    wr = jnp.maximum(cm.st_round(w), 1.0)
    zeros = jnp.zeros_like(h)
    k = cm.kernel_costs(feats, cm.Layout(hr, wr, zeros, zeros), spec, tau)
    worst = cm.smax(per_sample_cycles(feats.task, k) / feats.batch, tau)
    if feats.task == "training":  # a step: the batch at the slowest kernel's pace, then the slowest update
        worst = worst + cm.smax(k["update"], tau) / feats.batch
    over = jnp.maximum((k["weight_bytes"] + k["act_bytes"]) / cap - 1.0, 0.0)
    under = jnp.maximum(least / (h * w) - 1.0, 0.0)
    return jnp.log(worst) + 10.0 * jnp.sum(over) + 10.0 * jnp.sum(under)


@functools.lru_cache(maxsize=32)
def _step_fn(spec, learning_rate):
    opt = optax.adam(learning_rate)

    @jax.jit
    def step(theta, opt_state, band_id, n_bands, tau, feats, least, rows, width, cap):
        val, g = jax.value_and_grad(_relaxed_loss)(theta, band_id, n_bands, tau, feats, spec, least, rows, width, cap)
        upd, opt_state = opt.update(g, opt_state, theta)
        return optax.apply_updates(theta, upd), opt_state, val

    return opt, step


def gradient_placement(
    prob: PlacementProblem,
    *,
    budget: int = 300,
    steps_per_round: int = 20,
    learning_rate: float = 0.05,
    tau_fraction: float | tuple = (0.05, 0.005),
    init=None,
) -> SearchResult:
    """Gradient-based placement (module docstring): Adam on the relaxed model, legalised every `steps_per_round`
    steps, the best legal placement returned.

    Args:
      prob: the problem.
      budget: evaluations: gradient steps plus legalisations (two per round).
      steps_per_round: gradient steps between legalisations.
      learning_rate: Adam's step size on the logits.
      tau_fraction: temperature of the relaxed maxima, as a fraction of the last legal bottleneck cycles; a pair
        (start, end) decays geometrically over the budget (wide first, to move every near-bottleneck kernel; sharp
        at the end, to balance the exact maximum).
      init: starting areas [n]; default equal shares (as simulated annealing starts).
    """
    _check_budget(budget, 1)
    tr = _Tracker(prob, "gradient")
    s, bands, theta = _start(prob, tr, init)
    opt, step = _step_fn(prob.spec, float(learning_rate))
    opt_state = opt.init(theta)
    consts = (
        prob.feats,
        jnp.asarray(prob.least, jnp.float32),
        jnp.float32(prob.region.height),
        jnp.float32(prob.region.width),
        jnp.float32(prob.spec.data_bytes_per_core),
    )
    last_cycles = float(prob.spec.clock_hz) / s if s > 0 else float(np.sum(prob.work)) / prob.usable
    while tr.evals < budget:
        band_id, n_bands = jnp.asarray(bands.band_ids(prob.n)), jnp.int32(len(bands.groups))
        frac = tr.evals / budget
        t0, t1 = (tau_fraction, tau_fraction) if np.isscalar(tau_fraction) else tau_fraction
        tau = jnp.float32(t0 * (t1 / t0) ** frac * last_cycles)
        for _ in range(steps_per_round):
            if tr.evals >= budget - 1:
                break
            theta, opt_state, _ = step(theta, opt_state, band_id, n_bands, tau, *consts)
            tr.evals += 1
        plan = _plan_of(prob, theta, bands)
        s_here, _, _ = tr.score(plan)
        if tr.evals < budget:
            # A fresh band structure for the same areas: switch to it (and restart Adam there) when it is better.
            s_new, rects, b_new = tr.score(plan.areas)
            if rects is not None and s_new > s_here:
                bands, theta = b_new, _theta_of(banded_plan(prob, rects, b_new))
                opt_state = opt.init(theta)
                s_here = s_new
        if s_here > 0:
            last_cycles = float(prob.spec.clock_hz) / s_here
    return tr.result()


def _check_budget(budget, least):
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < least:
        raise ValueError(f"budget must be an int >= {least} (evaluations), got {budget!r}")


def search_placement(
    prob: PlacementProblem, method: str = "gradient", *, budget: int = 300, seed: int = 0, **kwargs
) -> SearchResult:
    """Run one placement search method by name ("gradient", "simulated_annealing", "random")."""
    if method == "gradient":
        return gradient_placement(prob, budget=budget, **kwargs)
    if method == "simulated_annealing":
        return simulated_annealing(prob, budget=budget, seed=seed, **kwargs)
    if method == "random":
        return random_search(prob, budget=budget, seed=seed, **kwargs)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def compare_searches(program, spec=None, *, budget: int = 300, seed: int = 0, methods=METHODS):
    """Every method on one program at the same budget, plus the compiler's heuristic placement.

    Returns a pandas DataFrame with columns method, evaluations, samples_per_s, fraction_of_bound, wall_s (and the
    results under `df.attrs["results"]`, keyed by method).
    """
    import pandas as pd

    prob = placement_problem(program, spec)
    results = {"heuristic": heuristic_placement(prob, program)}
    for m in methods:
        results[m] = search_placement(prob, m, budget=budget, seed=seed)
    df = pd.DataFrame(
        [
            dict(
                method=r.method,
                evaluations=r.evaluations,
                samples_per_s=r.samples_per_s,
                fraction_of_bound=r.fraction_of_bound,
                wall_s=r.wall_s,
            )
            for r in results.values()
        ]
    )
    df.attrs["results"] = results
    df.attrs["bound"] = prob.bound
    return df
