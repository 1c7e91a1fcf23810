"""Firmware profiles: register maps per vendor, model and firmware (``firmware_profiles/``).

A profile is one YAML document ``apiVersion: gateway.edge/v1alpha1``, ``kind:
FirmwareProfile`` (the JSON Schema is ``firmware_profiles/profile.schema.json``, made
from :class:`ProfileDoc` by ``edge profiles schema``). Its ``spec`` says:

* ``vendor``, ``model``, ``description`` and ``source`` (where the map comes from);
* ``defaults`` for the properties (``register``, ``dataType``, ``isSwap``,
  ``isRegisterSwap``);
* ``properties``: each a name plus the KubeEdge visitor keys of
  :mod:`edge.config.kubeedge_visitor` (``register``, ``offset``, ``limit``,
  ``dataType``, ``scale``, ``isSwap``, ``isRegisterSwap``, ``bit``, ``scaleFactor``,
  ``missing``), the DeviceModel keys (``type``, ``unit``, ``accessMode``,
  ``minimum``, ``maximum``), a ``description``, and ``firmware``: the PEP 440
  version specifiers (``">=2.0"``) of the firmware the property exists in;
* ``identification``: registers whose values tell this model apart (discovery);
* ``firmware``: the register that holds the firmware version, how it reads as a
  version (``decimal``, ``major.minor`` from the two bytes, ``string``), and the
  ``known`` ranges (specifier sets): a version outside every one is refused, never
  guessed;
* or ``sunspec``: the SunSpec models the profile decodes; its properties come from
  the device's model chain (:mod:`edge.profiles.sunspec`).

Everything here runs where configuration is validated (the checking child), never in
the polling agent.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from edge.config.kubeedge_docs import Config, Entry, ModelProperty, validate_shape
from edge.config.kubeedge_visitor import parse_visitor
from edge.config.model import AccessMode, ModbusOptions, RawType, Table, ValueType, Visitor
from edge.config.sources import Report, Where, join_field, read_yaml_documents

API_VERSION = "gateway.edge/v1alpha1"
KIND = "FirmwareProfile"
SHIPPED = Path(__file__).resolve().parents[2] / "firmware_profiles"
"""The profiles shipped with edge."""
SCHEMA_FILE = "profile.schema.json"


class _Shape(BaseModel):
    """Profiles are edge's own format: unknown keys are errors, keys are camelCase."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


def _specifiers(text: str) -> str:
    try:
        SpecifierSet(text)
    except InvalidSpecifier:
        raise ValueError("must be PEP 440 version specifiers, e.g. '>=2.0,<3'") from None
    if not text.strip():
        raise ValueError("a firmware range must not be empty")
    return text


class Register(_Shape):
    """A register read by discovery: ``limit`` registers of ``register`` at ``offset``."""

    table: Table = Field(alias="register")
    offset: StrictInt = Field(ge=0, le=65535)
    data_type: RawType = RawType.UINT16
    limit: StrictInt | None = Field(default=None, ge=1, le=125)
    is_swap: StrictBool = False
    is_register_swap: StrictBool = False

    @property
    def visitor(self) -> Visitor:
        """How the codec reads it (``limit`` from a fixed-width ``dataType`` when not
        given)."""
        limit = self.limit or self.data_type.register_count or 1
        return Visitor(self.table, self.offset, limit, self.data_type, is_swap=self.is_swap,
                       is_register_swap=self.is_register_swap)


class Identify(Register):
    """This model answers one of ``equals`` at the register."""

    equals: list[StrictInt | StrictFloat | StrictStr] = Field(min_length=1)


class Firmware(Register):
    """The firmware version register, how its value reads as a version, and the ranges
    of firmware this profile knows."""

    format: Literal["decimal", "major.minor", "string"] = "decimal"
    known: list[str] = Field(min_length=1)

    @field_validator("known")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        return [_specifiers(v) for v in value]


