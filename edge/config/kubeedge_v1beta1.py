"""KubeEdge ``devices.kubeedge.io/v1beta1`` Device and DeviceModel → :mod:`kubeedge_docs`.

Both layouts: ≤1.22 (the Device carries ``status.twins``, ignored here since desired
values live in ``spec.properties[].desired``) and 1.23 (twins moved to a DeviceStatus
object, ``spec.stateReport`` added). Shapes follow ``build/crds/devices`` of
kubeedge/kubeedge release-1.22 and master; ``configData`` stays free-form for
:mod:`edge.config.kubeedge_modbus`. ``pushMethod.mqtt`` becomes an
:class:`~edge.config.model.MqttPush`; the other push methods are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from edge.config.kubeedge_docs import (
    MODEL_TYPES,
    PROTOCOL_ALIASES,
    Config,
    Desired,
    DeviceDoc,
    K8sObject,
    Metadata,
    MethodEntry,
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
from edge.config.model import AccessMode, MqttPush
from edge.config.sources import Report, Where, join_field

_MQTT_SCHEMES = {"tcp": False, "mqtt": False, "ssl": True, "mqtts": True, "tls": True}
"""``pushMethod.mqtt.address`` schemes → whether the connection uses TLS."""


class _Visitors(K8sObject):
    protocol_name: str | None = None
    config_data: dict[str, Any] | None = None


class _MqttPushDoc(K8sObject):
    address: str
    topic: str
    qos: int = Field(default=0, ge=0, le=2)
    retained: bool = False


class _PushMethod(K8sObject):
    mqtt: _MqttPushDoc | None = None


class _Method(K8sObject):
    name: str = Field(min_length=1)
    description: str = ""
    property_names: list[str] = Field(default_factory=list)


class _DeviceProperty(K8sObject):
    name: str = Field(min_length=1)
    collect_cycle: Any = None  # milliseconds, checked by cycles()
    report_cycle: Any = None
    report_to_cloud: bool = True
    desired: Desired | None = None
    visitors: _Visitors | None = None
    push_method: _PushMethod | None = None


class _Protocol(K8sObject):
    protocol_name: str | None = None
    config_data: dict[str, Any] | None = None


class _DeviceSpec(K8sObject):
    device_model_ref: ObjectRef
    node_name: str | None = None
    protocol: _Protocol | None = None
    properties: list[Any] | None = None
    methods: list[Any] | None = None


class _ModelProperty(K8sObject):
    name: str = Field(min_length=1)
    type: str | None = None
    access_mode: AccessMode = AccessMode.READ_ONLY
    minimum: Any = None
    maximum: Any = None
    unit: str | None = None
    visitors: _Visitors | None = None


class _ModelSpec(K8sObject):
    protocol: str | None = None
    protocol_config_data: dict[str, Any] | None = None
    properties: list[Any] | None = None


def _mqtt_push(push: _MqttPushDoc, where: Where, field: str, report: Report) -> MqttPush | None:
    parts = urlsplit(push.address)
    tls = _MQTT_SCHEMES.get(parts.scheme.lower())
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port, tls = None, None
    topic_ok = bool(push.topic) and "+" not in push.topic and "#" not in push.topic
    if not topic_ok:
        report.error(
            where,
            join_field(field, "topic"),
            f"topic {push.topic!r} must be non-empty and without the wildcards + and #",
        )
    if tls is None or not parts.hostname:
        report.error(
            where,
            join_field(field, "address"),
            f"address {push.address!r} must be "
            "scheme://host[:port] with scheme tcp or mqtt (plain), ssl, mqtts or tls",
        )
        return None
    if not topic_ok:
        return None
    return MqttPush(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        topic=push.topic,
        qos=push.qos,
        retained=push.retained,
        tls=tls,
    )


def _push(push: _PushMethod | None, where: Where, field: str, report: Report) -> MqttPush | None:
    if push is None:
        return None
    for key in push.model_extra or {}:
        report.warning(
            where,
            join_field(field, key),
            f"pushMethod {key} is not supported, ignored (edge pushes to mqtt only)",
        )
    if push.mqtt is None:
        return None
    return _mqtt_push(push.mqtt, where, join_field(field, "mqtt"), report)


def _visitor_config(
    visitors: _Visitors | None, where: Where, field: str, report: Report
) -> Config | None:
    if visitors is None or visitors.config_data is None:
        return None
    return config_entries(visitors.config_data, where, field, report)


def _methods(data: list[Any] | None, where: Where, report: Report) -> tuple[MethodEntry, ...]:
    methods = tuple(
        MethodEntry(m.name, m.description, tuple(m.property_names), field)
        for field, m in validate_items(_Method, data, where, where.field("spec", "methods"), report)
    )
    report_duplicates([(m.name, m.field) for m in methods], "method", where, report)
    return methods


def _model_type(value: str | None, where: Where, field: str, report: Report) -> str | None:
    if value is None:
        return None
    if value.upper() not in MODEL_TYPES:
        report.error(
            where,
            field,
            f"type {value!r} is not a KubeEdge property type; accepted: {', '.join(MODEL_TYPES)}",
        )
        return None
    return value.upper()


def device_v1beta1(
    data: Mapping[str, Any], meta: Metadata, where: Where, report: Report
) -> DeviceDoc | None:
    """A v1beta1 Device document (``where`` already names it); None if ``spec`` is
    not even shaped like one. Problems go to ``report``."""
    spec = validate_shape(_DeviceSpec, data.get("spec"), where, where.field("spec"), report)
    if spec is None:
        return None
    properties = []
    for field, prop in validate_items(
        _DeviceProperty, spec.properties, where, where.field("spec", "properties"), report
    ):
        visitor_field = join_field(field, "visitors", "configData")
        collect_ms, report_ms = cycles(prop.collect_cycle, prop.report_cycle, where, field, report)
        properties.append(
            PropertyEntry(
                name=prop.name,
                field=field,
                visitor=_visitor_config(prop.visitors, where, visitor_field, report),
                visitor_field=visitor_field,
                collect_cycle_ms=collect_ms,
                report_cycle_ms=report_ms,
                report_to_cloud=prop.report_to_cloud,
                desired=prop.desired.value if prop.desired else None,
                desired_field=join_field(field, "desired", "value"),
                push_mqtt=_push(prop.push_method, where, join_field(field, "pushMethod"), report),
            )
        )
    report_duplicates([(p.name, p.field) for p in properties], "property", where, report)
    protocol = spec.protocol or _Protocol()
    config_field = where.field("spec", "protocol", "configData")
    return DeviceDoc(
        namespace=meta.namespace,
        name=meta.name,
        where=where,
        model_name=spec.device_model_ref.name,
        node_name=spec.node_name or None,
        protocol=protocol.protocol_name.lower() if protocol.protocol_name else None,
        config=config_entries(protocol.config_data, where, config_field, report, PROTOCOL_ALIASES),
        config_field=config_field,
        properties=tuple(properties),
        methods=_methods(spec.methods, where, report),
        broken_properties=invalid_names(spec.properties, "name", (p.name for p in properties)),
    )


def model_v1beta1(
    data: Mapping[str, Any], meta: Metadata, where: Where, report: Report
) -> ModelDoc | None:
    """A v1beta1 DeviceModel document; None if ``spec`` is not shaped like one."""
    spec = validate_shape(_ModelSpec, data.get("spec") or {}, where, where.field("spec"), report)
    if spec is None:
        return None
    properties = []
    for field, prop in validate_items(
        _ModelProperty, spec.properties, where, where.field("spec", "properties"), report
    ):
        minimum, maximum = bounds(prop.minimum, prop.maximum, where, field, report)
        visitor_field = join_field(field, "visitors", "configData")
        properties.append(
            ModelProperty(
                name=prop.name,
                where=where,
                field=field,
                type_name=_model_type(prop.type, where, join_field(field, "type"), report),
                access_mode=prop.access_mode,
                minimum=minimum,
                maximum=maximum,
                unit=prop.unit,
                visitor=_visitor_config(prop.visitors, where, visitor_field, report),
                visitor_field=visitor_field,
            )
        )
    report_duplicates([(p.name, p.field) for p in properties], "property", where, report)
    config_field = where.field("spec", "protocolConfigData")
    return ModelDoc(
        namespace=meta.namespace,
        name=meta.name,
        where=where,
        protocol=spec.protocol.lower() if spec.protocol else None,
        protocol_config=config_entries(
            spec.protocol_config_data, where, config_field, report, PROTOCOL_ALIASES
        ),
        properties=tuple(properties),
        broken_properties=invalid_names(spec.properties, "name", (p.name for p in properties)),
    )
