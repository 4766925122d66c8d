"""3D FFT of n^3 complex points on n x n cores, mapped as wsFFT maps it (Orenes-Vera et al., ICS'23).

The calibration case: "Wafer-scale fast Fourier transforms" (arXiv 2209.15040) runs an fp32 3D FFT of n^3 complex
points on an n x n region of a CS-2 and reports 13,633 / 32,176 / 82,405 / 236,329 / 815,371 cycles for n = 32, 64,
128, 256, 512 (959 us for 512^3 at 850 MHz). Its abstract gives the mapping: every core holds one pencil (a line of
n points along one axis of the cube); three supersteps each run a 1D FFT along one axis, and between them the data
is redistributed (transposed) by an all-to-all along one mesh dimension, with messages as small as one word.

Here, on an n x n region, core (i, j) starts with the z-pencil A[i, j, :] and the program is five supersteps:

    1. FFT along z on every core          (wafer.map_cores, `fft_pencil`)
    2. all-to-all along every row         (wafer.all_to_all, axis "row"): core (i, k) gets B[i, :, k]
    3. FFT along y
    4. all-to-all along every column      (axis "col"): core (ky, kz) gets C[:, ky, kz]
    5. FFT along x

so core (ky, kz) ends with the x-pencil F[:, ky, kz] of the transform (the output stays transposed, as the two
redistributions leave it; `from_cores` puts it back in (x, y, z) order for checking). Dependent phases are separate
supersteps (a transpose cannot start before its FFT has produced its data), so the predicted cycles are the sum of
the five records' `cycles(spec)`.

Per-core FFT: iterative radix-2 Cooley-Tukey in plain JAX, in the self-sorting (Stockham) order, so no bit
reversal is needed: log2 n stages, each multiplying the odd half by twiddle factors (a complex multiply: two
multiplies and an FMAC per component), one add and one subtract per component, and a reorder of the results for the
next stage, which the cost model charges as ALU moves. That is the instruction mix of Cerebras's own radix-2 FFT
(csl-examples benchmarks/FFT/fft.csl: @fmuls and @fmacs for the twiddles, @fsubs/@fadds for the butterfly,
@fmovs and a reshape per stage). Complex numbers are kept as two float32 planes (real, imaginary); that code
interleaves them in one array, which moves the same words and runs the same instructions. The twiddle table (n/2
complex values, as that code preloads) lives in SRAM.

Traffic: the transposes use the "relay" all-to-all (wafer/fabric.py), routed as Cerebras's published 2D FFT routes
its transposes; the wsFFT paper's own routing could not be checked here (docs/fidelity.md). A complex fp32 point is
two 32-bit words.

Large sizes (512^3 on 512 x 512 cores) need not move data: every cost record is fixed by shapes, so `records` gets
them by `jax.eval_shape` of the very same step functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import wafer

PUBLISHED_CYCLES = {32: 13_633, 64: 32_176, 128: 82_405, 256: 236_329, 512: 815_371}  # ICS'23, CS-2, fp32
PUBLISHED_CLOCK_HZ = 850e6  # the paper converts 815,371 cycles to 959 us at 850 MHz
SOURCE = "Orenes-Vera et al., Wafer-scale fast Fourier transforms, ICS'23, arXiv 2209.15040"
RE, IM, TW = "fft_re", "fft_im", "fft_twiddle"  # SRAM allocations


def _check_n(n):
    if isinstance(n, bool) or int(n) != n or n < 2 or int(n) & (int(n) - 1):
        raise ValueError(f"fft: n must be a power of two >= 2 (radix-2 pencils on n x n cores), got {n!r}")
    return int(n)


def twiddles(n: int) -> np.ndarray:
    """The per-core twiddle table, [2, n/2] float32: (cos, -sin) of 2 pi k / n for k < n/2."""
    n = _check_n(n)
    k = np.arange(n // 2)
    return np.stack([np.cos(2 * np.pi * k / n), -np.sin(2 * np.pi * k / n)]).astype(np.float32)


def fft_pencil(re, im, tw):
    """One core's 1D FFT of its pencil (forward, unnormalised, like jnp.fft.fft).

    Args:
      re, im: [n] float32, the pencil's real and imaginary parts (n a power of two).
      tw: [2, n/2] float32, `twiddles(n)`.
    Returns:
      (re, im): [n] float32 each, the transform in natural order.
    """
    n = re.shape[0]
    # y[r, k] holds the length-L transform of the subsequence x[r::R], R = n / L; start with L = 1.
    yr, yi = re.reshape(n, 1), im.reshape(n, 1)
    length = 1
    while length < n:
        half = n // (2 * length)  # residues left after this stage
        er, ei, orr, oi = yr[:half], yi[:half], yr[half:], yi[half:]  # even and odd subsequences: views
        wr, wi = tw[0, :: n // (2 * length)], tw[1, :: n // (2 * length)]  # w_2L^k = w_n^(k n / 2L): a stride
        tr = wr * orr - wi * oi
        ti = wr * oi + wi * orr
        yr = jnp.concatenate([er + tr, er - tr], axis=1)
        yi = jnp.concatenate([ei + ti, ei - ti], axis=1)
        length *= 2
    return yr.reshape(n), yi.reshape(n)


def to_cores(x) -> tuple[jax.Array, jax.Array]:
    """An n^3 complex array A[x, y, z] as the initial layout: core (i, j) holds the z-pencil A[i, j, :].

    Returns (re, im), [n, n, n] float32 each ([rows, cols, points]).
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or len(set(x.shape)) != 1:
        raise ValueError(f"fft: expected an n x n x n array, got shape {x.shape}")
    return jnp.real(x).astype(jnp.float32), jnp.imag(x).astype(jnp.float32)


