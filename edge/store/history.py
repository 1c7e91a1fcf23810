"""Configuration versions in SQLite: what was received, applied, committed, rolled back.

One file (``config.db`` beside the outbox; stdlib ``sqlite3``, WAL, ``synchronous
FULL``: a decision must survive a power cut). Table ``versions``, one row per bundle
version that passed verification and validation:

``version``
    the bundle's version (0 is the agent file alone, before any bundle);
``content``
    the bundle's payload as JSON text (for ``edge config diff`` and a restart);
``state``
    ``pending`` (applied, in its health window), ``committed`` (the last good one is
    the highest committed), ``rolled_back``, or ``superseded`` (committed once, a newer
    one was committed since);
``reason``
    why it was rolled back; ``received_ms``, ``decided_ms``: ms since the epoch.

At most one version is pending. A version whose agent settings need a new process is
applied by restarting the agent: table ``restarts`` marks it (``started`` 0 until the
new process took it, then 1; ``before``, JSON, the device states before the restart,
for the health window). A restart that finds it started again rolls it back.
History is bounded to ``keep`` versions; the newest
committed one and a pending one are never deleted.

Table ``requests`` carries rollbacks asked for on the gateway itself (``edge
rollback``) to the running agent, which takes them within a second.

Table ``commands`` holds the ids of the signed commands carried out until they expire,
so that a command is carried out once, also across restarts.

Table ``desired`` remembers, per device key and property, the last desired value
written (``signature`` identifies what was written where: endpoint, unit id, visitor
and desired text), with its ``outcome``: ``written`` (and ``read_back``, JSON) or why it
was refused for good (a :data:`~edge.modbus.writer.WriteErrorKind`). A desired value is
written again only when its signature changes, so a restart does not overwrite what an
operator set on the device since, nor repeat a refusal; a row goes when its property is
no longer configured, or when a write may or may not have reached the device.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

KEEP: Final = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL CHECK (action = 'rollback'),
    version INTEGER,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS restarts (
    version INTEGER PRIMARY KEY,
    started INTEGER NOT NULL DEFAULT 0,
    before TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS desired (
    device TEXT NOT NULL,
    property TEXT NOT NULL,
    signature TEXT NOT NULL,
    outcome TEXT NOT NULL,
    read_back TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (device, property)
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    content TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed', 'rolled_back', 'superseded')),
    reason TEXT NOT NULL DEFAULT '',
    received_ms INTEGER NOT NULL,
    decided_ms INTEGER
);
"""


@dataclass(frozen=True, slots=True)
class Version:
    """One row of the history (see the module doc)."""

    version: int
    content: Mapping[str, Any]
    state: str
    reason: str
    received_ms: int
    decided_ms: int | None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def history_file(store_path: Path) -> Path:
    """Where the history of the agent whose outbox is ``store_path`` lives."""
    return store_path.parent / "config.db"


