"""``edge cloud rollout``: a bundle to many gateways in stages, canary first.

The bundle goes to the first ``canary`` nodes; the rollout waits until each of them
has committed it, as its retained ``state`` says (``config.applied`` is the new
version and nothing is pending), then goes on with the next ``stage`` nodes, and so
on. A node whose state says the version failed (``last_error`` about it: rolled back
by its health window, or refused) or that does not commit within ``timeout_s``
stops the rollout: no later node gets the bundle, and the nodes that committed it in
this rollout are told to roll back (signed ``cmd/rollback`` to the version they ran
before).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.sync.bundle import signed_bundle, signed_command

POLL_S = 0.1


@dataclass
class Rollout:
    """One rollout over one broker connection; :meth:`run` does it."""

    host: str
    port: int
    prefix: str
    key: Any
    echo: Callable[[str], None]
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _topic(self, node: str, leaf: str) -> str:
        return self.prefix.format(node=node) + "/" + leaf

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        head, _, tail = self.prefix.partition("{node}")
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        rest = msg.topic.removeprefix(head)
        with self._lock:
            if rest.endswith(tail + "/state"):
                self.states[rest.removesuffix(tail + "/state")] = body
            elif rest.endswith(tail + "/cmd/rollback/reply"):
                self.replies[str(body.get("id"))] = body

    def _applied(self, node: str) -> tuple[int | None, int | None, str]:
        with self._lock:
            cfg = (self.states.get(node) or {}).get("config") or {}
        return cfg.get("applied"), cfg.get("pending"), str(cfg.get("last_error") or "")

    def _wait(self, nodes: Sequence[str], version: int, timeout_s: float) -> tuple[str, str]:
        """("", "") when every node committed ``version``; else (node, why)."""
        deadline = time.monotonic() + timeout_s
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                applied, pending, error = self._applied(node)
                if applied == version and pending is None:
                    waiting.remove(node)
                elif pending != version and error.startswith(f"version {version}"):
                    return node, error
            if time.monotonic() > deadline:
                return waiting[0], f"did not commit version {version} within {timeout_s:g} s"
            time.sleep(POLL_S)
        return "", ""

    def run(self, nodes: Sequence[str], content: dict[str, Any], *, version: int,
            canary: int, stage: int, timeout_s: float, expires_s: int) -> bool:
        """Roll ``content`` (a bundle without version and node) out; True when every
        node committed it."""
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=f"edge-rollout-{os.getpid()}")
        c.on_message = self._on_message
        subscribed = threading.Event()
        c.on_subscribe = lambda *_: subscribed.set()
        c.connect(self.host, self.port)
        c.loop_start()
        try:
            c.subscribe([(self._topic(n, leaf), 1) for n in nodes
                         for leaf in ("state", "cmd/rollback/reply")])
            subscribed.wait(10)
            time.sleep(0.5)  # the retained states arrive
            before = {n: self._applied(n)[0] for n in nodes}
            now = datetime.now(UTC)
            done: list[str] = []
            stages = [list(nodes[:canary])] + [list(nodes[i:i + stage])
                                               for i in range(canary, len(nodes), stage)]
            given = 0
            for i, group in enumerate(g for g in stages if g):
                given += len(group)
                self.echo(f"stage {i + 1}{' (canary)' if i == 0 else ''}: "
                          f"{', '.join(group)} <- version {version}")
                for node in group:
                    token = signed_bundle(content, self.key, version=version, node=node,
                                          now=now, expires_s=expires_s)
                    c.publish(self._topic(node, "desired"), token, qos=1,
                              retain=True).wait_for_publish(10)
                failed, why = self._wait(group, version, timeout_s)
                done += [n for n in group if n != failed and self._applied(n)[0] == version]
                if failed:
                    self.echo(f"{failed}: {why}; rollout stopped, {len(nodes) - given} "
                              "node(s) not given it")
                    self._roll_back(c, done, before)
                    return False
                self.echo(f"stage {i + 1}: committed")
            return True
        finally:
            c.disconnect()
            c.loop_stop()

    def _roll_back(self, c: mqtt.Client, nodes: list[str], before: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        ids = {}
        for node in nodes:
            ids[node], token = signed_command(self.key, "rollback", node=node, now=now,
                                              version=before[node])
            c.publish(self._topic(node, "cmd/rollback"), token, qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(i not in self.replies for i in ids.values()):
            time.sleep(POLL_S)
        for node, cid in ids.items():
            r = self.replies.get(cid)
            outcome = ("no reply" if r is None else
                       f"back on version {r.get('applied')}" if r.get("ok") else
                       f"refused: {r.get('error')}")
            self.echo(f"{node}: rolled back ({outcome})")
