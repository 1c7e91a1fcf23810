"""The agent's side of the datapath: puts the configured policy into the kernel, keeps
the workloads' cgroup ids current, reads the drop events and answers for the status.

States (``Enforcer.state``):

``off``
    no policy is configured (and none was pinned before): nothing is loaded.
``enforced``
    the kernel holds the policy (policies in ``audit`` mode report would-drops and
    drop nothing; ``modes`` says which run in which mode).
``unenforced``
    a policy is configured but the kernel does not hold it; ``reason`` says why (no
    root or CAP_BPF, no cgroup v2, no bpffs, libbpf missing, the verifier's refusal).
    Nothing is pretended: connections are not policed.

A configuration without policies on a gateway where a datapath is pinned (from before)
loads empty tables into it: nothing is policed, and the pins stay until
``edge policy remove``.

The state file (``state_path``, JSON, rewritten atomically when something changed and
at most every :data:`STATE_EVERY_S` for events) is what ``edge policy status`` reads
besides the kernel's counters: the rules by id, the workloads' cgroups, and the recent
drops.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from edge.policy.spec import PolicySettings

if TYPE_CHECKING:  # the compiler and the datapath are imported only with a policy
    from edge.policy.evaluator import FlatRule
    from edge.policy.tables import Tables

log = logging.getLogger(__name__)

RECENT: Final = 200
"""Drop events kept for the page, the API and the state file (newest last)."""
STATE_EVERY_S: Final = 5.0
WATCH_S: Final = 1.0
"""How often the workloads' cgroups are looked up again (a restarted systemd unit gets
a new cgroup, with a new id) and the event ring is read."""
NAME_SEARCH: Final = 1000
"""Directories looked through to name a cgroup below a workload (a drop event's)."""
State = Literal["off", "enforced", "unenforced"]
_PROTOCOLS: Final = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMP"}


@dataclass(frozen=True, slots=True)
class Drop:
    """One drop (or audit would-drop) as shown: wall-clock ``time_ms``, the
    ``workload`` (the socket's cgroup path, or ``cgroup <id>`` if it is gone), the
    ``rule`` id and where it comes from, ``direction`` of the connection, ``address``
    (remote), ``protocol`` and ``port``."""

    time_ms: int
    verdict: str
    workload: str
    rule: int
    where: str
    direction: str
    address: str
    protocol: str
    port: int


def rule_row(r: FlatRule) -> dict[str, Any]:
    """A rule as the status shows it (JSON-ready)."""
    return {"id": r.id, "where": r.where, "what": r.describe(), "action": r.action,
            "enforce": r.enforce, "direction": r.direction, "workload": r.workload,
            "policy": r.policy, "section": r.section}


class Enforcer:
    """Holds ``settings`` in the kernel for the agent. ``on_drop`` is called (in the
    event loop) with each drop event; ``state_path`` is where the status is kept for
    ``edge policy status`` (None: nowhere)."""

    def __init__(self, settings: PolicySettings, state_path: Path | None = None,
                 on_drop: Callable[[Drop], None] | None = None) -> None:
        self.settings = settings
        self.state_path = state_path
        self.on_drop = on_drop
        self.state: State = "off"
        self.reason = ""
        self.tables: Tables | None = None
        self.cgroups: dict[str, int | None] = {}
        self.applied_ms = 0
        self.update_s = 0.0
        self.updates = 0
        self.recent: collections.deque[Drop] = collections.deque(maxlen=RECENT)
        self.drops = collections.Counter[str]()
        """Drop events read, by verdict (``drop``, ``would-drop``)."""
        self._dp: Any = None  # edge.policy.datapath.Datapath, imported when needed
        self._ring: Any = None
        self._gens: dict[int, list[str]] = {}
        """Where each rule comes from, by generation (events name a generation's)."""
        self.gen: int | None = None
        self._names: dict[int, str] = {}
        self._state_written = 0.0
        self._state_dirty = False

    @property
    def pin(self) -> Path:
        return Path(self.settings.pin_dir)

    def start(self) -> State:
        """Loads the policy into the kernel (before the agent opens any connection);
        never raises: a failure is the ``unenforced`` state with its reason. The
        recent drops of the previous run (the state file) are kept: a restart to roll
        a policy back must not hide what it dropped."""
        self._load_recent()
        if not self.settings.policies and not (self.pin / "link-egress").exists():
            self.state, self.reason = "off", "no policy is configured"
            self._write_state()
            return self.state
        from edge.policy.tables import TooManyRules, compile_tables  # noqa: PLC0415

        try:
            self.tables = compile_tables(self.settings)
        except TooManyRules as e:
            return self._unenforced(str(e))
        try:
            from edge.policy.datapath import Datapath  # noqa: PLC0415 - only with a policy
            self._dp = Datapath.open(self.pin, backend=self.settings.backend)
            self.state = "enforced" if self.settings.policies else "off"
            self.reason = "" if self.settings.policies else (
                f"no policy is configured; the datapath pinned at {self.pin} polices "
                "nothing (edge policy remove takes it away)")
            self._apply()
            self._ring = self._dp.ring(self._on_event)
        except OSError as e:
            if self._dp is not None:
                self._dp.close()
                self._dp = None
            held = (f"; the datapath pinned at {self.pin} before still enforces what it "
                    "was given last (edge policy remove takes it away)"
                    if (self.pin / "link-egress").exists() else "")
            return self._unenforced(_why(e) + held)
        log.info("network policy: %s", self.summary())
        return self.state

    def _load_recent(self) -> None:
        if self.state_path is None:
            return
        try:
            before = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.recent.extend(Drop(**d) for d in before.get("recent", []))
            if isinstance(before.get("gen"), int):  # events of it may still be in the ring
                self._gens[before["gen"]] = [r["where"] for r in before.get("rules", [])]
        except (OSError, ValueError, TypeError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("network policy: %s is not readable (%s); starting afresh",
                            self.state_path, e)

    def _unenforced(self, reason: str) -> State:
        self.state, self.reason = "unenforced", reason
        log.error("network policy NOT enforced: %s", reason)
        self._write_state()
        return self.state

    def _apply(self) -> None:
        assert self.tables is not None
        assert self._dp is not None
        from edge.policy.datapath import cgroup_ids  # noqa: PLC0415
        ids = cgroup_ids(self._dp.cgroup_root, self.tables.workloads)
        applied = self._dp.apply(self.tables, ids)
        self.gen = applied.gen
        self._gens[applied.gen] = [r.where for r in self.tables.rules]
        self.cgroups = ids
        self._names = {cg: path for path, cg in ids.items() if cg is not None}
        self.applied_ms = int(time.time() * 1000)
        self.update_s = applied.seconds
        self.updates += 1
        for path, cg in ids.items():
            if cg is None:
                log.warning("network policy: workload %s has no cgroup now (not "
                            "running?); it is policed from when it appears", path)
        self._write_state()

    def summary(self) -> str:
        """One line: the state and what is held."""
        if self.state != "enforced" or self.tables is None:
            return f"{self.state}: {self.reason}"
        modes = collections.Counter(self.settings.mode_of(p) for p in self.settings.policies)
        return (f"enforced: {len(self.settings.policies)} polic"
                f"{'y' if len(self.settings.policies) == 1 else 'ies'} "
                f"({', '.join(f'{n} {m}' for m, n in sorted(modes.items()))}), "
                f"{len(self.tables.rules)} rules, updated in {self.update_s * 1000:.1f} ms")

    def poll(self) -> None:
        """Reads the drop events and looks the workloads' cgroups up again (a change
        is applied at once). Called every :data:`WATCH_S` by :meth:`run`."""
        if self._dp is None or self.tables is None:
            return
        if not (self.pin / "link-egress").exists():
            self.close()
            self._unenforced(f"the datapath was removed from {self.pin} (edge policy "
                             "remove); the policy is enforced again from the next start")
            return
        if self._ring is not None:
            self._ring.poll(0)
        from edge.policy.datapath import cgroup_ids  # noqa: PLC0415
        if cgroup_ids(self._dp.cgroup_root, self.tables.workloads) != self.cgroups:
            log.info("network policy: a workload's cgroup changed; updating")
            self._apply()
        if self._state_dirty and time.monotonic() - self._state_written >= STATE_EVERY_S:
            self._write_state()

    def _on_event(self, e: Any) -> None:
        rules = self._gens.get(e.gen, [])
        where = rules[e.rule - 1] if 0 < e.rule <= len(rules) else f"rule #{e.rule}"
        now_ns = time.monotonic_ns()
        drop = Drop(int(time.time() * 1000 - (now_ns - e.ts_ns) / 1e6), e.verdict,
                    self._name_of(e.cgroup),
                    e.rule, where, e.direction, str(e.address),
                    _PROTOCOLS.get(e.protocol, str(e.protocol)), e.port)
        self.recent.append(drop)
        self.drops[e.verdict] += 1
        self._state_dirty = True
        if self.on_drop is not None:
            self.on_drop(drop)

    def _name_of(self, cgroup: int) -> str:
        """The path of cgroup id ``cgroup``: a workload's, or one below a workload
        (looked for in their trees, at most :data:`NAME_SEARCH` directories), else
        ``cgroup <id>`` (it is gone)."""
        if cgroup not in self._names and self._dp is not None:
            seen = 0
            for path in self.cgroups:
                for top, dirs, _ in os.walk(self._dp.cgroup_root / path):
                    for d in dirs:
                        full = Path(top) / d
                        with contextlib.suppress(OSError):
                            ino = full.stat().st_ino
                            self._names.setdefault(ino, str(full.relative_to(
                                self._dp.cgroup_root)))
                    seen += len(dirs)
                    if cgroup in self._names or seen > NAME_SEARCH:
                        break
        return self._names.get(cgroup, f"cgroup {cgroup}")

    def status(self) -> dict[str, Any]:
        """The status (JSON-ready): ``state``, ``reason``, ``pin``, ``gen`` (the
        generation in the kernel, None before the first apply), ``applied_ms``,
        ``update_ms``, ``updates``, ``workloads`` (path → cgroup id or None), ``rules``
        (each with ``packets`` and ``bytes`` from the kernel), ``datapath`` (its own
        counters: events lost, unmatched, unparsed), ``drops`` (events read by verdict)
        and ``recent`` (the newest drops, newest last)."""
        counters: dict[int, tuple[int, int]] = {}
        stats: dict[str, int] = {}
        if self._dp is not None:
            try:
                counters, stats = self._dp.counters(), self._dp.stats()
            except OSError as e:
                log.warning("network policy: reading the counters failed: %s", e)
        rules = []
        for r in self.tables.rules if self.tables is not None else ():
            packets, size = counters.get(r.id, (0, 0))
            rules.append(rule_row(r) | {"packets": packets, "bytes": size})
        return {"state": self.state, "reason": self.reason, "pin": str(self.pin),
                "gen": self.gen, "applied_ms": self.applied_ms,
                "update_ms": round(self.update_s * 1000, 3), "updates": self.updates,
                "workloads": dict(self.cgroups), "rules": rules,
                "datapath": stats, "drops": dict(self.drops),
                "recent": [asdict(d) for d in self.recent]}

    def _write_state(self) -> None:
        self._state_dirty = False
        self._state_written = time.monotonic()
        if self.state_path is None:
            return
        body = self.status()
        del body["datapath"]
        for r in body["rules"]:
            del r["packets"], r["bytes"]
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(body), encoding="utf-8")
            os.replace(tmp, self.state_path)
        except OSError as e:
            log.warning("network policy: cannot write %s: %s", self.state_path, e)

    def close(self) -> None:
        """Stops reading; the pinned datapath stays in force."""
        if self._ring is not None:
            self._ring.poll(0)
            self._ring.close()
            self._ring = None
        if self._dp is not None:
            self._write_state()
            self._dp.close()
            self._dp = None


def _why(e: OSError) -> str:
    text = e.strerror if e.strerror and e.filename is None else str(e)  # no "[Errno n]"
    if e.errno in (errno.EPERM, errno.EACCES):
        return (f"not permitted ({text}): the datapath needs root, or CAP_BPF, "
                "CAP_NET_ADMIN and CAP_PERFMON with a bpffs mounted (CAP_SYS_ADMIN to "
                "mount one)")
    return text
