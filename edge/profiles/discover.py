"""Discovery: probe one Modbus device and say which firmware profile describes it.

:func:`discover` asks one unit id behind one connection, in this order:

1. **SunSpec** (SunSpec Information Model, Modbus mapping; :mod:`edge.profiles.sunspec`):
   the "SunS" marker at holding register 40000, 0 or 50000 and the model chain after
   it. When found, the profile is the SunSpec one (the first profile with a
   ``sunspec`` section, ``sunspec`` when shipped); every decoded model is read
   (one request per model block of at most 125 registers) and each of its points is
   decoded with edge's codec (:mod:`edge.modbus.codec`) through the visitor the
   configuration would build: a point the device does not implement (its SunSpec
   not-implemented value, or a not-implemented scale factor) is left out of the
   DeviceModel. Model 1's Mn, Md, SN and Vr are the identification; Vr is the
   firmware text.
2. **Read Device Identification** (FC 43 / MEI 14, regular stream, code 2; MODBUS
   Application Protocol V1.1b3 §6.21): recorded and used to name the device; an
   exception answer (ILLEGAL FUNCTION: not supported) or a timeout is "not supported".
3. **Register profiles** (only without SunSpec): every profile with
   ``identification`` has its identification registers read (a Modbus exception or a
   timeout is no match) and compared with ``equals``. Exactly one matching profile is
   the device's; more than one is ambiguous (named). Then the profile's ``firmware``
   register is read and turned into a version text by its ``format`` (``decimal``:
   the integer; ``major.minor``: the register's high and low byte; ``string``: the
   text) and checked against the ``known`` ranges: a firmware outside every range (or
   not readable, or not a version) is reported, never guessed
   (:attr:`Discovery.firmware_unknown`), and no manifest is made.

:func:`manifests` renders a found device as a KubeEdge v1beta1 DeviceModel and Device
(multi-document YAML that :func:`edge.config.load.load_manifests` loads without
problem).

Addresses are 0-based protocol addresses; timeouts are seconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from edge.config.kubeedge_visitor import parse_visitor
from edge.config.model import (
    AccessMode,
    Endpoint,
    Framing,
    ModbusOptions,
    RawType,
    SerialEndpoint,
    Table,
    TcpEndpoint,
    Value,
    ValueType,
    Visitor,
)
from edge.config.sources import Report
from edge.modbus.client import Connection
from edge.modbus.codec import CodecError, decoder_for
from edge.modbus.errors import (
    ModbusConnectionError,
    ModbusError,
    ModbusExceptionError,
)
from edge.modbus.pdu import identification_text
from edge.profiles.profile import (
    Identify,
    Loaded,
    ProfileProperty,
    Register,
    applies,
    known_range,
    model_property,
    parse_version,
    shipped,
    visitor_config,
    with_properties,
)
from edge.profiles.sunspec import (
    BASE_ADDRESSES,
    MARKER,
    SUPPORTED_MODELS,
    Chain,
    SunSpecError,
    chain_properties,
    read_chain,
)

MAX_READ = 125
"""Registers per read request (Application Protocol V1.1b3 §6.3)."""
DEVICE_ID_REGULAR = 2
"""ReadDevId code 2: the regular stream (objects 0x00–0x06)."""
API = "devices.kubeedge.io/v1beta1"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 57
"""Longest device name: its DeviceModel is ``<name>-model``, at most 63 characters."""


@dataclass(frozen=True, slots=True)
class FoundProperty:
    """One DeviceModel property: its name, KubeEdge ``type`` (INT, FLOAT, STRING, …),
    ``accessMode`` and unit (None: none)."""

    name: str
    type: ValueType
    access_mode: AccessMode
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Discovery:
    """What :func:`discover` found on unit ``unit_id`` of ``endpoint``.

    ``profile`` is the profile's name (None: nothing matched, ambiguous, or the device
    did not answer); ``firmware`` the firmware version text as read (SunSpec: model 1
    ``Vr``); ``sunspec`` the SunSpec chain (every model, decoded or not);
    ``identification`` what the profile's registers say (SunSpec: Mn, Md, SN, Vr);
    ``device_identification`` the FC 43 objects by name (empty: not supported);
    ``properties`` the DeviceModel's; ``ambiguous`` the profiles that all matched;
    ``firmware_unknown`` True when the firmware is outside every known range (or
    could not be read as a version); ``probes`` one line per probe and what answered;
    ``problems`` what went wrong or was left out, for a person to read; ``answered``
    False when no request got an answer (data or an exception response).
    """

    endpoint: Endpoint
    unit_id: int
    profile: str | None = None
    firmware: str | None = None
    sunspec: Chain | None = None
    identification: Mapping[str, str] = field(default_factory=dict)
    device_identification: Mapping[str, str] = field(default_factory=dict)
    properties: tuple[FoundProperty, ...] = ()
    ambiguous: tuple[str, ...] = ()
    firmware_unknown: bool = False
    firmware_checked: bool = False
    """True when ``firmware`` was checked against the profile's known ranges (it then
    goes into the Device's configData)."""
    probes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    answered: bool = False

    @property
    def endpoint_key(self) -> str:
        """``tcp://host:port``, ``rtu+tcp://host:port`` or ``serial://port``."""
        return self.endpoint.key

    @property
    def found(self) -> bool:
        """True when a manifest can be made: one profile, its firmware known."""
        return self.profile is not None and not self.firmware_unknown


