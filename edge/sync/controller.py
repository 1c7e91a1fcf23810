"""Desired bundles in the running agent: verify, validate, apply, health window, decide.

The agent subscribes to its retained ``{prefix}/desired`` (QoS 1). Each new bundle is
verified (:mod:`edge.sync.bundle`) and validated like ``edge check`` in the forked
child (:func:`edge.config.runtime.load_runtime_config`), then applied as one unit,
hot (:meth:`edge.agent.Agent.apply_devices`) when it changes only devices, the log
level and the health window; otherwise (broker, QoS, store bounds, Modbus timing, …)
by restarting the agent: the version is recorded pending "to be applied by a restart",
the agent stops cleanly and ``edge run`` executes itself again (same PID), and the new
process runs that version and opens its window (:func:`start_up`). Either way it is
watched for the new configuration's ``sync.health_window`` seconds:

* the uplink must be connected at the end of the window;
* no device may be offline at the end that was online before (or is new);
* no agent task may have failed during the window;
* no plugin it loaded anew may have failed to load, or be quarantined at the end.

Then the version is committed (it runs after a restart too), or the agent goes back to
the last committed version and records why (hot, or by another restart when the
version was applied by one). A restart during the window (a crash, a power cut; for a
version applied by a restart, a second one) counts as a failure: at start-up the
pending version is rolled back before anything runs. A version once rolled back is
never applied again, and a bundle must be newer than the newest version ever taken
(also after a rollback to an older one); the cloud pushes a new version instead.
A bundle's ``agent.release`` other than the running agent's is a self-update: it is
installed beside the running release first, then the bundle is applied by a restart
onto it, on trial; the window commits or reverts both (:mod:`edge.sync.release`).
Rollbacks on request come from ``edge rollback`` (through the history file) and from
signed ``cmd/rollback`` commands.

Signed commands (:data:`edge.uplink.topics.COMMANDS`) arrive on ``…/cmd/{name}``, are
verified in the forked child like bundles (a command must come on its own topic), done
once per ``id`` and answered on ``…/cmd/{name}/reply``: ``{"id", "ok", "error"}`` plus
``applied`` (rollback), ``value`` (write: the read-back), ``results`` (method: read-backs
by property); a failed write or method adds ``kind`` and ``stage``, a method
``written_before``. Writes and method calls run as tasks of their own
(:class:`edge.sync.writes.Writes`).

Events on ``…/events``: ``config_refused`` (``version`` once verified, else
``claimed_version``; ``reason`` — one of :data:`edge.sync.bundle.Reason`,
``rolled_back``, ``rollback`` for a rollback that cannot be done, or ``release`` for an
agent release that cannot be installed — and ``error``),
``config_applied`` (``version``; ``added``/``changed``/``removed`` when hot, else
``restart``: the settings that need it),
``config_committed`` (``version``) and ``config_rolled_back`` (``version``,
``reason``, ``to``). The retained ``state`` carries ``config: {applied, pending,
last_error}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edge import __version__
from edge.config.errors import ConfigError
from edge.config.runtime import (
    BundleRefusedError,
    BundleSource,
    ChildCall,
    RuntimeConfig,
    load_runtime_config,
)
from edge.modbus.writer import WriteError
from edge.store.history import History
from edge.sync.release import ReleaseSwitch
from edge.uplink.payload import json_bytes
from edge.uplink.topics import COMMANDS, MAX_COMMAND_BYTES

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger(__name__)

MAX_ID = 128
"""Longest command id echoed in the reply to a command that did not verify."""
REFUSED_LOG_S = 10.0
REQUEST_POLL_S = 1.0
"""How often the history is asked for rollbacks requested on the gateway."""
MAX_PROBLEMS = 20
"""Problems listed in a ``config_refused`` event at most (the log has all)."""


def _check_command(agent_file: Path, token: bytes, name: str) -> object:
    """In the child: ("ok", payload) of a verified command, or ("refused", reason,
    message)."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from edge.config.load import load_agent_file  # noqa: PLC0415
    from edge.sync.bundle import BundleError, load_public_key, verify_command  # noqa: PLC0415

    try:
        agent = load_agent_file(agent_file)
        keys = [load_public_key(Path(k).read_bytes(), where=str(k)) for k in agent.trust.keys]
        return ("ok", verify_command(token, keys, node=agent.node, now=datetime.now(UTC),
                                     expected=name))
    except BundleError as e:
        return ("refused", e.reason, str(e))
    except ConfigError as e:
        return ("refused", "invalid", str(e.problems[0]))


