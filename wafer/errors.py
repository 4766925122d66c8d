"""Errors the machine raises. They are part of the API: named classes under one base, `WaferError`, each message
saying what was wrong and what would be right. (Bad arguments to a constructor or a primitive raise ValueError or
TypeError, naming the argument.)"""

from __future__ import annotations


class WaferError(Exception):
    """Base class of the machine's own errors: a program that does not fit the wafer or has no cost rule."""


class SpecError(WaferError, ValueError):
    """A `WaferSpec` field out of range or of the wrong type; the message names the field
    (`WaferSpec.<field>`), the range it must lie in and the value given."""


class SramCapacityError(WaferError, ValueError):
    """An allocation does not fit in the SRAM of the cores it covers.

    Attributes: allocation (name), core ((row, col) of the fullest core), bytes_needed, bytes_free.
    """

    def __init__(
        self,
        allocation: str,
        core: tuple[int, int],
        bytes_needed: int,
        bytes_free: int,
        capacity: int,
        detail: str = "",
    ):
        self.allocation, self.core = allocation, core
        self.bytes_needed, self.bytes_free, self.capacity = bytes_needed, bytes_free, capacity
        msg = (
            f"SRAM allocation {allocation!r} needs {bytes_needed} bytes per core but core {core} has only "
            f"{bytes_free} bytes free (capacity {capacity} bytes per core)"
        )
        super().__init__(msg + (f"; {detail}" if detail else ""))


class UnsupportedPrimitiveError(WaferError, NotImplementedError):
    """A per-core program uses a primitive the cost model does not know.

    Attributes: primitive (name), source (the user's file:line, or "unknown").
    """

    def __init__(self, primitive: str, source: str, where: str = "per-core kernel"):
        self.primitive, self.source = primitive, source
        super().__init__(
            f"{where}: primitive '{primitive}' is not supported (at {source}). Supported primitives "
            f"are listed in wafer.kernel.SUPPORTED_PRIMITIVES."
        )
