"""The errors a Modbus request can end with (all subclasses of :class:`ModbusError`).

Exception codes and names: *MODBUS Application Protocol Specification V1.1b3* §7.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

EXCEPTION_NAMES: Final = {
    0x01: "ILLEGAL FUNCTION",
    0x02: "ILLEGAL DATA ADDRESS",
    0x03: "ILLEGAL DATA VALUE",
    0x04: "SERVER DEVICE FAILURE",
    0x05: "ACKNOWLEDGE",
    0x06: "SERVER DEVICE BUSY",
    0x08: "MEMORY PARITY ERROR",
    0x0A: "GATEWAY PATH UNAVAILABLE",
    0x0B: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}
"""Exception codes and their names (Application Protocol V1.1b3 §7)."""


class ModbusError(Exception):
    """Base of every error a Modbus request can end with."""


class ModbusExceptionError(ModbusError):
    """The device answered with an exception response (fc | 0x80, exception code).

    ``function_code`` is the requested function code (without 0x80),
    ``exception_code`` the code the device sent, ``name`` its standard name
    (Application Protocol V1.1b3 §7), e.g. ``ILLEGAL DATA ADDRESS``.
    """

    def __init__(self, function_code: int, exception_code: int) -> None:
        self.function_code = function_code
        self.exception_code = exception_code
        self.name = exception_name(exception_code)
        super().__init__(
            f"exception 0x{exception_code:02X} {self.name} (function code {function_code})"
        )


class FrameErrorKind(StrEnum):
    """What was wrong with an answer that cannot be the answer (``ModbusFrameError.kind``)."""

    CRC = "crc"
    """RTU: the CRC-16 does not match."""
    SHORT = "short"
    """Truncated: incomplete at the deadline, a PDU or read response shorter than it
    says or than the request asks for (fewer registers or bits)."""
    GARBLED = "garbled"
    """Cannot be delimited or makes no sense: garbled MBAP header, RTU frame of an
    unknown function code, longer than it says, exception response of the wrong size,
    write echo not matching, more than one frame for one request."""
    WRONG_UNIT = "wrong_unit"
    """A well-formed answer from another unit id than the one asked."""
    WRONG_FUNCTION = "wrong_function"
    """A well-formed answer with another function code than the request's."""


class ModbusFrameError(ModbusError):
    """An answer that cannot be the answer; ``kind`` (:class:`FrameErrorKind`) says how.

    An MBAP answer with a wrong transaction id is no frame error: it answers nobody,
    is discarded, and the request times out.
    """

    def __init__(self, message: str, *, kind: FrameErrorKind) -> None:
        super().__init__(message)
        self.kind = kind


def exception_name(code: int) -> str:
    """Standard name of an exception code, ``UNKNOWN EXCEPTION 0xNN`` for others."""
    return EXCEPTION_NAMES.get(code, f"UNKNOWN EXCEPTION 0x{code:02X}")


class ModbusTimeoutError(ModbusError):
    """The request's ``timeout`` passed before any of its answer arrived (also when it
    was still queued behind other requests on the endpoint or waiting for a connect)."""


class ModbusConnectionError(ModbusError):
    """The endpoint cannot be reached: connect failed or refused, connection lost,
    serial port gone, or the endpoint is waiting out its reconnect backoff.

    ``retry_in`` is how many seconds remain until a request may try to reconnect
    (0.0 when the next one may; ``math.inf`` once the connection was closed).
    """

    def __init__(self, message: str, *, retry_in: float = 0.0) -> None:
        super().__init__(message)
        self.retry_in = retry_in
