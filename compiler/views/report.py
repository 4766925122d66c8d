"""The compile report: where every kernel landed, what it holds, what it costs, and what bounds the pipeline.

Modelled on a Cerebras compile report ("Active PEs", "Compute Utilization"): per kernel, its rectangle, cores,
SRAM per core, FLOPs and cycles per sample; for the program, the pipeline bottleneck, predicted samples/s and
latency on the spec, active cores, compute utilisation and the busiest link. Every figure is the schedule's
(compiler/schedule.py): `build_report(schedule)` only formats it, and `estimate(program_or_plan, spec)` is the same
report for a plan on any spec.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from compiler import schedule as sched
from compiler.plan import Plan


@dataclasses.dataclass(frozen=True)
class KernelRow:
    name: str
    kind: str
    rect: tuple[int, int, int, int]
    cores: int
    weight_bytes_per_core: int
    act_bytes_per_core: int
    flops_per_sample: float
    compute_cycles_per_sample: float
    comm_cycles_per_sample: float
    cycles_per_sample: float
    source: str
    # training: cycles per step of the kernel's forward, backward and optimizer update; weight streaming: I/O
    # cycles to stream its weights in once at the spec's edge bandwidth
    forward_cycles: float = 0.0
    backward_cycles: float = 0.0
    update_cycles: float = 0.0
    io_cycles: float = 0.0
    # a defective wafer: the extra hops its row or column transfers are charged (the longest line of its core grid)
    extra_hops: int = 0


@dataclasses.dataclass(frozen=True)
class Report:
    """A compiled program's report. `str(report)` is a table; `report.to_dict()` is JSON-serialisable."""

    spec_name: str
    mode: str
    batch: int
    kernels: tuple[KernelRow, ...]
    bottleneck: str
    cycles_per_sample: float  # the pipeline's initiation interval per sample (its slowest kernel, stream or I/O)
    samples_per_s: float
    latency_cycles: float
    latency_s: float
    active_cores: int
    total_cores: int
    compute_utilization: float
    peak_sram_bytes_per_core: int
    sram_bytes_per_core: int
    max_link_words_per_sample: float
    route_hops: int
    clock_hz: float
    bound: str = "compute"  # what bounds the throughput: "compute", "fabric" or "I/O"
    io_cycles_per_step: float = 0.0  # streaming the batch in through the edge I/O
    # several wafers (training): `batch` is the global batch, `wafers` share it; the interconnect's cycles per step
    # (pipelined: the gradients' all-reduce; weight streaming: SwarmX's broadcasts and reduces, overlapping)
    wafers: int = 1
    batch_per_wafer: int = 0
    interconnect_cycles_per_step: float = 0.0
    # a defective wafer (spec.with_defects; wafer/defects.py): switched-off cores (dead, or at a dead link's end) and
    # dead links, the spares the remap used (rows retired; spare columns the most displaced row reaches into), the
    # logical links made longer, and the hops charged for them: the longest route's extra hops and the most any
    # kernel's transfers take (their cycles are in the figures above)
    dead_cores: int = 0
    dead_links: int = 0
    spare_rows_used: int = 0
    spare_cols_used: int = 0
    remapped_links: int = 0
    extra_route_hops: int = 0
    extra_kernel_hops: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernels"] = [dataclasses.asdict(k) for k in self.kernels]
        return json.loads(json.dumps(d))

    def kernel(self, name: str) -> KernelRow:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"no kernel {name!r}; kernels are {[k.name for k in self.kernels]}")

    def __str__(self) -> str:
        training = "training" in self.mode
        head = (
            f"{'kernel':<14}{'kind':<12}{'rectangle':<18}{'cores':>8}{'W B/core':>10}{'A B/core':>10}"
            f"{'FLOP/smp':>12}{'cyc/smp':>11}"
        )
        if training:
            head += f"{'fwd cyc':>11}{'bwd cyc':>11}{'upd cyc':>10}"
            if "streaming" in self.mode:
                head += f"{'I/O cyc':>11}"
        where = self.spec_name if self.wafers == 1 else f"{self.wafers} x {self.spec_name}"
        batch = f"batch {self.batch}" + ("" if self.wafers == 1 else f" ({self.batch_per_wafer} per wafer)")
        lines = [f"Compile report: {self.mode} on {where}, {batch}", head, "-" * len(head)]
        for k in self.kernels:
            r = k.rect
            rect = f"{r[2]}x{r[3]}@({r[0]},{r[1]})"
            mark = " <" if k.name == self.bottleneck else ""
            line = (
                f"{k.name:<14}{k.kind:<12}{rect:<18}{k.cores:>8}{k.weight_bytes_per_core:>10}"
                f"{k.act_bytes_per_core:>10}{k.flops_per_sample:>12.4g}{k.cycles_per_sample:>11.4g}"
            )
            if training:
                line += f"{k.forward_cycles:>11.4g}{k.backward_cycles:>11.4g}{k.update_cycles:>10.4g}"
                if "streaming" in self.mode:
                    line += f"{k.io_cycles:>11.4g}"
            lines.append(line + mark)
        lines += [
            "-" * len(head),
            f"bottleneck            {self.bottleneck}; pace {self.cycles_per_sample:.4g} cycles/sample",
            f"predicted throughput  {self.samples_per_s:,.1f} samples/s at {self.clock_hz / 1e6:.0f} MHz",
            f"latency               {self.latency_cycles:,.0f} cycles ({self.latency_s * 1e6:.2f} us)",
            f"active cores          {self.active_cores:,} of {self.total_cores:,} "
            f"({100 * self.active_cores / self.total_cores:.2f}%)",
            f"compute utilization   {100 * self.compute_utilization:.2f}% of active cores' peak",
            f"peak SRAM per core    {self.peak_sram_bytes_per_core:,} of {self.sram_bytes_per_core:,} bytes for data",
            f"busiest link          {self.max_link_words_per_sample:,.1f} words/sample; longest route "
            f"{self.route_hops} hops",
        ]
        if training:
            lines.append(f"bound by              {self.bound} (batch I/O {self.io_cycles_per_step:,.0f} cycles/step)")
            if self.wafers > 1:
                what = "weights in, gradients out (SwarmX)" if "streaming" in self.mode else "gradient all-reduce"
                lines.append(
                    f"interconnect          {self.wafers} wafers data-parallel; {what} "
                    f"{self.interconnect_cycles_per_step:,.0f} cycles/step"
                )
        else:
            lines.append(f"bound by              {self.bound} (the slowest of kernels, streams and edge I/O)")
        if self.dead_cores or self.dead_links:
            lines.append(
                f"defects               {self.dead_cores:,} dead cores, {self.dead_links:,} dead links remapped onto "
                f"{self.spare_cols_used} spare columns and {self.spare_rows_used} spare rows; "
                f"{self.remapped_links:,} longer links"
            )
            lines.append(
                f"extra hops charged    longest route +{self.extra_route_hops}, kernel transfers up to "
                f"+{self.extra_kernel_hops}"
            )
        return "\n".join(lines)


