"""Modbus device ``protocol.configData``: endpoint, unit id and options.

KubeEdge leaves ``configData`` free-form, so the keys are those the Modbus mappers in
the wild read (kubeedge/examples temperature demo, kubeedge/mappers-go modbus-dmi), in
both dialects, plus edge's own options. Every value is checked and every problem names
the key's field. :class:`ConfigReader` is shared with :mod:`edge.config.kubeedge_visitor`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, overload

from edge.config.hosts import host_error
from edge.config.kubeedge_docs import (
    PROTOCOL_ALIASES,
    Config,
    Entry,
    not_milliseconds,
    to_int,
    to_number,
)
from edge.config.model import (
    Endpoint,
    Framing,
    ModbusOptions,
    SerialEndpoint,
    TcpEndpoint,
)
from edge.config.sources import Report, Where, join_field, or_list

PROTOCOL_KEYS = (
    "communicateMode", "ip", "port", "slaveID", "serialPort", "baudRate", "dataBits",
    "stopBits", "parity", "rs485Enabled", "serialType",
    "timeout", "retries", "maxRegistersPerRequest", "maxBitsPerRequest", "maxGap",
    "profile", "firmware", "sunspecChain",
)  # fmt: skip
"""Device ``protocol.configData`` keys (canonical names; ``unitID`` and ``serialName``
are accepted for ``slaveID`` and ``serialPort``)."""

_MODES = {"tcp": "TCP", "rtu": "RTU", "rtuovertcp": "RTUoverTCP"}
_PARITY = {"none": "N", "n": "N", "even": "E", "e": "E", "odd": "O", "o": "O"}
_T = TypeVar("_T")


def format_number(value: float) -> str:
    """A number as a person writes it: ``100``, ``-3276.8``, ``3.402823466e+38``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.10g}"


class ConfigReader:
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
    def integer(
        self, key: str, default: int, low: int, high: int, *, milliseconds: bool = False
    ) -> int: ...

    @overload
    def integer(
        self,
        key: str,
        default: None,
        low: int,
        high: int,
        required: str | None = None,
        *,
        milliseconds: bool = False,
    ) -> int | None: ...

    def integer(
        self,
        key: str,
        default: int | None,
        low: int,
        high: int,
        required: str | None = None,
        *,
        milliseconds: bool = False,
    ) -> int | None:
        """The integer at ``key`` in ``low..high`` (a numeric string is accepted);
        ``default`` when absent or invalid (see :attr:`failed`). With ``milliseconds``
        a value that is not an integer (e.g. ``"1s"``) is told to be milliseconds."""
        entry = self._get(key, required)
        if entry is None:
            return default
        value = to_int(entry.value)
        if value is None:
            if milliseconds:
                self.error(key, not_milliseconds(entry.key, entry.value))
            else:
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
        value = to_number(entry.value)
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


def _host(r: ConfigReader, mode: str) -> str | None:
    """The checked ``ip`` of a TCP endpoint; None when absent or invalid (reported)."""
    host = r.string("ip", required=f"is required with communicateMode {mode}")
    if host is None:
        return None
    entry = r.config["ip"]
    message = host_error(entry.key, str(entry.value))
    if message is not None:
        r.error("ip", message)
        return None
    return host


def _endpoint(r: ConfigReader) -> Endpoint | None:
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
        host = _host(r, mode)
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
    (default 1; 0 is broadcast, which cannot be polled); ``ip`` is an IPv4/IPv6
    address or an RFC 1123 host name, without port or scheme; ``rs485Enabled`` and
    ``serialType`` are accepted without effect. Edge's own: ``timeout`` (ms per request,
    1000), ``retries`` (1), ``maxRegistersPerRequest`` (1..125), ``maxBitsPerRequest``
    (1..2000), ``maxGap`` (16; 0 = no gap fill); ``profile``, ``firmware``,
    ``sunspecChain`` are read by :mod:`edge.config.kubeedge_profile`. Unknown keys are
    warnings. Returns None
    when anything is wrong (all of it reported).
    """
    r = ConfigReader(config, where, field, report)
    r.warn_unknown(PROTOCOL_KEYS, PROTOCOL_ALIASES)
    endpoint = _endpoint(r)
    unit_id = r.integer("slaveID", 1, 0, 247)
    if unit_id == 0:
        r.error(
            "slaveID",
            "unit id 0 is the broadcast address: no device answers it, so it "
            "cannot be polled; use the device's unit id 1..247",
        )
    timeout_ms = r.integer("timeout", 1000, 1, 600_000, milliseconds=True)
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
