"""A compiled program's step as a Chrome / Perfetto trace: one track per kernel, its compute and fabric spans.

    from compiler.views.trace_export import chrome_trace
    trace = chrome_trace(exe, "trace.json", steps=2)   # open it in https://ui.perfetto.dev

The spans are the schedule's (`compiler.schedule.Schedule.events`): the same timing the report prints and the
emulator charges, drawn, not measured: a picture of the pipeline schedule, not a cycle-accurate trace. Times are
cycles converted to microseconds at `spec.clock_hz`; every event's `args` also gives its cycles.

What the spans show (compiler/schedule.py has the formulas): in inference, every sample's span on every kernel at
the pipeline's pace, with "compute" and "fabric" inside (together when the spec overlaps them, one after the other
otherwise), the inputs in and outputs out on the "host I/O" track and the first input's trip over the fabric on the
"routes" track; in pipelined training, each sample's "forward" and "backward" on each kernel, then every kernel's
"update", the batch streaming in meanwhile ("batch I/O"); in weight streaming, forward layer by layer then backward in
reverse, with the weights' and gradients' I/O on the "weight streaming I/O" track. Steps follow each other; each step
also gets a span on the "program" track. The JSON is the Trace Event Format's object form: {"traceEvents": [...],
"displayTimeUnit"}, with complete ("X") events and metadata ("M") events naming the process and the tracks.
"""

from __future__ import annotations

import json
import os

from compiler.run.program import Program

PID = 1
# tracks before the kernels', in this order ("interconnect": the gradient all-reduce between several wafers)
_FIXED = ("program", "host I/O", "routes", "weight streaming I/O", "interconnect")


def chrome_trace(program, path=None, steps: int = 1) -> dict:
    """A Chrome / Perfetto trace of `steps` calls (or training steps) of a compiled program.

    Args:
      program: a compiled program (`compiler.compile` or `compiler.compile_train`).
      path: also write the trace there as JSON (open it in https://ui.perfetto.dev or chrome://tracing).
      steps: how many calls / steps to draw, one after the other.
    Returns:
      The trace as a dict: {"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {...}}; events are
      sorted by start time.
    Raises:
      TypeError: not a compiled program; ValueError: steps < 1.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(program, Program):
        raise TypeError(
            f"chrome_trace needs a compiled program (compiler.compile(...) or compiler.compile_train(...)), got "
            f"{type(program).__name__}"
        )
    schedule, spec = program.schedule, program.spec
    mode = program.report.mode
    spans = schedule.events(steps)
    used = {
        "routes": program.plan.task == "inference",
        "weight streaming I/O": program.plan.mode == "weight_streaming",
        "interconnect": any(s.track == "interconnect" for s in spans),
    }
    fixed = [t for t in _FIXED if used.get(t, True)]
    tracks = {name: tid for tid, name in enumerate([*fixed, *schedule.names])}
    us = lambda cycles: float(cycles) / float(spec.clock_hz) * 1e6  # noqa: E731
    events = [
        {
            "name": s.name,
            "cat": s.cat,
            "ph": "X",
            "ts": us(s.start),
            "dur": us(s.cycles),
            "pid": PID,
            "tid": tracks[s.track],
            "args": {"start_cycle": s.start, "cycles": s.cycles, **s.args},
        }
        for s in spans
    ]
    events.sort(key=lambda e: (e["ts"], -e["dur"], e["tid"]))
    meta = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": f"{spec.name}: {mode}"}}]
    for name, tid in tracks.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
    trace = {
        "traceEvents": meta + events,
        "displayTimeUnit": "ns",
        "otherData": {
            "spec": spec.name,
            "mode": mode,
            "batch": int(program.plan.batch),
            "clock_hz": float(spec.clock_hz),
            "steps": steps,
            "step_cycles": schedule.step_cycles,
        },
    }
    if path is not None:
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace
