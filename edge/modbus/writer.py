"""Writing properties and calling Device methods over Modbus (DESIGN.md §4 "Writes").

A write is checked, sent as the exact inverse of decoding, read back and compared:

1. Checks, in this order; nothing is sent when one fails: DeviceModel ``accessMode``
   ``ReadWrite`` (else ``read_only``); a coil or holding register (else
   ``not_writable``: discrete inputs and input registers are read-only in the Modbus
   data model, Application Protocol V1.1b3 §4.3); a value of the kind the value type
   takes (else ``bad_value``); within the manifest's ``minimum``..``maximum``,
   inclusive, in engineering units, before unscaling (else ``out_of_range``);
   encodable by :func:`edge.modbus.codec.encode` (raw type range after unscaling,
   string length, hex size; else ``bad_value`` with the codec's message).
2. The request (V1.1b3 §6.5, §6.6, §6.11, §6.12, §6.16): coils FC 5 (one bit) or
   FC 15 (more); holding registers FC 6 (one register) or FC 16 (more); a ``bit``
   inside a holding register FC 22 Mask Write Register, which changes that bit alone.
   A unit that answers ILLEGAL FUNCTION (exception 1) to FC 22 is remembered on the
   :class:`~edge.modbus.client.Connection` (``mask_write_unsupported``); that write
   and every later bit write to the unit is a read-modify-write: FC 3 of the register,
   the bit changed, FC 6.
   Every write with its read-back holds the connection's per-unit lock
   (:meth:`~edge.modbus.client.Connection.unit_lock`), so two bits of one register
   written at once by this process cannot undo each other, and a write cannot land
   between another write and its read-back (which would be a false ``mismatch``).
3. The read-back: the property's ``limit`` items, read (FC 1 coils, FC 3 holding
   registers) and decoded with the same visitor, are returned. They must decode to
   ``decode(encode(value))`` — the value after scale rounding, float32 shortest
   decimals, string padding — else ``mismatch``.

Retries: every write sent here is idempotent — FC 5/6/15/16 set absolute values,
FC 22 sets one bit to a fixed state — so the device ends up the same whether it got
it once or twice: a timed-out write is sent again up to ``options.retries`` times, as
reads are, and so is a timed-out read-back. The FC 6 of a read-modify-write is not
(its word comes from a read that may be stale when it is resent), so after a timeout
the whole sequence is repeated from a fresh FC 3. Exception responses, garbled answers
and connection errors are never retried.

Errors: every failure is a :class:`WriteError` (a ValueError) whose message names the
device key, property, value and cause (for device failures the underlying error's
text, e.g. ``exception 0x02 ILLEGAL DATA ADDRESS (function code 6)``); ``stage``:
``check`` (nothing sent), ``read`` (the FC 3 of a read-modify-write; nothing written),
``write`` (after a timeout or lost connection the device may or may not have applied
it), ``read_back`` (written; the read-back failed or differs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, TypeVar

from edge.config.model import (
    AccessMode,
    DeviceSpec,
    PropertySpec,
    RawType,
    Table,
    Value,
    ValueType,
    Visitor,
)
from edge.modbus.codec import CodecError, bit_mask, decode, encode
from edge.modbus.errors import (
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
    ModbusTimeoutError,
)

if TYPE_CHECKING:  # the configuration checks import this module, not the client
    from edge.modbus.client import Connection

__all__ = [
    "Stage",
    "WriteError",
    "WriteErrorKind",
    "call_method",
    "desired_value",
    "find_property",
    "parse_number",
    "shown",
    "write_problem",
    "write_property",
]

WriteErrorKind = Literal[
    "unknown_device",
    "unknown_property",
    "read_only",
    "not_writable",
    "bad_value",
    "out_of_range",
    "unknown_method",
    "mismatch",
    "device_error",
    "timeout",
    "connection",
]
"""Why a write failed: ``unknown_device`` (the gateway has no such device; a
command's), ``unknown_property`` (the device has no such property),
``read_only`` (accessMode ReadOnly), ``not_writable`` (discrete
input or input register), ``bad_value`` (wrong kind, not encodable, a name a method does
not have), ``out_of_range`` (outside minimum..maximum), ``unknown_method`` (no such
Device method), ``mismatch`` (the read-back differs), ``device_error`` (an exception
response or an answer that cannot be the answer), ``timeout`` (no answer after the
retries), ``connection`` (the endpoint cannot be reached)."""

Stage = Literal["check", "read", "write", "read_back"]
"""How far a write got when it failed; see the module docstring."""

_T = TypeVar("_T")

ILLEGAL_FUNCTION = 0x01
"""Exception code of a device that does not implement a function code (V1.1b3 §7)."""


@dataclass(eq=False)
class WriteError(ValueError):
    """A property write or method call that failed; see :data:`WriteErrorKind`.

    ``message`` (also ``str(error)``) names the device key, property, value and
    cause. ``device`` is the device key ``namespace/name``; ``property`` and ``value``
    the property and the value asked for (None for a method-level error); ``cause`` the
    reason alone (for device failures, with the underlying error's text); ``stage`` see
    :data:`Stage`; ``exception_code`` the Modbus exception code of a ``device_error``
    from an exception response; ``written`` and ``read_back`` (``mismatch``) the
    decoded value written and the one read back (None when it did not decode);
    ``method`` the Device method (errors of :func:`call_method`), ``written_before``
    the properties it had written, in order, before this failure, ``results`` their
    read-back values.
    """

    kind: WriteErrorKind
    message: str
    device: str
    property: str | None = None
    value: object = None
    cause: str = ""
    stage: Stage = "check"
    exception_code: int | None = None
    written: Value | None = None
    read_back: Value | None = None
    method: str | None = None
    written_before: tuple[str, ...] = ()
    results: dict[str, Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A checked write: what goes on the wire and what the read-back must decode to."""

    prop: PropertySpec
    value: Value
    items: list[int] | list[bool]
    """``encode(visitor, value)``: the words or bits of FC 5/6/15/16."""
    mask: tuple[int, int] | None
    """``(and_mask, or_mask)`` for a bit inside a holding register, else None."""
    expected: Value
    """``decode(visitor, items)``: the value the read-back must give."""


@dataclass(slots=True)
class _Step:
    """Where a write is, for the error message: stage and request."""

    stage: Stage = "check"
    request: str = ""


async def write_property(
    conn: Connection, device: DeviceSpec, prop: PropertySpec, value: Value
) -> Value:
    """Write ``value`` (engineering units) to ``prop`` of ``device`` through ``conn``.

    ``conn`` is the connection of ``device.endpoint`` (``ConnectionPool.get``); requests
    go to ``device.unit_id`` with ``device.options.timeout_s`` (seconds) per request and
    ``device.options.retries`` more attempts after a timeout. Returns the value read
    back after the write, decoded as polling decodes it (e.g. 231.6 for 231.57 with
    scale 0.1; a bool for a coil or bit; text without its NUL padding).

    Raises:
        WriteError: for every failure, before or after anything was sent (see the
            module docstring for the checks, ``kind`` and ``stage``).
    """
    plan = _prepare(device, prop, value)
    return await _execute(conn, device, plan)


async def call_method(
    conn: Connection, device: DeviceSpec, method_name: str, values: Mapping[str, Value]
) -> dict[str, Value]:
    """Call the Device ``methods[]`` entry ``method_name``: write ``values``
    (property name → value in engineering units).

    Only the method's ``propertyNames`` may be given (a subset of them is allowed,
    at least one). Every value is checked first, as :func:`write_property` checks it,
    so a bad value stops the call before anything is sent. Then the properties are
    written one after another in the order of the method's ``propertyNames``, each read
    back before the next; the call stops at the first failure. Returns the read-back
    values, in that order.

    Raises:
        WriteError: ``unknown_method``; ``bad_value`` for no values or a name outside
            the method (the message lists the method's names); otherwise the first
            failing property's error, with ``method``, ``written_before`` (the
            properties written before it, in order) and ``results`` set and the
            message saying which were written.
    """
    method = next((m for m in device.methods if m.name == method_name), None)
    if method is None:
        known = ", ".join(m.name for m in device.methods) or "none"
        raise WriteError(
            "unknown_method",
            f"{device.key}: no method {method_name!r}; it has: {known}",
            device=device.key,
            cause=f"no method {method_name!r}",
            method=method_name,
        )
    allowed = ", ".join(method.property_names) or "none"
    outside = [name for name in values if name not in method.property_names]
    if outside or not values:
        cause = (
            f"{', '.join(map(repr, outside))} not in its properties" if outside
            else "no values given"
        )
        raise WriteError(
            "bad_value",
            f"{device.key} method {method_name!r}: {cause}; its properties: {allowed}; "
            "nothing was written",
            device=device.key,
            cause=cause,
            method=method_name,
        )
    plans: list[_Plan] = []
    for name in method.property_names:
        if name not in values:
            continue
        try:
            plans.append(_prepare(device, find_property(device, name), values[name]))
        except WriteError as e:
            raise _in_method(replace(e, value=values[name]), method_name, {}) from e
    results: dict[str, Value] = {}
    for plan in plans:
        try:
            results[plan.prop.name] = await _execute(conn, device, plan)
        except WriteError as e:
            raise _in_method(e, method_name, results) from e
    return results


def _in_method(error: WriteError, method: str, results: dict[str, Value]) -> WriteError:
    """``error`` of one property, restated as the failure of ``method``."""
    done = tuple(results)
    written = f"after writing {', '.join(done)}" if done else "with nothing written"
    return replace(
        error,
        message=f"{error.device} method {method!r}: property {error.property!r} = "
        f"{shown(error.value)} failed ({error.kind}) {written}: {error.cause}",
        method=method,
        written_before=done,
        results=dict(results),
    )


# -- checks -----------------------------------------------------------------------


def _refuse(
    kind: WriteErrorKind, device: DeviceSpec, prop: PropertySpec, value: object, cause: str
) -> WriteError:
    return WriteError(
        kind,
        f"{device.key}: cannot write {shown(value)} to property {prop.name!r}: {cause}",
        device=device.key,
        property=prop.name,
        value=value,
        cause=cause,
    )


def _not_writable(visitor: Visitor) -> str | None:
    if not visitor.table.writable:
        return (f"{visitor.table} cannot be written (only coils, by FC 5/15, "
                "and holding registers, by FC 6/16/22)")
    if visitor.scale_factor is not None:
        return (f"it is scaled by the scale factor register {visitor.scale_factor}; "
                "writing such a property is not supported")
    return None


def _plan(prop: PropertySpec, value: Value) -> _Plan | tuple[WriteErrorKind, str]:
    """Every check that needs no request: the plan of the write, or (kind, cause)."""
    visitor = prop.visitor
    if prop.access_mode is not AccessMode.READ_WRITE:
        return "read_only", f"its accessMode is {prop.access_mode}, not ReadWrite"
    problem = _not_writable(visitor)
    if problem:
        return "not_writable", problem
    problem = _kind_problem(prop, value)
    if problem:
        return "bad_value", problem
    problem = _range_problem(prop, value)
    if problem:
        return "out_of_range", problem
    try:
        items = encode(visitor, value)
        mask = bit_mask(visitor, value) if visitor.raw_type is RawType.BIT else None
        expected = decode(visitor, items)
    except CodecError as e:
        return "bad_value", str(e)
    return _Plan(prop, value, items, mask, expected)


def _prepare(device: DeviceSpec, prop: PropertySpec, value: Value) -> _Plan:
    """The plan of the write, or WriteError (nothing sent)."""
    plan = _plan(prop, value)
    if isinstance(plan, tuple):
        raise _refuse(plan[0], device, prop, value, plan[1])
    return plan


def write_problem(prop: PropertySpec, value: Value) -> tuple[WriteErrorKind, str] | None:
    """``(kind, cause)`` of the check that refuses writing ``value`` to ``prop`` before
    anything is sent (see the module docstring), or None when it may be written; for
    ``edge check`` of a manifest's desired values."""
    plan = _plan(prop, value)
    return plan if isinstance(plan, tuple) else None


SHOWN_CHARS = 80
"""Longest value written out whole in a message; longer ones are cut with "…"."""


def shown(value: object) -> str:
    """``repr(value)`` for a message, at most about SHOWN_CHARS characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} chars)"


_TRUE, _FALSE = ("true", "1"), ("false", "0")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_number(text: str) -> int | float | None:
    """``text`` as a number written in ASCII decimal (``-12``, ``+5``, ``007``, ``.5``,
    ``2.5e3``): an int when it has no point or exponent, else a float; None for
    anything else (``1_000``, ``0x10``, ``nan``, non-ASCII digits, an integer of more
    digits than Python converts)."""
    word = text.strip()
    try:
        if _INTEGER.fullmatch(word):
            return int(word)
        return float(word) if _DECIMAL.fullmatch(word) else None
    except ValueError:  # more than sys.get_int_max_str_digits() digits
        return None


def desired_value(prop: PropertySpec) -> Value:
    """The manifest's ``desired`` text of ``prop`` as a value of its value type: BOOLEAN
    ``true``/``false`` (also ``1``/``0``, any case), INT, FLOAT and DOUBLE a number
    (:func:`parse_number`; a float for FLOAT and DOUBLE), STRING and BYTES the text.
    Text that is none of these stays text, so that :func:`write_problem` names it
    (``bad_value``).

    Raises:
        ValueError: ``prop`` has no desired value.
    """
    text = prop.desired
    if text is None:
        raise ValueError(f"property {prop.name!r} has no desired value")
    if prop.value_type is ValueType.BOOLEAN:
        word = text.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else text
    if prop.value_type in (ValueType.STRING, ValueType.BYTES):
        return text
    number = parse_number(text)
    if number is None:
        return text
    return number if prop.value_type is ValueType.INT else float(number)


def find_property(device: DeviceSpec, name: str) -> PropertySpec:
    """The property ``name`` of ``device``.

    Raises:
        WriteError: ``unknown_property``, listing the properties it has.
    """
    prop = next((p for p in device.properties if p.name == name), None)
    if prop is None:
        known = ", ".join(p.name for p in device.properties) or "none"
        cause = f"no property {name!r}; it has: {known}"
        raise WriteError("unknown_property", f"{device.key}: {cause}", device=device.key,
                         property=name, cause=cause)
    return prop


_KINDS: dict[ValueType, tuple[str, tuple[type, ...]]] = {
    ValueType.BOOLEAN: ("true or false", (bool,)),
    ValueType.STRING: ("text", (str,)),
    ValueType.BYTES: ("a hex string", (str,)),
    ValueType.INT: ("a number", (int, float)),
    ValueType.FLOAT: ("a number", (int, float)),
    ValueType.DOUBLE: ("a number", (int, float)),
}


def _kind_problem(prop: PropertySpec, value: object) -> str | None:
    """Why ``value`` does not fit the property's value type, or None.

    BOOLEAN takes a bool; STRING text; BYTES a hex string; INT, FLOAT and DOUBLE a
    finite number (not a bool). A property that reads whole numbers (an integer raw
    type with an integral scale, or an integer packed in bits) takes only whole
    numbers: rounding 5.5 to 6 would write what nobody asked for. Fractional scales
    round to the nearest step of the scale (the read-back says what was written).
    """
    what, kinds = _KINDS[prop.value_type]
    wants_bool = prop.value_type is ValueType.BOOLEAN
    if not isinstance(value, kinds) or isinstance(value, bool) != wants_bool:
        return f"value type {prop.value_type} takes {what}, not {type(value).__name__}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{value!r} is not a finite number"
        if not value.is_integer() and _reads_whole_numbers(prop.visitor):
            return (
                f"{prop.visitor.raw_type} at scale {_number(prop.visitor.scale)} holds whole "
                f"numbers only; {value!r} is not one"
            )
    return None


def _reads_whole_numbers(visitor: Visitor) -> bool:
    if not visitor.raw_type.is_integer:
        return False
    return visitor.table.is_bit or Fraction(repr(float(visitor.scale))).denominator == 1


def _range_problem(prop: PropertySpec, value: Value) -> str | None:
    """Why a number is outside ``minimum``..``maximum`` (inclusive), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    low, high = prop.minimum, prop.maximum
    if (low is None or value >= low) and (high is None or value <= high):
        return None
    if low is not None and high is not None:
        allowed = f"{_number(low)}..{_number(high)}"
    elif low is not None:
        allowed = f"at least {_number(low)}"
    else:
        allowed = f"at most {_number(high or 0)}"
    unit = f" {prop.unit}" if prop.unit else ""
    return (
        f"out of range; allowed {allowed}{unit} (minimum/maximum of the manifest, inclusive)"
    )


def _number(value: float) -> str:
    """``100``, ``-3276.8``: a bound as the manifest writes it."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# -- requests ---------------------------------------------------------------------


async def _execute(conn: Connection, device: DeviceSpec, plan: _Plan) -> Value:
    """Send the write of ``plan``, read it back and compare; the read-back value."""
    visitor = plan.prop.visitor
    step = _Step()
    try:
        # one write and its read-back at a time per unit: a second write between them
        # would make the first one's read-back a false mismatch
        async with conn.unit_lock(device.unit_id):
            await _write(conn, device, plan, step)
            step.stage, step.request = "read_back", _describe(
                visitor.table.read_function_code, visitor.offset, visitor.limit, visitor.table
            )
            data = await _retrying(device, lambda: conn.read(
                device.unit_id, visitor.table, visitor.offset, visitor.limit,
                timeout=device.options.timeout_s,
            ))
    except ModbusError as e:
        raise _device_failure(device, plan, step, e) from e
    try:
        read_back = decode(visitor, data)
    except CodecError as e:
        raise _mismatch(device, plan, None, f"the read-back does not decode: {e}") from e
    if read_back != plan.expected:
        raise _mismatch(device, plan, read_back, f"read back {read_back!r}")
    return read_back


async def _write(conn: Connection, device: DeviceSpec, plan: _Plan, step: _Step) -> None:
    visitor = plan.prop.visitor
    unit, address, timeout = device.unit_id, visitor.offset, device.options.timeout_s
    step.stage = "write"
    if visitor.table is Table.COIL:
        bits = [bool(b) for b in plan.items]
        step.request = _describe(5 if len(bits) == 1 else 15, address, len(bits), visitor.table)
        await _retrying(device, lambda: conn.write_coils(unit, address, bits, timeout=timeout))
        return
    if plan.mask is None:
        words = [int(w) for w in plan.items]
        step.request = _describe(6 if len(words) == 1 else 16, address, len(words), visitor.table)
        await _retrying(
            device, lambda: conn.write_registers(unit, address, words, timeout=timeout)
        )
        return
    and_mask, or_mask = plan.mask
    if unit not in conn.mask_write_unsupported:
        step.request = f"FC 22 mask write of holding register {address}"
        try:
            await _retrying(device, lambda: conn.mask_write_register(
                unit, address, and_mask, or_mask, timeout=timeout
            ))
            return
        except ModbusExceptionError as e:
            if e.exception_code != ILLEGAL_FUNCTION:
                raise
            # the connection remembers it (mask_write_unsupported): read-modify-write
    await _read_modify_write(conn, device, address, and_mask, or_mask, step)


async def _read_modify_write(
    conn: Connection, device: DeviceSpec, address: int, and_mask: int, or_mask: int, step: _Step
) -> None:
    """FC 3 of the register, the FC 22 formula applied here, FC 6; all of it again
    from the FC 3 after a timeout (never the FC 6 alone: its word may be stale)."""
    unit, timeout = device.unit_id, device.options.timeout_s

    async def once() -> None:
        step.stage = "read"
        step.request = f"FC 3 read of holding register {address} (read-modify-write)"
        current = await conn.read(unit, Table.HOLDING_REGISTER, address, 1, timeout=timeout)
        word = (int(current[0]) & and_mask) | (or_mask & ~and_mask & 0xFFFF)
        step.stage = "write"
        step.request = f"FC 6 write of holding register {address} (read-modify-write)"
        await conn.write_registers(unit, address, [word], timeout=timeout)

    await _retrying(device, once)  # under the unit's lock, taken by _execute


async def _retrying(device: DeviceSpec, send: Callable[[], Awaitable[_T]]) -> _T:
    """``send()``, sent again after a timeout up to ``options.retries`` times (only for
    idempotent requests: reads, the writes above, a whole read-modify-write)."""
    for _ in range(device.options.retries):
        try:
            return await send()
        except ModbusTimeoutError:
            pass
    return await send()


def _describe(function_code: int, address: int, count: int, table: Table) -> str:
    kind = "read" if function_code in (1, 2, 3, 4) else "write"
    unit = "bit" if table.is_bit else "register"
    items = f"{count} {unit}s from {address}" if count > 1 else f"{unit} {address}"
    return f"FC {function_code} {kind} of {table} {items}"


def _device_failure(
    device: DeviceSpec, plan: _Plan, step: _Step, error: ModbusError
) -> WriteError:
    """A ModbusError of ``step``, as a WriteError of kind timeout, connection or
    device_error."""
    kind: WriteErrorKind
    code = None
    if isinstance(error, ModbusTimeoutError):
        kind = "timeout"
        tries = device.options.retries + 1
        note = f"no answer in {tries} attempt(s) of {_number(device.options.timeout_s)} s"
    elif isinstance(error, ModbusConnectionError):
        kind, note = "connection", "the endpoint cannot be reached"
    else:
        kind, note = "device_error", "the device answered with an error"
        if isinstance(error, ModbusExceptionError):
            code = error.exception_code
    after = {
        "check": "",
        "read": "; nothing was written",
        "write": "" if kind == "device_error" else "; the device may or may not have applied it",
        "read_back": "; it was written, the read-back failed",
    }[step.stage]
    cause = f"{step.request}: {note}: {error}{after}"
    return WriteError(
        kind,
        f"{device.key}: cannot write {shown(plan.value)} to property {plan.prop.name!r}: {cause}",
        device=device.key,
        property=plan.prop.name,
        value=plan.value,
        cause=cause,
        stage=step.stage,
        exception_code=code,
    )


def _mismatch(device: DeviceSpec, plan: _Plan, read_back: Value | None, what: str) -> WriteError:
    cause = f"wrote {plan.expected!r}, {what}"
    return WriteError(
        "mismatch",
        f"{device.key}: write of {shown(plan.value)} to property {plan.prop.name!r} did not "
        f"stick: {cause}",
        device=device.key,
        property=plan.prop.name,
        value=plan.value,
        cause=cause,
        stage="read_back",
        written=plan.expected,
        read_back=read_back,
    )

