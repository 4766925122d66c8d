"""BiCGStab for a 7-point stencil operator, mapped as Rocki et al. map it on the CS-1 (SC20).

The calibration case: "Fast stencil-code computation on a wafer-scale processor" (Rocki et al., SC20, arXiv
2010.03660) solves a linear system from a 7-point finite-difference stencil on a 600 x 595 x 1536 mesh with
BiCGStab on a CS-1 (our WSE1 preset) at 0.86 PFLOP/s, "about one third of the machine's peak".

Mapping (as the paper's abstract and the SDK's BiCGStab benchmark describe it): the X x Y plane of the mesh lies on
an X x Y region of cores and every core keeps its whole Z column in SRAM: the 7 diagonals of its rows of the matrix
(variable coefficients) and the solver's vectors x, r, r0, p, v, s, t. The x and y neighbours of a point are on the
four neighbouring cores (a radius-1 halo exchange of the column: Z values per link); its z neighbours are in the
core's own column. At Z = 1536 in 16-bit storage that is 14 arrays x 1536 x 2 B = 43,008 B of the 48 KB (the rest
holds code, scalars and buffers; the paper names memory capacity as what limits the problem size).

Precision (the paper's, as far as it could be checked here: see docs/fidelity.md): matrix and vectors in 16-bit
floats, arithmetic on them in fp16 SIMD, dot products accumulated in fp32 (fp16 inputs, fp32 sums: the "mixed"
instruction class), scalars (alpha, beta, omega, rho) in fp32. `dtype="float32"` runs everything in fp32.

One iteration is six supersteps, each a step function `state -> (state, wafer.Superstep)`; a phase that needs
the complete result of the one before it (an allreduce needs every core's partial dot product) is its own
superstep, while a halo exchange streams with the compute that produces and consumes it (dataflow) and shares a
superstep with it:

    rho      allreduce of the partial (r0, r)                 -> rho_new
    p_v      beta; p = r + beta (p - omega v); halo(p); v = A p; partial (r0, v)
    r0v      allreduce                                         -> (r0, v)
    s_t      alpha = rho_new / (r0, v); s = r - alpha v; halo(s); t = A s; partials (t, s), (t, t)
    ts_tt    allreduce of both                                 -> (t, s), (t, t)
    x_r      omega = (t, s) / (t, t); x += alpha p + omega s; r = s - omega t; rho = rho_new; partial (r0, r)

The allreduce over the region reduces every row to its middle column, that column to its middle core and multicasts
the sum back (wafer.reduce / wafer.multicast), in the pattern given (default "chain"); its adds are charged on the
cores that do them. FLOPs per iteration are counted per mesh point as the algorithm performs them: two 7-point
products (7 multiplies and 6 adds each: 26), four dot products (2 each: 8), and the vector updates p (4), s (2), x
(4), r (2): 46 per point. Predicted PFLOP/s = FLOPs per iteration / (cycles per iteration / clock).

The full-size case (600 x 595 cores, Z = 1536) moves no data: its records come from `jax.eval_shape` of the same
step functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import wafer

PUBLISHED_PFLOPS = 0.86  # SC20 abstract: 0.86 PFLOP/s on a 600 x 595 x 1536 mesh, CS-1
PAPER_MESH = (600, 595, 1536)
SOURCE = "Rocki et al., Fast stencil-code computation on a wafer-scale processor, SC20, arXiv 2010.03660"
FLOPS_PER_POINT = 2 * 13 + 4 * 2 + 4 + 2 + 4 + 2  # 46: two SpMVs, four dots, the p, s, x and r updates

VECTORS = ("x", "r", "r0", "p", "v", "s", "t")
COEF, SCAL, PART = "coef", "scalars", "partials"
RHO, ALPHA, OMEGA, RHO_NEW, R0V, TS, TT = range(7)  # slots of the per-core scalar allocation
PRECISIONS = {"float16": jnp.float16, "float32": jnp.float32}


def _dtype(dtype):
    if dtype not in PRECISIONS:
        raise ValueError(f"bicgstab: dtype must be one of {tuple(PRECISIONS)}, got {dtype!r}")
    return PRECISIONS[dtype]


# ---- the arithmetic, shared by the per-core program and the reference ---------------------------------------------
# Written once for arrays of any shape, so the emulated solver and the plain-jnp reference round identically
# element by element; only the order of the dot products' sums differs.


def stencil(c, u, n, s, w, e, below, above):
    """(A u) at each point: c [7, ...] the coefficients of the point and its x-1, x+1, y-1, y+1, z-1, z+1
    neighbours, the other arguments those neighbours' values (zero outside the mesh)."""
    return c[0] * u + c[1] * n + c[2] * s + c[3] * w + c[4] * e + c[5] * below + c[6] * above