def _unverified(token: bytes) -> object:
    """A JWS's payload (or plain JSON, unsigned) as it claims to be, unverified; None
    when unreadable."""
    try:
        return json.loads(token)
    except ValueError:
        try:
            part = token.split(b".")[1]
            return json.loads(base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4)))
        except (IndexError, ValueError):
            return None


def _claimed(token: bytes, key: str) -> object:
    """What a JWS's payload claims under ``key``, unverified (None when unreadable): a
    refused command is answered under its ``id`` so the sender can match it, a refused
    bundle is reported with the version it claims."""
    claimed = _unverified(token)
    value = claimed.get(key) if isinstance(claimed, dict) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def check_command(agent_file: Path, token: bytes, name: str) -> dict[str, Any]:
    """Verify a signed command that came on ``cmd/{name}`` in a forked child (the
    crypto stays there).

    Raises:
        BundleRefusedError: with the reason it was refused.
    """
    outcome = ChildCall(lambda: _check_command(agent_file, token, name),
                        label="command").outcome()
    if isinstance(outcome, tuple) and outcome[0] == "ok":
        return dict(outcome[1])
    _, reason, message = outcome if isinstance(outcome, tuple) else ("", "invalid", "?")
    raise BundleRefusedError(reason, message, None)


@dataclass(frozen=True, slots=True)
class StartUp:
    """What :func:`start_up` found: the configuration to run, a version it rolled back
    (``(version, reason)``, to be reported once the uplink is up), or the version this
    start applies for a restart (``resumed``, with the device states ``before`` it:
    its health window starts now). ``last_error`` says why the newest version taken
    is not running, when it was rolled back (before this start, too)."""

    cfg: RuntimeConfig
    rolled_back: tuple[int, str] | None = None
    resumed: int | None = None
    before: Mapping[str, str] = field(default_factory=dict)
    last_error: str = ""


def _bundle_config(agent_file: Path, content: Mapping[str, Any]) -> RuntimeConfig | str:
    """The agent file with the kept bundle ``content`` applied, or why it does not
    validate (all of it logged)."""
    try:
        return load_runtime_config(agent_file, source=BundleSource(content=content))
    except ConfigError as e:
        log.error("configuration version %s does not validate with %s:", content.get("version"),
                  agent_file)
        for p in e.problems:
            log.error("  %s", p)
        return f"it does not validate with {agent_file} ({e.problems[0].message})"


def start_up(history: History, agent_file: Path, local: RuntimeConfig) -> StartUp:
    """At start-up, before anything runs: decide on a version left pending by the
    previous process, and load the configuration to run.

    A pending version that was to be applied by this restart is run, with its health
    window from now (unless it does not validate: then it is rolled back). Any other
    pending version is rolled back: the agent restarted (or died) in its window. The
    configuration is then the newest committed version on top of the agent file
    ``local`` (the file alone when there is none, or when it no longer validates, e.g.
    after the file was edited; the log says why).
    """
    history.commit_baseline({"version": 0})
    taken = history.take_restart()
    rolled_back = None
    if taken is not None:
        version, before = taken
        cfg = _bundle_config(agent_file, version.content)
        if isinstance(cfg, RuntimeConfig) and cfg.release and cfg.release.version != __version__:
            cfg = ReleaseSwitch.from_env().not_running(cfg.release.version)
        if isinstance(cfg, RuntimeConfig):
            return StartUp(cfg, resumed=version.version, before=before)
        rolled_back = (version.version, cfg)
        history.roll_back(*rolled_back)
    pending = history.pending()
    if pending is not None:
        rolled_back = (pending.version, "the agent restarted during the health window")
        history.roll_back(*rolled_back)
    newest = history.get(history.newest())
    last_error = (f"version {newest.version} rolled back: {newest.reason}"
                  if newest is not None and newest.state == "rolled_back" else "")
    committed = history.committed()
    if committed is None or committed.version == 0:
        return StartUp(local, rolled_back, last_error=last_error)
    cfg = _bundle_config(agent_file, committed.content)
    if isinstance(cfg, str):
        log.error("running the agent file alone")
        return StartUp(local, rolled_back, last_error=last_error)
    return StartUp(cfg, rolled_back, last_error=last_error)


