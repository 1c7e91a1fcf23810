"""The OpenAPI 3.0 document of ``/api/v1`` (served at ``/api/v1/openapi.json``).

Written next to the handlers of :mod:`edge.web.api` and checked against them by the
tests (every route is described, every answer validates against its schema).
"""

from __future__ import annotations

from typing import Any

from edge import __version__

_INT = {"type": "integer"}
_VERSION = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_MS = {"type": "integer", "description": "ms since the Unix epoch (UTC)"}
_VALUE = {"oneOf": [_NUM, _STR, _BOOL]}
_DEVICES = {"type": "integer", "nullable": True, "description": "how many devices the "
            "version has; version 0 (the agent file, whose content is not kept): the running "
            "configuration's while it runs, else null"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _obj(props: dict[str, Any], required: list[str] | None = None, *,
         more: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props,
                              "required": required if required is not None else list(props),
                              "additionalProperties": more}
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR}),
    "Overview": _obj({
        "agent": _obj({"version": _STR, "node": _STR, "pid": _INT, "started": _MS,
                       "uptime_s": _NUM, "release": _nullable({
                           **_STR, "description": "the pushed release that runs (self-"
                           "update); null: the package's own"})}),
        "config": _obj({"version": _STR, "applied": _INT}, more=True),
        "uplink": _obj({"connected": _BOOL, "broker": _STR, "down_for_s": _NUM,
                        "reconnects": _INT, "inflight": _INT, "published": _INT,
                        "acked": _INT, "publish_rate": _NUM, "held": _INT}),
        "outbox": _obj({"rows": _INT, "bytes": _INT, "oldest_age_s": _NUM,
                        "dropped": {"type": "object", "additionalProperties": _INT}}),
        "devices": _obj({"total": _INT, "online": _INT, "offline": _INT}),
        "host": _obj({"cpu_percent": _NUM, "rss_bytes": _INT, "memory_percent": _NUM,
                      "disk_free_bytes": _INT, "disk_total_bytes": _INT,
                      "temperature_c": _nullable(_NUM)}),
    }),
    "Device": _obj({
        "key": _STR, "namespace": _STR, "name": _STR, "model": _STR, "endpoint": _STR,
        "unit_id": _INT,
        "profile": _nullable(_obj({"name": _STR, "firmware": _nullable(_STR)})),
        "state": {"type": "string", "enum": ["unknown", "online", "offline"]},
        "last_poll": _nullable(_MS), "last_latency_ms": _nullable(_NUM), "last_error": _STR,
        "breaker": {"type": "string", "enum": ["closed", "open", "half_open"]},
        "readings": _INT, "requests": _INT,
        "errors": _obj({"timeouts": _INT, "exceptions": _INT, "frame_errors": _INT,
                        "connection_errors": _INT, "decode_errors": _INT}),
    }),
    "Reading": {**_obj({"device": _STR, "ts": _MS, "seq": _INT,
                        "values": {"type": "object", "additionalProperties": _VALUE},
                        "times": {"type": "object", "additionalProperties": _MS},
                        "quality": {"type": "object", "additionalProperties": _STR}},
                       ["device", "ts", "seq", "values", "times"]),
                "description": "the latest value of every property, merged from the "
                "device's latest readings (one per collectCycle): ts and seq of the newest "
                "reading, times the ms of each property's own read, quality bad where a "
                "property's latest read failed (it is then absent from values)"},
    "Event": _obj({"ts": _MS, "type": _STR}, more=True),
    "Plugin": {**_obj({
        "name": _STR, "version": _STR, "sha256": _STR,
        "devices": {"type": "array", "items": _STR},
        "on_failure": {"type": "string", "enum": ["pass", "drop"]},
        "state": {"type": "string", "enum": ["running", "quarantined", "not loaded"]},
        "calls": _INT, "errors": _INT, "traps": _INT, "timeouts": _INT, "passed": _INT,
        "dropped": _INT, "instances": _INT, "time_s": _NUM, "p50_us": _NUM, "p99_us": _NUM,
        "last_error": _STR, "load_error": _STR}, ["name", "state", "load_error"]),
        "description": "one plugin: its counters since the agent started, over every "
        "version under its name; a plugin whose configured version never loaded has only "
        "name, state and load_error"},
    "PolicyRule": {**_obj({
        "id": {"type": "integer", "minimum": 1, "maximum": 256},
        "where": _STR, "what": _STR, "action": {"type": "string", "enum": ["allow", "deny"]},
        "enforce": _BOOL, "direction": {"type": "string", "enum": ["egress", "ingress"]},
        "workload": _nullable(_STR), "policy": _nullable(_STR),
        "section": {"type": "string", "enum": ["failsafe", "egressDeny", "ingressDeny",
                                               "egress", "ingress", "default"]},
        "packets": _INT, "bytes": _INT}),
        "description": "one compiled rule, in match order (id = position, 1-based; "
        "renumbered when the policy changes): where it comes from, what it matches, its "
        "action, whether it is in force (failsafe rules always are; false: an audit "
        "policy's), the workload (cgroup path; null: every policed workload), the "
        "policy (null for failsafe rules) and section, and the packets and bytes the "
        "kernel counted for it since the policy was last applied"},
    "PolicyDrop": {**_obj({
        "time_ms": _MS, "verdict": {"type": "string", "enum": ["drop", "would-drop"]},
        "workload": _STR, "rule": _INT, "where": _STR,
        "direction": {"type": "string", "enum": ["egress", "ingress"]},
        "address": _STR, "protocol": _STR, "port": _INT}),
        "description": "one packet dropped (drop: an enforcing policy) or reported and "
        "passed (would-drop: an audit policy): the workload (the socket's cgroup path, or "
        "\"cgroup <id>\"), the deciding rule, the connection's direction, the remote "
        "address, the protocol and the rule's port (remote for egress, the workload's "
        "own for ingress; 0 for ICMP)"},
    "Policy": _obj({
        "state": {"type": "string", "enum": ["off", "enforced", "unenforced"]},
        "reason": _STR, "pin": _STR,
        "gen": {"type": "integer", "nullable": True, "description": "the generation of "
                "the tables in the kernel (0 or 1; null before the first apply)"},
        "applied_ms": {"type": "integer", "description": "when the policy was last put "
                       "into the kernel, ms since the Unix epoch (UTC); 0: never"},
        "update_ms": {"type": "number", "description": "how long that took, ms"},
        "updates": {"type": "integer", "description": "times the policy was put into the "
                    "kernel since the agent started (each zeroes the rule counters)"},
        "workloads": {"type": "object", "additionalProperties": _nullable(_INT),
                      "description": "cgroup path -> cgroup id (null: no such cgroup now, "
                      "i.e. not running)"},
        "rules": {"type": "array", "items": _ref("PolicyRule")},
        "datapath": {**_obj({"events_lost": _INT, "unmatched": _INT, "unparsed": _INT},
                            []),
                     "description": "the datapath's own counters (empty without one)"},
        "drops": {"type": "object", "additionalProperties": _INT,
                  "description": "drop events read since the agent started, by verdict"},
        "recent": {"type": "array", "items": _ref("PolicyDrop"),
                   "description": "the last drop events, newest last"},
    }),
    "Session": _obj({"user": _STR, "via": {"type": "string", "enum": ["session", "token"]},
                     "csrf": _nullable(_STR)}),
    "Version": _obj({"version": _INT, "state": {"type": "string", "enum": [
        "pending", "committed", "rolled_back", "superseded"]}, "reason": _STR,
        "received": _MS, "decided": _nullable(_MS), "devices": _DEVICES}),
}
_SCHEMAS["DeviceDetail"] = _obj({**_SCHEMAS["Device"]["properties"],
    "properties": {"type": "array", "items": _obj({
        "name": _STR, "type": _STR, "access": {"type": "string", "enum": ["ReadOnly",
                                                                          "ReadWrite"]},
        "unit": _nullable(_STR), "minimum": _nullable(_NUM), "maximum": _nullable(_NUM),
        "desired": _nullable(_STR), "report_to_cloud": _BOOL, "collect_cycle_ms": _INT,
        "table": _STR, "address": _INT})},
    "methods": {"type": "array", "items": _obj({"name": _STR,
                                                "properties": {"type": "array", "items": _STR}})},
    "latest": _nullable(_ref("Reading")),
    "twin": {"type": "object", "additionalProperties": {"type": "object"}}
})


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _answer("an error, named", _ref("Error"))
_DEVICE_PARAMS = [
    {"name": "namespace", "in": "path", "required": True, "schema": _STR},
    {"name": "name", "in": "path", "required": True, "schema": _STR},
]


