"""Errors the compiler raises. They are part of the API: named classes, each message says what was wrong and what
would be right."""

from __future__ import annotations

from collections.abc import Iterable

from wafer.kernel import UnsupportedPrimitiveError


class UnsupportedOpError(UnsupportedPrimitiveError):
    """The traced program uses a primitive the compiler has no kernel or cost rule for.

    A subclass of `wafer.kernel.UnsupportedPrimitiveError`, so code catching the machine's error catches this one.

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