def build_report(schedule: sched.Schedule) -> Report:
    """The report of a plan's schedule (module docstring)."""
    plan, spec, fig = schedule.plan, schedule.spec, schedule.figures
    k, names, batch = schedule.kernels, schedule.names, plan.batch
    training = plan.task == "training"
    streaming = plan.mode == "weight_streaming"
    wafers = int(fig.get("wafers", 1))
    graph = {kernel.name: kernel for kernel in plan.graph.kernels}
    flops_factor = 3.0 if training else 1.0  # training: forward, input gradient, weight gradient
    s = np.asarray(fig["cycles_per_sample"], np.float64)
    rows = []
    for i, name in enumerate(names):
        p = plan.kernels[name]
        extra = {}
        if training:
            extra = dict(
                forward_cycles=float(k["forward"][i]),
                backward_cycles=float(k["backward"][i]),
                update_cycles=float(k["update"][i]),
                io_cycles=float(k["io"][i]) if streaming else 0.0,
            )
        extra["extra_hops"] = int(round(float(k["extra_hops"][i])))
        rows.append(
            KernelRow(
                name=name,
                kind=p.kind,
                rect=tuple(int(v) for v in p.rect),
                cores=int(k["cores"][i]),
                weight_bytes_per_core=int(k["weight_bytes"][i]),
                act_bytes_per_core=int(k["act_bytes"][i]),
                flops_per_sample=flops_factor * float(plan.features.flops[i]) / batch,
                compute_cycles_per_sample=float(k["compute"][i]) / batch,
                comm_cycles_per_sample=float(k["comm"][i]) / batch,
                cycles_per_sample=float(s[i]),
                source=graph[name].source,
                **extra,
            )
        )
    worst = int(np.argmax(s))
    step = float(fig["step_cycles"])
    active = int(fig["cores"])
    flops = sum(r.flops_per_sample for r in rows)
    lanes = float(spec.simd_width("fmac", plan.policy.dtype_class))  # peak: matmul FMACs at the policy's lanes
    if training:
        util = flops * batch / (active * 2 * lanes * step) if step else 0.0
        cycles_per_sample, latency = step / (batch * wafers), step
        mode = f"{plan.mode} training"
    else:
        pace = float(fig["bottleneck_cycles"])  # the slowest kernel, stream or the edge I/O, per sample
        util = flops / (active * 2 * lanes * pace) if pace else 0.0
        cycles_per_sample, latency = pace, float(fig["latency_cycles"])
        mode = "layer-pipelined inference"
    links = schedule.link_words()
    rm = spec.remap
    defects = {}
    if rm is not None:
        defects = dict(
            dead_cores=int(rm.dead.sum()),
            dead_links=len(rm.defects.dead_links),
            spare_rows_used=rm.spare_rows_used,
            spare_cols_used=rm.spare_cols_used,
            remapped_links=rm.remapped_links,
            extra_route_hops=int(round(float(fig["route_extra_hops"]))),
            extra_kernel_hops=max((r.extra_hops for r in rows), default=0),
        )
    return Report(
        spec_name=spec.name,
        mode=f"{mode} ({plan.policy})" if plan.policy.mixed else mode,
        batch=batch * wafers,
        kernels=tuple(rows),
        bottleneck=names[worst],
        cycles_per_sample=cycles_per_sample,
        samples_per_s=float(fig["samples_per_s"]),
        latency_cycles=latency,
        latency_s=latency / float(spec.clock_hz),
        active_cores=active,
        total_cores=spec.cores,
        compute_utilization=float(min(util, 1.0)),
        peak_sram_bytes_per_core=int(fig["peak_sram_bytes"]),
        sram_bytes_per_core=spec.data_bytes_per_core,
        max_link_words_per_sample=float(links.max() / batch) if links.size else 0.0,
        route_hops=int(fig["hops"]),
        clock_hz=float(spec.clock_hz),
        bound=schedule.bound(),
        io_cycles_per_step=float(fig["io_cycles"]),
        wafers=wafers,
        batch_per_wafer=batch,
        interconnect_cycles_per_step=float(fig.get("interconnect_cycles", 0.0)),
        **defects,
    )


def estimate(program_or_plan, spec=None) -> Report:
    """The schedule's figures for a compiled program or a plan, on its own spec or another one: a `Report` with the
    same `to_dict()` keys as `program.report` (and equal values on the program's own spec).

    Another spec changes the figures that time the plan (clock, SIMD widths, bandwidths, latencies); its layout
    (rectangles, tilings, SRAM) stays the plan's.
    """
    plan = program_or_plan if isinstance(program_or_plan, Plan) else program_or_plan.plan
    return build_report(sched.of(plan, spec))
