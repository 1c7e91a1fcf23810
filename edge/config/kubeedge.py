"""KubeEdge Device and DeviceModel manifests → :class:`~edge.config.model.DeviceSpec`.

Reads ``devices.kubeedge.io`` objects (v1beta1 in the ≤1.22 and 1.23 layouts, v1alpha2;
DESIGN.md §3) from multi-document YAML files and directories, resolves every Device
against its DeviceModel (same namespace, across all files read), merges the model's
defaults under the device's values, and checks it all. Every problem names file,
document, object and field; all are collected, and one error means nothing is applied.

Modules: :mod:`edge.config.kubeedge_v1beta1` and :mod:`edge.config.kubeedge_v1alpha2`
read the documents into the version-neutral shapes of :mod:`edge.config.kubeedge_docs`;
:mod:`edge.config.kubeedge_modbus` checks the Modbus ``configData``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.config.kubeedge_docs import (
    DEFAULT_CYCLE_MS,
    GROUP,
    VERSIONS,
    BrokenDoc,
    DeviceDoc,
    Metadata,
    ModelDoc,
    ModelProperty,
    ParsedObject,
    PropertyEntry,
    check_names,
    validate_shape,
)
from edge.config.kubeedge_modbus import Connection, parse_connection
from edge.config.kubeedge_profile import overridden, profiled_properties, use_profile
from edge.config.kubeedge_v1alpha2 import device_v1alpha2, model_v1alpha2
from edge.config.kubeedge_v1beta1 import device_v1beta1, model_v1beta1
from edge.config.kubeedge_visitor import parse_visitor
from edge.config.model import (
    AccessMode,
    DeviceSpec,
    Endpoint,
    MethodSpec,
    ModbusOptions,
    PropertySpec,
    SerialEndpoint,
    TcpEndpoint,
)
from edge.config.sources import (
    Document,
    Report,
    Where,
    expand_manifest_paths,
    join_field,
    or_list,
    read_yaml_documents,
)
from edge.modbus.writer import desired_value, write_problem
from edge.profiles.profile import Loaded

_Parser = Callable[[Mapping[str, Any], Metadata, Where, Report], ModelDoc | DeviceDoc | None]
_PARSERS: dict[tuple[str, str], _Parser] = {
    ("v1beta1", "Device"): device_v1beta1,
    ("v1beta1", "DeviceModel"): model_v1beta1,
    ("v1alpha2", "Device"): device_v1alpha2,
    ("v1alpha2", "DeviceModel"): model_v1alpha2,
}
_DEFAULT_OPTIONS = ModbusOptions()
_SKIPPED_KINDS = {("v1beta1", "DeviceStatus")}  # 1.23: twins and state, written by edgecore


def _parse_object(data: object, where: Where, report: Report) -> ParsedObject | None:
    if not isinstance(data, dict):
        got = type(data).__name__
        report.error(where, where.field(), f"must be a mapping (a Kubernetes object), got {got}")
        return None
    api, kind = data.get("apiVersion"), str(data.get("kind"))
    version = str(api).partition("/")[2]
    if not _ours(data):
        report.warning(
            where,
            where.field("apiVersion"),
            f"apiVersion {api!r} (kind {kind}) is not {GROUP}/{or_list(VERSIONS)}; ignored",
        )
        return None
    if (version, kind) in _SKIPPED_KINDS:
        return None
    parser = _PARSERS.get((version, kind))
    if parser is None:
        known = sorted(k for v, k in (*_PARSERS, *_SKIPPED_KINDS) if v == version)
        report.error(
            where,
            where.field("kind"),
            f"kind {kind!r} is not known in {api}; accepted: {', '.join(known)}",
        )
        return None
    unnamed = Where(where.file, where.document, f"{kind} (unnamed)", where.prefix)
    meta = validate_shape(Metadata, data.get("metadata"), unnamed, where.field("metadata"), report)
    if meta is None:
        return BrokenDoc(kind, None, None, unnamed)
    return _parse_named(parser, kind, data, meta, where, report)


def _parse_named(
    parser: _Parser,
    kind: str,
    data: Mapping[str, Any],
    meta: Metadata,
    where: Where,
    report: Report,
) -> ParsedObject:
    """The object ``parser`` reads from ``data``, reported against ``kind namespace/name``
    (quoted when it holds unprintable characters); broken when its names are not the
    Kubernetes ones."""
    label = f"{meta.namespace}/{meta.name}"
    label = label if label.isprintable() else repr(label)
    named = Where(where.file, where.document, f"{kind} {label}", where.prefix)
    names_ok = check_names(meta, named, where.field("metadata"), report)
    parsed = parser(data, meta, named, report)
    if parsed is not None and names_ok:
        return parsed
    return BrokenDoc(kind, meta.namespace, meta.name, named)


def _ours(data: object) -> bool:
    """True for a mapping of API group ``devices.kubeedge.io`` in a known version."""
    if not isinstance(data, dict):
        return True  # reported as not being an object at all
    group, _, version = str(data.get("apiVersion")).partition("/")
    return group == GROUP and version in VERSIONS


def parse_objects(documents: Iterable[Document], report: Report) -> tuple[list[ParsedObject], int]:
    """The Device and DeviceModel objects in ``documents``, in order, and how many
    objects of other API groups or versions were ignored (each with a warning).

    An unknown kind in ``devices.kubeedge.io`` is an error; 1.23 DeviceStatus objects
    are skipped. A ``kind: List`` (``apiVersion: v1``, as ``kubectl get -o yaml``
    writes) is read item by item, with field paths under ``items[i]``.
    """
    objects: list[ParsedObject] = []
    ignored = 0
    for doc in documents:
        data = doc.data
        items: list[tuple[object, Where]] = [(data, Where(doc.file, doc.index))]
        if isinstance(data, dict) and data.get("apiVersion") == "v1" and data.get("kind") == "List":
            listed = data.get("items")
            items = [
                (item, Where(doc.file, doc.index, prefix=join_field("items", i)))
                for i, item in enumerate(listed if isinstance(listed, list) else [])
            ]
        for item, where in items:
            ignored += not _ours(item)
            parsed = _parse_object(item, where, report)
            if parsed is not None:
                objects.append(parsed)
    return objects, ignored


def _source(where: Where) -> str:
    return f"{where.file}: document {where.document}"


def _kind(obj: ParsedObject) -> str:
    if isinstance(obj, BrokenDoc):
        return obj.kind
    return "Device" if isinstance(obj, DeviceDoc) else "DeviceModel"


def _index(
    objects: Iterable[ParsedObject], kind: str, report: Report
) -> dict[tuple[str, str], ParsedObject]:
    """Objects of ``kind`` by (namespace, name); a second one of the same name is an error."""
    index: dict[tuple[str, str], ParsedObject] = {}
    for obj in objects:
        if _kind(obj) != kind or obj.namespace is None or obj.name is None:
            continue
        key = (obj.namespace, obj.name)
        first = index.setdefault(key, obj)
        if first is not obj:
            report.error(
                obj.where,
                obj.where.field("metadata", "name"),
                f"duplicate {kind} "
                f"{obj.namespace}/{obj.name}: already defined in {_source(first.where)}",
            )
    return index


def _property(
    model_prop: ModelProperty,
    entry: PropertyEntry | None,
    device: DeviceDoc,
    connection: Connection | None,
    report: Report,
) -> PropertySpec | None:
    config = overridden(model_prop.visitor or {}, entry.visitor if entry else None,
                        device.where, entry.visitor_field if entry else "")
    if not config:
        report.warning(
            device.where,
            entry.field if entry else device.where.field("spec"),
            f"property {model_prop.name!r} has no Modbus visitor (neither in the "
            "DeviceModel nor in this Device); not polled",
        )
        return None
    if entry is not None and entry.visitor is not None:
        where, field = device.where, entry.visitor_field
    else:
        where, field = model_prop.where, model_prop.visitor_field
    read = parse_visitor(
        config,
        where,
        field,
        report,
        model=model_prop,
        options=connection.options if connection else _DEFAULT_OPTIONS,
    )
    if read is None:
        return None
    if model_prop.access_mode is AccessMode.READ_WRITE and not read.visitor.table.writable:
        report.warning(
            where,
            field,
            f"property {model_prop.name!r} is ReadWrite but "
            f"{read.visitor.table} cannot be written; it is only read",
        )
    prop = PropertySpec(
        name=model_prop.name,
        visitor=read.visitor,
        value_type=read.value_type,
        access_mode=model_prop.access_mode,
        collect_cycle_ms=entry.collect_cycle_ms if entry else DEFAULT_CYCLE_MS,
        report_cycle_ms=entry.report_cycle_ms if entry else DEFAULT_CYCLE_MS,
        report_to_cloud=entry.report_to_cloud if entry else True,
        minimum=read.minimum,
        maximum=read.maximum,
        unit=model_prop.unit,
        desired=entry.desired if entry else None,
        push_mqtt=entry.push_mqtt if entry else None,
    )
    if entry is not None and entry.desired is not None:
        _check_desired(prop, device.where, entry.desired_field, report)
    return prop


def _check_desired(prop: PropertySpec, where: Where, field: str, report: Report) -> None:
    """A desired value the agent cannot write is an error, before it is applied; one of
    a ReadOnly property is a warning (applying it refuses, with an event)."""
    problem = write_problem(prop, desired_value(prop))
    if problem is None:
        return
    kind, cause = problem
    message = f"desired value {prop.desired!r} of property {prop.name!r} cannot be written: {cause}"
    if kind in ("read_only", "not_writable"):
        report.warning(where, field, f"{message}; it is refused (with an event) when applied")
    else:
        report.error(where, field, message)


def _methods(
    device: DeviceDoc, model: ModelDoc, names: Sequence[str], report: Report
) -> tuple[MethodSpec, ...]:
    for method in device.methods:
        for i, name in enumerate(method.property_names):
            if name not in names and name not in model.broken_properties:
                report.error(
                    device.where,
                    join_field(method.field, "propertyNames", i),
                    f"method {method.name!r} names property {name!r}, which DeviceModel "
                    f"{model.namespace}/{model.name} does not have; it has: "
                    f"{', '.join(names) or 'none'}",
                )
    return tuple(MethodSpec(m.name, m.property_names, m.description) for m in device.methods)


def _model(
    device: DeviceDoc, models: Mapping[tuple[str, str], ParsedObject], report: Report
) -> ModelDoc | None:
    """The DeviceModel of ``device``; None (reported) when it is not there or broken."""
    model = models.get((device.namespace, device.model_name))
    if model is None:
        known = sorted(name for ns, name in models if ns == device.namespace)
        report.error(
            device.where,
            device.where.field("spec", "deviceModelRef", "name"),
            f"DeviceModel {device.namespace}/{device.model_name} is not in the "
            f"manifests read; DeviceModels in namespace {device.namespace}: "
            f"{', '.join(known) or 'none'}",
        )
    return model if isinstance(model, ModelDoc) else None  # a broken one is reported


def _device(
    device: DeviceDoc, model: ModelDoc, report: Report, profiles: Mapping[str, Loaded] | None
) -> DeviceSpec | None:
    """``device`` (a Modbus one) merged with its ``model`` (and the firmware profile it
    names, from ``profiles``: None for the shipped ones); None when anything is wrong."""
    where = device.where
    config = {**model.protocol_config, **device.config}
    connection = parse_connection(config, where, device.config_field, report)
    use = use_profile(config, where, device.config_field, report, profiles)
    if use is None and "profile" in config:
        return None  # reported
    model_props = {p.name: p for p in profiled_properties(model, use, report)}
    entries = {}
    for entry in device.properties:
        if entry.name in model_props:
            entries[entry.name] = entry
        elif use is not None and entry.name in use.other_firmware:
            report.error(where, entry.field, (
                f"property {entry.name!r} of profile {use.profile.doc.name} exists in firmware "
                f"{use.other_firmware[entry.name]} only; this device's firmware is "
                f"{use.firmware}"))
        elif entry.name not in model.broken_properties:
            report.error(
                where,
                entry.field,
                f"property {entry.name!r} is not in DeviceModel "
                f"{model.namespace}/{model.name}; it has: "
                f"{', '.join(model_props) or 'none'}",
            )
    properties = []
    for model_prop in model_props.values():
        if model_prop.name in device.broken_properties:
            continue  # its entry is invalid, and reported
        prop = _property(model_prop, entries.get(model_prop.name), device, connection, report)
        if prop is not None:
            properties.append(prop)
    methods = _methods(device, model, list(model_props), report)
    if connection is None:
        return None
    if not properties and not report.has_errors:
        report.warning(where, where.field("spec"), "no property is polled")
    return DeviceSpec(
        namespace=device.namespace,
        name=device.name,
        model=model.name,
        endpoint=connection.endpoint,
        unit_id=connection.unit_id,
        properties=tuple(properties),
        options=connection.options,
        methods=methods,
        source=_source(where),
        profile=use.ref if use else None,
    )


def _endpoint_identity(endpoint: Endpoint) -> str:
    """``host:port`` (IP addresses in canonical form, names in lower case; framing
    ignored) or the serial port: two devices with the same identity share a line."""
    if not isinstance(endpoint, TcpEndpoint):
        return endpoint.port
    try:
        host = ipaddress.ip_address(endpoint.host).compressed
    except ValueError:
        host = endpoint.host.lower()
    return f"[{host}]:{endpoint.port}" if ":" in host else f"{host}:{endpoint.port}"


def _warn_same_device(built: Sequence[tuple[DeviceDoc, DeviceSpec]], report: Report) -> None:
    """Warn about each Device with the endpoint and unit id of an earlier one."""
    first: dict[tuple[str, int], DeviceDoc] = {}
    for doc, spec in built:
        endpoint = _endpoint_identity(spec.endpoint)
        other = first.setdefault((endpoint, spec.unit_id), doc)
        if other is not doc:
            report.warning(
                doc.where,
                doc.config_field,
                f"same endpoint {endpoint} and unit id {spec.unit_id} as Device "
                f"{other.namespace}/{other.name} ({_source(other.where)}): both would poll "
                "the same device, probably a copy-paste mistake; change the ip and port "
                "(or serial port) or the slaveID",
            )


_LINE_SETTINGS = (("baudRate", "baudrate"), ("dataBits", "bytesize"), ("parity", "parity"),
                  ("stopBits", "stopbits"))  # fmt: skip
"""A serial line's settings: the ``configData`` key and the SerialEndpoint field."""


