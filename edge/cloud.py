"""``edge cloud``: the control plane's side, for operators and tests.

``keygen`` makes an Ed25519 key pair (the public half goes into each gateway's
``trust.keys``); ``push`` builds a desired bundle from KubeEdge manifests (or takes a
bundle JSON file), signs it and publishes it retained on ``{prefix}/desired`` of each
node (DESIGN.md §6, :mod:`edge.sync.bundle`); ``status`` reads the gateways' retained
``state``; ``rollback``, ``write`` and ``call`` send signed commands and wait for the
replies; ``rollout`` pushes to a fleet in stages (:mod:`edge.rollout`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from edge.config.errors import ConfigError

DEFAULT_PREFIX = "edge/v1/{node}"
ACK_TIMEOUT_S = 10.0
KINDS = {"Device": "devices", "DeviceModel": "deviceModels"}


def _broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host, int(port)


def _objects(data: object, group: str) -> list[Any]:
    """KubeEdge Device/DeviceModel objects of one YAML document (``kind: List`` too)."""
    if isinstance(data, dict) and data.get("kind") == "List":
        return [o for item in data.get("items") or [] for o in _objects(item, group)]
    if (isinstance(data, dict) and str(data.get("apiVersion", "")).startswith(group + "/")
            and data.get("kind") in KINDS):
        return [data]
    return []


def bundle_content(paths: list[Path]) -> dict[str, list[Any]]:
    """The ``devices`` and ``deviceModels`` of manifest files and directories, each
    file read once and checked the way a gateway will check them.

    Raises:
        ConfigError: every problem of the manifests.
    """
    from edge.config.kubeedge import resolve_documents  # noqa: PLC0415
    from edge.config.kubeedge_docs import GROUP  # noqa: PLC0415
    from edge.config.sources import (  # noqa: PLC0415
        Report,
        expand_manifest_paths,
        read_yaml_documents,
    )

    report = Report()
    documents = [d for f in expand_manifest_paths(paths, report)
                 for d in read_yaml_documents(f, report)]
    resolve_documents(documents, node=None, report=report)
    report.raise_if_errors()
    out: dict[str, list[Any]] = {"devices": [], "deviceModels": []}
    for doc in documents:
        for obj in _objects(doc.data, GROUP):
            out[KINDS[obj["kind"]]].append(obj)
    return out


def for_node(content: dict[str, Any], node: str) -> dict[str, Any]:
    """``content`` without the Devices bound to another node (``spec.nodeName``)."""
    def ours(d: Any) -> bool:
        bound = (d.get("spec") or {}).get("nodeName") if isinstance(d, dict) else None
        return not bound or bound == node
    return {**content, "devices": [d for d in content.get("devices", []) if ours(d)]}


def plugin_entries(manifests: tuple[Path, ...], key: Any) -> list[dict[str, Any]]:
    """A bundle's ``plugins`` from plugin manifest files: each module read from its
    ``wasm`` path and carried inline (``module``, base64), its sha256 checked, and the
    manifest signed with ``key`` (the bundle's) unless it is signed already.

    Raises:
        click.ClickException: a manifest or module that is not usable, named.
    """
    import base64  # noqa: PLC0415
    import hashlib  # noqa: PLC0415

    import yaml  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    from edge.config.plugins import Manifest, sign  # noqa: PLC0415
    from edge.wasm.spec import ModuleFileError, read_module  # noqa: PLC0415

    entries = []
    for path in manifests:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise click.ClickException(f"{path}: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("wasm"), str):
            raise click.ClickException(f"{path}: not a plugin manifest with a wasm path")
        try:
            blob = read_module(path.parent / data.pop("wasm"))
        except ModuleFileError as e:
            raise click.ClickException(str(e)) from e
        digest = hashlib.sha256(blob).hexdigest()
        if data.get("sha256") != digest:
            raise click.ClickException(f"{path}: sha256 is not its module's ({digest}): "
                                       "edge plugin sign it again")
        entry = {**data, "module": base64.b64encode(blob).decode()}
        try:
            manifest = Manifest.model_validate(entry)
        except ValidationError as e:
            raise click.ClickException(f"{path}: not a valid plugin manifest:\n{e}") from e
        if not entry.get("signature"):
            entry["signature"] = sign(manifest, key)
        entries.append(entry)
    return entries


def policy_entries(paths: tuple[Path, ...]) -> list[dict[str, Any]]:
    """The NetworkPolicy documents of YAML files (several per file, ``---``), checked
    the way a gateway checks a bundle's ``policies``; every problem printed (naming
    the file and document) and exit status 2 when there is one."""
    import yaml  # noqa: PLC0415

    from edge.config.policy import bundle_policies  # noqa: PLC0415
    from edge.config.sources import Report  # noqa: PLC0415

    report = Report()
    entries: list[dict[str, Any]] = []
    for path in paths:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8"))
                    if d is not None]
        except (OSError, yaml.YAMLError) as e:
            raise click.ClickException(f"{path}: {e}") from e
        bundle_policies(docs, str(path), report)
        entries += docs
    if not report.problems:  # names given twice across the files
        bundle_policies(entries, "--policy", report)
    try:
        report.raise_if_errors()
    except ConfigError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        sys.exit(2)
    return entries


def _policy_option(f: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--policy", "policies", multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A file of NetworkPolicy documents the bundle carries (repeat); they "
             "replace the gateway's agent-file policies.")(f)


def _plugin_option(f: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--plugin", "plugins", multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A plugin manifest whose plugin the bundle carries (repeat, in run order); "
             "signed with --key unless it is signed.")(f)


def _content_or_exit(sources: tuple[Path, ...]) -> dict[str, list[Any]]:
    """:func:`bundle_content`, or every problem printed and exit status 2."""
    try:
        return bundle_content(list(sources))
    except ConfigError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        sys.exit(2)


def _client() -> Any:
    """A paho client (MQTT 3.1.1, clean session) for one CLI call."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    return mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                       client_id=f"edge-cloud-{os.getpid()}")


def _start(c: Any, host: str, port: int) -> None:
    """Connect ``c`` and start its network thread.

    Raises:
        click.ClickException: the broker cannot be reached.
    """
    try:
        c.connect(host, port)
    except OSError as e:
        raise click.ClickException(f"cannot reach the broker {host}:{port}: {e}") from e
    c.loop_start()


def publish_retained(host: str, port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish each ``(topic, payload)`` retained at QoS 1 over one connection and wait
    for every PUBACK.

    Raises:
        click.ClickException: the broker cannot be reached or does not acknowledge.
    """

    c = _client()
    _start(c, host, port)
    try:
        for topic, payload in messages:
            info = c.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(ACK_TIMEOUT_S)
            if not info.is_published():
                raise click.ClickException(f"the broker {host}:{port} did not acknowledge "
                                           f"{topic} within {ACK_TIMEOUT_S:g} s")
    finally:
        c.disconnect()
        c.loop_stop()


def _signing_options(f: Callable[..., None]) -> Callable[..., None]:
    """``--key``, ``--broker``, ``--prefix``: what every signed publication needs."""
    f = click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
                     help="Topic prefix.")(f)
    f = click.option("--broker", default="127.0.0.1:1883", show_default=True,
                     help="HOST:PORT.")(f)
    return click.option("--key", "key_path", required=True,
                        type=click.Path(dir_okay=False, exists=True, path_type=Path),
                        help="The private key (PEM) to sign with.")(f)


def _release_options(f: Callable[..., None]) -> Callable[..., None]:
    """``--release ARCHIVE`` and ``--release-url URL``: the self-update of a bundle."""
    f = click.option("--release-url", default=None,
                     help="Where the gateways fetch --release [default: its file:// URL].")(f)
    return click.option(
        "--release", "release_path", default=None,
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="An agent release archive (build-deb.sh, edge release pack) for the gateways "
             "to run: its version, size and SHA-256 go in agent.release.")(f)


def _bundle_options(f: Callable[..., None]) -> Callable[..., None]:
    """``--version`` and ``--expires`` of a bundle."""
    f = click.option("--expires", "expires_s", type=click.IntRange(min=1),
                     default=7 * 86400, show_default=True,
                     help="Seconds until the bundle expires.")(f)
    return click.option("--version", "version", type=click.IntRange(min=1), default=None,
                        help="Bundle version (default: the time in seconds since the "
                             "epoch).")(f)


@click.group()
def cloud() -> None:
    """The control plane's side: keys, signed bundles."""


@cloud.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=".", show_default=True, help="Where to write NAME.key and NAME.pub.")
@click.option("--name", default="cloud", show_default=True, help="File name stem.")
def keygen(out_dir: Path, name: str) -> None:
    """Make an Ed25519 key pair: NAME.key (private, mode 0600) and NAME.pub (public)."""
    from edge.sync.bundle import key_id, load_public_key, new_key_pair  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (private, public):
        if p.exists():
            raise click.ClickException(f"{p} exists; not overwritten")
    private_pem, public_pem = new_key_pair()
    private.touch(mode=0o600)
    private.write_bytes(private_pem)
    public.write_bytes(public_pem)
    kid = key_id(load_public_key(public_pem))
    click.echo(f"{private} (keep it secret) and {public} (list it in each gateway's "
               f"trust.keys); key id {kid}")


def retained(host: str, port: int, topic_filter: str, *, wait_s: float) -> dict[str, bytes]:
    """The retained messages on ``topic_filter``: what the broker sends right after the
    subscription, collected for ``wait_s`` seconds.

    Raises:
        click.ClickException: the broker cannot be reached.
    """
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    got: dict[str, bytes] = {}

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got[msg.topic] = bytes(msg.payload)

    c = _client()
    c.on_message = on_message
    c.on_connect = lambda cl, *_: cl.subscribe(topic_filter, qos=1)
    _start(c, host, port)
    time.sleep(wait_s)
    c.disconnect()
    c.loop_stop()
    return got


@cloud.command()
@click.option("--node", "nodes", multiple=True, help="Only these gateways (repeat).")
@click.option("--broker", default="127.0.0.1:1883", show_default=True, help="HOST:PORT.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix.")
@click.option("--wait", "wait_s", type=float, default=1.0, show_default=True,
              help="Seconds to collect the retained states.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
def status(nodes: tuple[str, ...], broker: str, prefix: str, wait_s: float,
           as_json: bool) -> None:
    """Each gateway's retained state: online, configuration applied / pending / last
    error, devices online."""
    host, port = _broker(broker)
    topic = prefix.format(node="+") + "/state"
    states = retained(host, port, topic, wait_s=wait_s)
    head, _, tail = prefix.partition("{node}")
    rows = []
    for t, payload in sorted(states.items()):
        node = t.removeprefix(head).removesuffix(tail + "/state")
        if nodes and node not in nodes:
            continue
        try:
            st = json.loads(payload)
        except ValueError:
            st = {"state": f"unreadable state {payload[:40]!r}"}
        rows.append((node, st))
    missing = sorted(set(nodes) - {n for n, _ in rows})
    for node, st in rows:
        if as_json:
            click.echo(json.dumps({"node": node, **st}, separators=(",", ":")))
            continue
        cfg = st.get("config") or {}
        devices = st.get("devices") or {}
        online = sum(1 for v in devices.values() if v == "online")
        line = (f"{node}: {st.get('state')}, config {cfg.get('applied', '?')}"
                + (f" (pending {cfg['pending']})" if cfg.get("pending") else "")
                + f", devices {online}/{len(devices)} online")
        click.echo(line + (f"; last error: {cfg['last_error']}" if cfg.get("last_error") else ""))
    for node in missing:
        click.echo(f"{node}: no retained state on {host}:{port}", err=True)
    if missing:
        sys.exit(1)


def command_replies(host: str, port: int, commands: dict[str, tuple[str, str, bytes]],
                    *, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Publish each node's command (``node -> (topic, id, signed token)``, QoS 1) and
    wait up to ``timeout_s`` for the replies on ``topic/reply`` carrying its ``id``;
    the replies by node (missing nodes did not answer in time)."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    ids = {node: cid for node, (_t, cid, _tok) in commands.items()}
    by_topic = {topic + "/reply": node for node, (topic, _id, _tok) in commands.items()}
    replies: dict[str, dict[str, Any]] = {}
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        node = by_topic.get(msg.topic)
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if node is not None and isinstance(body, dict) and body.get("id") == ids[node]:
            replies[node] = body

    c = _client()
    c.on_message = on_message
    c.on_subscribe = lambda *_: subscribed.set()
    _start(c, host, port)
    try:
        c.subscribe([(t, 1) for t in by_topic])
        subscribed.wait(ACK_TIMEOUT_S)
        for topic, _id, token in commands.values():
            c.publish(topic, token, qos=1).wait_for_publish(ACK_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(commands) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        c.disconnect()
        c.loop_stop()
    return replies


@cloud.command()
@click.option("--node", "nodes", multiple=True, required=True, help="Target gateway (repeat).")
@_signing_options
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for every node's reply.")
@click.argument("version", type=int, required=False)
def rollback(nodes: tuple[str, ...], key_path: Path, broker: str, prefix: str,
             timeout_s: float, version: int | None) -> None:
    """Tell each node to go back to VERSION (default: the version before its running
    one), signed, and wait for their replies; exit 1 unless all did."""
    from edge.sync.bundle import signed_command  # noqa: PLC0415

    host, port = _broker(broker)
    key = _private_key(key_path)
    now = datetime.now(UTC)
    commands = {}
    for node in nodes:
        cid, token = signed_command(key, "rollback", node=node, now=now, version=version)
        commands[node] = (prefix.format(node=node) + "/cmd/rollback", cid, token)
    replies = command_replies(host, port, commands, timeout_s=timeout_s)
    for node in nodes:
        r = replies.get(node)
        if r is None:
            click.echo(f"{node}: no reply within {timeout_s:g} s", err=True)
        elif r.get("ok"):
            click.echo(f"{node}: rolled back, running version {r.get('applied')}")
        else:
            click.echo(f"{node}: refused: {r.get('error')}", err=True)
    if len(replies) < len(nodes) or not all(r.get("ok") for r in replies.values()):
        sys.exit(1)


def _cli_value(text: str) -> Any:
    """A value given on the command line: a JSON scalar (``42``, ``-3.5``, ``true``,
    ``"7"`` for the text 7), else a decimal number as :func:`~edge.modbus.writer.
    parse_number` reads it (``+5``, ``.5``, ``007``), ``true``/``false`` in any case,
    else the text itself."""
    from edge.modbus.writer import parse_number  # noqa: PLC0415

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, bool | int | float | str):
        return value
    number = parse_number(text)
    if number is not None:
        return number
    return {"true": True, "false": False}.get(text.strip().lower(), text)


def _command_reply(node: str, key_path: Path, broker: str, prefix: str, timeout_s: float,
                   name: str, **fields: Any) -> dict[str, Any]:
    """Send the signed ``cmd/{name}`` with ``fields`` to ``node`` and return its reply
    when it did what was asked; otherwise say why on stderr and exit 1."""
    from edge.sync.bundle import signed_command  # noqa: PLC0415

    host, port = _broker(broker)
    cid, token = signed_command(_private_key(key_path), name, node=node,
                                now=datetime.now(UTC), **fields)
    topic = prefix.format(node=node) + f"/cmd/{name}"
    reply = command_replies(host, port, {node: (topic, cid, token)},
                            timeout_s=timeout_s).get(node)
    if reply is None:
        click.echo(f"{node}: no reply within {timeout_s:g} s", err=True)
        sys.exit(1)
    if not reply.get("ok"):
        kind = f" ({reply['kind']})" if reply.get("kind") else ""
        click.echo(f"{node}: failed{kind}: {reply.get('error')}", err=True)
        for prop, value in (reply.get("results") or {}).items():
            click.echo(f"{node}: written before the failure: {prop} = {json.dumps(value)}",
                       err=True)
        sys.exit(1)
    return reply


_DEVICE = click.argument("device", metavar="NAMESPACE/DEVICE")


_NEGATIVE_VALUES = {"ignore_unknown_options": True}
"""So that a negative value (``-40``) is a value, not an unknown option."""


@cloud.command(context_settings=_NEGATIVE_VALUES)
@click.option("--node", required=True, help="Target gateway.")
@_signing_options
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the reply.")
@_DEVICE
@click.argument("prop", metavar="PROPERTY")
@click.argument("value")
def write(node: str, key_path: Path, broker: str, prefix: str, timeout_s: float,
          device: str, prop: str, value: str) -> None:
    """Write VALUE (engineering units; JSON such as 42, -3.5, true or "7", else text) to
    PROPERTY of the device on the gateway NODE, signed; print the value read back.
    Exit 1 when it was refused or failed (the reason is printed)."""
    reply = _command_reply(node, key_path, broker, prefix, timeout_s, "write",
                           device=device, property=prop, value=_cli_value(value))
    click.echo(f"{node}: {device} {prop} = {json.dumps(reply.get('value'))} (read back)")


@cloud.command(name="call", context_settings=_NEGATIVE_VALUES)
@click.option("--node", required=True, help="Target gateway.")
@_signing_options
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the reply.")
@_DEVICE
@click.argument("method")
@click.argument("assignments", nargs=-1, required=True, metavar="PROPERTY=VALUE...")
def call(node: str, key_path: Path, broker: str, prefix: str, timeout_s: float,
         device: str, method: str, assignments: tuple[str, ...]) -> None:
    """Call the Device METHOD of the device on the gateway NODE with PROPERTY=VALUE
    pairs (values as for ``write``), signed; the gateway writes them in the method's
    order and stops at the first failure. Print the values read back; exit 1 on a
    failure (with what was written before it)."""
    values = {}
    for item in assignments:
        name, eq, text = item.partition("=")
        if not eq or not name:
            raise click.BadParameter(f"{item!r} is not PROPERTY=VALUE",
                                     param_hint="PROPERTY=VALUE")
        values[name] = _cli_value(text)
    reply = _command_reply(node, key_path, broker, prefix, timeout_s, "method",
                           device=device, method=method, values=values)
    for prop, value in reply.get("results", {}).items():
        click.echo(f"{node}: {device} {prop} = {json.dumps(value)} (read back)")


def _private_key(key_path: Path) -> Any:
    from edge.sync.bundle import load_private_key  # noqa: PLC0415

    try:
        return load_private_key(key_path.read_bytes(), where=str(key_path))
    except ValueError as e:
        raise click.ClickException(str(e)) from e


def _release_entry(archive: Path, url: str | None) -> dict[str, object]:
    """``agent.release`` for the release ``archive`` served at ``url``."""
    import hashlib  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("release.json")
            manifest = json.loads(member.read()) if member else None
    except (tarfile.TarError, KeyError, ValueError, OSError) as e:
        raise click.ClickException(f"{archive}: not a release archive ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("version"), str):
        raise click.ClickException(f"{archive}: release.json names no version")
    data = archive.read_bytes()
    return {"version": manifest["version"], "url": url or archive.resolve().as_uri(),
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


@cloud.command()
@click.option("--node", "nodes", multiple=True, required=True, help="Target gateway (repeat).")
@_signing_options
@_bundle_options
@click.option("--agent", "agent_path", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="A YAML file of agent-file sections the bundle overrides.")
@_release_options
@_plugin_option
@_policy_option
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
def push(nodes: tuple[str, ...], key_path: Path, broker: str, prefix: str,
         version: int | None, expires_s: int, agent_path: Path | None,
         release_path: Path | None, release_url: str | None,
         plugins: tuple[Path, ...], policies: tuple[Path, ...],
         sources: tuple[Path, ...]) -> None:
    """Sign a bundle of SOURCES (manifest files/directories, or one bundle .json) and
    publish it retained on each node's desired topic."""
    import yaml  # noqa: PLC0415

    from edge.sync.bundle import signed_bundle  # noqa: PLC0415

    host, port = _broker(broker)
    key = _private_key(key_path)
    agent = yaml.safe_load(agent_path.read_text(encoding="utf-8")) if agent_path else {}
    if release_path is not None:
        agent = {**(agent or {}), "release": _release_entry(release_path, release_url)}
    now = datetime.now(UTC)
    version = version or int(time.time())
    messages: list[tuple[str, bytes]] = []
    lines: list[str] = []
    if len(sources) == 1 and sources[0].suffix == ".json":
        everything = json.loads(sources[0].read_text(encoding="utf-8"))
    else:
        everything = _content_or_exit(sources)
    if plugins:
        everything = {**everything, "plugins": plugin_entries(plugins, key)}
    if policies:
        everything = {**everything, "policies": policy_entries(policies)}
    for node in nodes:
        body = {"agent": agent or {}, **for_node(everything, node)}
        topic = prefix.format(node=node) + "/desired"
        messages.append((topic, signed_bundle(body, key, version=version, node=node, now=now,
                                              expires_s=expires_s)))
        lines.append(f"{node}: version {version} -> {topic} ({len(body.get('devices', []))} "
                     f"devices, {len(body.get('deviceModels', []))} models, "
                     f"{len(body.get('plugins', []))} plugins, "
                     f"{len(body.get('policies', []))} policies)")
    publish_retained(host, port, messages)
    for line in lines:
        click.echo(line)


@cloud.command()
@click.option("--node", "nodes", multiple=True, required=True,
              help="Target gateway (repeat), in rollout order.")
@click.option("--canary", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes in the first stage.")
@click.option("--stage", type=click.IntRange(min=1), default=None,
              help="Nodes per later stage (default: as many as the canary).")
@_signing_options
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True,
              help="Seconds a stage may take to commit (health window included).")
@_bundle_options
@_release_options
@_plugin_option
@_policy_option
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
def rollout(nodes: tuple[str, ...], canary: int, stage: int | None, key_path: Path,
            broker: str, prefix: str, version: int | None, timeout_s: float, expires_s: int,
            release_path: Path | None, release_url: str | None,
            plugins: tuple[Path, ...], policies: tuple[Path, ...],
            sources: tuple[Path, ...]) -> None:
    """Push a bundle of SOURCES to the canary nodes, then in stages once each stage has
    committed it; on the first failure stop, and roll the nodes that took it back."""
    from edge.rollout import Rollout  # noqa: PLC0415

    host, port = _broker(broker)
    key = _private_key(key_path)
    content: dict[str, Any] = dict(_content_or_exit(sources))
    if plugins:
        content["plugins"] = plugin_entries(plugins, key)
    if policies:
        content["policies"] = policy_entries(policies)
    if release_path is not None:
        content["agent"] = {"release": _release_entry(release_path, release_url)}
    ok = Rollout(host, port, prefix, key, click.echo).run(
        list(nodes), content, version=version or int(time.time()), canary=canary,
        stage=stage or canary, timeout_s=timeout_s, expires_s=expires_s)
    if not ok:
        sys.exit(1)
