"""What the hardware is: `WaferSpec` and the WSE-1/2/3 presets.

A `WaferSpec` describes a wafer-scale engine: the grid of cores, each core's SRAM, its SIMD arithmetic, the
links between neighbouring cores, the clock and the I/O at the wafer's edge. It never changes while a program
runs; what changes lives in `wafer.WaferState` (brax keeps `sys` and `state` apart the same way).

Shape-fixing integers (grid size, SRAM bytes, banks, router colours) are static fields. Figures a researcher may
want gradients for (clock, SIMD widths, bandwidths, hop latency) are pytree leaves, so `jax.grad` over a spec
passed as an argument gives the sensitivity of a cost to each hardware figure. The spec is frozen and hashable
(while its leaves are Python numbers), so it can also be a static argument of `jax.jit`.

Sources of the figures (see also ../shared/DESIGN.md, "Hardware facts"):
  [AT]  AnandTech, "Cerebras Unveils Wafer Scale Engine Two (WSE2)", 2021: 850,000 cores, 40 GB SRAM,
        20 PB/s memory bandwidth, 220 Pb/s fabric.
  [SDK] Cerebras SDK documentation: "Computing with Cerebras" (757 x 996 programmer-visible fabric on WSE-2,
        48 KB per PE in 8 banks of 6 KB, one 32-bit wavelet per cycle per link direction, 24 routable colours),
        CSL language appendix "SIMD mode" (fp16 FMAC 4-wide, fp16-in/fp32-accumulate 2-wide, fp32 add 2-wide
        on WSE-2; 8/4/4 on WSE-3), memcpy framework (3 reserved columns west, 2 east).
  [BENCH] Cerebras csl-examples benchmark scripts: cycles converted to seconds at 850 MHz.
  [HC34] Hot Chips 34 talk on WSE-2: 1.1 GHz core clock.
  [CS2] Cerebras CS-2 system datasheet: 12 x 100 GbE into the wafer, 1.2 Tb/s.
  [ALCF] ALCF AI-testbed documentation and SC24 tutorial: WSE-3 fabric 762 x 1172, 44 GB SRAM.
  [LIE] Sean Lie, Hot Chips 34 (2022), "Cerebras Architecture Deep Dive": per core two 64-bit SRAM reads and one
        64-bit write per cycle (what fp16 SIMD-4 FMAC with memory operands needs).
  [LGI24] Luczynski et al., "Near-Optimal Wafer-Scale Reduce", HPDC'24 (arXiv 2404.15888): T_R, the latency of
        a wavelet between a core and its router, about 2 cycles (as a public summary of the paper quotes it; the
        paper's text was not readable here).
  [FIT:fft3d] fitted on the calibration case fft3d (Orenes-Vera et al., ICS'23; wafer/validation/fft.py), all
        five sizes, minimising the largest relative error (docs/fidelity.md).
Figures marked ASSUMED are not published; they are our best estimate and are overridable.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from flax import struct

from wafer.defects import DefectMap, remap, remap_of
from wafer.errors import SpecError

# Instruction classes the cost model distinguishes (see wafer/cost.py):
#   fmac    fused multiply-accumulate (dot products, convolutions, a*b+c); counted once per element.
#   alu     one-input or two-input vector arithmetic, comparisons, selects and moves.
#   special division, square root and transcendentals: no hardware unit, a software sequence per element.
OP_CLASSES = ("fmac", "alu", "special")
# Storage classes of operands: 16-bit floats (fp16, bf16, cb16), 16-bit inputs with fp32 accumulation,
# 32-bit floats, integers.
DTYPE_CLASSES = ("fp16", "mixed", "fp32", "int")


def _is_concrete_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


@struct.dataclass
class WaferSpec:
    """A wafer-scale engine: grid, memory, arithmetic, fabric, clock and I/O.

    Attributes:
      name: preset name, for reports.
      rows, cols: programmer-visible core grid (WSE-2: 757 x 996 [SDK]).
      sram_bytes_per_core: private SRAM per core (48 KB on WSE-1/2/3 [SDK]).
      sram_banks: SRAM banks per core (8 banks of 6 KB on WSE-2 [SDK]).
      router_colors: routable virtual channels sharing each physical link (24 [SDK]).
      reserved_colors: colours the runtime keeps for itself (its memcpy and launch streams), so a program routes
        with router_colors - reserved_colors (6 [SDK memcpy framework, as the helper library reserves them]).
      code_bytes_per_core: SRAM every core keeps for the program's code, its task table and descriptors. ASSUMED
        4 KB (not published; Rocki et al.'s BiCGStab keeps 14 fp16 columns of 1536 points, 43,008 B, in 48 KB with
        its code, so the code and the solver's scalars take under 6 KB).
      memcpy_cols_west, memcpy_cols_east: columns the host-I/O (memcpy) framework reserves on each side [SDK].
      overlap: whether a superstep's compute and communication overlap (the hardware is dataflow-driven, so by
        default they do: a superstep costs max(compute, comm); with False it costs compute + comm).
      clock_hz: core clock. ASSUMED 850 MHz as Cerebras's own benchmark scripts use [BENCH]; [HC34] gives 1.1 GHz.
      simd_fmac_fp16, simd_fmac_mixed, simd_fmac_fp32: FMAC lanes per cycle for 16-bit, 16-bit-in/32-bit-
        accumulate and fp32 operands [SDK SIMD appendix]; fp32 FMAC width is ASSUMED (not published).
      simd_alu_fp16, simd_alu_fp32, simd_alu_int: lanes per cycle of other vector arithmetic; fp32 add is
        published [SDK], the others ASSUMED equal to the matching FMAC/add width.
      special_cycles: cycles per element for division, sqrt and transcendentals (ASSUMED: software sequences of
        a polynomial and a Newton step, about 16 instructions).
      instr_startup_cycles: cycles a vector instruction costs before its first element: its descriptors' set-up,
        the issue and the pipeline's fill, and the scalar loop control around it. 14.3 [FIT:fft3d].
      task_cycles: cycles a task activation costs (a per-core program started by its data or by the host).
        ASSUMED 10 (the calibration set cannot tell it: its programs start a handful of tasks).
      sram_read_bytes_per_cycle, sram_write_bytes_per_cycle: per core, 16 and 8: two 64-bit reads and one 64-bit
        write [LIE]. Every vector instruction reads its operands from SRAM and writes its result there, so these
        bound each instruction (wafer/cost.py). The SDK's CSL appendix describes a 32-bit access per operand per
        lane; fp16 FMAC at its published 4 lanes reads two 16-bit vector operands and writes one per lane, 16 and 8
        bytes a cycle, which only [LIE]'s ports sustain; 20 PB/s over 850k cores at ~1 GHz [AT] is ~24 B a cycle,
        consistent with 16 + 8. So [LIE] holds.
      link_bits_per_cycle: bits per cycle per direction on each N/E/S/W link (one 32-bit wavelet [SDK]).
      ramp_bits_per_cycle: bits per cycle each way between a core and its own router (one 32-bit wavelet [SDK]).
      hop_latency_cycles: cycles for a wavelet to cross one router. ASSUMED 1 (not published; Cerebras's sync
        code subtracts px + py cycles of propagation delay; [LGI24] model a link as one cycle).
      ramp_latency_cycles: T_R, cycles for a wavelet between a core and its router (2 [LGI24]); a dependent
        receive-combine-send stage costs 2 T_R + 1.
      edge_io_bits_per_s: host I/O into the wafer's edge (12 x 100 GbE = 1.2 Tb/s [CS2]).
      defects: a `wafer.DefectMap` (dead cores and links of a physical grid with spare rows and columns, remapped
        so that programs see the whole rows x cols grid; wafer/defects.py, `with_defects`), or None: a perfect
        wafer. Static; validated (remapped) at construction.
    """

    # Static (shape-fixing) fields.
    name: str = struct.field(pytree_node=False, default="custom")
    rows: int = struct.field(pytree_node=False, default=757)
    cols: int = struct.field(pytree_node=False, default=996)
    sram_bytes_per_core: int = struct.field(pytree_node=False, default=48 * 1024)
    sram_banks: int = struct.field(pytree_node=False, default=8)
    router_colors: int = struct.field(pytree_node=False, default=24)
    reserved_colors: int = struct.field(pytree_node=False, default=6)
    code_bytes_per_core: int = struct.field(pytree_node=False, default=4 * 1024)
    memcpy_cols_west: int = struct.field(pytree_node=False, default=3)
    memcpy_cols_east: int = struct.field(pytree_node=False, default=2)
    overlap: bool = struct.field(pytree_node=False, default=True)
    defects: DefectMap | None = struct.field(pytree_node=False, default=None)
    # Differentiable figures (pytree leaves).
    clock_hz: float = 850e6
    simd_fmac_fp16: float = 4.0
    simd_fmac_mixed: float = 2.0
    simd_fmac_fp32: float = 1.0
    simd_alu_fp16: float = 4.0
    simd_alu_fp32: float = 2.0
    simd_alu_int: float = 2.0
    special_cycles: float = 16.0
    instr_startup_cycles: float = 14.3
    task_cycles: float = 10.0
    sram_read_bytes_per_cycle: float = 16.0
    sram_write_bytes_per_cycle: float = 8.0
    link_bits_per_cycle: float = 32.0
    ramp_bits_per_cycle: float = 32.0
    hop_latency_cycles: float = 1.0
    ramp_latency_cycles: float = 2.0
    edge_io_bits_per_s: float = 1.2e12

    def __post_init__(self):
        # Leaves may be tracers (spec passed through jit/grad/vmap): only concrete values are checked.
        _check_int(self, "rows", 1, 100_000)
        _check_int(self, "cols", 1, 100_000)
        _check_int(self, "sram_bytes_per_core", 4, 1 << 30)
        if isinstance(self.sram_bytes_per_core, int) and self.sram_bytes_per_core % 4:
            raise SpecError(
                f"WaferSpec.sram_bytes_per_core must be a multiple of 4 (whole 32-bit words), "
                f"got {self.sram_bytes_per_core}"
            )
        _check_int(self, "sram_banks", 1, 1024)
        _check_int(self, "router_colors", 1, 1024)
        _check_int(self, "reserved_colors", 0, 1023)
        if isinstance(self.reserved_colors, int) and isinstance(self.router_colors, int):
            if self.reserved_colors >= self.router_colors:
                raise SpecError(
                    f"WaferSpec.reserved_colors must be less than router_colors ({self.router_colors}), got "
                    f"{self.reserved_colors}"
                )
        _check_int(self, "code_bytes_per_core", 0, 1 << 30)
        if isinstance(self.code_bytes_per_core, int) and isinstance(self.sram_bytes_per_core, int):
            if self.code_bytes_per_core % 4 or self.code_bytes_per_core >= self.sram_bytes_per_core:
                raise SpecError(
                    f"WaferSpec.code_bytes_per_core must be a multiple of 4 below sram_bytes_per_core "
                    f"({self.sram_bytes_per_core}), got {self.code_bytes_per_core}"
                )
        _check_int(self, "memcpy_cols_west", 0, 1000)
        _check_int(self, "memcpy_cols_east", 0, 1000)
        if not isinstance(self.overlap, bool):
            raise SpecError(f"WaferSpec.overlap must be True or False, got {self.overlap!r}")
        _check_float(self, "clock_hz", 1e6, 1e11)
        for f in (
            "simd_fmac_fp16",
            "simd_fmac_mixed",
            "simd_fmac_fp32",
            "simd_alu_fp16",
            "simd_alu_fp32",
            "simd_alu_int",
        ):
            _check_float(self, f, 0.125, 1024.0)
        _check_float(self, "special_cycles", 0.0, 1e4)
        _check_float(self, "instr_startup_cycles", 0.0, 1e4)
        _check_float(self, "task_cycles", 0.0, 1e6)
        _check_float(self, "sram_read_bytes_per_cycle", 0.125, 1e4)
        _check_float(self, "sram_write_bytes_per_cycle", 0.125, 1e4)
        _check_float(self, "link_bits_per_cycle", 1.0, 1e5)
        _check_float(self, "ramp_bits_per_cycle", 1.0, 1e5)
        _check_float(self, "hop_latency_cycles", 0.0, 1e4)
        _check_float(self, "ramp_latency_cycles", 0.0, 1e4)
        _check_float(self, "edge_io_bits_per_s", 1e3, 1e18)
        if self.defects is not None:
            if not isinstance(self.defects, DefectMap):
                raise SpecError(
                    f"WaferSpec.defects must be a wafer.DefectMap or None, got {type(self.defects).__name__}; "
                    f"use spec.with_defects(...)"
                )
            if isinstance(self.rows, int) and isinstance(self.cols, int):
                remap(self.defects, self.rows, self.cols)  # raises DefectError when the spares cannot hide them

    # ---- derived figures -------------------------------------------------------------------------------------

    @property
    def cores(self) -> int:
        """Programmer-visible cores, rows x cols."""
        return self.rows * self.cols

    @property
    def sram_words_per_core(self) -> int:
        """32-bit words of SRAM per core."""
        return self.sram_bytes_per_core // 4

    @property
    def data_bytes_per_core(self) -> int:
        """SRAM bytes per core left for a program's data: the SRAM less the code's reservation."""
        return self.sram_bytes_per_core - self.code_bytes_per_core

    @property
    def sram_bytes_total(self) -> int:
        return self.sram_bytes_per_core * self.cores

    def simd_width(self, op_class: str, dtype_class: str):
        """Lanes per cycle for an instruction class ("fmac", "alu") on operands of a dtype class."""
        if op_class == "fmac":
            return {
                "fp16": self.simd_fmac_fp16,
                "mixed": self.simd_fmac_mixed,
                "fp32": self.simd_fmac_fp32,
                "int": self.simd_alu_int,
            }[dtype_class]
        if op_class == "alu":
            return {
                "fp16": self.simd_alu_fp16,
                "mixed": self.simd_alu_fp32,
                "fp32": self.simd_alu_fp32,
                "int": self.simd_alu_int,
            }[dtype_class]
        raise ValueError(f"op_class must be one of ('fmac', 'alu'), got {op_class!r}")

    def peak_flops(self, dtype_class: str = "fp16"):
        """Dense peak FLOP/s: cores x FMAC lanes x 2 x clock (an FMAC is two FLOPs)."""
        return self.cores * self.simd_width("fmac", dtype_class) * 2 * self.clock_hz

    def with_(self, **overrides) -> WaferSpec:
        """A copy with some fields changed (validated like the constructor).

        Raises:
          SpecError: a field out of range, or a name that is not a field (with the closest field names).
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            import difflib

            hints = {u: difflib.get_close_matches(u, fields, n=2) for u in unknown}
            said = "; ".join(
                f"{u!r}" + (f" (perhaps you meant {' or '.join(h)})" if h else "") for u, h in hints.items()
            )
            raise SpecError(f"WaferSpec has no field {said}; its fields are {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def with_defects(
        self,
        rate: float = 0.0,
        seed: int = 0,
        *,
        dead_cores=(),
        dead_links=(),
        spare_rows: int = 0,
        spare_cols: int | None = None,
        link_rate: float = 0.0,
    ) -> WaferSpec:
        """A copy on a defective wafer: a physical grid of (rows + spare_rows) x (cols + spare_cols) cores, some dead,
        remapped so that programs still see the whole rows x cols grid (wafer/defects.py; docs/defects.md).

        Args:
          rate: probability that a physical core is dead (independently; 0: only the explicit `dead_cores`).
          seed: seeds the random map (the same seed gives the same map).
          dead_cores: explicit dead cores, physical (row, col), added to the random ones.
          dead_links: explicit dead links, physical (row, col, "N" | "E" | "S" | "W").
          spare_rows, spare_cols: spares of the physical grid; spare_cols defaults to 1.5 % of the columns (at least
            two), the top of the 1-1.5 % spares Cerebras describes (`wafer.defects.default_spare_cols`).
          link_rate: probability that a physical link is dead.
        Raises:
          DefectError (a SpecError): a defect outside the physical grid, or more defects than the spares can hide.
        """
        rand = DefectMap.random(
            self.rows, self.cols, rate, seed, spare_rows=spare_rows, spare_cols=spare_cols, link_rate=link_rate
        )
        dm = DefectMap(
            dead_cores=rand.dead_cores + tuple(dead_cores),
            dead_links=rand.dead_links + tuple(dead_links),
            spare_rows=rand.spare_rows,
            spare_cols=rand.spare_cols,
        )
        return dataclasses.replace(self, defects=dm)

    @property
    def remap(self):
        """Where each logical core lies on the physical grid (`wafer.defects.Remap`), or None without defects."""
        return remap_of(self)

    @classmethod
    def mini(cls, rows: int, cols: int, **overrides) -> WaferSpec:
        """A small wafer with WSE-2 figures, for tests and notebooks: `WaferSpec.mini(8, 8)`."""
        name = overrides.pop("name", f"mini-{rows}x{cols}")
        return WSE2.with_(name=name, rows=rows, cols=cols, **overrides)

    def describe(self) -> dict:
        """Every field and the main derived figures, JSON-serialisable."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "defects"}
        if self.defects is not None:
            d["defects"] = self.remap.describe()
        d.update(
            cores=self.cores,
            sram_bytes_total=self.sram_bytes_total,
            peak_flops_fp16=float(self.peak_flops("fp16")),
            peak_flops_fp32=float(self.peak_flops("fp32")),
        )
        return d


def _check_int(spec, field, lo, hi):
    v = getattr(spec, field)
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not lo <= v <= hi:
        raise SpecError(f"WaferSpec.{field} must be an int in [{lo}, {hi}], got {v!r}")


def _check_float(spec, field, lo, hi):
    v = getattr(spec, field)
    if isinstance(v, bool):
        raise SpecError(f"WaferSpec.{field} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if _is_concrete_number(v) and not lo <= float(v) <= hi:
        raise SpecError(f"WaferSpec.{field} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if isinstance(v, str):
        raise SpecError(f"WaferSpec.{field} must be a number in [{lo:g}, {hi:g}], got {v!r}")


# WSE-1 (CS-1): 633 x 633 fabric, 48 KB per core, fp16 FMAC 4-wide [SDK]; other widths ASSUMED as WSE-2.
WSE1 = WaferSpec(name="WSE-1", rows=633, cols=633)
# WSE-2 (CS-2): 757 x 996 programmer-visible cores, 48 KB in 8 banks, SIMD 4/2/2 [SDK], 850 MHz [BENCH],
# 1.2 Tb/s edge I/O [CS2].
WSE2 = WaferSpec(name="WSE-2", rows=757, cols=996)
# WSE-3 (CS-3): 762 x 1172 [ALCF], 48 KB per core, SIMD 8/4/4 [SDK]; fp32 FMAC width ASSUMED 2;
# clock and edge I/O ASSUMED as CS-2.
WSE3 = WaferSpec(
    name="WSE-3",
    rows=762,
    cols=1172,
    simd_fmac_fp16=8.0,
    simd_fmac_mixed=4.0,
    simd_fmac_fp32=2.0,
    simd_alu_fp16=8.0,
    simd_alu_fp32=4.0,
    simd_alu_int=4.0,
)