class _Probe:
    """Reads through ``conn`` with one timeout, each register range once."""

    def __init__(self, conn: Connection, unit_id: int, timeout: float) -> None:
        self.conn, self.unit_id, self.timeout = conn, unit_id, timeout
        self.probes: list[str] = []
        self.problems: list[str] = []
        self.answered = False
        """A request got an answer: data, or an exception response."""
        self._cache: dict[tuple[Table, int, int], list[int] | ModbusError] = {}

    async def words(self, table: Table, address: int, count: int) -> list[int]:
        """``count`` registers; raises the ModbusError of the read (also when cached);
        ModbusConnectionError always goes up uncached."""
        key = (table, address, count)
        cached = self._cache.get(key)
        if cached is None:
            try:
                got = await self.conn.read(self.unit_id, table, address, count,
                                           timeout=self.timeout)
                cached = [int(w) for w in got]
                self.answered = True
            except ModbusConnectionError:
                raise
            except ModbusError as e:
                self.answered = self.answered or isinstance(e, ModbusExceptionError)
                cached = e
            self._cache[key] = cached
        if isinstance(cached, ModbusError):
            raise cached
        return cached

    async def holding(self, address: int, count: int) -> Sequence[int]:
        return await self.words(Table.HOLDING_REGISTER, address, count)


_RAW_VALUE_TYPE = {RawType.FLOAT32: ValueType.FLOAT, RawType.FLOAT64: ValueType.FLOAT,
                   RawType.STRING: ValueType.STRING, RawType.BYTES: ValueType.BYTES,
                   RawType.BOOLEAN: ValueType.BOOLEAN, RawType.BIT: ValueType.BOOLEAN}


def _type_of(raw: RawType | None, scale: float | None, scale_factor: int | None,
             declared: ValueType | None) -> ValueType:
    """The DeviceModel type: the profile's, else floats and scaled points FLOAT,
    integers INT, strings STRING, bytes BYTES, booleans and bits BOOLEAN."""
    if declared is not None:
        return declared
    if scale_factor is not None or (scale is not None and float(scale) != int(scale)):
        return ValueType.FLOAT
    return _RAW_VALUE_TYPE.get(raw, ValueType.INT) if raw else ValueType.INT


def _found_property(loaded: Loaded, prop: ProfileProperty) -> FoundProperty:
    raw = prop.data_type or loaded.doc.spec.defaults.data_type
    return FoundProperty(prop.name, _type_of(raw, prop.scale, prop.scale_factor, prop.type),
                         prop.access_mode, prop.unit)


def _visitor(loaded: Loaded, index: int, report: Report) -> Visitor | None:
    """Property ``index``'s visitor as the configuration builds it (None: it does not
    parse, reported)."""
    read = parse_visitor(visitor_config(loaded, index), loaded.where, loaded.field(index),
                         report, model=model_property(loaded, index), options=ModbusOptions())
    return None if read is None else read.visitor


def _fmt_words(words: Sequence[int]) -> str:
    return " ".join(f"0x{w:04X}" for w in words)


# ---------------------------------------------------------------- SunSpec