def _get(summary: str, schema: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
         errors: tuple[int, ...] = ()) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _answer(summary, schema)}
    responses.update({str(code): _ERROR for code in (*errors, 401)})
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    return {"get": op}


def _query(name: str, description: str, minimum: int | None = None,
           required: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "maximum": 2**63 - 1}
    if minimum is not None:
        schema["minimum"] = minimum
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema}


def openapi() -> dict[str, Any]:
    """The document (a fresh dict each call)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "edge gateway agent", "version": __version__,
                 "description": "The local REST API of one edge gateway agent. Reading is "
                 "open to loopback clients (web.view: local); changing anything needs a "
                 "login session with its X-CSRF-Token header, or a bearer token."},
        "paths": {
            "/api/v1/overview": _get("agent, configuration, uplink, outbox, devices, host",
                                     _ref("Overview")),
            "/api/v1/devices": _get("every configured device",
                                    {"type": "array", "items": _ref("Device")}),
            "/api/v1/devices/{namespace}/{name}": _get(
                "one device: definition, latest reading, twin", _ref("DeviceDetail"),
                params=_DEVICE_PARAMS, errors=(404,)),
            "/api/v1/devices/{namespace}/{name}/trend": _get(
                "per numeric property [[ts, value], …] (ts in ms since the Unix epoch), "
                "oldest first, one point per 2 s, the last 5 minutes",
                {"type": "object", "additionalProperties": {"type": "array", "items": {
                    "type": "array", "items": _NUM, "minItems": 2, "maxItems": 2}}},
                params=[*_DEVICE_PARAMS, _query("since", "only points after this time "
                                                "(ms since the epoch)", 0)],
                errors=(400, 404)),
            "/api/v1/readings": _get("the latest reading of every device (null before "
                                     "its first)", {"type": "object",
                                                    "additionalProperties": _nullable(
                                                        _ref("Reading"))}),
            "/api/v1/events": _get("the last events, oldest first",
                                   {"type": "array", "items": _ref("Event")},
                                   params=[_query("limit", "at most this many, the newest", 1)],
                                   errors=(400,)),
            "/api/v1/stats": _get("Agent.stats(): outbox, uplink, devices, config",
                                  {"type": "object"}),
            "/api/v1/plugins": _get(
                "the WASM plugins, in the order they run (empty without plugins), and why "
                "the plugin directory's last change was not taken (empty when it was)",
                _obj({"plugins": {"type": "array", "items": _ref("Plugin")},
                      "problems": {"type": "array", "items": _STR}})),
            "/api/v1/policy": _get(
                "the network policy: its state (off: none configured; enforced: the "
                "kernel holds it; unenforced: configured but not in the kernel, and "
                "reason says why), its rules in match order with the kernel's counters, "
                "the workloads' cgroups and the recent drops", _ref("Policy")),
            "/api/v1/config": _get("the running configuration",
                                   _obj({"version": _STR, "applied": _INT,
                                         "files": {"type": "array", "items": _STR}},
                                        ["version", "applied", "files"], more=True)),
            "/api/v1/config/versions": _get("the kept versions, oldest first",
                                            {"type": "array", "items": _ref("Version")}),
            "/api/v1/config/versions/{version}": _get(
                "one kept version with its content (version 0, the agent file alone: "
                "content is only {\"version\": 0}, and note says so)",
                _obj({"version": _INT, "state": _STR, "content": {"type": "object"},
                      "devices": _DEVICES, "note": _nullable(_STR)}),
                params=[{"name": "version", "in": "path", "required": True,
                         "schema": _VERSION}], errors=(400, 404)),
            "/api/v1/config/diff": _get(
                "a unified diff of two kept versions' content",
                _obj({"old": _INT, "new": _INT, "lines": {"type": "array", "items": _STR}}),
                params=[_query("old", "a kept version", 0, True),
                        _query("new", "a kept version", 0, True)], errors=(400, 404)),
            "/api/v1/login": {"post": {
                "summary": "log in: a session cookie (HttpOnly, SameSite=Strict) and the "
                           "CSRF token to send as X-CSRF-Token with every change",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _obj({"user": _STR, "password": _STR})}}},
                "responses": {"200": _answer("logged in", _ref("Session")), "400": _ERROR,
                              "401": _ERROR, "415": _ERROR, "429": _ERROR}}},
            "/api/v1/logout": {"post": {
                "summary": "log out (the session ends, its cookie is expired)",
                "security": [{"session": [], "csrf": []}, {"bearer": []}],
                "responses": {"204": {"description": "logged out"}, "401": _ERROR,
                              "403": _ERROR}}},
            "/api/v1/session": _get("who the request is: the logged-in user and the "
                                    "session's CSRF token, or the bearer token "
                                    "(\"token <8 hex digits>\", csrf null)",
                                    _ref("Session"), errors=(401,)),
            "/api/v1/config/rollback": {"post": {
                "summary": "ask the running agent to roll back (as `edge rollback`)",
                "security": [{"session": [], "csrf": []}, {"bearer": []}],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": _obj({"version": _nullable(_VERSION)}, [])}}},
                "responses": {
                    "202": _answer("asked; the agent does it within a second, or after an "
                                   "open health window",
                                   _obj({"requested": _nullable(_INT), "by": _nullable(_STR)})),
                    "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR, "409": _ERROR,
                }}},
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "edge_session"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }
