"""KubeEdge ``devices.kubeedge.io`` objects in one shape for every API version.

:mod:`edge.config.kubeedge_v1beta1` (≤1.22 layout with ``status.twins``, 1.23 layout
with a separate DeviceStatus) and :mod:`edge.config.kubeedge_v1alpha2` (typed protocol
blocks, ``propertyVisitors``, typed model properties) read documents into the
:class:`ModelDoc` and :class:`DeviceDoc` defined here. The free-form ``configData``
stays a :data:`Config` of :class:`Entry` values that remember where each key was
written, so that :mod:`edge.config.kubeedge_modbus` and
:mod:`edge.config.kubeedge_visitor` can check it and name the exact field.

Also here: the pydantic base of the document shapes (extra keys allowed, as on any
Kubernetes object) and the protocol-independent checks shared by both versions
(metadata and its names, duplicate names in one object, cycles, model property
bounds). Field names follow the CRDs in kubeedge/kubeedge ``build/crds/devices``
(DESIGN.md §3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from edge.config.model import AccessMode, MqttPush
from edge.config.sources import Report, Where, join_field

GROUP = "devices.kubeedge.io"
"""The KubeEdge device API group."""
VERSIONS = ("v1beta1", "v1alpha2")
"""Accepted versions of :data:`GROUP`, the storage version first."""
DEFAULT_CYCLE_MS = 1000
"""``collectCycle``/``reportCycle`` when absent or 0 (as the KubeEdge mapper framework)."""
_ONE_DAY_MS = 86_400_000
_SHORTEST_LIKELY_CYCLE_MS = 10
MODEL_TYPES = ("INT", "FLOAT", "DOUBLE", "STRING", "BOOLEAN", "BYTES", "STREAM")
"""DeviceModel property types (v1beta1 ``type``; v1alpha2 ``type.<lower-case name>``)."""
PROTOCOL_ALIASES = {"unitID": "slaveID", "serialName": "serialPort"}
"""Protocol ``configData`` keys written two ways in the wild → the canonical key."""
_INTEGER = re.compile(r"[+-]?\d+")
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


@dataclass(frozen=True, slots=True)
class Entry:
    """One ``configData`` value: the key as written, the value, and its full field path."""

    key: str
    value: object
    where: Where
    field: str


Config = dict[str, Entry]
"""A ``configData`` block by canonical key (``unitID`` → ``slaveID``,
``serialName`` → ``serialPort``); a model's block merged with a device's is one too."""


@dataclass(frozen=True, slots=True)
class Bound:
    """A write bound (a model's ``minimum``/``maximum`` or a visitor's ``min``/``max``)."""

    value: float
    key: str
    where: Where
    field: str


@dataclass(frozen=True, slots=True)
class ModelProperty:
    """A DeviceModel property at ``field`` of ``where``. ``type_name`` is the upper-case
    KubeEdge type or None; ``visitor`` the model's default visitor ``configData``
    (v1beta1 only) or None."""

    name: str
    where: Where
    field: str
    type_name: str | None
    access_mode: AccessMode
    minimum: Bound | None
    maximum: Bound | None
    unit: str | None
    visitor: Config | None
    visitor_field: str


@dataclass(frozen=True, slots=True)
class ModelDoc:
    """A DeviceModel: ``protocol`` (lower case) and ``protocolConfigData`` defaults.

    ``broken_properties`` names the properties whose entry is invalid (reported
    already): nothing more is said about them.
    """

    namespace: str
    name: str
    where: Where
    protocol: str | None
    protocol_config: Config
    properties: tuple[ModelProperty, ...]
    broken_properties: frozenset[str]


@dataclass(frozen=True, slots=True)
class PropertyEntry:
    """A Device's entry for one property (v1beta1 ``spec.properties[i]``, v1alpha2
    ``spec.propertyVisitors[i]``); cycles are checked milliseconds."""

    name: str
    field: str
    visitor: Config | None
    visitor_field: str
    collect_cycle_ms: int
    report_cycle_ms: int
    report_to_cloud: bool
    desired: str | None
    desired_field: str
    push_mqtt: MqttPush | None


@dataclass(frozen=True, slots=True)
class MethodEntry:
    """A Device ``methods[i]`` entry."""

    name: str
    description: str
    property_names: tuple[str, ...]
    field: str


@dataclass(frozen=True, slots=True)
class DeviceDoc:
    """A Device: its model reference, node, protocol (lower case) and ``configData``.

    ``broken_properties`` names the property entries that are invalid (reported
    already): such a property is left out without further messages.
    """

    namespace: str
    name: str
    where: Where
    model_name: str
    node_name: str | None
    protocol: str | None
    config: Config
    config_field: str
    properties: tuple[PropertyEntry, ...]
    methods: tuple[MethodEntry, ...]
    broken_properties: frozenset[str]


@dataclass(frozen=True, slots=True)
class BrokenDoc:
    """A Device or DeviceModel whose structure or name is invalid (already reported);
    kept so that duplicates are still found and devices using a broken model are not
    told that it is missing."""

    kind: str
    namespace: str | None
    name: str | None
    where: Where


ParsedObject = ModelDoc | DeviceDoc | BrokenDoc


# --- document shapes (pydantic) -------------------------------------------------------


class K8sObject(BaseModel):
    """Base of the document shapes: camelCase keys as in the CRDs, extra keys allowed
    (Kubernetes objects carry many that do not concern edge)."""

    model_config = ConfigDict(
        extra="allow", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class Metadata(K8sObject):
    """``metadata``: ``name`` is required, ``namespace`` defaults to ``default``."""

    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)


def check_names(meta: Metadata, where: Where, field: str, report: Report) -> bool:
    """Report a ``metadata.name`` that is not a DNS-1123 subdomain or a
    ``metadata.namespace`` that is not a DNS-1123 label (the Kubernetes rules; both
    become MQTT topic levels, which must not hold ``/``, ``+``, ``#`` or NUL);
    False when either is reported."""
    ok = True
    if len(meta.name) > 253 or not _DNS_SUBDOMAIN.fullmatch(meta.name):
        ok = False
        report.error(
            where,
            join_field(field, "name"),
            f"name {meta.name!r}{_length(meta.name, 253)} is not a DNS-1123 subdomain, as "
            "Kubernetes requires: lowercase letters, digits, '-' and '.', each dot-separated "
            "part starting and ending with a letter or digit, at most 253 characters",
        )
    if len(meta.namespace) > 63 or not re.fullmatch(_DNS_LABEL, meta.namespace):
        ok = False
        report.error(
            where,
            join_field(field, "namespace"),
            f"namespace {meta.namespace!r}{_length(meta.namespace, 63)} is not a DNS-1123 "
            "label, as Kubernetes requires: lowercase letters, digits and '-', starting and "
            "ending with a letter or digit, at most 63 characters",
        )
    return ok


def _length(text: str, most: int) -> str:
    """`` (N characters)`` when ``text`` is longer than ``most``, else nothing."""
    return f" ({len(text)} characters)" if len(text) > most else ""


class ObjectRef(K8sObject):
    """A reference by name, e.g. ``spec.deviceModelRef``."""

    name: str = Field(min_length=1)


class Desired(K8sObject):
    """A twin's desired value: a string in the CRD (a YAML number is taken as its text)."""

    model_config = ConfigDict(coerce_numbers_to_str=True)
    value: str


ShapeT = TypeVar("ShapeT", bound=BaseModel)


def validate_shape(
    shape: type[ShapeT], data: object, where: Where, field: str, report: Report
) -> ShapeT | None:
    """``data`` validated as ``shape``, or None with every problem reported at ``field``."""
    try:
        return shape.model_validate(data)
    except ValidationError as err:
        report.validation_error(err, where, field)
        return None


def validate_items(
    shape: type[ShapeT], data: list[Any] | None, where: Where, field: str, report: Report
) -> Iterator[tuple[str, ShapeT]]:
    """Validate list items one by one (a bad item does not hide the others' problems);
    yields ``(field path of the item, item)`` for the valid ones."""
    for index, item in enumerate(data or ()):
        item_field = join_field(field, index)
        parsed = validate_shape(shape, item, where, item_field, report)
        if parsed is not None:
            yield item_field, parsed


def invalid_names(data: list[Any] | None, key: str, valid: Iterable[str]) -> frozenset[str]:
    """The names (at ``key``, e.g. ``name``) of the items of ``data`` that are not
    among the ``valid`` ones: items that failed validation, so that nothing more is
    said about them."""
    named = {item.get(key) for item in data or () if isinstance(item, dict)}
    return frozenset(n for n in named if isinstance(n, str)) - frozenset(valid)


# --- value helpers --------------------------------------------------------------------


def to_number(value: object) -> float | None:
    """A finite number from an int, float or numeric string (v1beta1 carries
    ``minimum``/``maximum`` as strings); None if it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def to_int(value: object) -> int | None:
    """An int, an integral float, or a decimal string (``"+12"``) as int; None otherwise
    (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


def not_milliseconds(key: str, value: object) -> str:
    """The message for a duration ``value`` at ``key`` that is not an integer number of
    milliseconds, e.g. ``'1s'``."""
    return f"{key} must be an integer number of milliseconds, got {value!r} (1000 for one second)"


def config_entries(
    data: Mapping[str, Any] | None,
    where: Where,
    field: str,
    report: Report,
    aliases: Mapping[str, str] | None = None,
) -> Config:
    """The entries of one ``configData`` mapping; two aliases of one key are an error."""
    config: Config = {}
    for raw_key, value in (data or {}).items():
        key = str(raw_key)
        canonical = (aliases or {}).get(key, key)
        entry = Entry(key, value, where, join_field(field, key))
        if canonical in config:
            first = config[canonical].key
            report.error(where, entry.field, f"{key} and {first} mean the same; give only one")
        config[canonical] = entry
    return config


def _bound(value: object, key: str, where: Where, field: str, report: Report) -> Bound | None:
    if value is None or value == "":
        return None
    number = to_number(value)
    if number is None:
        report.error(
            where,
            field,
            f'{key} must be a number (a string such as "100.5" is '
            f"accepted as in v1beta1), got {value!r}",
        )
        return None
    return Bound(number, key, where, field)


def bounds(
    minimum: object, maximum: object, where: Where, field: str, report: Report
) -> tuple[Bound | None, Bound | None]:
    """A model property's ``minimum``/``maximum`` under ``field``: numbers (or numeric
    strings), absent or ``""`` for none, minimum ≤ maximum."""
    low = _bound(minimum, "minimum", where, join_field(field, "minimum"), report)
    high = _bound(maximum, "maximum", where, join_field(field, "maximum"), report)
    if low is not None and high is not None and low.value > high.value:
        report.error(
            where, high.field, f"maximum {high.value:g} is less than minimum {low.value:g}"
        )
    return low, high


def _cycle_ms(value: object, key: str, where: Where, field: str, report: Report) -> int:
    """A ``collectCycle``/``reportCycle`` in milliseconds: absent or 0 means
    :data:`DEFAULT_CYCLE_MS`; not an integer (e.g. ``"1s"``), negative, or more than a
    day (nanoseconds given by mistake, as in some upstream samples), is an error; under
    10 ms (seconds given by mistake) is a warning."""
    if value is None:
        return DEFAULT_CYCLE_MS
    number = to_int(value)
    if number is None:
        report.error(where, field, not_milliseconds(key, value))
        return DEFAULT_CYCLE_MS
    if not number:
        return DEFAULT_CYCLE_MS
    if number < 0:
        report.error(
            where,
            field,
            f"{key} {number} is negative; give milliseconds (0 or absent means {DEFAULT_CYCLE_MS})",
        )
    elif number > _ONE_DAY_MS:
        report.error(
            where,
            field,
            f"{key} {number} is more than one day: KubeEdge cycles are "
            f"milliseconds and this looks like nanoseconds ({number / 1e6:.10g} ms)",
        )
    elif number < _SHORTEST_LIKELY_CYCLE_MS:
        report.warning(
            where,
            field,
            f"{key} {number} ms is probably a mistake: KubeEdge cycles are milliseconds "
            f"({number * 1000} for {number} s)",
        )
    return number


def cycles(
    collect: object, report_cycle: object, where: Where, field: str, report: Report
) -> tuple[int, int]:
    """``(collectCycle, reportCycle)`` of the property entry at ``field``, milliseconds
    (an int, an integral float or a decimal string): absent or 0 means
    :data:`DEFAULT_CYCLE_MS`; not an integer (e.g. ``"1s"``), negative, or more than a
    day (nanoseconds given by mistake, as in some upstream samples), is an error; under
    10 ms (seconds given by mistake) is a warning."""
    return (
        _cycle_ms(collect, "collectCycle", where, join_field(field, "collectCycle"), report),
        _cycle_ms(report_cycle, "reportCycle", where, join_field(field, "reportCycle"), report),
    )


def report_duplicates(
    names: list[tuple[str, str]], what: str, where: Where, report: Report
) -> None:
    """Report every repeated name in ``[(name, field)]``."""
    first: dict[str, str] = {}
    for name, field in names:
        if name in first:
            report.error(where, field, f"duplicate {what} {name!r} (first at {first[name]})")
        else:
            first.setdefault(name, field)
