"""KubeEdge ``devices.kubeedge.io/v1alpha2`` Device and DeviceModel → :mod:`kubeedge_docs`.

v1alpha2 is deprecated upstream but still served; it is converted to the v1beta1 shape:
the typed ``spec.protocol.modbus.slaveID`` and ``spec.protocol.common.{tcp, com,
collectTimeout, collectRetryTimes, customizedValues}`` become ``configData`` keys,
``spec.propertyVisitors[].modbus`` becomes a visitor ``configData``, desired values come
from ``status.twins[].desired``, and typed model properties (``type: {int: {accessMode,
minimum, maximum, unit}}``) become v1beta1 ones. ``nodeSelector`` is not evaluated
(a warning says so).
Shapes follow kubeedge/kubeedge ``build/crds/devices`` (v1alpha2 CRDs, 2024-01).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from edge.config.kubeedge_docs import (
    MODEL_TYPES,
    PROTOCOL_ALIASES,
    Config,
    Desired,
    DeviceDoc,
    Entry,
    K8sObject,
    Metadata,
    ModelDoc,
    ModelProperty,
    ObjectRef,
    PropertyEntry,
    bounds,
    config_entries,
    cycles,
    invalid_names,
    report_duplicates,
    validate_items,
    validate_shape,
)
from edge.config.model import AccessMode
from edge.config.sources import Report, Where, join_field

# v1alpha2 typed protocol fields → the v1beta1 configData key they mean.
_V1ALPHA2_PROTOCOL: dict[str, tuple[str, ...]] = {
    "slaveID": ("modbus", "slaveID"),
    "ip": ("common", "tcp", "ip"),
    "port": ("common", "tcp", "port"),
    "serialPort": ("common", "com", "serialPort"),
    "baudRate": ("common", "com", "baudRate"),
    "dataBits": ("common", "com", "dataBits"),
    "parity": ("common", "com", "parity"),
    "stopBits": ("common", "com", "stopBits"),
    "timeout": ("common", "collectTimeout"),
    "retries": ("common", "collectRetryTimes"),
}


class _PropertyVisitorV1A2(K8sObject):
    property_name: str = Field(min_length=1)
    collect_cycle: Any = None  # milliseconds, checked by cycles()
    report_cycle: Any = None
    modbus: dict[str, Any] | None = None


class _DeviceSpecV1A2(K8sObject):
    device_model_ref: ObjectRef
    node_selector: Any = None  # not evaluated, warned
    protocol: dict[str, Any] | None = None
    property_visitors: list[Any] | None = None


class _Twin(K8sObject):
    property_name: str
    desired: Desired | None = None


class _DeviceStatusV1A2(K8sObject):
    twins: list[_Twin] | None = None


class _TypedPropertyV1A2(K8sObject):
    access_mode: AccessMode = AccessMode.READ_ONLY
    minimum: Any = None
    maximum: Any = None
    unit: str | None = None


class _ModelPropertyV1A2(K8sObject):
    name: str = Field(min_length=1)
    type: dict[str, _TypedPropertyV1A2]


class _ModelSpecV1A2(K8sObject):
    protocol: str | None = None
    properties: list[Any] | None = None


def _dig(data: Mapping[str, Any], path: tuple[str, ...]) -> object:
    node: object = data
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _v1alpha2_protocol(data: Mapping[str, Any], where: Where, field: str, report: Report) -> Config:
    """The typed v1alpha2 protocol fields as v1beta1 ``configData`` keys, plus
    ``common.customizedValues`` (where our extensions such as ``maxGap`` go)."""
    custom = _dig(data, ("common", "customizedValues"))
    config = config_entries(
        custom if isinstance(custom, dict) else None,
        where,
        join_field(field, "common", "customizedValues"),
        report,
        PROTOCOL_ALIASES,
    )
    for key, path in _V1ALPHA2_PROTOCOL.items():
        value = _dig(data, path)
        if value is None:
            continue
        entry = Entry(path[-1], value, where, join_field(field, *path))
        if key in config:
            report.error(
                where,
                entry.field,
                f"also given as customizedValues.{config[key].key}; give only one",
            )
        config[key] = entry
    return config


def _v1alpha2_protocol_name(data: Mapping[str, Any]) -> str | None:
    if "modbus" in data:
        return "modbus"
    custom = _dig(data, ("customizedProtocol", "protocolName"))
    if isinstance(custom, str) and custom:
        return custom.lower()
    return next((name for name in ("opcua", "bluetooth") if name in data), None)


def device_v1alpha2(
    data: Mapping[str, Any], meta: Metadata, where: Where, report: Report
) -> DeviceDoc | None:
    """A v1alpha2 Device document converted to the v1beta1 shape; None if ``spec`` is not
    shaped like one. Problems go to ``report``."""
    spec = validate_shape(_DeviceSpecV1A2, data.get("spec"), where, where.field("spec"), report)
    if spec is None:
        return None
    if spec.node_selector is not None:
        report.warning(
            where,
            where.field("spec", "nodeSelector"),
            "is ignored: edge does not evaluate node selectors, so every gateway that reads "
            "this Device polls it (v1beta1 spec.nodeName is what selects the devices of a "
            "gateway)",
        )
    status = validate_shape(
        _DeviceStatusV1A2, data.get("status") or {}, where, where.field("status"), report
    )
    desired: dict[str, tuple[str | None, str]] = {
        twin.property_name: (twin.desired.value, where.field("status", "twins", i, "desired"))
        for i, twin in enumerate(status.twins if status and status.twins else [])
        if twin.desired is not None
    }
    protocol_data = spec.protocol or {}
    protocol = _v1alpha2_protocol_name(protocol_data)
    config_field = where.field("spec", "protocol")
    properties = []
    for field, visitor in validate_items(
        _PropertyVisitorV1A2,
        spec.property_visitors,
        where,
        where.field("spec", "propertyVisitors"),
        report,
    ):
        modbus_field = join_field(field, "modbus")
        if visitor.modbus is None and protocol == "modbus":
            report.error(
                where,
                modbus_field,
                "is required: a Modbus device's visitor gives "
                "register, offset, limit, scale, isSwap, isRegisterSwap",
            )
        collect_ms, report_ms = cycles(
            visitor.collect_cycle, visitor.report_cycle, where, field, report
        )
        desired_value, desired_field = desired.get(visitor.property_name, (None, field))
        properties.append(
            PropertyEntry(
                name=visitor.property_name,
                field=field,
                visitor=None
                if visitor.modbus is None
                else config_entries(visitor.modbus, where, modbus_field, report),
                visitor_field=modbus_field,
                collect_cycle_ms=collect_ms,
                report_cycle_ms=report_ms,
                report_to_cloud=True,
                desired=desired_value,
                desired_field=desired_field,
                push_mqtt=None,
            )
        )
    report_duplicates([(p.name, p.field) for p in properties], "property visitor", where, report)
    return DeviceDoc(
        namespace=meta.namespace,
        name=meta.name,
        where=where,
        model_name=spec.device_model_ref.name,
        node_name=None,
        protocol=protocol,
        config=_v1alpha2_protocol(protocol_data, where, config_field, report),
        config_field=config_field,
        properties=tuple(properties),
        methods=(),
        broken_properties=invalid_names(
            spec.property_visitors, "propertyName", (p.name for p in properties)
        ),
    )


def model_v1alpha2(
    data: Mapping[str, Any], meta: Metadata, where: Where, report: Report
) -> ModelDoc | None:
    """A v1alpha2 DeviceModel converted to the v1beta1 shape; None if ``spec`` is not
    shaped like one."""
    spec = validate_shape(
        _ModelSpecV1A2, data.get("spec") or {}, where, where.field("spec"), report
    )
    if spec is None:
        return None
    properties = []
    for field, prop in validate_items(
        _ModelPropertyV1A2, spec.properties, where, where.field("spec", "properties"), report
    ):
        type_field = join_field(field, "type")
        kinds = [name for name in prop.type if name.upper() in MODEL_TYPES]
        if len(prop.type) != 1 or not kinds:
            report.error(
                where,
                type_field,
                "must hold exactly one of int, float, double, string, "
                f"boolean, bytes; got {', '.join(prop.type) or 'none'}",
            )
        typed = prop.type[kinds[0]] if kinds else _TypedPropertyV1A2()
        typed_field = join_field(type_field, kinds[0]) if kinds else type_field
        minimum, maximum = bounds(typed.minimum, typed.maximum, where, typed_field, report)
        properties.append(
            ModelProperty(
                name=prop.name,
                where=where,
                field=field,
                type_name=kinds[0].upper() if kinds else None,
                access_mode=typed.access_mode,
                minimum=minimum,
                maximum=maximum,
                unit=typed.unit,
                visitor=None,
                visitor_field="",
            )
        )
    report_duplicates([(p.name, p.field) for p in properties], "property", where, report)
    return ModelDoc(
        meta.namespace,
        meta.name,
        where,
        spec.protocol.lower() if spec.protocol else None,
        {},
        tuple(properties),
        invalid_names(spec.properties, "name", (p.name for p in properties)),
    )