def from_cores(re, im) -> jax.Array:
    """The final layout (core (ky, kz) holds the x-pencil F[:, ky, kz]) back in (x, y, z) order, complex64."""
    return jnp.transpose(re + 1j * im, (2, 0, 1)).astype(jnp.complex64)


def make_state(spec: wafer.WaferSpec, n: int, x=None) -> wafer.WaferState:
    """A wafer with the pencils and the twiddle table in SRAM on the n x n region at (0, 0).

    Args:
      spec: the wafer (needs n x n cores).
      n: points per axis; x: the n^3 complex input (zeros if None, e.g. when only costs are wanted).
    """
    n = _check_n(n)
    if n > spec.rows or n > spec.cols:
        raise ValueError(f"fft: an {n}^3 FFT needs {n} x {n} cores; {spec.name} has {spec.rows} x {spec.cols}")
    rect = wafer.Rect(0, 0, n, n)
    re, im = (None, None) if x is None else to_cores(x)
    state = wafer.init(spec)
    state = state.allocate(RE, rect, (n,), "float32", value=re)
    state = state.allocate(IM, rect, (n,), "float32", value=im)
    return state.allocate(TW, rect, (2, n // 2), "float32", value=jnp.asarray(twiddles(n)))


def _fft_step(state):
    (re, im), kcost = wafer.map_cores(fft_pencil, state.read(RE), state.read(IM), state.read(TW))
    return state.write(RE, re).write(IM, im), wafer.superstep(kcost)


@functools.cache  # one step function per (axis, pattern), so jitted steps are compiled once
def _transpose_step(axis, pattern):
    def step(state):
        re, t_re = wafer.all_to_all(state.read(RE), axis, pattern=pattern)
        im, t_im = wafer.all_to_all(state.read(IM), axis, pattern=pattern)
        return state.write(RE, re).write(IM, im), wafer.superstep(t_re | t_im)  # both planes share the links

    return step


# wafer.step jitted once for every (spec, step function): the three FFT passes share one compiled program.
_jit_step = jax.jit(wafer.step, static_argnums=(1, 2))


def steps(*, pattern: str = "relay"):
    """The program: [(name, step)] with `step(state) -> (state, wafer.Superstep)`, in order."""
    return [
        ("fft_z", _fft_step),
        ("transpose_rows", _transpose_step("row", pattern)),
        ("fft_y", _fft_step),
        ("transpose_cols", _transpose_step("col", pattern)),
        ("fft_x", _fft_step),
    ]


def run(spec: wafer.WaferSpec, x, *, pattern: str = "relay"):
    """Run the 3D FFT of `x` ([n, n, n] complex) on the emulated wafer.

    Returns:
      (y, state, records): y [n, n, n] complex64 in (x, y, z) order (compare with jnp.fft.fftn(x)), the final
      state (counters charged by wafer.step), and the supersteps' records {name: Superstep}.
    """
    n = _check_n(jnp.shape(x)[0])
    state = make_state(spec, n, x)
    records = {}
    for name, fn in steps(pattern=pattern):
        state, records[name] = _jit_step(state, spec, fn)
    return from_cores(state.read(RE), state.read(IM)), state, records


def records(spec: wafer.WaferSpec, n: int, *, pattern: str = "relay"):
    """The supersteps' cost records {name: Superstep} without moving data: `jax.eval_shape` of the same steps."""
    state = jax.eval_shape(lambda: make_state(spec, n))
    out = {}
    for name, fn in steps(pattern=pattern):
        state, out[name] = jax.eval_shape(lambda s, fn=fn: wafer.step(s, spec, fn), state)
    return out


def predicted_cycles(spec: wafer.WaferSpec, n: int, *, pattern: str = "relay", recs=None) -> float:
    """Sum over the program's supersteps of `record.cycles(spec)`."""
    recs = records(spec, n, pattern=pattern) if recs is None else recs
    return float(sum(r.cycles(spec) for r in recs.values()))