class ProfileProperty(_Shape):
    """One property: a visitor and the DeviceModel facts (see the module docstring)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    table: Table | None = Field(default=None, alias="register")
    offset: StrictInt = Field(ge=0, le=65535)
    limit: StrictInt | None = Field(default=None, ge=1, le=125)
    data_type: RawType | None = None
    scale: StrictInt | StrictFloat | None = None
    is_swap: StrictBool | None = None
    is_register_swap: StrictBool | None = None
    bit: StrictInt | None = Field(default=None, ge=0, le=15)
    scale_factor: StrictInt | None = Field(default=None, ge=0, le=65535)
    missing: StrictInt | None = Field(default=None, ge=0)
    type: ValueType | None = None
    unit: str | None = None
    access_mode: AccessMode = AccessMode.READ_ONLY
    minimum: StrictInt | StrictFloat | None = None
    maximum: StrictInt | StrictFloat | None = None
    description: str = ""
    firmware: str | None = None

    @field_validator("firmware")
    @classmethod
    def _range(cls, value: str | None) -> str | None:
        return None if value is None else _specifiers(value)


class Defaults(_Shape):
    """Visitor keys every property has unless it says otherwise."""

    table: Table | None = Field(default=None, alias="register")
    data_type: RawType | None = None
    is_swap: StrictBool | None = None
    is_register_swap: StrictBool | None = None


class SunSpecModels(_Shape):
    """The SunSpec model ids the profile decodes (definitions from pysunspec2)."""

    models: list[StrictInt] = Field(min_length=1)


class ProfileSpec(_Shape):
    vendor: str = Field(min_length=1)
    model: str = Field(min_length=1)
    description: str = ""
    source: str = Field(min_length=1)
    defaults: Defaults = Defaults()
    identification: list[Identify] = Field(default_factory=list)
    firmware: Firmware | None = None
    properties: list[ProfileProperty] = Field(default_factory=list)
    sunspec: SunSpecModels | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ProfileSpec:
        if bool(self.properties) == bool(self.sunspec):
            raise ValueError("a profile has either properties or sunspec models, not both "
                             "or neither")
        names = [p.name for p in self.properties]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"property names must be unique; twice: {', '.join(twice)}")
        ranged = [p.name for p in self.properties if p.firmware]
        if ranged and self.firmware is None:
            raise ValueError(f"properties {', '.join(ranged)} name a firmware range, but the "
                             "profile has no firmware section saying how to read the version")
        return self


class ProfileMetadata(_Shape):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

    @field_validator("name", mode="before")
    @classmethod
    def _label(cls, value: object) -> object:
        if isinstance(value, str) and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
                                                       value):
            raise ValueError("must be a DNS-1123 label: at most 63 lowercase letters, digits "
                             "and '-', starting and ending with a letter or digit (e.g. "
                             "acme-th100)")
        return value


class ProfileDoc(_Shape):
    """One firmware profile document."""

    api_version: Literal["gateway.edge/v1alpha1"]
    kind: Literal["FirmwareProfile"]
    metadata: ProfileMetadata
    spec: ProfileSpec

    @property
    def name(self) -> str:
        return self.metadata.name


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a profile document, as committed in
    ``firmware_profiles/profile.schema.json``."""
    schema = ProfileDoc.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edge.gateway/schemas/firmware-profile.json"
    return schema


class Loaded:
    """A profile read from ``file``: the document and where to report against it."""

    __slots__ = ("doc", "file", "where")

    def __init__(self, doc: ProfileDoc, file: str) -> None:
        self.doc = doc
        self.file = file
        self.where = Where(file, 1, f"FirmwareProfile {doc.name}")

    def field(self, index: int, *keys: str | int) -> str:
        return join_field("spec", "properties", index, *keys)


def with_properties(profile: Loaded, properties: Sequence[dict[str, object]],
                    obj: str) -> Loaded:
    """``profile`` with ``properties`` (profile property mappings, e.g. a SunSpec chain's
    from :func:`edge.profiles.sunspec.chain_properties`) in place of its own; problems
    with them are reported against ``obj`` (the Device they were made for).

    Raises:
        pydantic.ValidationError: a property mapping is not a profile property.
    """
    spec = profile.doc.spec.model_copy(update={
        "properties": [ProfileProperty.model_validate(p) for p in properties],
        "sunspec": None})
    loaded = Loaded(profile.doc.model_copy(update={"spec": spec}), profile.file)
    loaded.where = Where(profile.file, 1, obj)
    return loaded


def visitor_config(profile: Loaded, index: int) -> Config:
    """The visitor ``configData`` entries of property ``index`` (defaults filled in;
    ``limit`` from a fixed-width ``dataType`` when not given), each pointing at its
    place in the profile file."""
    prop = profile.doc.spec.properties[index]
    defaults = profile.doc.spec.defaults.model_dump(mode="json", by_alias=True,
                                                     exclude_none=True)
    own = prop.model_dump(mode="json", by_alias=True, exclude_none=True, include={
        "table", "offset", "limit", "data_type", "scale", "is_swap", "is_register_swap",
        "bit", "scale_factor", "missing"})
    config: Config = {}
    for key, value in {**defaults, **own}.items():
        field = profile.field(index, key) if key in own else join_field("spec", "defaults", key)
        config[key] = Entry(key, value, profile.where, field)
    raw = prop.data_type or profile.doc.spec.defaults.data_type
    count = raw.register_count if raw else None
    if "limit" not in config and count is not None:
        config["limit"] = Entry("limit", count, profile.where, profile.field(index, "dataType"))
    return config


def model_property(profile: Loaded, index: int) -> ModelProperty:
    """Property ``index`` as a DeviceModel property whose visitor is the profile's."""
    prop = profile.doc.spec.properties[index]
    field = profile.field(index)
    return ModelProperty(
        name=prop.name, where=profile.where, field=field,
        type_name=prop.type.value if prop.type else None, access_mode=prop.access_mode,
        minimum=None, maximum=None, unit=prop.unit,
        visitor=visitor_config(profile, index), visitor_field=field,
    )


def check_profile(profile: Loaded, report: Report) -> None:
    """Every property's visitor as the agent would read it (offsets, types, limits,
    scale factor), and the identification and firmware registers as discovery reads
    them (extent, type, ``equals`` values the type can hold, a ``format`` that fits
    the type): problems name the profile file and the field."""
    for index in range(len(profile.doc.spec.properties)):
        parse_visitor(visitor_config(profile, index), profile.where, profile.field(index),
                      report, model=model_property(profile, index), options=ModbusOptions())
    spec = profile.doc.spec
    for index, ident in enumerate(spec.identification):
        field = join_field("spec", "identification", index)
        if _check_register(profile, ident, field, report):
            for j, want in enumerate(ident.equals):
                problem = _never_read(ident.data_type, want)
                if problem:
                    report.error(profile.where, join_field(field, "equals", j), problem)
    if spec.firmware is not None and _check_register(profile, spec.firmware,
                                                     join_field("spec", "firmware"), report):
        fits = _FORMAT_TYPES[spec.firmware.format]
        if spec.firmware.data_type not in fits:
            report.error(profile.where, join_field("spec", "firmware", "format"), (
                f"format {spec.firmware.format} reads {' or '.join(fits)}, not "
                f"{spec.firmware.data_type}"))


_FORMAT_TYPES: dict[str, tuple[RawType, ...]] = {
    "major.minor": (RawType.UINT16,),
    "decimal": (RawType.UINT16, RawType.UINT32, RawType.UINT64),
    "string": (RawType.STRING,),
}
"""The raw types each firmware ``format`` reads (major.minor: the two bytes of one
register; a wider register would lose a word)."""


def _check_register(profile: Loaded, reg: Register, field: str, report: Report) -> bool:
    """``reg`` checked as a visitor (extent, type, limit); False when it is wrong."""
    raw = reg.data_type
    if raw.register_count is None and reg.limit is None:
        report.error(profile.where, join_field(field, "limit"),
                     f"a {raw} register needs limit (how many registers it spans)")
        return False
    values = {"register": reg.table.value, "offset": reg.offset, "dataType": raw.value,
              "limit": reg.limit or raw.register_count, "isSwap": reg.is_swap,
              "isRegisterSwap": reg.is_register_swap}
    config = {key: Entry(key, value, profile.where, join_field(field, key))
              for key, value in values.items()}
    model = ModelProperty(name=field, where=profile.where, field=field, type_name=None,
                          access_mode=AccessMode.READ_ONLY, minimum=None, maximum=None,
                          unit=None, visitor=config, visitor_field=field)
    read = parse_visitor(config, profile.where, field, report, model=model,
                         options=ModbusOptions())
    if read is not None and read.visitor.table.is_bit:
        report.error(profile.where, join_field(field, "register"),
                     "identification and firmware are read from registers, not bits")
        return False
    return read is not None


def _never_read(raw: RawType, want: float | str) -> str | None:
    """Why ``want`` can never be what a ``raw`` register reads, or None."""
    if raw.is_integer and raw.bits:
        lo, hi = (-(1 << raw.bits - 1), (1 << raw.bits - 1) - 1) if raw.signed else (
            0, (1 << raw.bits) - 1)
        if isinstance(want, int) and lo <= want <= hi:
            return None
        return f"{want!r} can never be read from {raw}: give an integer {lo}..{hi}"
    if raw in (RawType.FLOAT32, RawType.FLOAT64):
        return None if isinstance(want, (int, float)) else (
            f"{want!r} can never be read from {raw}: give a number")
    if raw is RawType.STRING:
        return None if isinstance(want, str) else (
            f"{want!r} can never be read from a string register: give the text")
    return f"identification by a {raw} register is not supported: use an integer, float or string"


def read_profile(path: Path, report: Report) -> Loaded | None:
    """The profile in ``path`` (one YAML document), checked; None when anything is wrong
    (reported against the file)."""
    documents = read_yaml_documents(path, report)
    if len(documents) != 1:
        if documents or not report.has_errors:
            report.error(Where(str(path)), "", f"a profile file holds one document, "
                         f"found {len(documents)}")
        return None
    doc = validate_shape(ProfileDoc, documents[0].data, Where(str(path), 1), "", report)
    if doc is None:
        return None
    loaded = Loaded(doc, str(path))
    check_profile(loaded, report)
    return loaded


def read_profiles(dirs: Iterable[Path], report: Report) -> dict[str, Loaded]:
    """Every ``*.yaml`` / ``*.yml`` profile under ``dirs`` (recursively, sorted) by
    name; the same name again (in a later file) is an error against that file."""
    found: dict[str, Loaded] = {}
    for directory in dirs:
        for path in sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml")):
            loaded = read_profile(path, report)
            if loaded is None:
                continue
            first = found.setdefault(loaded.doc.name, loaded)
            if first is not loaded:
                report.error(loaded.where, "metadata.name",
                             f"profile {loaded.doc.name} is also defined in {first.file}")
    return found


def with_local(dirs: Sequence[Path], report: Report) -> dict[str, Loaded] | None:
    """The shipped profiles and those of ``dirs`` (one name once: a local profile with
    a shipped one's name is an error against the local file), or None (the shipped
    ones) when ``dirs`` is empty."""
    return read_profiles([SHIPPED, *dirs], report) if dirs else None


@functools.cache
def shipped() -> dict[str, Loaded]:
    """The shipped profiles (read once per process).

    Raises:
        ValueError: a shipped profile does not load (a packaging fault).
    """
    report = Report()
    profiles = read_profiles([SHIPPED], report)
    if report.has_errors:
        raise ValueError("; ".join(str(p) for p in report.problems))
    return profiles


def parse_version(text: str) -> Version | None:
    """``text`` as a PEP 440 version (``2.01``, ``v1.2.3``); None when it is not one."""
    try:
        return Version(text.strip())
    except InvalidVersion:
        return None


def known_range(profile: ProfileDoc, version: Version) -> str | None:
    """The ``firmware.known`` range ``version`` is in, or None."""
    firmware = profile.spec.firmware
    for text in firmware.known if firmware else ():
        if SpecifierSet(text).contains(version, prereleases=True):
            return text
    return None


def applies(prop: ProfileProperty, version: Version | None) -> bool:
    """True when ``prop`` exists in firmware ``version`` (None: the firmware is not
    known, so only properties of every firmware apply)."""
    if prop.firmware is None:
        return True
    return version is not None and SpecifierSet(prop.firmware).contains(version,
                                                                        prereleases=True)


def firmware_dependent(profile: ProfileDoc) -> Sequence[str]:
    """The names of the properties that exist only in some firmware."""
    return [p.name for p in profile.spec.properties if p.firmware]
