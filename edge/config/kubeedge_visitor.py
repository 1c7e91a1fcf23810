"""Modbus property visitors: ``visitors.configData`` → :class:`~edge.config.model.Visitor`.

Keys are those of the KubeEdge Modbus mappers (``register``, ``offset``, ``limit``,
``scale``, ``isSwap``, ``isRegisterSwap``; ``dataType``, ``min``, ``max`` from the
kubeedge/examples mapper) plus ``bit``. Raw types follow DESIGN.md §4: an explicit
``dataType`` wins, KubeEdge's generic types are mapped by ``limit``; write bounds combine
the model's ``minimum``/``maximum`` with the visitor's ``min``/``max``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from edge.config.kubeedge_docs import Bound, Config, ModelProperty
from edge.config.kubeedge_modbus import ConfigReader, format_number
from edge.config.model import ModbusOptions, RawType, Table, ValueType, Visitor
from edge.config.sources import Report, Where, or_list

VISITOR_KEYS = (
    "register", "offset", "limit", "scale", "isSwap", "isRegisterSwap",
    "dataType", "bit", "min", "max", "scaleFactor", "missing",
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
_TABLE_NAMES = tuple(table.value for table in Table)
_RAW_TYPES = {raw.value: raw for raw in RawType}


@dataclass(frozen=True, slots=True)
class PropertyRead:
    """What a property's visitor says: where and how to read it, its value type, and the
    write bounds (the tighter of the model's and the visitor's)."""

    visitor: Visitor
    value_type: ValueType
    minimum: float | None
    maximum: float | None


def _check_extent(
    r: ConfigReader, table: Table, offset: int | None, limit: int, options: ModbusOptions
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


def _data_type(r: ConfigReader) -> tuple[RawType | None, str | None]:
    """``(explicit raw type, generic type)`` named by ``dataType``; both None when absent
    or invalid."""
    entry = r.config.get("dataType")
    if entry is None:
        return None, None
    name = "" if entry.value is None else str(entry.value).strip().lower()
    if name in _RAW_TYPES:
        return _RAW_TYPES[name], None
    if name in GENERIC_TYPES:
        return None, name
    named = f"dataType {entry.value!r} is not known" if name else "dataType is empty"
    r.error(
        "dataType",
        f"{named}; accepted: {', '.join(_RAW_TYPES)} (exact), "
        f"or {', '.join(GENERIC_TYPES)} (KubeEdge generic, mapped by limit)",
    )
    return None, None


def _bit_table_type(
    r: ConfigReader, table: Table, limit: int, explicit: RawType | None, generic: str | None
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
    r: ConfigReader,
    table: Table,
    limit: int,
    scale: float,
    model: ModelProperty,
    explicit: RawType | None,
    generic: str | None,
) -> RawType | None:
    """The raw type (DESIGN.md §4): an explicit ``dataType`` wins; a generic one (or the
    model's type when ``dataType`` is absent) is mapped by ``limit``."""
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
            f"{format_number(scale)}, as the upstream examples mapper does; set dataType int16 or "
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


def _visitor_bound(r: ConfigReader, key: str) -> Bound | None:
    value = r.number(key)
    return None if value is None else Bound(value, key, *r.at(key))


def _write_bounds(
    r: ConfigReader, raw: RawType, table: Table, limit: int, scale: float, model: ModelProperty
) -> tuple[float | None, float | None]:
    """Write bounds: the tighter of the model's ``minimum``/``maximum`` and the visitor's
    ``min``/``max``; each must fit what ``raw`` carries after ``scale`` (bit-valued
    properties are limited to their bits with a warning, as upstream samples put e.g.
    ``maximum: 100`` on a coil)."""
    visitor_low, visitor_high = _visitor_bound(r, "min"), _visitor_bound(r, "max")
    lows = [b for b in (model.minimum, visitor_low) if b is not None]
    highs = [b for b in (model.maximum, visitor_high) if b is not None]
    if not lows and not highs:
        return None, None
    if raw in (RawType.STRING, RawType.BYTES):
        for b in (*lows, *highs):
            r.report.warning(b.where, b.field, f"{b.key} is ignored for {raw}")
        return None, None
    minimum = max((b.value for b in lows), default=None)
    maximum = min((b.value for b in highs), default=None)
    span = _span(raw, table, limit, scale)
    if span is not None:
        low, high = span
        bit_valued = table.is_bit or raw in (RawType.BOOLEAN, RawType.BIT)
        for b in (*lows, *highs):
            if low <= b.value <= high:
                continue
            held = f"{format_number(low)}..{format_number(high)}"
            if bit_valued:
                r.report.warning(
                    b.where,
                    b.field,
                    f"{b.key} {format_number(b.value)} is outside what "
                    f"{raw} on {table} holds ({held}); writes are limited to {held}",
                )
            else:
                r.failed.add(b.key)
                r.report.error(
                    b.where,
                    b.field,
                    f"{b.key} {format_number(b.value)} does not fit {raw} "
                    f"× scale {format_number(scale)} ({held})",
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
            f"no value is allowed: minimum {format_number(minimum)} > "
            f"maximum {format_number(maximum)} (the tighter of the DeviceModel's "
            "minimum/maximum and the visitor's min/max wins)",
        )
    return minimum, maximum


def _value_type(raw: RawType, model: ModelProperty, generic: str | None) -> ValueType:
    if model.type_name in _VALUE_TYPES:
        return ValueType(model.type_name)
    if generic is not None:
        return ValueType(generic.upper())
    return _RAW_VALUE_TYPE.get(raw, ValueType.INT)


def _scale_factor(
    r: ConfigReader, table: Table, raw: RawType, offset: int | None, limit: int,
    options: ModbusOptions,
) -> int | None:
    """``scaleFactor``: the address of the int16 exponent register, read with the
    property in one request (SunSpec ``sunssf``)."""
    sf = r.integer("scaleFactor", None, 0, 65535)
    if sf is None or offset is None:
        return None
    if table.is_bit or not raw.is_integer:
        r.error("scaleFactor", f"a scale factor register applies to integer types of "
                f"register tables, not to {raw} of {table}")
        return None
    if offset <= sf < offset + limit:
        r.error("scaleFactor", f"scale factor register {sf} is one of the property's own "
                f"registers ({offset}..{offset + limit - 1})")
        return None
    extent = max(offset + limit, sf + 1) - min(offset, sf)
    if extent > options.max_registers:
        r.error("scaleFactor", f"scale factor register {sf} is {extent} registers from the "
                f"property's end: more than one read of {table} carries "
                f"({options.max_registers})")
        return None
    return sf


def _missing(r: ConfigReader, table: Table, limit: int) -> int | None:
    """``missing``: the raw value that means "not implemented" (an integer, or a
    ``0x`` hex string, of at most ``limit`` registers)."""
    entry = r.config.get("missing")
    if entry is None:
        return None
    value = entry.value
    if isinstance(value, str) and value.lower().startswith("0x"):
        with contextlib.suppress(ValueError):
            value = int(value, 16)
    if table.is_bit:
        r.error("missing", f"a not-implemented value applies to register tables, not {table}")
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 16 * limit:
        r.error("missing", f"missing must be the raw value of the {limit} register(s) as an "
                f"unsigned integer (0..{(1 << 16 * limit) - 1:#x}), got {value!r}")
        return None
    return value


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
    ``max`` (write bounds, combined with the model's ``minimum``/``maximum``),
    ``scaleFactor`` (address of an int16 power-of-ten exponent register in the same
    table, integer types only, read in the same request: SunSpec), ``missing`` (the
    raw "not implemented" value, an unsigned integer or ``0x…`` string). Unknown
    keys are warnings. Swaps and scale do not apply to bit tables (a scale there is a
    warning). Returns None when anything is wrong (all of it reported).
    """
    r = ConfigReader(config, where, field, report)
    r.warn_unknown(VISITOR_KEYS, {})
    table = r.choice("register", _TABLES, _TABLE_NAMES, required="is required")
    offset = r.integer("offset", None, 0, 65535, required="is required (the 0-based address)")
    limit = r.integer("limit", 1, 1, 65536)
    scale = r.number("scale")
    if scale == 0:
        r.error("scale", "scale must not be 0")
    scale = scale or 1.0
    is_swap, is_register_swap = r.boolean("isSwap"), r.boolean("isRegisterSwap")
    explicit, generic = _data_type(r)
    if table is None or "limit" in r.failed or "dataType" in r.failed:
        return None
    _check_extent(r, table, offset, limit, options)
    if "limit" in r.failed:
        return None
    raw = _raw_type(r, table, limit, scale, model, explicit, generic)
    if raw is None:
        return None
    bit = None
    if raw is RawType.BIT:
        bit = r.integer("bit", None, 0, 15, required="is required with dataType bit (0 = LSB)")
    elif "bit" in r.config:
        r.error("bit", "bit is only used with dataType bit")
    bit_table = table.is_bit
    numeric = not bit_table and (raw.is_integer or raw in (RawType.FLOAT32, RawType.FLOAT64))
    if scale != 1 and not numeric:
        r.warning("scale", f"scale {format_number(scale)} is ignored for {raw} on {table}")
        scale = 1.0
    minimum, maximum = _write_bounds(r, raw, table, limit, scale, model)
    scale_factor = _scale_factor(r, table, raw, offset, limit, options)
    missing = _missing(r, table, limit)
    if not r.ok or offset is None:
        return None
    visitor = Visitor(
        table=table,
        offset=offset,
        limit=limit,
        raw_type=raw,
        scale=scale,
        is_swap=is_swap and not bit_table,
        is_register_swap=is_register_swap and not bit_table,
        bit=bit,
        scale_factor=scale_factor,
        missing=missing,
    )
    value_type = _value_type(raw, model, generic)
    if scale_factor is not None and model.type_name is None:
        value_type = ValueType.FLOAT  # 10^e with e < 0 makes a decimal
    return PropertyRead(visitor, value_type, minimum, maximum)
