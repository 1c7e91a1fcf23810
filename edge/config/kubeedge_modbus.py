"""Modbus ``configData``: endpoint, unit id and options of a device; visitors of properties.

KubeEdge leaves ``configData`` free-form, so the keys are those the Modbus mappers in
the wild read (kubeedge/examples temperature demo, kubeedge/mappers-go modbus-dmi),
both dialects, plus edge's own options. Raw types follow DESIGN.md §4. Every value is
checked here and every problem names the key's field; the result is the typed
:mod:`edge.config.model`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, overload

from edge.config.kubeedge_docs import PROTOCOL_ALIASES, Bound, Config, Entry, ModelProperty
from edge.config.kubeedge_docs import to_number as _to_number
from edge.config.model import (
    Endpoint,
    Framing,
    ModbusOptions,
    RawType,
    SerialEndpoint,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.config.sources import Report, Where, join_field, or_list

PROTOCOL_KEYS = (
    "communicateMode", "ip", "port", "slaveID", "serialPort", "baudRate", "dataBits",
    "stopBits", "parity", "rs485Enabled", "serialType",
    "timeout", "retries", "maxRegistersPerRequest", "maxBitsPerRequest", "maxGap",
)  # fmt: skip
"""Device ``protocol.configData`` keys (canonical names; ``unitID`` and ``serialName``
are accepted for ``slaveID`` and ``serialPort``)."""
VISITOR_KEYS = (
    "register", "offset", "limit", "scale", "isSwap", "isRegisterSwap",
    "dataType", "bit", "min", "max",
)  # fmt: skip
"""Property ``visitors.configData`` keys."""

GENERIC_TYPES = ("int", "float", "double", "string", "boolean", "bytes")
"""KubeEdge's generic types, mapped to a raw type by ``limit``."""
_BY_LIMIT: dict[tuple[str, int], RawType] = {
    ("int", 1): RawType.INT16,
    ("int", 2): RawType.INT32,
    ("int", 4): RawType.INT64,
    ("float", 1): RawType.INT16,  # × scale, as the kubeedge/examples mapper reads it
    ("float", 2): RawType.FLOAT32,
    ("float", 4): RawType.FLOAT64,
    ("double", 4): RawType.FLOAT64,
    ("boolean", 1): RawType.BOOLEAN,
}
_ANY_LIMIT = {"string": RawType.STRING, "bytes": RawType.BYTES}
_RAW_VALUE_TYPE = {
    RawType.FLOAT32: ValueType.FLOAT,
    RawType.FLOAT64: ValueType.DOUBLE,
    RawType.STRING: ValueType.STRING,
    RawType.BYTES: ValueType.BYTES,
    RawType.BOOLEAN: ValueType.BOOLEAN,
    RawType.BIT: ValueType.BOOLEAN,
}
_VALUE_TYPES = {t.value for t in ValueType}
_BIT_TABLE_TYPES = (RawType.UINT16, RawType.UINT32, RawType.UINT64)
_FLOAT32_MAX = 3.4028234663852886e38
_TABLES = {table.value.lower(): table for table in Table}
_MODES = {"tcp": "TCP", "rtu": "RTU", "rtuovertcp": "RTUoverTCP"}
_PARITY = {"none": "N", "n": "N", "even": "E", "e": "E", "odd": "O", "o": "O"}
_INTEGER = re.compile(r"[+-]?\d+")
_T = TypeVar("_T")


def _num(value: float) -> str:
    """A number as a person writes it: ``100``, ``-3276.8``, ``3.402823466e+38``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.10g}"


def _as_int(value: object) -> int | None:
    """An int, an integral float, or a decimal string as int; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