class History:
    """The version history of one gateway; every method commits before it returns."""

    def __init__(self, path: Path, *, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the file."""
        self._db.close()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One write transaction: all of it reaches the file, or none."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _rows(self, *, state: str | None = None, version: int | None = None) -> list[Version]:
        cur = self._db.execute(
            "SELECT version, content, state, reason, received_ms, decided_ms FROM versions "
            "WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR version = ?2) ORDER BY version",
            (state, version))
        return [Version(v, json.loads(c), s, r, rec, dec) for v, c, s, r, rec, dec in cur]

    def versions(self) -> list[Version]:
        """Every version kept, oldest first."""
        return self._rows()

    def get(self, version: int) -> Version | None:
        """One version, or None when it is not (or no longer) kept."""
        rows = self._rows(version=version)
        return rows[0] if rows else None

    def committed(self) -> Version | None:
        """The version to run: the newest committed one (None before any)."""
        rows = self._rows(state="committed")
        return rows[-1] if rows else None

    def newest(self) -> int:
        """The highest version ever taken (applied, whatever became of it; 0 if none):
        a bundle must be newer, even after a rollback to an older one."""
        row = self._db.execute("SELECT max(version) FROM versions").fetchone()
        return int(row[0] or 0)

    def pending(self) -> Version | None:
        """The version in its health window, if any."""
        rows = self._rows(state="pending")
        return rows[-1] if rows else None

    def add_pending(self, version: int, content: Mapping[str, Any], *,
                    restart_before: Mapping[str, str] | None = None) -> None:
        """Record ``version`` as applied and in its health window; with
        ``restart_before`` (device key → state), as to be applied by a restart.

        Raises:
            ValueError: another version is pending, or ``version`` is already kept.
        """
        with self._txn():
            if self.pending() is not None:
                raise ValueError("another version is still pending")
            if self.get(version) is not None:
                raise ValueError(f"version {version} is already in the history")
            self._db.execute(
                "INSERT INTO versions (version, content, state, received_ms) "
                "VALUES (?, ?, 'pending', ?)",
                (version, json.dumps(content, separators=(",", ":")), _now_ms()))
            if restart_before is not None:
                self._db.execute("INSERT INTO restarts (version, before) VALUES (?, ?)",
                                 (version, json.dumps(dict(restart_before))))
            self._trim()

    def take_restart(self) -> tuple[Version, dict[str, str]] | None:
        """At start-up: the pending version to be applied by this restart, with the
        device states before it, marked as taken; None when there is none (or it was
        taken by an earlier start, which then did not live through its window)."""
        with self._txn():
            pending = self.pending()
            row = self._db.execute(
                "SELECT started, before FROM restarts WHERE version = ?",
                (pending.version if pending else -1,)).fetchone()
            if pending is None or row is None or row[0]:
                return None
            self._db.execute("UPDATE restarts SET started = 1 WHERE version = ?",
                             (pending.version,))
            return pending, json.loads(row[1])

    def commit(self, version: int) -> None:
        """``version`` passed its health window: it is the last good one now."""
        with self._txn():
            self._db.execute("UPDATE versions SET state = 'superseded' WHERE state = 'committed'")
            self._decide(version, "committed", "")

    def commit_baseline(self, content: Mapping[str, Any]) -> None:
        """Record version 0 (the agent file alone) as committed if nothing is yet."""
        with self._txn():
            if not self._rows():
                self._db.execute(
                    "INSERT INTO versions (version, content, state, received_ms, decided_ms) "
                    "VALUES (0, ?, 'committed', ?, ?)",
                    (json.dumps(content, separators=(",", ":")), _now_ms(), _now_ms()))

    def roll_back(self, version: int, reason: str) -> None:
        """``version`` failed (or was rolled back on request) for ``reason``; it is never
        applied again. The newest committed version is the one to run."""
        with self._txn():
            self._decide(version, "rolled_back", reason)

    def reinstate(self, version: int, reason: str) -> None:
        """Go back to the kept ``version`` on request: the committed version is rolled
        back for ``reason`` and ``version`` is committed again.

        Raises:
            ValueError: ``version`` is not kept, or was itself rolled back.
        """
        with self._txn():
            target = self.get(version)
            if target is None:
                raise ValueError(f"version {version} is not in the history")
            if target.state == "rolled_back":
                raise ValueError(f"version {version} was rolled back ({target.reason})")
            current = self.committed()
            if current is not None and current.version != version:
                self._decide(current.version, "rolled_back", reason)
            self._decide(version, "committed", "")

    def request_rollback(self, version: int | None) -> None:
        """Ask the running agent to roll back to ``version`` (None: the one before)."""
        with self._txn():
            self._db.execute("INSERT INTO requests (action, version, at_ms) "
                             "VALUES ('rollback', ?, ?)", (version, _now_ms()))

    def take_requests(self) -> list[int | None]:
        """The rollbacks asked for since the last call, oldest first (then forgotten)."""
        with self._txn():
            rows = self._db.execute("SELECT version FROM requests ORDER BY id").fetchall()
            self._db.execute("DELETE FROM requests")
        return [v for (v,) in rows]

    def take_command(self, cid: str, expires_ms: int) -> bool:
        """Record command ``cid`` (valid until ``expires_ms``) as carried out; False when
        it was already (a replay). Expired ids are forgotten."""
        with self._txn():
            self._db.execute("DELETE FROM commands WHERE expires_ms < ?", (_now_ms(),))
            cur = self._db.execute("INSERT OR IGNORE INTO commands (id, expires_ms) "
                                   "VALUES (?, ?)", (cid, expires_ms))
            return cur.rowcount == 1

    def desired_written(self) -> dict[tuple[str, str], tuple[str, str, Any]]:
        """``(device, property) → (signature, outcome, read-back value)`` of every
        desired value written or refused."""
        cur = self._db.execute(
            "SELECT device, property, signature, outcome, read_back FROM desired")
        return {(d, p): (sig, out, json.loads(rb)) for d, p, sig, out, rb in cur}

    def record_desired(self, device: str, prop: str, signature: str, outcome: str,
                       read_back: Any = None) -> None:
        """The desired value of ``signature`` was written to ``device``'s ``prop``
        (``outcome`` ``written``) and read back as ``read_back`` (a JSON value), or was
        refused for good (``outcome``: why)."""
        with self._txn():
            self._db.execute(
                "INSERT OR REPLACE INTO desired "
                "(device, property, signature, outcome, read_back, at_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (device, prop, signature, outcome, json.dumps(read_back), _now_ms()))

    def unknown_desired(self, device: str, prop: str) -> None:
        """What ``device``'s ``prop`` holds is unknown (a write may or may not have
        reached it): forget its row, so that the next desired value is written."""
        with self._txn():
            self._db.execute("DELETE FROM desired WHERE device = ? AND property = ?",
                             (device, prop))

    def forget_desired(self, keep: set[tuple[str, str]]) -> None:
        """Drop the rows of every ``(device, property)`` not in ``keep``."""
        with self._txn():
            rows = self._db.execute("SELECT device, property FROM desired").fetchall()
            self._db.executemany("DELETE FROM desired WHERE device = ? AND property = ?",
                                 [r for r in rows if tuple(r) not in keep])

    def diff(self, old: int, new: int) -> list[str]:
        """A unified diff of two kept versions' content (JSON, keys sorted), by line.

        Raises:
            ValueError: a version is not kept.
        """
        texts = []
        for v in (old, new):
            kept = self.get(v)
            if kept is None:
                raise ValueError(f"version {v} is not in the history")
            texts.append(json.dumps(kept.content, indent=2, sort_keys=True).splitlines())
        return list(difflib.unified_diff(texts[0], texts[1], f"version {old}",
                                         f"version {new}", lineterm=""))

    def previous(self) -> Version | None:
        """The newest version before the committed one that may be gone back to."""
        current = self.committed()
        rows = [v for v in self._rows(state="superseded")
                if current is None or v.version < current.version]
        return rows[-1] if rows else None

    def _decide(self, version: int, state: str, reason: str) -> None:
        cur = self._db.execute(
            "UPDATE versions SET state = ?, reason = ?, decided_ms = ? WHERE version = ?",
            (state, reason, _now_ms(), version))
        if cur.rowcount != 1:
            raise ValueError(f"version {version} is not in the history")
        self._db.execute("DELETE FROM restarts WHERE version = ?", (version,))

    def _trim(self) -> None:
        keep = self._db.execute(
            "SELECT version FROM versions ORDER BY version DESC LIMIT ?", (self.keep,)
        ).fetchall()
        if len(keep) < self.keep:
            return
        oldest_kept = keep[-1][0]
        self._db.execute(
            "DELETE FROM versions WHERE version < ? AND state NOT IN ('pending', 'committed')",
            (oldest_kept,))
