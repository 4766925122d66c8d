"""Several wafers: `ClusterSpec`, the interconnect between CS-2 systems, and its closed-form times.

Cerebras trains one model data-parallel on several CS-2 systems through its Wafer-Scale Cluster: MemoryX holds the
weights, and SwarmX, a tree of broadcast/reduce nodes between MemoryX and the systems, broadcasts the weights to
every system and sums the gradients coming back from them. Every system reaches the cluster through its own
edge ports. A `ClusterSpec` says how many wafers train together and what the interconnect between them does;
what each wafer is stays its `WaferSpec`.

Sources:
  [CS2] Cerebras CS-2 system datasheet: 12 x 100 GbE into each system, 1.2 Tb/s.
  [WSC] Cerebras, "Cerebras Wafer-Scale Cluster" white paper and Hot Chips 34 (Sean Lie, 2022): MemoryX holds the
        weights and runs the optimizer; SwarmX broadcasts weights to, and reduces gradients from, up to 192 CS-2
        systems, over the systems' 100 GbE links; data-parallel across systems, the same model on each.
Figures marked ASSUMED are not published; they are our best estimate and are overridable.

Times (seconds; `nbytes` the bytes each wafer sends or receives):
  broadcast / reduce   levels x latency + nbytes x 8 / bandwidth: SwarmX forwards (or adds) in chunks, so a
                       message crosses the tree's levels pipelined and pays the bandwidth once;
  all-reduce           a reduce up the tree and a broadcast back down: 2 x levels x latency + nbytes x 8 /
                       bandwidth, the two directions of the full-duplex links overlapping chunk by chunk.
levels = ceil(log_fanin(wafers)); one wafer has no interconnect (every time is 0).
"""

from __future__ import annotations

import dataclasses
import numbers

from flax import struct


@struct.dataclass
class ClusterSpec:
    """N wafers training data-parallel and the interconnect between them (module docstring).

    Attributes:
      wafers: how many wafers (CS-2 systems) train together (1 to 192 [WSC]).
      fanin: children per SwarmX node. ASSUMED 2 (a binary tree; the topology's fan-in is not published).
      interconnect_bits_per_s: bandwidth between a wafer and SwarmX, each way: the system's 12 x 100 GbE = 1.2 Tb/s
        [CS2, WSC].
      interconnect_latency_s: one SwarmX level, a hop and the node's forwarding or adding. ASSUMED 5 us (a 100 GbE
        switch hop and a server's network stack; not published).
    """

    wafers: int = struct.field(pytree_node=False, default=1)
    fanin: int = struct.field(pytree_node=False, default=2)
    interconnect_bits_per_s: float = 1.2e12
    interconnect_latency_s: float = 5e-6

    def __post_init__(self):
        for name, lo, hi in (("wafers", 1, 192), ("fanin", 2, 1024)):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"ClusterSpec.{name} must be an int in [{lo}, {hi}], got {v!r}")
        for name, lo, hi in (("interconnect_bits_per_s", 1e3, 1e18), ("interconnect_latency_s", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool | str) or (_concrete(v) and not lo <= v <= hi):
                raise ValueError(f"ClusterSpec.{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")

    @property
    def levels(self) -> int:
        """SwarmX tree levels between the wafers and the root: ceil(log_fanin(wafers)); 0 for one wafer."""
        levels, reach = 0, 1
        while reach < self.wafers:
            levels, reach = levels + 1, reach * self.fanin
        return levels

    def with_(self, **overrides) -> ClusterSpec:
        return dataclasses.replace(self, **overrides)

    def describe(self) -> dict:
        return {
            "wafers": self.wafers,
            "fanin": self.fanin,
            "levels": self.levels,
            "interconnect_bits_per_s": float(self.interconnect_bits_per_s),
            "interconnect_latency_s": float(self.interconnect_latency_s),
        }


def stream_seconds(cluster: ClusterSpec, nbytes, bits_per_s=None):
    """A broadcast to, or a reduce from, every wafer of `nbytes` each (module docstring); `bits_per_s` caps the
    bandwidth (a wafer's own edge I/O, when it is the slower). 0 for one wafer."""
    if cluster.wafers == 1:
        return 0.0 * nbytes
    bw = cluster.interconnect_bits_per_s if bits_per_s is None else _min(cluster.interconnect_bits_per_s, bits_per_s)
    return cluster.levels * cluster.interconnect_latency_s + nbytes * 8.0 / bw


def allreduce_seconds(cluster: ClusterSpec, nbytes):
    """The sum of `nbytes` from every wafer back to every wafer (module docstring). 0 for one wafer."""
    if cluster.wafers == 1:
        return 0.0 * nbytes
    return 2 * cluster.levels * cluster.interconnect_latency_s + nbytes * 8.0 / cluster.interconnect_bits_per_s


def _concrete(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _min(a, b):
    if _concrete(a) and _concrete(b):
        return min(a, b)
    import jax.numpy as jnp

    return jnp.minimum(a, b)
