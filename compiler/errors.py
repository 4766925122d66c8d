"""Errors the compiler raises. They are part of the API: named classes under one base, `CompilerError`, each
message saying what was wrong and what would be right.

    CompilerError
      UnsupportedOpError   a primitive with no kernel or cost rule (also a wafer.UnsupportedPrimitiveError)
      PlacementError       kernels that do not fit the wafer, or a bad hand placement
      RouteError           a flow that cannot be routed

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