class _Reader:
    """Typed reads of one ``configData`` block (``field`` of ``where``); each problem is
    reported at the key's own field, and the key joins :attr:`failed`."""

    def __init__(self, config: Config, where: Where, field: str, report: Report) -> None:
        self.config = config
        self.where = where
        self.field = field
        self.report = report
        self.failed: set[str] = set()

    @property
    def ok(self) -> bool:
        """True while no read has failed."""
        return not self.failed

    def at(self, key: str) -> tuple[Where, str]:
        """Where ``key`` was written, or where it would go in this block."""
        entry = self.config.get(key)
        return (entry.where, entry.field) if entry else (self.where, join_field(self.field, key))

    def error(self, key: str, message: str) -> None:
        self.failed.add(key)
        self.report.error(*self.at(key), message)

    def warning(self, key: str, message: str) -> None:
        self.report.warning(*self.at(key), message)

    def warn_unknown(self, accepted: Sequence[str], aliases: Mapping[str, str]) -> None:
        known = [*accepted, *aliases]
        for key, entry in self.config.items():
            if key not in accepted:
                self.report.warning(
                    entry.where,
                    entry.field,
                    f"unknown key {entry.key!r} is ignored; accepted: {', '.join(known)}",
                )

    def _get(self, key: str, required: str | None) -> Entry | None:
        entry = self.config.get(key)
        if entry is None and required is not None:
            self.error(key, f"{key} {required}")
        return entry

    @overload
    def integer(self, key: str, default: int, low: int, high: int) -> int: ...

    @overload
    def integer(
        self, key: str, default: None, low: int, high: int, required: str | None = None
    ) -> int | None: ...

    def integer(
        self, key: str, default: int | None, low: int, high: int, required: str | None = None
    ) -> int | None:
        """The integer at ``key`` in ``low..high`` (a numeric string is accepted);
        ``default`` when absent or invalid (see :attr:`failed`)."""
        entry = self._get(key, required)
        if entry is None:
            return default
        value = _as_int(entry.value)
        if value is None:
            self.error(key, f"{entry.key} must be an integer, got {entry.value!r}")
            return default
        if not low <= value <= high:
            self.error(key, f"{entry.key} {value} is out of range {low}..{high}")
            return default
        return value

    def number(self, key: str) -> float | None:
        """The number at ``key`` (a numeric string is accepted); None when absent or invalid."""
        entry = self.config.get(key)
        if entry is None:
            return None
        value = _to_number(entry.value)
        if value is None:
            self.error(key, f"{entry.key} must be a number, got {entry.value!r}")
        return value

    def boolean(self, key: str) -> bool:
        """The boolean at ``key`` (also "true"/"false"); False when absent or invalid."""
        entry = self.config.get(key)
        if entry is None:
            return False
        value = entry.value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.error(key, f"{entry.key} must be true or false, got {value!r}")
            return False
        return value

    def string(self, key: str, required: str | None = None) -> str | None:
        """The non-empty string at ``key``; None when absent or invalid."""
        entry = self._get(key, required)
        if entry is None:
            return None
        if not isinstance(entry.value, str) or not entry.value.strip():
            self.error(key, f"{entry.key} must be a non-empty string, got {entry.value!r}")
            return None
        return entry.value.strip()

    def choice(
        self, key: str, choices: Mapping[str, _T], shown: Sequence[str], required: str | None = None
    ) -> _T | None:
        """The choice named at ``key`` (case, ``-``, ``_`` and spaces ignored); None when
        absent or invalid. ``shown`` lists the accepted spellings for the message."""
        entry = self._get(key, required)
        if entry is None:
            return None
        name = re.sub(r"[\s_-]", "", str(entry.value)).lower()
        if name not in choices:
            self.error(key, f"{entry.key} {entry.value!r} is not accepted; use {or_list(shown)}")
            return None
        return choices[name]


# --- the device: endpoint, unit id, options ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """What a Device's ``protocol.configData`` says: where, which unit id, how."""

    endpoint: Endpoint
    unit_id: int
    options: ModbusOptions


def _endpoint(r: _Reader) -> Endpoint | None:
    mode = r.choice("communicateMode", _MODES, ("TCP", "RTU", "RTUoverTCP"))
    if mode is None and "communicateMode" in r.config:
        return None
    has_ip, has_serial = "ip" in r.config, "serialPort" in r.config
    if mode is None:
        if has_ip and has_serial:
            r.error(
                "communicateMode",
                "ambiguous: both ip (Modbus TCP) and a serial port "
                "(Modbus RTU) are given; set communicateMode to TCP, RTU or RTUoverTCP",
            )
            return None
        if not (has_ip or has_serial):
            r.error(
                "ip",
                "no endpoint: give ip (and port) for Modbus TCP, or serialName/"
                "serialPort for Modbus RTU",
            )
            return None
        mode = "TCP" if has_ip else "RTU"
    if mode != "RTU":
        host = r.string("ip", required=f"is required with communicateMode {mode}")
        port = r.integer("port", 502, 1, 65535)
        framing = Framing.RTU if mode == "RTUoverTCP" else Framing.MBAP
        return TcpEndpoint(host, port, framing) if host and r.ok else None
    serial = r.string("serialPort", required="(or serialName) is required with communicateMode RTU")
    baudrate = r.integer("baudRate", 9600, 50, 4_000_000)
    bytesize = r.integer("dataBits", 8, 5, 8)
    stopbits = r.integer("stopBits", 1, 1, 2)
    parity = r.choice("parity", _PARITY, ("None", "Even", "Odd", "N", "E", "O")) or "N"
    return SerialEndpoint(serial, baudrate, bytesize, parity, stopbits) if serial and r.ok else None


