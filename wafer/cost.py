"""The one set of cost rules: cycles from counts.

Every cycle the emulator charges and every estimate the compiler or a sweep makes comes from these functions.
Their inputs are *counts* that a program's shapes fix (what each core's instructions do, words on links and ramps,
hops, dependent stages) and a `WaferSpec`. They are plain arithmetic, so they work on Python floats (reports), NumPy
arrays (maps over cores, the compiler's kernels) and JAX tracers (jit, vmap and grad over spec leaves) alike.

The core (figures and sources in wafer/spec.py):
  Vector instructions are memory to memory (the SDK's data-structure descriptors): each reads its operands from
  SRAM and writes its result there, one instruction issues at a time, and an instruction over n elements costs
      instr_startup_cycles + n * max(1 / SIMD lanes, read bytes per element / SRAM read bytes per cycle,
                                     write bytes per element / SRAM write bytes per cycle)
  (a special function: special_cycles per element instead of 1 / lanes). A task activation (a per-core program
  started by its data or by the host) costs task_cycles. So a core's cycles are linear in its counts:
      compute cycles = sum over count keys of count x `unit_cycles(spec, key)`.
The fabric, per phase of a transfer (transfers in one phase share links and run at once; phases run in turn),
after Luczynski et al.'s model of the WSE (HPDC'24), T = max(C, E/N + L) + (2 T_R + 1) D, with the busiest link as
a bound of its own (their patterns spread load evenly; a transpose does not):
      max(C x 32 / ramp bits, W x 32 / link bits, E/N x 32 / link bits + L x hop latency) + D x (2 T_R + 1)
  W: words on the busiest link; E/N: link words per core taking part (all hops of all words over the cores that
  send, forward or receive); C: words through the busiest ramp (the link between a core and its own router, one
  32-bit wavelet per cycle each way: a core receiving k streams takes all their words in turn); L: the longest
  single stream, in hops; D: dependent stages (a core taking data off its ramp, combining it, sending it on; none
  for plain routing); T_R: the ramp's latency.
  superstep = max(compute, transfer) if spec.overlap else compute + transfer; seconds = cycles / clock.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

WORD_BITS = 32  # one wavelet is a 32-bit word [SDK]


def _is_jax(x) -> bool:
    return type(x).__module__.startswith("jax")


def maximum(a, b):
    """max that keeps Python floats Python floats and works on arrays and tracers."""
    if _is_jax(a) or _is_jax(b):
        import jax.numpy as jnp

        return jnp.maximum(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return max(a, b)


def unit_cycles(spec, key, *, maximum=maximum):
    """Cycles per count of one key of a per-core count (wafer/kernel.py).

    Keys: ("instr",) a vector instruction's start-up; ("task",) a task activation; (op_class, dtype_class, read,
    write) one element of a vector instruction of that class, reading `read` and writing `write` SRAM bytes, and
    (op_class, dtype_class, read, write, fabric) one that also takes `fabric` 32-bit words off the core's ramp (a
    fabric operand: at most one wavelet per cycle); (op_class, dtype_class) one element of pure arithmetic (no SRAM
    operands). `maximum`: the max to use (a caller relaxing the rules for gradients passes a smooth one).
    """
    if key[0] == "instr":
        return spec.instr_startup_cycles
    if key[0] == "task":
        return spec.task_cycles
    if key[0] == "ops":  # a tally of operations for partitioning (their instructions are counted under "instr")
        return 0.0
    if len(key) < 4:
        return _arith_cycles(spec, key[0], key[1])
    return element_cycles(spec, key[0], key[1], key[2], key[3], key[4] if len(key) > 4 else 0.0, maximum=maximum)


def _arith_cycles(spec, op_class, dtype_class):
    return spec.special_cycles if op_class == "special" else 1.0 / spec.simd_width(op_class, dtype_class)


def element_cycles(spec, op_class, dtype_class, read, write, fabric=0.0, *, maximum=maximum):
    """Cycles per element of a vector instruction of `op_class` on `dtype_class` operands that reads `read` and
    writes `write` SRAM bytes per element and takes `fabric` 32-bit words per element off the core's ramp: the
    slowest of its arithmetic, its SRAM reads, its SRAM writes and its ramp (module docstring). `read`, `write` and
    `fabric` may be arrays (a compiler's kernels, each with its own operand bytes)."""
    out = _arith_cycles(spec, op_class, dtype_class)
    for amount, rate in (
        (read, spec.sram_read_bytes_per_cycle),
        (write, spec.sram_write_bytes_per_cycle),
        (fabric, spec.ramp_bits_per_cycle / WORD_BITS),
    ):
        if not (isinstance(amount, int | float) and amount == 0):  # (a smooth max of a zero term would add to it)
            out = maximum(out, amount / rate)
    return out


def compute_cycles(spec, counts: Mapping, *, maximum=maximum):
    """Cycles one core spends on its instructions: sum over `counts` of count x `unit_cycles`.

    Args:
      spec: a WaferSpec.
      counts: a per-core count (wafer/kernel.py): {key: count}.
    """
    total = 0.0
    for key, n in counts.items():
        total = total + n * unit_cycles(spec, key, maximum=maximum)
    return total


def transfer_cycles(spec, link_words, hops, *, ramp_words=0.0, mean_words=None, depth=0.0, maximum=maximum):
    """Cycles of one phase of fabric traffic (module docstring): its busiest link carries `link_words` 32-bit words,
    its busiest ramp `ramp_words`, the links carry `mean_words` per core taking part (default `link_words`), its
    longest stream crosses `hops` links and `depth` dependent stages lie on its critical path."""
    word = WORD_BITS / spec.link_bits_per_cycle
    mean = link_words if mean_words is None else mean_words
    stream = maximum(link_words * word, mean * word + hops * spec.hop_latency_cycles)
    ramp = ramp_words * (WORD_BITS / spec.ramp_bits_per_cycle)
    return maximum(ramp, stream) + depth * (2.0 * spec.ramp_latency_cycles + 1.0)


def superstep_cycles(spec, compute, comm, *, maximum=maximum):
    """A superstep's cycles from its slowest core's compute and its communication."""
    return maximum(compute, comm) if spec.overlap else compute + comm


def seconds(spec, cycles):
    return cycles / spec.clock_hz


def io_seconds(spec, nbytes):
    """Seconds to stream `nbytes` through the wafer's edge I/O."""
    return nbytes * 8.0 / spec.edge_io_bits_per_s


def io_cycles(spec, nbytes):
    return io_seconds(spec, nbytes) * spec.clock_hz