def z_neighbours(u):
    """(below, above) along the last axis, zero beyond the ends (descriptor offsets on the hardware)."""
    zero = jnp.zeros((), u.dtype)
    cfg = [(0, 0, 0)] * (u.ndim - 1)
    return jax.lax.pad(u, zero, cfg + [(1, -1, 0)]), jax.lax.pad(u, zero, cfg + [(-1, 1, 0)])


def dot(a, b):
    """Dot product with fp32 accumulation (for fp16 inputs: 16-bit inputs, 32-bit sums)."""
    return jnp.dot(a.reshape(-1), b.reshape(-1), preferred_element_type=jnp.float32)


def update_p(r, p, v, beta, omega):
    return r + beta.astype(r.dtype) * (p - omega.astype(r.dtype) * v)


def update_s(r, v, alpha):
    return r - alpha.astype(r.dtype) * v


def update_x(x, p, s, alpha, omega):
    return x + alpha.astype(x.dtype) * p + omega.astype(x.dtype) * s


def update_r(s, t, omega):
    return s - omega.astype(s.dtype) * t


# ---- problem -------------------------------------------------------------------------------------------------------


def problem(key, mesh, dtype="float16"):
    """A random, diagonally dominant 7-point operator and right-hand side on an X x Y x Z mesh.

    Returns (coef [7, X, Y, Z], b [X, Y, Z]) in `dtype`; never zeros (random inputs), coefficients of
    neighbours outside the mesh kept (they multiply zeros).
    """
    dt = _dtype(dtype)
    kc, kb = jax.random.split(key)
    off = -jax.random.uniform(kc, (6, *mesh), jnp.float32, 0.5, 1.0) / 6.0
    diag = 1.0 + jax.random.uniform(jax.random.fold_in(kc, 1), (1, *mesh), jnp.float32, 0.0, 0.5)
    b = jax.random.normal(kb, mesh, jnp.float32)
    return jnp.concatenate([diag, off]).astype(dt), b.astype(dt)


def reference(coef, b, iterations: int):
    """Plain-jnp BiCGStab (x0 = 0) on the global mesh, same precision policy; returns the iterates [k, X, Y, Z]."""

    def apply(u):
        pad = jnp.pad(u, ((1, 1), (1, 1), (0, 0)))
        below, above = z_neighbours(u)
        n, s, w, e = pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]
        return stencil(coef, u, n, s, w, e, below, above)

    x, r = jnp.zeros_like(b), b
    r0, p, v = r, jnp.zeros_like(b), jnp.zeros_like(b)
    rho = alpha = omega = jnp.float32(1.0)
    rho_new = dot(r0, r)
    out = []
    for _ in range(iterations):
        beta = (rho_new / rho) * (alpha / omega)
        p = update_p(r, p, v, beta, omega)
        v = apply(p)
        alpha = rho_new / dot(r0, v)
        s = update_s(r, v, alpha)
        t = apply(s)
        omega = dot(t, s) / dot(t, t)
        x = update_x(x, p, s, alpha, omega)
        r = update_r(s, t, omega)
        rho, rho_new = rho_new, dot(r0, r)
        out.append(x)
    return jnp.stack(out)


# ---- the wafer program ------------------------------------------------------------------------------------------


