"""SunSpec devices: discover the model chain, turn it into profile properties.

Source: the SunSpec Information Model specification (Modbus mapping: the "SunS"
marker at a base address, then models of ``ID``, ``L`` and ``L`` registers of points,
ended by ID 0xFFFF with L 0; "not implemented" values per point type) and the
official model definitions as JSON shipped by the ``pysunspec2`` package
(``sunspec2/models/json/model_<id>.json``; the values of ``sunspec2/mb.py``
``SUNS_UNIMPL_*``). Only the JSON files are read; edge decodes with its own codec,
not with pysunspec2's Modbus client or device classes.

Addresses are 0-based protocol addresses of holding registers; a point's ``offset``
counts from its model's ID register (ID is 0, L is 1). A profile property is the
mapping the firmware-profile YAML holds (``name``, ``register``, ``offset``,
``limit``, ``dataType``, ``scaleFactor``/``scale``, ``missing``, ``unit``,
``description``, ``accessMode``).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from importlib import resources
from typing import Any

SUPPORTED_MODELS = (1, 101, 102, 103, 111, 112, 113, 201, 202, 203, 204)
"""Common, inverters (int+sf and float), AC meters; models edge decodes."""
BASE_ADDRESSES = (40000, 0, 50000)
"""Where the "SunS" marker is looked for, in this order."""
MARKER = (0x5375, 0x6E53)
"""The two words "SunS" at the base address."""
END_MODEL_ID = 0xFFFF
MAX_MODELS = 64
"""A chain longer than this is taken for garbage (no end marker)."""

Read = Callable[[int, int], Awaitable[Sequence[int]]]
"""``read(address, count)``: ``count`` (≤ 125) holding registers from ``address``;
raises on a Modbus exception or timeout."""


class SunSpecError(ValueError):
    """A SunSpec model that cannot be used, or a device whose chain cannot be read;
    the message names the model id and/or address and what was found."""


@dataclass(frozen=True, slots=True)
class Point:
    """One point of a model: ``size`` registers at ``offset`` (ID at 0). ``sf`` names
    the sunssf point scaling it, or is a fixed exponent, or None. ``access`` is the
    SunSpec "R" or "RW"; ``symbols`` are the (name, value) pairs of enums/bitfields."""

    name: str
    type: str
    size: int
    offset: int
    sf: str | int | None
    units: str | None
    label: str | None
    access: str
    mandatory: bool
    symbols: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelDefinition:
    """A model without repeating groups: group ``name`` (e.g. "inverter_three_phase"),
    ``length`` L (registers after ID and L), its points in register order."""

    id: int
    name: str
    label: str
    length: int
    points: tuple[Point, ...]

    def point(self, name: str) -> Point:
        """The point called ``name``; KeyError if there is none."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"model {self.id} has no point {name!r}")


@dataclass(frozen=True, slots=True)
class ChainModel:
    """A model found on a device: its id, the address of its ID register, its L."""

    model_id: int
    address: int
    length: int


@dataclass(frozen=True, slots=True)
class Chain:
    """The models after the marker at ``base``, in device order (end marker left out)."""

    base: int
    models: tuple[ChainModel, ...]


@cache
def _model_json(model_id: int) -> dict[str, Any]:
    path = resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    if not path.is_file():
        raise SunSpecError(f"SunSpec model {model_id}: pysunspec2 has no definition for it")
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


@cache
def model_definition(model_id: int) -> ModelDefinition:
    """The definition of SunSpec model ``model_id`` from pysunspec2's JSON (cached).

    Raises:
        SunSpecError: pysunspec2 has no definition for the id, or the model has
            repeating groups (out of scope).
    """
    group = _model_json(model_id)["group"]
    if group.get("groups"):
        raise SunSpecError(f"SunSpec model {model_id} ({group['name']}) has repeating "
                           "groups, which edge does not support")
    points, offset = [], 0
    for p in group["points"]:
        symbols = tuple((str(s["name"]), int(s["value"])) for s in p.get("symbols", ()))
        points.append(Point(p["name"], p["type"], int(p["size"]), offset, p.get("sf"),
                            p.get("units"), p.get("label"), p.get("access", "R"),
                            p.get("mandatory") == "M", symbols))
        offset += int(p["size"])
    return ModelDefinition(model_id, group["name"], group.get("label", group["name"]),
                           offset - 2, tuple(points))


async def read_chain(read: Read) -> Chain:
    """Find the marker at each of :data:`BASE_ADDRESSES` in turn (a failing read or
    other words: the next base), then walk the models up to the end marker.

    Raises:
        SunSpecError: no marker at any base (the message says what each answered);
            a supported model whose L is not its definition's; a read failing
            within the chain; the chain running past address 65535 or beyond
            :data:`MAX_MODELS` models.
    """
    answers = []
    for base in BASE_ADDRESSES:
        try:
            words = tuple(await read(base, 2))
        except Exception as exc:
            answers.append(f"{base}: {type(exc).__name__}: {exc}")
            continue
        if words == MARKER:
            return await _walk(read, base)
        answers.append(f"{base}: " + " ".join(f"0x{w:04X}" for w in words))
    raise SunSpecError('no SunSpec marker "SunS" (0x5375 0x6E53) at any base address; '
                       + "; ".join(answers))


async def _walk(read: Read, base: int) -> Chain:
    models: list[ChainModel] = []
    address = base + 2
    while True:
        if address + 2 > 0x10000:
            raise SunSpecError(f"SunSpec chain at base {base} runs past address 65535 "
                               f"(next model at {address}) without the end marker")
        if len(models) >= MAX_MODELS:
            raise SunSpecError(f"SunSpec chain at base {base} has more than {MAX_MODELS} "
                               f"models without the end marker (next at {address})")
        try:
            model_id, length = (await read(address, 2))[:2]
        except Exception as exc:
            raise SunSpecError(f"SunSpec chain at base {base}: reading the model header "
                               f"at {address} failed: {type(exc).__name__}: {exc}") from exc
        if model_id == END_MODEL_ID:
            return Chain(base, tuple(models))
        if model_id in SUPPORTED_MODELS:
            expected = model_definition(model_id).length
            if length != expected:
                raise SunSpecError(f"SunSpec model {model_id} at address {address}: "
                                   f"L is {length}, its definition has {expected}")
        models.append(ChainModel(model_id, address, length))
        address += 2 + length


_RAW_TYPE = {
    "int16": "int16", "uint16": "uint16", "count": "uint16", "enum16": "uint16",
    "bitfield16": "uint16", "acc16": "uint16", "int32": "int32", "uint32": "uint32",
    "acc32": "uint32", "enum32": "uint32", "bitfield32": "uint32", "ipaddr": "uint32",
    "int64": "int64", "uint64": "uint64", "acc64": "uint64", "float32": "float32",
    "float64": "float64", "string": "string", "eui48": "bytes", "ipv6addr": "bytes",
}
_BYTES_LIMIT = {"eui48": 4, "ipv6addr": 8}
# sunspec2/mb.py SUNS_UNIMPL_*, as the registers carry them (first register most
# significant); strings have none (all NUL decodes to "").
MISSING = {
    "int16": 0x8000, "uint16": 0xFFFF, "count": 0xFFFF, "acc16": 0, "enum16": 0xFFFF,
    "bitfield16": 0xFFFF, "int32": 0x8000_0000, "uint32": 0xFFFF_FFFF, "acc32": 0,
    "enum32": 0xFFFF_FFFF, "bitfield32": 0xFFFF_FFFF, "ipaddr": 0,
    "int64": 0x8000_0000_0000_0000, "uint64": 0xFFFF_FFFF_FFFF_FFFF, "acc64": 0,
    "ipv6addr": 0, "float32": 0x7FC0_0000, "float64": 0x7FF8_0000_0000_0000,
    "eui48": 0xFFFF_FFFF_FFFF, "sunssf": 0x8000,
}
_SKIPPED = ("pad", "sunssf")


def chain_properties(chain: Chain) -> list[dict[str, object]]:
    """Profile properties of every supported model of ``chain`` (others left out).

    Names are ``"{group}.{point}"``; a model seen again gets ``_2``, ``_3``… on its
    group name. ID, L, pad and sunssf points are left out; ``scaleFactor`` is the
    absolute address of the point's sunssf register (a fixed exponent becomes
    ``scale: 10**sf``).
    """
    props: list[dict[str, object]] = []
    seen: dict[int, int] = {}
    for cm in chain.models:
        if cm.model_id not in SUPPORTED_MODELS:
            continue
        seen[cm.model_id] = seen.get(cm.model_id, 0) + 1
        d = model_definition(cm.model_id)
        group = d.name if seen[cm.model_id] == 1 else f"{d.name}_{seen[cm.model_id]}"
        for p in d.points[2:]:
            if p.type in _SKIPPED:
                continue
            prop: dict[str, object] = {
                "name": f"{group}.{p.name}", "register": "HoldingRegister",
                "offset": cm.address + p.offset, "dataType": _RAW_TYPE[p.type],
            }
            if p.type == "string":
                prop["limit"] = p.size
            elif p.type in _BYTES_LIMIT:
                prop["limit"] = _BYTES_LIMIT[p.type]
            if isinstance(p.sf, str):
                prop["scaleFactor"] = cm.address + d.point(p.sf).offset
            elif isinstance(p.sf, int):
                prop["scale"] = 10**p.sf
            if p.type in MISSING:
                prop["missing"] = MISSING[p.type]
            if p.units:
                prop["unit"] = p.units
            prop["description"] = p.label or p.name
            prop["accessMode"] = "ReadWrite" if p.access == "RW" else "ReadOnly"
            props.append(prop)
    return props


# --- the simulator's image -------------------------------------------------------

_SF_PREFERRED = {"V": -1, "A": -2, "Hz": -2, "W": -1, "VA": -1, "var": -1, "Pct": -1,
                 "C": -1, "Wh": 0, "VAh": 0, "varh": 0}
_LINE_TO_LINE = re.compile(r"^(PPV|PhVph(AB|BC|CA))")
_INT_RANGE = {"int16": (-(1 << 15), 1 << 15), "int32": (-(1 << 31), 1 << 31),
              "int64": (-(1 << 63), 1 << 63)}


def _hash(seed: str, group: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}|{group}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


_RANGES: dict[str, tuple[Fraction | int, Fraction | int]] = {
    "Hz": (Fraction(4995, 100), Fraction(1, 10)), "A": (1, 14), "C": (20, 40),
    "W": (200, 2800), "VA": (200, 2800), "var": (-1000, 950),
    "Wh": (100_000, 9_000_000), "VAh": (100_000, 9_000_000), "varh": (10_000, 900_000)}
"""(low, span) of simulated values per SunSpec unit; V and Pct depend on the point."""


def _physical(p: Point, h: int) -> Fraction | None:
    """A plausible value of a measured point in its units (3 decimals), else None."""
    low: Fraction | int
    span: Fraction | int
    if p.units == "V":
        low, span = ((395, 10) if _LINE_TO_LINE.match(p.name)
                     else (350, 300) if p.name.startswith("DC") else (227, 6))
    elif p.units == "Pct":  # power factor in percent, leading (negative) on odd hashes
        low, span = (80, 19) if h & 1 == 0 else (-99, 19)
    elif p.units in _RANGES:
        low, span = _RANGES[p.units]
    else:
        return None
    return Fraction(round((low + span * Fraction(h % 10_000, 10_000)) * 1000), 1000)


def _fits(p: Point, raw: int) -> bool:
    lo, hi = _INT_RANGE.get(_RAW_TYPE[p.type], (0, 1 << (16 * p.size)))
    return lo <= raw < hi and raw & ((1 << (16 * p.size)) - 1) != MISSING.get(p.type)


def _raw_words(p: Point, raw: int) -> list[int]:
    unsigned = raw & ((1 << (16 * p.size)) - 1)
    return [(unsigned >> (16 * (p.size - 1 - i))) & 0xFFFF for i in range(p.size)]


def chain_image(models: Sequence[int], *, base: int = 40000,
                seed: str = "") -> tuple[Chain, dict[int, int]]:
    """A simulated device: the marker at ``base``, ``models`` (supported ids) in order,
    the end marker; returns its chain and register image (address → word).

    Values are deterministic in ``seed`` and the point names: voltages near 230 V
    (400 V line to line), 50 Hz, currents of a few A, powers of hundreds to thousands
    of W, reactive power and some power factors negative, energies of 10⁵–10⁷ Wh,
    enums one of their symbols, bitfields 0 or one bit; each sunssf register between
    -3 and 0 so that every point it scales fits its type. Model 1: Mn "edge", Md
    ``seed`` or "simulated", Vr "1.0.0", SN from ``seed``, DA 1.

    Raises:
        SunSpecError: a model edge does not decode, or not 1 to MAX_MODELS models.
    """
    if not 1 <= len(models) <= MAX_MODELS:
        raise SunSpecError(f"a SunSpec chain holds 1 to {MAX_MODELS} models, not {len(models)}")
    image = {base: MARKER[0], base + 1: MARKER[1]}
    chain: list[ChainModel] = []
    address = base + 2
    for model_id in models:
        if model_id not in SUPPORTED_MODELS:
            raise SunSpecError(f"SunSpec model {model_id} is not supported by edge; it decodes "
                               f"{', '.join(map(str, SUPPORTED_MODELS))}")
        d = model_definition(model_id)
        chain.append(ChainModel(model_id, address, d.length))
        for a, w in zip(range(address, address + 2 + d.length),
                        _model_words(d, seed, len(chain)), strict=True):
            image[a] = w
        address += 2 + d.length
    if address + 2 > 0x10000:
        raise SunSpecError(f"SunSpec models {list(models)} at base {base} pass address 65535")
    image[address], image[address + 1] = END_MODEL_ID, 0
    return Chain(base, tuple(chain)), image


def _exponents(d: ModelDefinition, seed: str, group: str,
               values: dict[str, Fraction | None]) -> dict[str, int]:
    """Each sunssf point's exponent: the unit's usual one (or one less, by the seed),
    raised towards 0 until every point it scales fits its type."""
    exps: dict[str, int] = {}
    for sfp in (p for p in d.points if p.type == "sunssf"):
        users = [(p, v) for p in d.points if p.sf == sfp.name
                 if (v := values[p.name]) is not None]
        units = users[0][0].units if users else None
        e = max(-3, _SF_PREFERRED.get(units or "", 0) - _hash(seed, group, sfp.name) % 2)
        while e < 0 and not all(_fits(p, round(v / Fraction(10) ** e)) for p, v in users):
            e += 1
        exps[sfp.name] = e
    return exps


def _model_words(d: ModelDefinition, seed: str, index: int) -> list[int]:
    group = f"{d.name}#{index}"
    values = {p.name: _physical(p, _hash(seed, group, p.name)) for p in d.points}
    exps = _exponents(d, seed, group, values)
    strings = {"Mn": "edge", "Md": seed or "simulated", "Vr": "1.0.0",
               "SN": "SIM" + hashlib.sha256(seed.encode()).hexdigest()[:9].upper()}
    fixed = {"ID": d.id, "L": d.length, "DA": 1}
    words: list[int] = []
    for p in d.points:
        h = _hash(seed, group, p.name)
        value = values[p.name]
        if p.type == "string":
            data = strings.get(p.name, "").encode()[: 2 * p.size].ljust(2 * p.size, b"\0")
            words += struct.unpack(f">{p.size}H", data)
        elif p.type in ("float32", "float64"):
            fmt = ">f" if p.type == "float32" else ">d"
            data = struct.pack(fmt, float(value if value is not None else h % 100))
            words += struct.unpack(f">{p.size}H", data)
        else:
            words += _raw_words(p, _integer_raw(p, value, exps, h, fixed))
    return words


def _integer_raw(p: Point, value: Fraction | None, exps: dict[str, int], h: int,
                 fixed: dict[str, int]) -> int:
    if p.name in fixed or p.type in ("sunssf", "pad"):
        return fixed.get(p.name, exps.get(p.name, 0))
    if value is not None:
        e = exps.get(p.sf, 0) if isinstance(p.sf, str) else p.sf or 0
        return round(value / Fraction(10) ** e)
    if p.symbols and p.type.startswith("enum"):
        return p.symbols[h % len(p.symbols)][1]
    if p.type.startswith("bitfield"):
        return (1 << (h % 4)) if h & 0x10 else 0
    return 1 + h % 99


def _shortest_float32(x: float) -> float:
    packed = struct.pack(">f", x)
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return x


def expected_values(chain: Chain, image: dict[int, int]) -> dict[str, int | float | str]:
    """What a correct agent publishes for ``chain_properties(chain)`` read from
    ``image`` (absent addresses read 0), decoded with plain ``struct`` and exact
    decimal scaling (raw × 10^e as a fraction, rounded once to float; int when
    e ≥ 0). Points whose raw value is their "missing" value, or whose sunssf is
    not implemented (0x8000), are left out. Float32 values are the shortest decimal
    that round-trips; strings are UTF-8 with trailing NUL and spaces stripped;
    bytes lowercase hex.
    """
    out: dict[str, int | float | str] = {}
    codes = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q",
             "uint64": "Q", "float32": "f", "float64": "d"}
    for prop in chain_properties(chain):
        kind = str(prop["dataType"])
        offset = int(str(prop["offset"]))
        count = int(str(prop.get("limit", struct.calcsize(codes.get(kind, "H")) // 2)))
        data = struct.pack(f">{count}H", *(image.get(a, 0) for a in range(offset,
                                                                           offset + count)))
        if "missing" in prop and int.from_bytes(data, "big") == prop["missing"]:
            continue
        name = str(prop["name"])
        if kind == "string":
            out[name] = data.decode("utf-8", errors="replace").rstrip("\0 ")
            continue
        if kind == "bytes":
            out[name] = data.hex()
            continue
        scale = Fraction(1)
        if "scaleFactor" in prop:
            sf_word = image.get(int(str(prop["scaleFactor"])), 0)
            e = sf_word - 0x10000 if sf_word & 0x8000 else sf_word
            if e == -32768:
                continue
            scale = Fraction(10) ** e
        elif "scale" in prop:
            scale = Fraction(str(prop["scale"]))
        (raw,) = struct.unpack(">" + codes[kind], data)
        if kind in ("float32", "float64"):
            value = _shortest_float32(raw) if kind == "float32" else raw
            out[name] = value if scale == 1 else float(f"{value * float(scale):.15g}")
        else:
            exact = raw * scale
            out[name] = exact.numerator if exact.denominator == 1 else float(exact)
    return out