def _check_serial_lines(built: Sequence[tuple[DeviceDoc, DeviceSpec]], report: Report) -> None:
    """Report each Device that opens a serial port an earlier one opens with other
    line settings: one bus has one baud rate, data bits, parity and stop bits."""
    first: dict[str, tuple[DeviceDoc, SerialEndpoint]] = {}
    for doc, spec in built:
        if not isinstance(spec.endpoint, SerialEndpoint):
            continue
        other, line = first.setdefault(spec.endpoint.port, (doc, spec.endpoint))
        differ = [
            f"{key} {getattr(spec.endpoint, attr)} here, {getattr(line, attr)} there"
            for key, attr in _LINE_SETTINGS
            if getattr(spec.endpoint, attr) != getattr(line, attr)
        ]
        if differ:
            report.error(
                doc.where,
                doc.config_field,
                f"serial port {line.port} is also used by Device {other.namespace}/{other.name} "
                f"({_source(other.where)}) with other line settings: {'; '.join(differ)}; "
                "devices on one bus share its settings, make them equal",
            )


@dataclass(frozen=True, slots=True)
class Manifests:
    """What :func:`read_manifests` found.

    ``devices`` are only meaningful when the report has no errors; ``files`` are the
    manifest files read. The rest says why Devices are not polled (each case is also a
    warning of its own): ``ignored`` counts objects of other API groups or versions,
    ``found`` the Device objects, ``other_nodes`` holds the ``spec.nodeName`` of each
    Device bound to another node, ``other_protocols`` the protocol of each Device
    skipped for it ("" when it names none).
    """

    devices: tuple[DeviceSpec, ...]
    files: tuple[str, ...]
    ignored: int
    found: int
    other_nodes: tuple[str, ...]
    other_protocols: tuple[str, ...]