async def _sunspec(probe: _Probe, profile: Loaded) -> dict[str, Any] | None:
    """The SunSpec part of a Discovery, or None when the device has no chain."""
    bases: dict[int, str] = {}

    async def read(address: int, count: int) -> Sequence[int]:
        """A holding-register read that notes what each base address answered."""
        try:
            words = await probe.holding(address, count)
        except ModbusError as e:
            if address in BASE_ADDRESSES and count == len(MARKER):
                bases.setdefault(address, f"{address}: {type(e).__name__}: {e}")
            raise
        if address in BASE_ADDRESSES and count == len(MARKER):
            bases.setdefault(address, f"{address}: {_fmt_words(words)}")
        return words

    try:
        chain = await read_chain(read)
    except SunSpecError as e:
        probe.probes.append(f"SunSpec: {e}")
        if "no SunSpec marker" not in str(e):
            probe.problems.append(f"SunSpec: {e}")
        return None
    before = [text for base, text in bases.items() if base != chain.base]
    probe.probes.append(
        (f"SunSpec: {'; '.join(before)}; " if before else "SunSpec: ")
        + f'marker "SunS" at {chain.base}; models '
        + ", ".join(f"{m.model_id} at {m.address}" for m in chain.models))
    decoded = set(profile.doc.spec.sunspec.models if profile.doc.spec.sunspec else ())
    usable = Chain(chain.base, tuple(m for m in chain.models
                                     if m.model_id in decoded and m.model_id in SUPPORTED_MODELS))
    for m in chain.models:
        if m not in usable.models:
            probe.problems.append(f"SunSpec model {m.model_id} at {m.address} is not decoded "
                                  f"by profile {profile.doc.name}: left out")
    if not usable.models:
        probe.problems.append(f"SunSpec chain at {chain.base} has no model profile "
                              f"{profile.doc.name} decodes: no manifest")
        return None
    image: dict[int, int] = {}
    for m in usable.models:
        end = m.address + 2 + m.length
        for start in range(m.address, end, MAX_READ):
            count = min(MAX_READ, end - start)
            try:
                image.update(enumerate(await probe.holding(start, count), start=start))
            except ModbusError as e:
                probe.problems.append(f"SunSpec model {m.model_id}: reading {count} registers "
                                      f"at {start} failed ({e}); its points are kept unchecked")
    values, found = _implemented(probe, with_properties(
        profile, chain_properties(usable), f"SunSpec chain at {chain.base}"), image)
    ident = {key: str(values[f"common.{key}"]) for key in ("Mn", "Md", "SN", "Vr")
             if f"common.{key}" in values and str(values[f"common.{key}"])}
    return {"profile": profile.doc.name, "sunspec": usable, "identification": ident,
            "firmware": ident.get("Vr"), "properties": found}


def _implemented(probe: _Probe, loaded: Loaded,
                 image: Mapping[int, int]) -> tuple[dict[str, Value], tuple[FoundProperty, ...]]:
    """The values of ``loaded``'s properties decoded from ``image`` (address → word)
    and the properties to keep: all but the not-implemented ones (a point whose
    registers were not read is kept)."""
    report = Report()
    values: dict[str, Value] = {}
    found: list[FoundProperty] = []
    left_out: list[str] = []
    for index, prop in enumerate(loaded.doc.spec.properties):
        visitor = _visitor(loaded, index, report)
        if visitor is None:
            probe.problems.append(f"SunSpec point {prop.name}: no visitor: left out")
            continue
        span = range(visitor.first, visitor.last_end)
        if all(a in image for a in span):
            try:
                values[prop.name] = decoder_for(visitor)([image[a] for a in span],
                                                         visitor.offset - visitor.first)
            except CodecError as e:
                left_out.append(prop.name)
                if "not implemented" not in str(e):
                    probe.problems.append(f"SunSpec point {prop.name}: {e}: left out")
                continue
        found.append(_found_property(loaded, prop))
    if left_out:
        probe.probes.append(f"SunSpec: {len(left_out)} point(s) not implemented, left out: "
                            + ", ".join(left_out))
    return values, tuple(found)


# ------------------------------------------------------------------ FC 43