def parse_connection(config: Config, where: Where, field: str, report: Report) -> Connection | None:
    """The endpoint, unit id and options of one device from its ``protocol.configData``
    (the DeviceModel's ``protocolConfigData`` merged under it).

    Keys (:data:`PROTOCOL_KEYS`): ``communicateMode`` TCP | RTU | RTUoverTCP (absent:
    TCP when ``ip`` is given, RTU when a serial port is); ``ip``, ``port`` (502; string
    or int); ``serialPort``/``serialName``, ``baudRate`` (9600), ``dataBits`` (8),
    ``stopBits`` (1), ``parity`` (None/Even/Odd or N/E/O); ``slaveID``/``unitID`` 1..247
    (default 1; 0 is broadcast, which cannot be polled); ``rs485Enabled`` and
    ``serialType`` are accepted without effect. Edge's own: ``timeout`` (ms per request,
    1000), ``retries`` (1), ``maxRegistersPerRequest`` (1..125), ``maxBitsPerRequest``
    (1..2000), ``maxGap`` (16; 0 = no gap fill). Unknown keys are warnings. Returns None
    when anything is wrong (all of it reported).
    """
    r = _Reader(config, where, field, report)
    r.warn_unknown(PROTOCOL_KEYS, PROTOCOL_ALIASES)
    endpoint = _endpoint(r)
    unit_id = r.integer("slaveID", 1, 0, 247)
    if unit_id == 0:
        r.error(
            "slaveID",
            "unit id 0 is the broadcast address: no device answers it, so it "
            "cannot be polled; use the device's unit id 1..247",
        )
    timeout_ms = r.integer("timeout", 1000, 1, 600_000)
    retries = r.integer("retries", 1, 0, 100)
    max_registers = r.integer("maxRegistersPerRequest", 125, 1, 125)
    max_bits = r.integer("maxBitsPerRequest", 2000, 1, 2000)
    max_gap = r.integer("maxGap", 16, 0, 2000)
    r.boolean("rs485Enabled")
    r.string("serialType")
    if not r.ok or endpoint is None:
        return None
    options = ModbusOptions(timeout_ms / 1000, retries, max_registers, max_bits, max_gap)
    return Connection(endpoint, unit_id, options)


# --- a property: visitor, raw type, write bounds ----------------------------------------


@dataclass(frozen=True, slots=True)
class PropertyRead:
    """What a property's visitor says: where and how to read it, its value type, and the
    write bounds (the tighter of the model's and the visitor's)."""

    visitor: Visitor
    value_type: ValueType
    minimum: float | None
    maximum: float | None


def _check_extent(
    r: _Reader, table: Table, offset: int | None, limit: int, options: ModbusOptions
) -> None:
    if table.is_bit:
        cap, most, unit, option = options.max_bits, 2000, "bits", "maxBitsPerRequest"
    else:
        cap, most, unit, option = options.max_registers, 125, "registers", "maxRegistersPerRequest"
    if limit > cap:
        lowered = "" if cap == most else f" ({option} of this device)"
        r.error(
            "limit",
            f"limit {limit} is more than one read of {table} carries: {cap} {unit}{lowered}",
        )
    if offset is not None and offset + limit > 65536:
        r.error(
            "offset",
            f"offset {offset} + limit {limit} runs past the last address (65535) of {table}",
        )


def _data_type(r: _Reader) -> tuple[RawType | None, str | None]:
    """``(explicit raw type, generic type)`` named by ``dataType``; both None when absent
    or invalid."""
    entry = r.config.get("dataType")
    if entry is None:
        return None, None
    name = str(entry.value).strip().lower()
    if name in RawType.__members__.values():
        return RawType(name), None
    if name in GENERIC_TYPES:
        return None, name
    explicit = ", ".join(t.value for t in RawType)
    r.error(
        "dataType",
        f"dataType {entry.value!r} is not known; accepted: {explicit} (exact), "
        f"or {', '.join(GENERIC_TYPES)} (KubeEdge generic, mapped by limit)",
    )
    return None, None


def _bit_table_type(
    r: _Reader, table: Table, limit: int, explicit: RawType | None, generic: str | None
) -> RawType | None:
    if explicit is RawType.BOOLEAN or (explicit is None and generic == "boolean" and limit == 1):
        if limit != 1:
            r.error("limit", f"limit {limit} does not fit boolean (1 bit)")
            return None
        return RawType.BOOLEAN
    if explicit is not None:
        if explicit not in _BIT_TABLE_TYPES:
            r.error(
                "dataType",
                f"dataType {explicit} cannot be read from {table}, a bit table: "
                "use boolean, uint16, uint32 or uint64",
            )
            return None
        if limit > (explicit.bits or 0):
            r.error("limit", f"limit {limit} does not fit {explicit} ({explicit.bits} bits)")
            return None
        return explicit
    fits = next((t for t in _BIT_TABLE_TYPES if limit <= (t.bits or 0)), None)
    if fits is None:
        r.error(
            "limit",
            f"limit {limit} bits do not fit one value (at most 64, uint64); split the property",
        )
    return fits


def _raw_type(
    r: _Reader, table: Table, limit: int, scale: float, model: ModelProperty
) -> RawType | None:
    """The raw type (DESIGN.md §4): an explicit ``dataType`` wins; a generic one (or the
    model's type when ``dataType`` is absent) is mapped by ``limit``."""
    explicit, generic = _data_type(r)
    if "dataType" in r.failed:
        return None
    what = f"dataType {generic}"
    if explicit is None and generic is None:
        if model.type_name in (None, "STREAM"):
            r.error(
                "dataType",
                f"no Modbus type: the DeviceModel property type is "
                f"{model.type_name or 'absent'}; set dataType here or type in the model",
            )
            return None
        generic = (model.type_name or "").lower()
        what = f"DeviceModel type {model.type_name}"
    if table.is_bit:
        return _bit_table_type(r, table, limit, explicit, generic)
    if explicit is not None:
        count = explicit.register_count
        if count is not None and count != limit:
            r.error(
                "limit",
                f"limit {limit} does not fit {explicit} ({count} register{'s' * (count > 1)})",
            )
            return None
        return explicit
    assert generic is not None  # no explicit type: a generic one was found above
    raw = _BY_LIMIT.get((generic, limit)) or _ANY_LIMIT.get(generic)
    if raw is None:
        fits = [f"{n} ({t})" for (g, n), t in _BY_LIMIT.items() if g == generic]
        r.error(
            "limit",
            f"limit {limit} does not fit {what}: it takes limit {or_list(fits)}; "
            "or set an explicit dataType",
        )
    elif generic == "int":
        r.warning(
            "dataType",
            f"{what} with limit {limit} is read as signed {raw} (upstream "
            f"mappers read it unsigned, which breaks negative values); set dataType {raw} "
            f"or u{raw} to say which",
        )
    elif generic == "float" and limit == 1:
        r.warning(
            "dataType",
            f"{what} with limit 1 is ambiguous: read as int16 × scale "
            f"{_num(scale)}, as the upstream examples mapper does; set dataType int16 or "
            "uint16 to say which",
        )
    return raw


def _span(raw: RawType, table: Table, limit: int, scale: float) -> tuple[float, float] | None:
    """The values ``raw`` can carry after ``scale``; None when any finite number fits."""
    if table.is_bit:
        return 0, 1 if raw is RawType.BOOLEAN else 2**limit - 1
    if raw in (RawType.BOOLEAN, RawType.BIT):
        return 0, 1
    if raw is RawType.FLOAT32:
        return -_FLOAT32_MAX * abs(scale), _FLOAT32_MAX * abs(scale)
    bits = raw.bits
    if bits is None:
        return None
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if raw.signed else (0, 2**bits - 1)
    if scale == 1:
        return low, high
    return min(low * scale, high * scale), max(low * scale, high * scale)


def _visitor_bound(r: _Reader, key: str) -> Bound | None:
    value = r.number(key)
    return None if value is None else Bound(value, key, *r.at(key))


