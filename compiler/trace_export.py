"""A compiled program's step as a Chrome / Perfetto trace: one track per kernel, its compute and fabric spans.

    from compiler.trace_export import chrome_trace
    trace = chrome_trace(exe, "trace.json", steps=2)   # open it in https://ui.perfetto.dev

The trace is drawn from the same cost rules as the report (wafer/cost.py through the kernel plans), not measured:
it is a picture of the pipeline formula, not a cycle-accurate schedule. Times are cycles converted to
microseconds at `spec.clock_hz`; every event's `args` also gives its cycles.

Layer-pipelined inference (`compiler.compile`), as `PipelineRecord.cycles` counts a call of B samples: kernel i
costs s_i = cycles per batch / B per sample, the pipeline starts a sample every T = max_i s_i cycles, and a
sample reaches kernel i when it has passed the kernels before it. So sample j runs on kernel i from
`L + sum_{k<i} s_k + j T` for s_i cycles, where L = longest route x hop latency is drawn first as the input's
trip over the fabric (on the "host I/O" track). Within a sample span, "compute" (SIMD and SRAM) and "fabric"
(the kernel's own multicasts and reductions) both start with it when the spec overlaps them (the sample costs the
larger) and run one after the other otherwise. A call ends at L + sum_i s_i + (B - 1) T, the record's cycles.

Pipelined training (`compiler.compile_train`), as `TrainRecord` counts a step: per sample, kernel i spends
f_i / B on its forward and b_i / B on its backward (the formula charges them together, per kernel, at the
pipeline's pace T = max_i (f_i + b_i) / B), so sample j's span on kernel i starts at
`2L + sum_{k<i} (f_k + b_k) / B + j T`, with "forward" and "backward" inside it; then every kernel updates its
weights at once ("update", u_i cycles) and the step ends after the slowest update. The batch streams in over
the edge I/O meanwhile ("batch I/O" on the host track); a step lasts the longer of the two.

Weight streaming: layer after layer, each on the whole wafer: forward spans in order (compute and "weights in"
I/O, the longer one counts), then backward spans in reverse order (compute and weights in / gradients out, twice
the I/O, on the "weight streaming I/O" track); the optimizer runs on the host.

Steps follow each other (`steps=n`): a step starts when the previous one ends. Each step also gets a span on the
"program" track. The JSON is the Trace Event Format's object form: {"traceEvents": [...], "displayTimeUnit"}, with
complete ("X") events and metadata ("M") events naming the process and the tracks.
"""

from __future__ import annotations

import json
import os

from wafer import cost

PID = 1
_PROGRAM, _HOST, _WEIGHTS = 0, 1, 2  # track ids; kernel i is track i + _FIRST
_FIRST = 3


def _us(spec, cycles) -> float:
    return float(cycles) / float(spec.clock_hz) * 1e6


class _Events:
    def __init__(self, spec):
        self.spec = spec
        self.events: list[dict] = []

    def span(self, name, tid, start, cycles, cat, **args):
        """A complete event from `start` for `cycles` wafer cycles (zero-length spans are skipped)."""
        if float(cycles) <= 0:
            return
        self.events.append(
            {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": _us(self.spec, start),
                "dur": _us(self.spec, cycles),
                "pid": PID,
                "tid": tid,
                "args": {"start_cycle": float(start), "cycles": float(cycles), **args},
            }
        )