class ConfigSync:
    """Owns the desired-bundle pipeline of one agent; :meth:`run` until cancelled."""

    def __init__(
        self,
        agent: Agent,
        agent_file: Path,
        history: History,
        start: StartUp | None = None,
    ) -> None:
        self.agent = agent
        self.agent_file = agent_file
        self.history = history
        self._inbox: asyncio.Queue[bytes | tuple[str, int | None, str]] = asyncio.Queue()
        """Bundles (their JWS), and rollback commands ``(id, version, reply topic)``."""
        self._commands: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._refused = 0
        self._refused_logged_at = -REFUSED_LOG_S
        self._writing: set[asyncio.Task[None]] = set()
        self._last_token = b""
        self._pending: int | None = start.resumed if start else None
        """The version in its health window (from the start: one applied by a restart)."""
        self._start = start or StartUp(agent.cfg)
        self._last_error = self._start.last_error
        self._restart_for = ""
        """Why the agent is to restart once the message at hand is answered."""
        self.release = ReleaseSwitch.from_env()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- MQTT (paho's thread) -------------------------------------------------------

    def _subscribe(self) -> None:
        client, topics = self.agent.uplink.client.paho, self.agent.topics
        for topic in (topics.desired, *map(topics.command, COMMANDS)):
            client.message_callback_add(topic, self._on_message)
            client.subscribe(topic, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._loop is None or not msg.payload:
            return
        if msg.topic == self.agent.topics.desired:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, bytes(msg.payload))
        else:
            self._loop.call_soon_threadsafe(self._commands.put_nowait,
                                            (msg.topic.rpartition("/")[2], bytes(msg.payload)))

    # -- the loop -------------------------------------------------------------------

    def _report_state(self) -> None:
        cfg = self.agent.cfg
        self.agent.uplink.set_config(cfg.version, {
            "applied": cfg.bundle_version, "pending": self._pending,
            "last_error": self._last_error})

    def _event(self, kind: str, **fields: Any) -> None:
        self.agent.config_events[kind] += 1
        self.agent.uplink.publish_event(kind, **fields)

    async def run(self) -> None:
        """Subscribe, then handle each bundle as it arrives (cancel to stop)."""
        self._loop = asyncio.get_running_loop()
        if self._start.rolled_back is not None:
            version, reason = self._start.rolled_back
            self._last_error = f"version {version} rolled back: {reason}"
            log.error("configuration version %d rolled back: %s", version, reason)
            self._event("config_rolled_back", version=version, reason=reason,
                        to=self.agent.cfg.bundle_version)
        if self._start.resumed is None and self.release.on_trial():
            why = "no configuration version awaits this release"
            self.release.revert(why)
            self._restart_for = f"release {__version__} reverted: {why}"
        self._report_state()
        self.agent.uplink.client.add_connect_hook(self._subscribe)
        if self.agent.uplink.client.stats.connected:
            self._subscribe()
        commands = asyncio.create_task(self._command_loop(), name="commands")
        try:
            if self._start.resumed is not None:
                await self._resume(self._start.resumed, self._start.before)
            await self._config_loop()
        finally:
            commands.cancel()
        self.agent.request_restart(self._restart_for)

    async def _config_loop(self) -> None:
        """Bundles, and rollbacks asked for on the gateway or by command, one at a time,
        until one needs the agent to restart."""
        while not self._restart_for:
            try:
                item = await asyncio.wait_for(self._inbox.get(), REQUEST_POLL_S)
            except TimeoutError:
                for target in self.history.take_requests():
                    await self.roll_back_to(target)
                    if self._restart_for:
                        break
                continue
            if isinstance(item, bytes):
                if item != self._last_token:
                    self._last_token = item
                    await self._handle(item)
                continue
            cid, version, reply = item
            error = await self.roll_back_to(version)
            committed = self.history.committed()
            self._reply(reply, {"id": cid, "ok": not error, "error": error,
                                "applied": committed.version if committed else 0,
                                "restart": bool(self._restart_for)})

    async def _command_loop(self) -> None:
        """Signed commands as they come, also during a health window."""
        while True:
            name, token = await self._commands.get()
            await self._command(name, token)

    async def _resume(self, version: int, before: Mapping[str, str]) -> None:
        """The health window of ``version``, which this process started to apply."""
        new = {d.key for d in self.agent.cfg.devices} - set(before)
        self._pending = version
        self._report_state()
        log.info("configuration version %d started by a restart; health window %g s",
                 version, self.agent.cfg.health_window_s)
        await self._decide(version, before, new, back=None,
                           plugins=tuple(s.name for s in self.agent.cfg.plugins))

    async def _command(self, name: str, token: bytes) -> None:
        """A ``cmd/{name}``: verified in the child, carried out once per ``id`` (also
        across restarts), answered on ``cmd/{name}/reply``. A write or method call runs
        as a task of its own; a rollback goes to the configuration loop, and is refused
        at once while a version is in its health window. A command that does not verify
        is answered (``kind: refused`` and its ``reason``) and logged, nothing else:
        any client of the broker can send one."""
        reply = self.agent.topics.command(name) + "/reply"
        try:
            if len(token) > MAX_COMMAND_BYTES:
                raise BundleRefusedError("malformed", f"the command is {len(token)} bytes, "
                                         f"more than {MAX_COMMAND_BYTES}", None)
            cmd = await asyncio.to_thread(check_command, self.agent_file, token, name)
        except ConfigError as e:
            reason = e.reason if isinstance(e, BundleRefusedError) else "invalid"
            self._log_refused(name, e.problems[0].message)
            cid = _claimed(token, "id")
            self._reply(reply, {"id": cid if isinstance(cid, str) and len(cid) <= MAX_ID else None,
                                "ok": False, "kind": "refused", "reason": reason,
                                "error": e.problems[0].message})
            return
        cid = cmd["id"]
        expires_ms = int(datetime.fromisoformat(cmd["expires_at"]).timestamp() * 1000)
        if not self.history.take_command(cid, expires_ms):
            self._reply(reply, {"id": cid, "ok": False, "kind": "refused", "reason": "replayed",
                                "error": f"command {cid} was already carried out (a replay)"})
            return
        if name == "rollback":
            if self._pending is not None:
                self._reply(reply, {"id": cid, "ok": False, "kind": "refused",
                                    "reason": "pending", "error": f"version {self._pending} is "
                                    "in its health window; ask again when it is decided"})
            else:
                self._inbox.put_nowait((cid, cmd.get("version"), reply))
            return
        task = asyncio.create_task(self._write(name, cmd, reply), name=f"cmd/{name}[{cid}]")
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    def _log_refused(self, name: str, error: str) -> None:
        """Log a refused command: at most once per REFUSED_LOG_S, with how many since."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_LOG_S:
            log.warning("cmd/%s refused: %s (%d refused since the last report)", name,
                        error[:200], self._refused)
            self._refused, self._refused_logged_at = 0, now

    async def _write(self, name: str, cmd: Mapping[str, Any], reply: str) -> None:
        """A verified ``cmd/write`` or ``cmd/method``, answered with the read-back
        (``value``; ``results`` by property for a method) or the failure (``kind``,
        ``stage``; for a method ``written_before`` and their ``results``)."""
        writes, cid, device = self.agent.writes, cmd["id"], cmd["device"]
        answer: dict[str, Any] = {"id": cid, "device": device}
        try:
            if name == "write":
                answer["property"] = cmd["property"]
                answer["value"] = await writes.write(device, cmd["property"], cmd["value"],
                                                     cid=cid)
            else:
                answer["method"] = cmd["method"]
                answer["results"] = await writes.call(device, cmd["method"], cmd["values"],
                                                      cid=cid)
        except WriteError as e:
            answer.update(ok=False, error=str(e), kind=e.kind, stage=e.stage)
            if name == "method":
                answer.update(written_before=list(e.written_before), results=e.results)
        else:
            answer.update(ok=True, error="")
        self._reply(reply, answer)

    def _reply(self, topic: str, body: Mapping[str, Any]) -> None:
        self.agent.uplink.client.publish(topic, json_bytes(dict(body)))

    async def roll_back_to(self, target: int | None) -> str:
        """Go back, on request, to the kept version ``target`` (None: the one before
        the running version), commit it at once, and never apply the left version
        again. Refused (``config_refused``, reason ``rollback``) when there is no such
        version or it does not validate any more. Returns why it was refused ("" when
        done)."""
        running = self.agent.cfg
        if target is None:
            previous = self.history.previous()
            if previous is None:
                return self._refuse(None, "rollback",
                                    "there is no earlier version to roll back to")
            target = previous.version
        kept = self.history.get(target)
        if kept is None or kept.state == "rolled_back":
            why = "is not in the history" if kept is None else f"was rolled back ({kept.reason})"
            return self._refuse(target, "rollback",
                                f"cannot roll back to version {target}: it {why}")
        source = BundleSource(content=kept.content) if target > 0 else None
        try:
            new = await asyncio.to_thread(load_runtime_config, self.agent_file, source=source)
        except ConfigError as e:
            errors = [str(p) for p in e.problems if p.severity == "error"]
            return self._refuse(target, "rollback",
                                f"version {target} does not validate any more", errors)
        from edge.agent import needs_restart  # noqa: PLC0415

        fixed = needs_restart(running, new)
        reason = f"rolled back on request to version {target}"
        self.history.reinstate(target, reason)
        if fixed:
            self._restart_for = f"rolling back to version {target} changes {', '.join(fixed)}"
        else:
            await self.agent.apply_devices(new)
        self._last_error = ""
        log.warning("configuration version %d %s", running.bundle_version, reason)
        self._event("config_rolled_back", version=running.bundle_version, reason=reason,
                    to=target)
        self._report_state()
        return ""

    def _refuse(self, version: int | None, reason: str, error: str,
                problems: list[str] | None = None, *, claimed: object = None) -> str:
        """Report a refusal; ``version`` is known only once verified, ``claimed`` is
        what an unverified bundle says (reported as ``claimed_version``)."""
        self._last_error = f"version {version}: {error}" if version else error
        log.error("desired configuration refused (%s): %s", reason, error)
        for p in problems or []:
            log.error("  %s", p)
        self._event("config_refused", version=version, reason=reason, error=error,
                    **({"problems": problems[:MAX_PROBLEMS]} if problems else {}),
                    **({"claimed_version": claimed} if version is None and claimed else {}))
        self._report_state()
        return error

    async def _handle(self, token: bytes) -> None:
        running = self.agent.cfg
        # newer than anything taken before: a rollback must not reopen older bundles
        source = BundleSource(token=token, running_version=max(running.bundle_version,
                                                               self.history.newest()))
        try:
            new = await asyncio.to_thread(load_runtime_config, self.agent_file, source=source)
        except BundleRefusedError as e:
            known = self.history.get(e.version) if e.version is not None else None
            if (e.reason == "replayed" and e.version == running.bundle_version
                    and _unverified(token) == running.bundle):
                # the retained bundle again, e.g. after a restart: it is what runs
                log.debug("bundle version %s is the running one", e.version)
            elif known is not None and known.state == "rolled_back":
                self._refuse(e.version, "rolled_back", f"version {e.version} was rolled back "
                             f"before ({known.reason}); push a new version")
            else:
                self._refuse(e.version, e.reason, e.problems[0].message,
                             claimed=_claimed(token, "version"))
            return
        except ConfigError as e:
            errors = [str(p) for p in e.problems if p.severity == "error"]
            self._refuse(None, "invalid", f"{len(errors)} problem(s) in the bundle", errors,
                         claimed=_claimed(token, "version"))
            return
        from edge.agent import needs_restart  # noqa: PLC0415 (the agent imports this module)

        fixed = needs_restart(running, new)
        update = self.release.due(new)
        if update is not None:
            error = await self.release.stage(update)
            if error:
                self._refuse(new.bundle_version, "release", error)
                return
            fixed.append("release")
        if fixed:
            self._apply_by_restart(new, fixed, update.version if update else None)
            return
        await self._apply(running, new)

    def _apply_by_restart(self, new: RuntimeConfig, fixed: list[str],
                          release: str | None) -> None:
        """``new`` changes settings a running agent cannot: record it as pending, to be
        applied by restarting the agent (its health window starts in the new process),
        on the installed ``release`` (on trial) when it brings one."""
        version = new.bundle_version
        self.history.add_pending(version, new.bundle or {},
                                 restart_before=self.agent.device_states())
        error = self.release.switch(release) if release else ""
        if error:
            self.history.roll_back(version, error)
            self._last_error = f"version {version} rolled back: {error}"
            log.error("configuration version %d rolled back: %s", version, error)
            self._event("config_rolled_back", version=version, reason=error,
                        to=self.agent.cfg.bundle_version)
            self._report_state()
            return
        self._pending = version
        self._last_error = ""
        self._report_state()
        self._event("config_applied", version=version, restart=fixed)
        log.warning("configuration version %d changes %s: restarting the agent to apply it",
                    version, ", ".join(fixed))
        self._restart_for = f"configuration version {version} changes {', '.join(fixed)}"

    def _healthy(self, before: Mapping[str, str], changed: set[str],
                 plugins: tuple[str, ...]) -> str:
        """Why the configuration just applied is not healthy ("" when it is); ``plugins``
        were loaded anew by it."""
        agent = self.agent
        if not agent.uplink.client.stats.connected:
            return "the uplink is not connected at the end of the health window"
        if agent.task_failures:
            return f"{agent.task_failures} agent task(s) failed during the health window"
        states = agent.device_states()
        down = sorted(k for k, st in states.items()
                      if st != "online" and (before.get(k) == "online" or k in changed))
        if down:
            return f"device(s) {', '.join(down)} not online after the change"
        trouble = agent.plugins.trouble(plugins) if agent.plugins is not None else []
        if trouble:
            return f"plugin(s) failing after the change: {'; '.join(trouble)}"
        return ""

    async def _apply(self, running: RuntimeConfig, new: RuntimeConfig) -> None:
        version, agent = new.bundle_version, self.agent
        before = agent.device_states()
        self.history.add_pending(version, new.bundle or {})
        self._pending = version
        self._last_error = ""
        self._report_state()
        agent.task_failures = 0
        changes = await agent.apply_devices(new)
        self._event("config_applied", version=version, added=list(changes.added),
                    changed=list(changes.changed), removed=list(changes.removed))
        log.info("configuration version %d applied; health window %g s", version,
                 new.health_window_s)
        await self._decide(version, before, {*changes.added, *changes.changed}, back=running,
                           plugins=changes.plugins)

    async def _decide(self, version: int, before: Mapping[str, str], changed: set[str], *,
                      back: RuntimeConfig | None, plugins: tuple[str, ...]) -> None:
        """Wait out the health window of the applied ``version``, then commit it or roll
        it back: hot to ``back``, or (None) by a restart onto the committed version."""
        await asyncio.sleep(self.agent.cfg.health_window_s)
        why = self._healthy(before, changed, plugins)
        self._pending = None
        if not why:
            if back is None:  # the release first: a power cut between the two leaves
                self.release.commit()  # it running, and the version rolled back at start
            self.history.commit(version)
            self._last_error = ""
            log.info("configuration version %d committed", version)
            self._event("config_committed", version=version)
            self._report_state()
            return
        self.history.roll_back(version, why)
        committed = self.history.committed()
        to = committed.version if committed else 0
        if back is None:
            self.release.revert(f"configuration version {version} rolled back: {why}")
            self._restart_for = f"configuration version {version} rolled back"
        else:
            await self.agent.apply_devices(back)
        self._last_error = f"version {version} rolled back: {why}"
        log.error("configuration version %d rolled back to %d: %s", version, to, why)
        self._event("config_rolled_back", version=version, reason=why, to=to)
        self._report_state()