def _write_bounds(
    r: _Reader, raw: RawType, table: Table, limit: int, scale: float, model: ModelProperty
) -> tuple[float | None, float | None]:
    """Write bounds: the tighter of the model's ``minimum``/``maximum`` and the visitor's
    ``min``/``max``; each must fit what ``raw`` carries after ``scale`` (bit-valued
    properties are limited to their bits with a warning, as upstream samples put e.g.
    ``maximum: 100`` on a coil)."""
    visitor_low, visitor_high = _visitor_bound(r, "min"), _visitor_bound(r, "max")
    lows = [b for b in (model.minimum, visitor_low) if b is not None]
    highs = [b for b in (model.maximum, visitor_high) if b is not None]
    if raw in (RawType.STRING, RawType.BYTES):
        for b in (*lows, *highs):
            r.report.warning(b.where, b.field, f"{b.key} is ignored for {raw}")
        return None, None
    minimum = max((b.value for b in lows), default=None)
    maximum = min((b.value for b in highs), default=None)
    span = _span(raw, table, limit, scale)
    if span is not None:
        low, high = span
        held = f"{_num(low)}..{_num(high)}"
        bit_valued = table.is_bit or raw in (RawType.BOOLEAN, RawType.BIT)
        for b in (*lows, *highs):
            if low <= b.value <= high:
                continue
            if bit_valued:
                r.report.warning(
                    b.where,
                    b.field,
                    f"{b.key} {_num(b.value)} is outside what "
                    f"{raw} on {table} holds ({held}); writes are limited to {held}",
                )
            else:
                r.failed.add(b.key)
                r.report.error(
                    b.where,
                    b.field,
                    f"{b.key} {_num(b.value)} does not fit {raw} × scale {_num(scale)} ({held})",
                )
        if bit_valued:
            minimum = None if minimum is None else float(min(max(minimum, low), high))
            maximum = None if maximum is None else float(min(max(maximum, low), high))
    mine = visitor_high or visitor_low
    if minimum is not None and maximum is not None and minimum > maximum and mine:
        r.failed.add(mine.key)
        r.report.error(
            mine.where,
            mine.field,
            f"no value is allowed: minimum {_num(minimum)} > "
            f"maximum {_num(maximum)} (the tighter of the DeviceModel's "
            "minimum/maximum and the visitor's min/max wins)",
        )
    return minimum, maximum


def _value_type(raw: RawType, model: ModelProperty, generic: str | None) -> ValueType:
    if model.type_name in _VALUE_TYPES:
        return ValueType(model.type_name)
    if generic is not None:
        return ValueType(generic.upper())
    return _RAW_VALUE_TYPE.get(raw, ValueType.INT)


def parse_visitor(
    config: Config,
    where: Where,
    field: str,
    report: Report,
    *,
    model: ModelProperty,
    options: ModbusOptions,
) -> PropertyRead | None:
    """One property's visitor ``configData`` (the model's merged under the device's).

    Keys (:data:`VISITOR_KEYS`): ``register`` (CoilRegister, DiscreteInputRegister,
    HoldingRegister, InputRegister; required), ``offset`` (0..65535; required),
    ``limit`` (1; registers or bits, offset + limit ≤ 65536, ≤ one request),
    ``scale`` (1; non-zero), ``isSwap``, ``isRegisterSwap``, ``dataType`` (explicit
    raw type or KubeEdge generic), ``bit`` (0..15, with ``dataType: bit``), ``min`` /
    ``max`` (write bounds, combined with the model's ``minimum``/``maximum``). Unknown
    keys are warnings. Swaps and scale do not apply to bit tables (a scale there is a
    warning). Returns None when anything is wrong (all of it reported).
    """
    r = _Reader(config, where, field, report)
    r.warn_unknown(VISITOR_KEYS, {})
    table = r.choice("register", _TABLES, [t.value for t in Table], required="is required")
    offset = r.integer("offset", None, 0, 65535, required="is required (the 0-based address)")
    limit = r.integer("limit", 1, 1, 65536)
    scale = r.number("scale")
    if scale == 0:
        r.error("scale", "scale must not be 0")
    scale = scale or 1.0
    is_swap, is_register_swap = r.boolean("isSwap"), r.boolean("isRegisterSwap")
    if table is None or "limit" in r.failed:
        _data_type(r)  # still report an unknown dataType
        return None
    _check_extent(r, table, offset, limit, options)
    raw = _raw_type(r, table, limit, scale, model)
    if raw is None:
        return None
    bit = None
    if raw is RawType.BIT:
        bit = r.integer("bit", None, 0, 15, required="is required with dataType bit (0 = LSB)")
    elif "bit" in r.config:
        r.error("bit", "bit is only used with dataType bit")
    numeric = not table.is_bit and (raw.is_integer or raw in (RawType.FLOAT32, RawType.FLOAT64))
    if scale != 1 and not numeric:
        r.warning("scale", f"scale {_num(scale)} is ignored for {raw} on {table}")
        scale = 1.0
    minimum, maximum = _write_bounds(r, raw, table, limit, scale, model)
    if not r.ok or offset is None:
        return None
    visitor = Visitor(
        table=table,
        offset=offset,
        limit=limit,
        raw_type=raw,
        scale=scale,
        is_swap=is_swap and not table.is_bit,
        is_register_swap=is_register_swap and not table.is_bit,
        bit=bit,
    )
    return PropertyRead(visitor, _value_type(raw, model, _data_type(r)[1]), minimum, maximum)