def chrome_trace(exe_or_tx, path=None, steps: int = 1) -> dict:
    """A Chrome / Perfetto trace of `steps` calls (or training steps) of a compiled program.

    Args:
      exe_or_tx: an `Executable` (`compiler.compile`) or a `Trainer` (`compiler.compile_train`).
      path: also write the trace there as JSON (open it in https://ui.perfetto.dev or chrome://tracing).
      steps: how many calls / steps to draw, one after the other.
    Returns:
      The trace as a dict: {"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {...}}; events are
      sorted by start time. See the module docstring for the model.
    Raises:
      TypeError: not a compiled program; ValueError: steps < 1.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    record, spec = getattr(exe_or_tx, "record", None), getattr(exe_or_tx, "spec", None)
    if record is None or spec is None or not hasattr(record, "plans"):
        raise TypeError(
            f"chrome_trace needs a compiled program (compiler.compile(...) or compiler.compile_train(...)), got "
            f"{type(exe_or_tx).__name__}"
        )
    ev = _Events(spec)
    training = hasattr(record, "update_counts")
    mode = getattr(exe_or_tx, "report", None)
    mode = mode.mode if mode is not None else ("training" if training else "inference")
    t = 0.0
    for step in range(steps):
        if not training:
            length = _inference_step(ev, record, spec, t)
        elif record.mode == "weight_streaming":
            length = _streaming_step(ev, record, spec, t)
        else:
            length = _pipelined_train_step(ev, record, spec, t)
        ev.span(f"step {step}", _PROGRAM, t, length, "step", step=step)
        t += length
    events = sorted(ev.events, key=lambda e: (e["ts"], -e["dur"], e["tid"]))
    names = {_PROGRAM: "program", _HOST: "host I/O"}
    if training and record.mode == "weight_streaming":
        names[_WEIGHTS] = "weight streaming I/O"
    names.update({i + _FIRST: p.name for i, p in enumerate(record.plans)})
    meta = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": f"{spec.name}: {mode}"}}]
    for tid, name in names.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
    trace = {
        "traceEvents": meta + events,
        "displayTimeUnit": "ns",
        "otherData": {
            "spec": spec.name,
            "mode": mode,
            "batch": int(record.batch),
            "clock_hz": float(spec.clock_hz),
            "steps": steps,
            "step_cycles": float(record.cycles(spec)),
        },
    }
    if path is not None:
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace


def _parts(ev, tid, start, compute, comm, names=("compute", "fabric")):
    """Two costs inside one span: both from its start when the spec overlaps them, else one after the other."""
    ev.span(names[0], tid, start, compute, names[0])
    ev.span(names[1], tid, start if ev.spec.overlap else start + compute, comm, names[1])


def _inference_step(ev, record, spec, t0) -> float:
    batch = int(record.batch)
    per_sample = [float(s) for s in record.sample_cycles(spec)]
    pace = max(per_sample, default=0.0)
    latency = record.routes.max_hops * float(spec.hop_latency_cycles)
    ev.span("input over the fabric", _HOST, t0, latency, "route", hops=int(record.routes.max_hops))
    start = t0 + latency
    for i, (p, s) in enumerate(zip(record.plans, per_sample)):
        compute, comm = float(p.compute_cycles(spec)) / batch, float(p.comm_cycles(spec)) / batch
        for j in range(batch):
            t = start + j * pace
            ev.span(f"sample {j}", i + _FIRST, t, s, "sample", kernel=p.name, sample=j)
            _parts(ev, i + _FIRST, t, compute, comm)
        start += s
    return float(record.cycles(spec))


def _pipelined_train_step(ev, record, spec, t0) -> float:
    batch = int(record.batch)
    ks = [tuple(float(v) for v in k) for k in record.kernel_cycles(spec)]
    per_sample = [(f + b) / batch for f, b, _ in ks]
    pace = max(per_sample, default=0.0)
    hops = record.routes.max_hops if record.routes is not None else 0
    latency = 2 * hops * float(spec.hop_latency_cycles)
    ev.span("batch I/O", _HOST, t0, float(record.io_cycles(spec)), "io")
    start = t0 + latency
    for i, (p, (f, b, _)) in enumerate(zip(record.plans, ks)):
        for j in range(batch):
            t = start + j * pace
            ev.span(f"sample {j}", i + _FIRST, t, (f + b) / batch, "sample", kernel=p.name, sample=j)
            ev.span("forward", i + _FIRST, t, f / batch, "forward")
            ev.span("backward", i + _FIRST, t + f / batch, b / batch, "backward")
        start += (f + b) / batch
    end = t0 + latency + sum(per_sample) + (batch - 1) * pace
    for i, (_, _, u) in enumerate(ks):
        ev.span("update", i + _FIRST, end, u, "update")
    return float(record.cycles(spec))


def _streaming_step(ev, record, spec, t0) -> float:
    ks = [tuple(float(v) for v in k) for k in record.kernel_cycles(spec)]
    ios = [float(cost.io_cycles(spec, b)) for b in record.stream_bytes]
    ev.span("batch I/O", _HOST, t0, float(record.io_cycles(spec)), "io")
    t = t0
    for i, ((f, _, _), io) in enumerate(zip(ks, ios)):
        length = max(f, io)
        ev.span("forward", i + _FIRST, t, length, "forward", weights_in_cycles=io, compute_cycles=f)
        ev.span("compute", i + _FIRST, t, f, "compute")
        ev.span("weights in", _WEIGHTS, t, io, "io")
        t += length
    for i in reversed(range(len(ks))):
        (_, b, _), io = ks[i], ios[i]
        length = max(b, 2 * io)
        ev.span("backward", i + _FIRST, t, length, "backward", weights_and_gradients_cycles=2 * io, compute_cycles=b)
        ev.span("compute", i + _FIRST, t, b, "compute")
        ev.span("weights in, gradients out", _WEIGHTS, t, 2 * io, "io")
        t += length
    return float(record.cycles(spec))