def read_manifests(
    paths: Sequence[Path], *, node: str | None, report: Report,
    profiles: Mapping[str, Loaded] | None = None,
) -> Manifests:
    """Read manifest files and directories (``*.yaml``/``*.yml``, recursive, sorted) and
    resolve every Device against its DeviceModel (:func:`resolve_documents`)."""
    files = expand_manifest_paths(paths, report)
    documents = [doc for file in files for doc in read_yaml_documents(file, report)]
    return resolve_documents(documents, node=node, report=report, files=tuple(map(str, files)),
                             profiles=profiles)


def resolve_documents(
    documents: Sequence[Document], *, node: str | None, report: Report,
    files: tuple[str, ...] = (), profiles: Mapping[str, Loaded] | None = None,
) -> Manifests:
    """Resolve every Device of ``documents`` (from files or a bundle) against its
    DeviceModel into a DeviceSpec.

    ``node`` is this gateway's name: a v1beta1 Device whose ``spec.nodeName`` names
    another node is skipped with a warning (None: no filter). Devices of other
    protocols are skipped with a warning; a Device with the endpoint and unit id of
    another is a warning; two Devices on one serial port with different line settings
    are an error. ``profiles`` are the firmware profiles Devices may name (None: the
    shipped ones, :func:`edge.profiles.profile.shipped`). Problems go to ``report``;
    ``files`` is passed through.
    """
    objects, ignored = parse_objects(documents, report)
    models = _index(objects, "DeviceModel", report)
    devices = [d for d in _index(objects, "Device", report).values() if isinstance(d, DeviceDoc)]
    built: list[tuple[DeviceDoc, DeviceSpec]] = []
    other_nodes: list[str] = []
    other_protocols: list[str] = []
    for device in devices:
        where = device.where
        if node and device.node_name and device.node_name != node:
            report.warning(
                where,
                where.field("spec", "nodeName"),
                f"belongs to node {device.node_name!r}, not to this gateway ({node!r}); skipped",
            )
            other_nodes.append(device.node_name)
            continue
        model = _model(device, models, report)
        if model is None:
            continue
        protocol = device.protocol or model.protocol
        if protocol != "modbus":
            named = (
                f"protocol {protocol!r} is not supported" if protocol else "no protocol is named"
            )
            report.warning(
                where,
                where.field("spec", "protocol"),
                f"{named} (edge speaks modbus: "
                "spec.protocol.protocolName or the DeviceModel's spec.protocol); skipped",
            )
            other_protocols.append(protocol or "")
            continue
        spec = _device(device, model, report, profiles)
        if spec is not None:
            built.append((device, spec))
    _check_serial_lines(built, report)
    _warn_same_device(built, report)
    return Manifests(
        devices=tuple(spec for _doc, spec in built),
        files=files,
        ignored=ignored,
        found=len(devices),
        other_nodes=tuple(other_nodes),
        other_protocols=tuple(other_protocols),
    )