def make_state(spec: wafer.WaferSpec, mesh, coef=None, b=None, *, dtype="float16") -> wafer.WaferState:
    """The solver's SRAM on the X x Y region at (0, 0): coefficients, vectors (x0 = 0, r = r0 = b), scalars.

    Args:
      mesh: (X, Y, Z); coef [7, X, Y, Z] and b [X, Y, Z] (zeros if None: for cost records only).
    """
    dt = _dtype(dtype)
    nx, ny, nz = (int(m) for m in mesh)
    if nx > spec.rows or ny > spec.cols:
        raise ValueError(
            f"bicgstab: an {nx} x {ny} x {nz} mesh needs {nx} x {ny} cores; {spec.name} has {spec.rows} x {spec.cols}"
        )
    rect = wafer.Rect(0, 0, nx, ny)
    state = wafer.init(spec)
    c = None if coef is None else jnp.moveaxis(jnp.asarray(coef, dt), 0, 2)  # [X, Y, 7, Z]
    state = state.allocate(COEF, rect, (7, nz), dt, value=c)
    bb = None if b is None else jnp.asarray(b, dt)
    for name in VECTORS:
        state = state.allocate(name, rect, (nz,), dt, value=bb if name in ("r", "r0") else None)
    scal = jnp.zeros((nx, ny, 8), jnp.float32).at[..., [RHO, ALPHA, OMEGA]].set(1.0)
    state = state.allocate(SCAL, rect, (8,), "float32", value=scal)
    part = None
    if b is not None:  # each core's partial (r0, r) for the first iteration's rho step: setup, not timed
        part = jnp.zeros((nx, ny, 2), jnp.float32).at[..., 0].set(jax.vmap(jax.vmap(dot))(bb, bb))
    return state.allocate(PART, rect, (2,), "float32", value=part)


def region_allreduce(v, *, pattern: str = "chain"):
    """Sum of `v` [h, w, k] over the whole region, delivered to every core: rows to their middle column, that
    column to its middle core, multicast back (along the column, then the rows).

    Returns (total [h, w, k], traffic, adds): traffic and the adds' KernelCosts placed on the region's grid.
    """
    h, w = v.shape[:2]
    mc = (w - 1) // 2
    rows, t_rows, a_rows = wafer.reduce(v, "row", "sum", to=mc, pattern=pattern, return_adds=True)
    col, t_col, a_col = wafer.reduce(rows, "col", "sum", to="all", pattern=pattern, return_adds=True)
    total, t_back = wafer.multicast(jnp.broadcast_to(col, v.shape), "row", src=mc)
    adds = a_rows + tuple(k.at(0, mc) for k in a_col)
    return total, t_rows + t_col.at(0, mc) + t_back, adds


def _halo_cols(u):
    halo, traffic = wafer.halo_exchange(u, 1)
    return (halo["N"], halo["S"], halo["W"], halo["E"]), traffic


def _spmv(c, u, n, s, w, e):
    below, above = z_neighbours(u)
    return stencil(c, u, n, s, w, e, below, above)


@functools.cache  # one step function per (slots, pattern), so jitted steps are compiled once
def _allreduce_step(slots, pattern):
    """Allreduce the first len(slots) partial dot products into the scalar slots."""

    def step(state):
        part = state.read(PART)[..., : len(slots)]
        total, traffic, adds = region_allreduce(part, pattern=pattern)
        scal = state.read(SCAL).at[..., list(slots)].set(total)
        return state.write(SCAL, scal), wafer.superstep(*adds, traffic)

    return step


def _p_v_step(state):
    r, p, v, r0, c = (state.read(k) for k in ("r", "p", "v", "r0", COEF))
    scal = state.read(SCAL)

    def new_p(r, p, v, sc):
        beta = (sc[RHO_NEW] / sc[RHO]) * (sc[ALPHA] / sc[OMEGA])
        return update_p(r, p, v, beta, sc[OMEGA])

    def v_and_dot(c, p, n, s, w, e, r0):
        v = _spmv(c, p, n, s, w, e)
        return v, dot(r0, v)

    p, k1 = wafer.map_cores(new_p, r, p, v, scal)
    nbrs, traffic = _halo_cols(p)
    (v, part), k2 = wafer.map_cores(v_and_dot, c, p, *nbrs, r0)
    partials = state.read(PART).at[..., 0].set(part)
    return state.write("p", p).write("v", v).write(PART, partials), wafer.superstep(k1, k2, traffic)