async def _device_identification(probe: _Probe) -> dict[str, str]:
    try:
        objects = await probe.conn.read_device_identification(
            probe.unit_id, code=DEVICE_ID_REGULAR, timeout=probe.timeout)
    except ModbusConnectionError:
        raise
    except ModbusExceptionError as e:
        probe.answered = True
        probe.probes.append(f"FC 43 Read Device Identification: not supported ({e.name})")
        return {}
    except ModbusError as e:
        probe.probes.append(f"FC 43 Read Device Identification: not supported ({e})")
        return {}
    probe.answered = True
    text = identification_text(objects)
    probe.probes.append("FC 43 Read Device Identification: "
                        + (", ".join(f"{k} {v!r}" for k, v in text.items()) or "no objects"))
    return text


# --------------------------------------------------------- register profiles


async def _register_value(probe: _Probe, reg: Register) -> Value:
    """The value at ``reg`` decoded by edge's codec; raises ModbusError or CodecError."""
    visitor = reg.visitor
    words = await probe.words(visitor.table, visitor.offset, visitor.limit)
    return decoder_for(visitor)(words, 0)


def _equal(value: Value, want: float | str) -> bool:
    if isinstance(want, str):
        return isinstance(value, str) and value == want
    return not isinstance(value, (str, bool)) and value == want


async def _matches(probe: _Probe, loaded: Loaded) -> bool:
    seen = []
    for ident in loaded.doc.spec.identification:
        where = f"{ident.table} {ident.offset}"
        try:
            value = await _register_value(probe, ident)
        except ModbusConnectionError:
            raise
        except (ModbusError, CodecError) as e:
            probe.probes.append(f"profile {loaded.doc.name}: {where}: {e}: no match")
            return False
        if not _equal(value, _want(ident, value)):
            probe.probes.append(f"profile {loaded.doc.name}: {where} is {_show(value)}, "
                                f"not {' or '.join(_show(v) for v in ident.equals)}: no match")
            return False
        seen.append(f"{where} is {_show(value)}")
    probe.probes.append(f"profile {loaded.doc.name}: matches ({'; '.join(seen)})")
    return True


def _want(ident: Identify, value: Value) -> float | str:
    """The ``equals`` entry ``value`` is (or the first, for the message)."""
    return next((w for w in ident.equals if _equal(value, w)), ident.equals[0])


def _show(value: Value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} (0x{value:04X})" if value >= 0 else str(value)
    return repr(value)


def _version_text(fmt: str, value: Value) -> str:
    if fmt == "string":
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"firmware register holds {value!r}, not an integer")
    if fmt == "major.minor":
        return f"{(value >> 8) & 0xFF}.{value & 0xFF}"
    return str(value)


async def _firmware(probe: _Probe, loaded: Loaded) -> dict[str, Any]:
    """The firmware part of a Discovery for ``loaded``: ``firmware``, and
    ``firmware_checked`` or ``firmware_unknown`` (with the problem noted)."""
    doc = loaded.doc
    firmware = doc.spec.firmware
    if firmware is None:
        return {}
    where = f"{firmware.table} {firmware.offset}"
    try:
        text = _version_text(firmware.format, await _register_value(probe, firmware))
    except (ModbusError, CodecError) as e:
        if isinstance(e, ModbusConnectionError):
            raise
        probe.problems.append(f"profile {doc.name}: the firmware register {where} cannot "
                              f"be read ({e}): the firmware is not known, not guessed")
        return {"firmware_unknown": True}
    version = parse_version(text)
    known = known_range(doc, version) if version is not None else None
    if known is None:
        why = "is not a version" if version is None else "is outside every known range"
        probe.problems.append(
            f"profile {doc.name}: firmware {text} (read at {where}) {why} "
            f"({'; '.join(firmware.known)}): its register map is not guessed; write a "
            "profile for this firmware")
        return {"firmware": text, "firmware_unknown": True}
    probe.probes.append(f"profile {doc.name}: firmware {text} (at {where}) is in {known}")
    return {"firmware": text, "firmware_checked": True}


