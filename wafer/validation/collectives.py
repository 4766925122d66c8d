"""Reduce and allreduce along a row in Luczynski et al.'s patterns, against their performance model.

"Near-Optimal Wafer-Scale Reduce" (Luczynski, Gianinazzi, Iff, Wilson, De Sensi, Hoefler; HPDC'24, arXiv
2404.15888) models the cycles of a communication algorithm on the WSE as

    T = max(C, E / N + L) + (2 T_R + 1) D

with, for the algorithm's messages (as the paper and its public summaries define them):
  E  energy: total hops travelled by all wavelets (words x hops, summed),
  N  the number of links the algorithm uses,
  L  distance: the most hops one message travels between two cores that compute on it,
  C  contention: the most wavelets that have to cross one link (or enter one core),
  D  depth: the longest chain of dependent receive-add-send steps,
  T_R the latency of a wavelet from a core to its router and back, so each dependent step costs 2 T_R + 1
      cycles (the ramp down, the add, the ramp up).
They report it within 4 % of their measurements on a CS-2. The paper's value of T_R could not be read here (its
full text was not reachable: docs/fidelity.md); `T_R_ASSUMED` is our placeholder, marked as such everywhere it is
used, and the model's figures are references, not measurements.

`model_terms` counts E, N, L, C, D from an explicit list of each pattern's messages, written here independently of
wafer/fabric.py (tests hold the two equal on E and C); `model_cycles` evaluates the formula; `emulated_cycles`
runs the very same collective on the emulator (wafer.reduce / wafer.allreduce with its adds charged in the
superstep) and returns `record.cycles(spec)`. An allreduce is modelled as a reduce to the middle core plus a
multicast back (C = B, E = (n - 1) B, N = n - 1, L = the longer side, D = 0): the emulator's allreduce.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import wafer

SOURCE = "Luczynski et al., Near-Optimal Wafer-Scale Reduce, HPDC'24, arXiv 2404.15888 (model, within 4 % of CS-2)"
PATTERNS = wafer.fabric.REDUCE_PATTERNS
T_R_ASSUMED = 2.0  # ASSUMED cycles, core -> router -> core; the paper's value was not available (docs/fidelity.md)
# Sizes: rows of 64 and 512 cores (the paper reduces along rows of up to the full wafer) and vectors of 1 to 1024
# 32-bit words per core; the paper's exact sweep points could not be checked, so these are our choice in its range.
REDUCE_SIZES = [(n, b) for n in (64, 512) for b in (1, 64, 1024)]
ALLREDUCE_SIZES = [(512, 1), (512, 1024)]


def _messages(m: int, pattern: str, group: int):
    """The messages (src, dst) of a one-sided reduce of m cores to the core at distance 0 (positions = distance)."""
    if pattern == "chain":
        return [(j, j - 1) for j in range(1, m)]
    if pattern == "star":
        return [(j, 0) for j in range(1, m)]
    if pattern == "tree":
        out, step = [], 1
        while step < m:
            out += [(j, j - step) for j in range(step, m, 2 * step)]
            step *= 2
        return out
    s = group
    inner = [(j, j - 1) for j in range(1, m) if j % s]
    return inner + [(j, j - s) for j in range(s, m, s)]


def _depth(m: int, pattern: str, group: int) -> int:
    if m <= 1:
        return 0
    if pattern == "chain":
        return m - 1
    if pattern == "star":
        return 1
    if pattern == "tree":
        return math.ceil(math.log2(m))
    return (min(group, m) - 1) + (-(-m // group) - 1)


def model_terms(pattern: str, n: int, words: int, *, to: str = "last", group: int | None = None) -> dict:
    """E, N, L, C, D of a reduce of `words` words per core along n cores, to an end ("last") or, for the reduce
    half of an allreduce, to the middle core ("middle": both sides at once, on disjoint links)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    group = wafer.fabric.default_group(n) if group is None else group
    d = n - 1 if to == "last" else (n - 1) // 2
    sides = [d + 1, n - d] if to == "middle" else [n]
    energy, links, distance, contention, depth = 0.0, 0, 0, 0.0, 0
    for m in sides:
        load = np.zeros(m)
        for src, dst in _messages(m, pattern, group):
            load[dst + 1 : src + 1] += words  # the link from j to j - 1 is load[j]
            energy += words * (src - dst)
            distance = max(distance, src - dst)
        links += int(np.count_nonzero(load))
        contention = max(contention, float(load.max(initial=0.0)))
        depth = max(depth, _depth(m, pattern, group))
    return {"E": energy, "N": links, "L": distance, "C": contention, "D": depth}


def model_formula(terms: dict, t_r: float) -> float:
    """T = max(C, E / N + L) + (2 T_R + 1) D."""
    if terms["N"] == 0:
        return 0.0
    return max(terms["C"], terms["E"] / terms["N"] + terms["L"]) + (2 * t_r + 1) * terms["D"]


def model_cycles(pattern: str, n: int, words: int, *, kind: str = "reduce", t_r: float = T_R_ASSUMED, group=None):
    """Luczynski et al.'s predicted cycles of a reduce (to the last core) or an allreduce along n cores."""
    if kind == "reduce":
        return model_formula(model_terms(pattern, n, words, to="last", group=group), t_r)
    if kind != "allreduce":
        raise ValueError(f"kind must be 'reduce' or 'allreduce', got {kind!r}")
    reduce_part = model_formula(model_terms(pattern, n, words, to="middle", group=group), t_r)
    far = n - 1 - (n - 1) // 2
    broadcast = model_formula({"E": (n - 1) * words, "N": n - 1, "L": far, "C": words, "D": 0}, t_r)
    return reduce_part + broadcast


def _collective(pattern, kind, group):
    to = "last" if kind == "reduce" else "all"

    def fn(x):
        y, traffic, adds = wafer.reduce(x, "row", "sum", to=to, pattern=pattern, group=group, return_adds=True)
        return y, wafer.superstep(*adds, traffic)

    return fn


def emulated_record(pattern: str, n: int, words: int, *, kind: str = "reduce", group=None):
    """The emulator's Superstep of the collective on a 1 x n row holding `words` float32 words per core (from
    shapes alone)."""
    x = jax.ShapeDtypeStruct((1, n, words), jnp.float32)
    return jax.eval_shape(_collective(pattern, kind, group), x)[1]


def emulated_cycles(spec, pattern: str, n: int, words: int, *, kind: str = "reduce", group=None) -> float:
    """`record.cycles(spec)` of the collective's superstep (traffic and the adds on the cores that do them)."""
    return float(emulated_record(pattern, n, words, kind=kind, group=group).cycles(spec))


def check_numerics(pattern: str, n: int, words: int, *, kind: str = "reduce", seed: int = 0) -> float:
    """Run the collective on random data; return the largest error against jnp.sum relative to max |sum|."""
    x = jax.random.normal(jax.random.key(seed), (1, n, words), jnp.float32)
    y, _ = jax.jit(_collective(pattern, kind, None))(x)
    ref = jnp.sum(x, axis=1, keepdims=True)
    ref = jnp.broadcast_to(ref, y.shape)
    return float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