def _s_t_step(state):
    r, v, c = (state.read(k) for k in ("r", "v", COEF))
    scal = state.read(SCAL)

    def new_s(r, v, sc):
        alpha = sc[RHO_NEW] / sc[R0V]
        return update_s(r, v, alpha), alpha

    (s, alpha), k1 = wafer.map_cores(new_s, r, v, scal)
    nbrs, traffic = _halo_cols(s)

    def t_and_dots(c, s, n, so, w, e):
        t = _spmv(c, s, n, so, w, e)
        return t, jnp.stack([dot(t, s), dot(t, t)])

    (t, parts), k2 = wafer.map_cores(t_and_dots, c, s, *nbrs)
    new = state.write("s", s).write("t", t).write(PART, parts).write(SCAL, scal.at[..., ALPHA].set(alpha))
    return new, wafer.superstep(k1, k2, traffic)


def _x_r_step(state):
    x, p, s, t, r0 = (state.read(k) for k in ("x", "p", "s", "t", "r0"))
    scal = state.read(SCAL)

    def update(x, p, s, t, r0, sc):
        omega = sc[TS] / sc[TT]
        r = update_r(s, t, omega)
        return update_x(x, p, s, sc[ALPHA], omega), r, omega, dot(r0, r)

    (x, r, omega, part), kcost = wafer.map_cores(update, x, p, s, t, r0, scal)
    scal = scal.at[..., OMEGA].set(omega).at[..., RHO].set(scal[..., RHO_NEW])
    new = state.write("x", x).write("r", r).write(SCAL, scal).write(PART, state.read(PART).at[..., 0].set(part))
    return new, wafer.superstep(kcost)


_jit_step = jax.jit(wafer.step, static_argnums=(1, 2))  # compiled once per (spec, step function)


def steps(*, pattern: str = "chain"):
    """One iteration: [(name, step)] with `step(state) -> (state, wafer.Superstep)`, in order. The state must
    hold every core's partial (r0, r) in partials[0] (`make_state` puts it there; so does each iteration's
    last step)."""
    return [
        ("rho", _allreduce_step((RHO_NEW,), pattern)),
        ("p_v", _p_v_step),
        ("r0v", _allreduce_step((R0V,), pattern)),
        ("s_t", _s_t_step),
        ("ts_tt", _allreduce_step((TS, TT), pattern)),
        ("x_r", _x_r_step),
    ]


def run(spec: wafer.WaferSpec, coef, b, iterations: int, *, dtype="float16", pattern: str = "chain", jit=True):
    """Run `iterations` BiCGStab iterations on the emulated wafer (each step jitted unless jit=False, which is
    quicker for one-off runs of tiny meshes, e.g. under jax.grad in tests).

    Returns:
      (xs, state, records): the iterates [k, X, Y, Z] (compare with `reference`), the final state (counters
      charged by wafer.step), and one iteration's records {name: Superstep}.
    """
    state = make_state(spec, b.shape, coef, b, dtype=dtype)
    xs, recs = [], {}
    for _ in range(int(iterations)):
        for name, fn in steps(pattern=pattern):
            state, recs[name] = _jit_step(state, spec, fn) if jit else wafer.step(state, spec, fn)
        xs.append(state.read("x"))
    return jnp.stack(xs), state, recs


def records(spec: wafer.WaferSpec, mesh, *, dtype="float16", pattern: str = "chain"):
    """One iteration's records {name: Superstep} without moving data: `jax.eval_shape` of the same steps."""
    state = jax.eval_shape(lambda: make_state(spec, mesh, dtype=dtype))
    out = {}
    for name, fn in steps(pattern=pattern):
        state, out[name] = jax.eval_shape(lambda s, fn=fn: wafer.step(s, spec, fn), state)
    return out


def flops_per_iteration(mesh) -> float:
    return float(FLOPS_PER_POINT * np.prod(mesh))


def predicted_pflops(spec: wafer.WaferSpec, mesh=PAPER_MESH, *, dtype="float16", pattern="chain", recs=None):
    """FLOPs per iteration / (cycles per iteration / clock), in PFLOP/s."""
    recs = records(spec, mesh, dtype=dtype, pattern=pattern) if recs is None else recs
    cycles = sum(r.cycles(spec) for r in recs.values())
    return flops_per_iteration(mesh) / (float(cycles) / float(spec.clock_hz)) / 1e15