async def _register_profile(probe: _Probe, profiles: Mapping[str, Loaded],
                            named: str | None = None) -> dict[str, Any]:
    """Match the register profiles by their identification registers (``named``: the
    one the user named, matched without them when it has none); several that match
    are told apart by which one's known firmware ranges hold the firmware read."""
    candidates = [p for _, p in sorted(profiles.items()) if p.doc.spec.identification]
    matching = [p for p in candidates if await _matches(probe, p)]
    if named is not None and not profiles[named].doc.spec.identification:
        probe.probes.append(f"profile {named}: as named (it has no identification registers)")
        matching = [profiles[named]]
    elif not candidates:
        probe.probes.append("register profiles: none has identification registers")
    firmware = {p.doc.name: await _firmware(probe, p) for p in matching} if matching else {}
    if len(matching) > 1:
        known = [p for p in matching if not firmware[p.doc.name].get("firmware_unknown")]
        if len(known) == 1:
            probe.probes.append(f"profile {known[0].doc.name}: the only one of "
                                f"{', '.join(p.doc.name for p in matching)} whose firmware "
                                "ranges hold this firmware")
            matching = known
    if len(matching) != 1:
        if len(matching) > 1:
            names = ", ".join(p.doc.name for p in matching)
            probe.problems.append(f"ambiguous: profiles {names} all match; neither their "
                                  "identification registers nor their firmware ranges tell "
                                  "them apart (name one with --profile)")
        return {"ambiguous": tuple(p.doc.name for p in matching)}
    loaded = matching[0]
    doc = loaded.doc
    out: dict[str, Any] = {"profile": doc.name, **firmware[doc.name],
                           "identification": {"vendor": doc.spec.vendor, "model": doc.spec.model}}
    if out.get("firmware_unknown"):
        return out
    version = parse_version(out["firmware"]) if "firmware" in out else None
    out["properties"] = tuple(_found_property(loaded, p) for p in doc.spec.properties
                              if applies(p, version))
    return out


# ---------------------------------------------------------------- discover


async def discover(conn: Connection, unit_id: int, *, timeout: float,  # noqa: ASYNC109
                   profiles: Mapping[str, Loaded] | None = None,
                   named: str | None = None) -> Discovery:
    """Probe unit ``unit_id`` behind ``conn`` (see the module docstring); every request
    is bounded by ``timeout`` seconds. ``profiles`` (name → profile) defaults to the
    shipped ones; SunSpec is probed when one of them has a ``sunspec`` section.
    ``named`` restricts the probe to that one profile (the user knows the model: a
    profile without identification registers is then taken as named, its firmware
    still read and checked).

    Never raises for what the device answers: an unreachable endpoint is a Discovery
    without profile whose problems say so. Raises ValueError for a unit id or timeout
    the protocol does not allow, or a ``named`` profile that is not among them.
    """
    profiles = shipped() if profiles is None else profiles
    if named is not None:
        if named not in profiles:
            raise ValueError(f"profile {named!r} is not known; profiles: "
                             f"{', '.join(sorted(profiles))}")
        profiles = {named: profiles[named]}
    probe = _Probe(conn, unit_id, timeout)
    found: dict[str, Any] = {}
    try:
        sunspec = next((p for _, p in sorted(profiles.items()) if p.doc.spec.sunspec), None)
        if sunspec is not None:
            found = await _sunspec(probe, sunspec) or {}
        device_identification = await _device_identification(probe)
        if not found:
            found = await _register_profile(probe, profiles, named)
    except ModbusConnectionError as e:
        probe.problems.append(f"cannot reach {conn.endpoint.key}: {e}")
        device_identification = {}
    return Discovery(endpoint=conn.endpoint, unit_id=unit_id,
                     device_identification=device_identification,
                     probes=tuple(probe.probes), problems=tuple(probe.problems),
                     answered=probe.answered, **found)


# --------------------------------------------------------------- manifests


def default_name(discovery: Discovery) -> str:
    """A DNS-1123 label from the vendor, model and serial number found (SunSpec Mn, Md,
    SN; else FC 43 VendorName and ProductCode or ModelName; else the profile), or
    ``modbus-unit-<id>``."""
    ident, dev = discovery.identification, discovery.device_identification
    parts = [ident.get("Mn") or ident.get("vendor") or dev.get("VendorName", ""),
             ident.get("Md") or ident.get("model") or dev.get("ModelName")
             or dev.get("ProductCode", ""), ident.get("SN", "")]
    if not any(parts) and discovery.profile:
        parts = [discovery.profile]
    name = dns_label("-".join(p for p in parts if p))
    return name or f"modbus-unit-{discovery.unit_id}"


