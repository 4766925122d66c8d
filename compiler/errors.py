"""Errors the compiler raises. They are part of the API: named classes under one base, `CompilerError`, each
message saying what was wrong and what would be right.

    CompilerError
      UnsupportedOpError   a primitive with no kernel or cost rule (also a wafer.UnsupportedPrimitiveError)
      PlacementError       kernels that do not fit the wafer, or a bad hand placement
      RouteError           a flow that cannot be routed
        ColorError         a router that would need more colours than the wafer has
      BatchError           inputs that disagree on the batch size, or a bad batch_axis
      InputMismatchError   call-time inputs (or a training batch) unlike the compiled example
      ParamsMismatchError  params whose tree, shapes or dtypes differ from the compiled ones
      StateMismatchError   a state made by another program or for another spec
      CheckpointError      no checkpoint in a directory can be restored

A kernel whose tiles do not fit its cores raises the machine's `wafer.SramCapacityError`, naming the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

from wafer.errors import UnsupportedPrimitiveError


class CompilerError(Exception):
    """Base class of the compiler's own errors."""


class UnsupportedOpError(CompilerError, UnsupportedPrimitiveError):
    """The traced program uses a primitive the compiler has no kernel or cost rule for.

    A subclass of `wafer.UnsupportedPrimitiveError`, so code catching the machine's error catches this one.

    Attributes:
      primitive: the primitive's name (for example "fft").
      source: the user's "file:line" that produced it, or "unknown".
      supported: the names the compiler does support (sorted).
    """

    def __init__(self, primitive: str, source: str, supported: Iterable[str] = (), hint: str = ""):
        super().__init__(primitive, source, where="compiler")
        self.supported = tuple(sorted(supported))
        message = f"compiler: primitive '{primitive}' is not supported (at {source})."
        if hint:
            message += f" {hint}"
        if self.supported:
            message += " Supported primitives: " + ", ".join(self.supported) + "."
        self.args = (message,)


class PlacementError(CompilerError, ValueError):
    """Kernels cannot be placed (or a given placement is invalid).

    Attributes:
      kernel: name of the kernel concerned, or None when the problem is not one kernel's.
      reason: what was wrong and what would help (also the message).
    """

    def __init__(self, reason: str, kernel: str | None = None):
        self.kernel = kernel
        self.reason = reason
        super().__init__(reason)


class RouteError(CompilerError, ValueError):
    """A flow cannot be routed: an unknown kernel, bad words, or overlapping rectangles."""


class ColorError(RouteError):
    """A router would need more colours (virtual channels) than the spec leaves a program.

    Attributes:
      core: (row, col) of the router.
      needed: colours it would need; available: router_colors - reserved_colors.
      streams: the streams whose lanes pass it; kernel: the kernel whose cores it serves (or None).
    """

    def __init__(self, core, needed: int, available: int, streams=(), kernel: str | None = None, own: int = 0):
        self.core, self.needed, self.available = tuple(core), int(needed), int(available)
        self.streams, self.kernel = tuple(streams), kernel
        names = ", ".join(f"{s}->{d}" for s, d in self.streams[:8]) + (" ..." if len(self.streams) > 8 else "")
        where = f" inside kernel {kernel!r} (whose multicasts and reductions use {own})" if kernel else ""
        super().__init__(
            f"the router at core {self.core}{where} would need {self.needed} colours, more than the "
            f"{self.available} a program has (router_colors - reserved_colors): {len(self.streams)} streams pass it "
            f"({names}). Place the kernels those streams join closer together (a hand placement or other "
            f"PlacementParams), or merge kernels so that fewer streams cross"
        )


class BatchError(CompilerError, ValueError):
    """The inputs' batch cannot be told: they disagree on its size, or `batch_axis` is malformed
    (compiler/frontend/batch.py).

    Attributes:
      sizes: {input path: its batch axis' size} when the inputs disagree, else {}.
    """

    def __init__(self, message: str, sizes=None):
        self.sizes = dict(sizes or {})
        super().__init__(message)


class InputMismatchError(CompilerError, ValueError):
    """Inputs given at call time (or a training step's batch) differ from the example the program was compiled
    with: their tree, a leaf's shape or its dtype. A compiled program's SRAM layout and cost are for the example's
    shapes; compile again for others.

    Attributes: path (the leaf, e.g. "inputs[0]"), expected, got (shape/dtype strings or tree structures).
    """

    def __init__(self, message: str, path: str | None = None, expected=None, got=None):
        self.path, self.expected, self.got = path, expected, got
        super().__init__(message)


class ParamsMismatchError(CompilerError, ValueError):
    """Params given to `load`/`init` differ from the ones compiled: their tree, a leaf's shape or its dtype's kind
    (a float leaf where an integer one was compiled, ...). Same-kind dtypes are cast to the compiled one (float64
    NumPy arrays to float32), as `jnp.asarray` does.

    Attributes: path (the leaf, e.g. "params/Dense_0/kernel"), expected, got.
    """

    def __init__(self, message: str, path: str | None = None, expected=None, got=None):
        self.path, self.expected, self.got = path, expected, got
        super().__init__(message)


class StateMismatchError(CompilerError, ValueError):
    """A state that this program did not make: from another program (an allocation it reads is missing or of
    another shape), for another spec (another grid), or of the other task (a training state given to an inference
    program, or the reverse).

    Attributes: allocation (the SRAM allocation concerned, or None).
    """

    def __init__(self, message: str, allocation: str | None = None):
        self.allocation = allocation
        super().__init__(message)


class CheckpointError(CompilerError, OSError):
    """No checkpoint in a directory can be restored (each one is corrupted, half-written or of another program).

    Attributes: directory, failures ({step: the error restoring it}).
    """

    def __init__(self, message: str, directory=None, failures=None):
        self.directory, self.failures = directory, dict(failures or {})
        super().__init__(message)
