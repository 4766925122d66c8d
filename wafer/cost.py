"""The one set of cost rules: cycles from counts.

Every cycle the emulator charges and every estimate the compiler or a sweep makes comes from these functions.
Their inputs are *counts* that a program's shapes fix (elements per instruction class, bytes moved to and from
SRAM, words on the busiest link, hops on the longest route) and a `WaferSpec`. They are plain arithmetic, so
they work on Python floats (reports), NumPy arrays (maps over cores) and JAX tracers (jit, vmap and grad over
spec leaves) alike.

Rules (figures and sources in wafer/spec.py):
  compute cycles  = sum over (class, dtype) of elements / SIMD lanes    (an FMAC counts once)
                  + special elements x special_cycles
  SRAM cycles     = max(read bytes / read bytes per cycle, write bytes / write bytes per cycle)
  kernel cycles   = max(compute cycles, SRAM cycles)      (operands stream from SRAM while the SIMD unit runs)
  transfer cycles = words on the busiest link x 32 / link bits per cycle + hops x hop latency
                    (wavelets pipeline through routers: the busiest link sets the rate, the path adds latency;
                    transfers that share a link in the same superstep add up on it, which is contention)
  superstep       = max(compute, transfer) if spec.overlap else compute + transfer
  seconds         = cycles / clock
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


def compute_cycles(spec, counts: Mapping[tuple[str, str], float]):
    """Cycles one core spends on arithmetic.

    Args:
      spec: a WaferSpec.
      counts: {(op_class, dtype_class): elements} with op_class in ("fmac", "alu", "special") and dtype_class
        in ("fp16", "mixed", "fp32", "int"); see wafer/kernel.py for how a per-core program is counted.
    """
    total = 0.0
    for (op_class, dtype_class), n in counts.items():
        if op_class == "special":
            total = total + n * spec.special_cycles
        else:
            total = total + n / spec.simd_width(op_class, dtype_class)
    return total


def sram_cycles(spec, read_bytes, write_bytes, *, maximum=maximum):
    """Cycles to stream a kernel's operands out of and results into one core's SRAM.

    `maximum`: the max to use (a caller relaxing the rules for gradients passes a smooth one)."""
    return maximum(read_bytes / spec.sram_read_bytes_per_cycle, write_bytes / spec.sram_write_bytes_per_cycle)


def kernel_cycles(spec, counts, read_bytes, write_bytes, *, maximum=maximum):
    """Cycles of one per-core program: arithmetic and SRAM streaming overlap, the slower one bounds."""
    return maximum(compute_cycles(spec, counts), sram_cycles(spec, read_bytes, write_bytes, maximum=maximum))


def transfer_cycles(spec, link_words, hops):
    """Cycles of a fabric transfer whose busiest link carries `link_words` 32-bit words over `hops` hops."""
    return link_words * (WORD_BITS / spec.link_bits_per_cycle) + hops * spec.hop_latency_cycles


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