def dns_label(text: str) -> str:
    """``text`` as a DNS-1123 label of at most :data:`MAX_NAME` characters (lower case,
    runs of other characters one ``-``); "" when nothing is left."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return label[:MAX_NAME].rstrip("-")


def valid_name(name: str) -> bool:
    """True for a DNS-1123 label of at most :data:`MAX_NAME` characters."""
    return len(name) <= MAX_NAME and bool(_DNS_LABEL.match(name))


def _connection(endpoint: Endpoint) -> dict[str, Any]:
    if isinstance(endpoint, SerialEndpoint):
        return {"communicateMode": "RTU", "serialPort": endpoint.port,
                "baudRate": endpoint.baudrate, "parity": endpoint.parity,
                "dataBits": endpoint.bytesize, "stopBits": endpoint.stopbits}
    assert isinstance(endpoint, TcpEndpoint)
    mode = "RTUoverTCP" if endpoint.framing is Framing.RTU else "TCP"
    return {"communicateMode": mode, "ip": endpoint.host, "port": endpoint.port}


def summary(discovery: Discovery) -> list[str]:
    """What was found, one line each (the manifest's leading comment)."""
    d = discovery
    lines = [f"endpoint {d.endpoint_key}, unit {d.unit_id}"]
    if d.sunspec is not None:
        lines.append(f"SunSpec at {d.sunspec.base}: models "
                     + ", ".join(f"{m.model_id} at {m.address}" for m in d.sunspec.models))
    lines.append("FC 43 Read Device Identification: "
                 + (", ".join(f"{k} {v!r}" for k, v in d.device_identification.items())
                    or "not supported"))
    if d.identification:
        lines.append("identification: " + ", ".join(f"{k} {v!r}"
                                                    for k, v in d.identification.items()))
    lines.append(f"profile {d.profile or 'none'}, firmware {d.firmware or 'not read'}"
                 + ("" if d.firmware is None or d.firmware_checked
                    else " (not checked: the profile has one map for every firmware)"))
    lines.append(f"{len(d.properties)} properties")
    lines += d.problems
    return [" ".join(line.split()) for line in lines]


def manifests(discovery: Discovery, *, name: str, namespace: str = "default") -> str:
    """The DeviceModel ``<name>-model`` and the Device ``name`` (KubeEdge v1beta1) of a
    found device, as multi-document YAML behind a ``#`` comment of what was found.

    Raises:
        ValueError: the discovery found no profile, or the firmware is unknown; a
            name that is no DNS-1123 label of at most :data:`MAX_NAME` characters.
    """
    d = discovery
    if d.profile is None or d.firmware_unknown:
        raise ValueError("no manifest: " + ("; ".join(d.problems) or "no profile matched"))
    if not valid_name(name):
        raise ValueError(f"name {name!r} is not a DNS-1123 label of at most {MAX_NAME} "
                         "characters (lower case letters, digits, '-')")
    model_name = f"{name}-model"
    props = []
    for p in d.properties:
        entry: dict[str, Any] = {"name": p.name, "type": p.type.value,
                                 "accessMode": p.access_mode.value}
        if p.unit:
            entry["unit"] = p.unit
        props.append(entry)
    config: dict[str, Any] = {**_connection(d.endpoint), "slaveID": d.unit_id,
                              "profile": d.profile}
    if d.firmware is not None and d.firmware_checked:
        config["firmware"] = d.firmware
    if d.sunspec is not None:
        config["sunspecChain"] = [{"model": m.model_id, "address": m.address}
                                  for m in d.sunspec.models]
    model = {"apiVersion": API, "kind": "DeviceModel",
             "metadata": {"name": model_name, "namespace": namespace},
             "spec": {"protocol": "modbus", "properties": props}}
    device = {"apiVersion": API, "kind": "Device",
              "metadata": {"name": name, "namespace": namespace},
              "spec": {"deviceModelRef": {"name": model_name},
                       "protocol": {"protocolName": "modbus", "configData": config}}}
    comment = "".join(f"# {line}\n" for line in ["edge discover:", *summary(d)])
    return comment + yaml.safe_dump_all([model, device], sort_keys=False)
