"""The outbox: every message the uplink owes the broker, in SQLite (WAL), until PUBACK.

One file (``store.path``), used from one thread only (:class:`~edge.uplink.forwarder.
Forwarder`'s). Tables:

* ``outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, topic, payload BLOB, qos, ts, size)``:
  ``id`` orders everything (so a device's readings keep their order across reconnects
  and restarts), ``ts`` is the reading time in ms since the Unix epoch (for the TTL and
  the oldest age), ``size`` = bytes of topic + payload (what ``max_bytes`` bounds).
* ``seq(device, seq)``: the last ``seq`` committed per device ("ns/name"), written in
  the same transaction as the readings, so a restart — also after SIGKILL — continues
  where the committed readings end.
* ``totals(k, v)``: rows, bytes and drops, kept transactionally so opening a big store
  reads no more than a page.

Durability: ``synchronous=FULL`` (the default) fsyncs the WAL at every commit, so a
committed batch survives a power cut; ``normal`` survives a killed process but may
lose the last commits on a power cut (SQLite, "PRAGMA synchronous").

Bounds: ``max_bytes`` (sum of ``size``) and ``ttl_ms``; what exceeds them is dropped
by ``drop`` policy — ``oldest`` rows first (default) or the ``newest`` batch — never
rows handed to the broker and not yet acknowledged, and never pinned rows (events)
but for their TTL. Every drop is counted by reason
in :class:`OutboxStats` and returned to the caller, which reports it as an event.

Faults: a file that is not a database or is corrupt (SQLITE_NOTADB, SQLITE_CORRUPT) is
renamed to ``<path>.corrupt-<UTC time>`` (with its -wal/-shm) and a fresh store is
started — see :meth:`Outbox.reopen_fresh`; a full disk (SQLITE_FULL) raises
:class:`StoreFullError` with the batch not written, and the caller frees room with
:meth:`Outbox.make_room`: SQLite needs disk space even to delete, so the outbox keeps
``<path>.reserve`` (2 MiB: more than the WAL grows to, ``WAL_PAGES`` plus one
transaction) to give up then, and takes it back when there is room again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    size INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    device TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_device ON outbox (device, id);
CREATE TABLE IF NOT EXISTS seq (device TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO totals VALUES ('rows', 0), ('bytes', 0);
"""
_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_FULL = sqlite3.SQLITE_FULL
_HEAD_CHUNK = 500
WAL_PAGES = 128
RESERVE_BYTES = 2 << 20
MAX_PAGES = 4_294_967_294
CHUNK_BYTES = 256 << 10
CHUNK_ROWS = 200
_T = TypeVar("_T")

_More = Callable[[int, int], bool]
"""``(ts_ms, freed_bytes) -> bool``: go on dropping from the head."""


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns a store written by an earlier edge lacks (with their defaults)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
    if not have:
        return
    for column, decl in (("pinned", "INTEGER NOT NULL DEFAULT 0"),
                         ("device", "TEXT NOT NULL DEFAULT ''")):
        if column not in have:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")


def _below(goal: int, _ts: int, freed: int) -> bool:
    return freed < goal


class StoreFullError(Exception):
    """The disk (or the file system's quota) is full: nothing of the batch was written."""


class StoreCorruptError(Exception):
    """The database file is not a database or is corrupt (SQLITE_NOTADB/SQLITE_CORRUPT)."""


def is_corrupt(e: sqlite3.Error) -> bool:
    """True when SQLite says the file is damaged (not for locks, I/O or a full disk)."""
    return getattr(e, "sqlite_errorcode", None) in _CORRUPT


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store: ``device`` ("ns/name", or "" for events) and its ``seq``
    (0 when it has none), ``ts`` in ms since the Unix epoch. A ``pinned`` message
    (an event: rare, and the report of drops itself) is never dropped for
    ``max_bytes`` or a full disk, only for its TTL."""

    topic: str
    payload: bytes
    qos: int
    ts: int
    device: str = ""
    seq: int = 0
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    """A stored message; ``size`` is bytes of topic + payload."""

    id: int
    topic: str
    payload: bytes
    qos: int
    ts: int
    size: int
    device: str = ""


@dataclass(slots=True)
class OutboxStats:
    """What the outbox holds and what it dropped (since this process opened it).

    ``rows``/``bytes`` are the depth now; ``oldest_ts`` is ms since the Unix epoch of
    the oldest stored message (0 when empty); ``dropped`` counts messages by reason
    (``max_bytes``, ``ttl``, ``disk_full``, and ``corrupt`` for those lost with a damaged
    file, counted by the forwarder); ``corrupt_files`` lists files moved aside.
    """

    rows: int = 0
    bytes: int = 0
    oldest_ts: int = 0
    committed: int = 0
    acked: int = 0
    transactions: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    corrupt_files: list[str] = field(default_factory=list)

    def count_drop(self, reason: str, n: int) -> None:
        """Add ``n`` messages dropped for ``reason``."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(frozen=True, slots=True)
class Drop:
    """Messages dropped in one go: how many, their bytes, why, their time span (ms since
    the Unix epoch) and the span of their ids."""

    reason: str
    count: int
    bytes: int
    first_ts: int
    last_ts: int
    first_id: int
    last_id: int


class Outbox:
    """The SQLite outbox at ``path``; see the module docstring.

    ``max_bytes`` > 0, ``ttl_ms`` > 0, ``drop`` is ``oldest`` or ``newest``,
    ``synchronous`` is ``full`` or ``normal``. Raises :class:`sqlite3.Error` only for
    what it cannot handle itself (an unwritable directory, a locked file).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        ttl_ms: int,
        drop: str = "oldest",
        synchronous: str = "full",
        reserve_bytes: int = RESERVE_BYTES,
    ) -> None:
        if drop not in ("oldest", "newest") or synchronous not in ("full", "normal"):
            raise ValueError("drop is oldest|newest, synchronous is full|normal")
        self.path = path
        self.max_bytes = max_bytes
        self.ttl_ms = ttl_ms
        self.drop_policy = drop
        self._synchronous = synchronous
        self.stats = OutboxStats()
        self._reserve = path.with_name(path.name + ".reserve")
        self._reserve_bytes = reserve_bytes
        self.seqs: dict[str, int] = {}
        self.end_id = 1
        """The id the next stored message gets (ids never go back in one process)."""
        self.closed = False
        """True once :meth:`close` was called."""
        self._db = self._open()
        self._take_reserve()

    # -- opening ------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            if not is_corrupt(e):
                raise
            self._move_aside()
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            # a small WAL: it needs disk too, and a full disk must leave room to delete
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            _migrate(db)
            db.executescript(SCHEMA)
            totals = dict(db.execute("SELECT k, v FROM totals"))
            self.stats.rows, self.stats.bytes = totals["rows"], totals["bytes"]
            self.seqs = dict(db.execute("SELECT device, seq FROM seq"))
            oldest = db.execute("SELECT ts FROM outbox ORDER BY id LIMIT 1").fetchone()
            self.stats.oldest_ts = oldest[0] if oldest else 0
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            if last:
                self.end_id = max(self.end_id, int(last[0]) + 1)
            elif self.end_id > 1:  # a fresh file after a damaged one: ids go on
                db.execute("INSERT INTO sqlite_sequence VALUES ('outbox', ?)", (self.end_id - 1,))
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, f"{target}{suffix}")
        self.stats.corrupt_files.append(str(target))

    @property
    def replaced_damaged_file(self) -> bool:
        """True once a damaged file was moved aside (at open or later)."""
        return bool(self.stats.corrupt_files)

    def reopen_fresh(self) -> str:
        """Move the damaged file aside and start an empty store; the known ``seqs``
        are kept and written to it, ids continue. Returns where the old file went."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        seqs = dict(self.seqs)
        self._move_aside()
        self.stats.rows = self.stats.bytes = self.stats.oldest_ts = 0
        self._db = self._connect()
        self.seqs = seqs
        with self._transaction():
            self._db.executemany("INSERT INTO seq VALUES (?, ?)", seqs.items())
        return self.stats.corrupt_files[-1]

    def close(self) -> None:
        """Close the file (the WAL is checkpointed into it)."""
        self._db.close()
        self.closed = True

    # -- writing ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self.stats.transactions += 1

    def write(
        self, new: Sequence[NewMessage], acked: Iterable[Row], *, keep: frozenset[int]
    ) -> tuple[list[Row], list[Drop]]:
        """In one transaction: delete the ``acked`` rows, append ``new`` (with the
        devices' seqs), then enforce ``max_bytes``, never dropping ids in ``keep``
        (in flight). Returns the new rows (ids ascending) and what was dropped.

        Raises :class:`StoreFullError` (nothing written, acked rows not deleted) and
        :class:`StoreCorruptError`.
        """
        acked = list(acked)
        rows: list[Row] = []
        drops: list[Drop] = []
        try:
            with self._transaction():
                self._delete_acked(acked)
                rows = self._insert(new)
                drops = self._enforce_bytes(keep)
        except sqlite3.DatabaseError as e:
            self._reload_totals()
            raise self._translate(e) from e
        self._after_commit(new, acked, rows)
        return rows, drops

    def _translate(self, e: sqlite3.DatabaseError) -> Exception:
        if getattr(e, "sqlite_errorcode", None) == _FULL:
            return StoreFullError(str(e))
        if is_corrupt(e):
            return StoreCorruptError(str(e))
        return e

    def _delete_acked(self, acked: list[Row]) -> None:
        if not acked:
            return
        freed = self._db.executemany(
            "DELETE FROM outbox WHERE id = ?", [(r.id,) for r in acked]
        ).rowcount
        if freed == len(acked):
            self._add_totals(-freed, -sum(r.size for r in acked))
        else:  # never expected (drops spare rows in flight): count again, exactly
            self._recount()

    def _recount(self) -> None:
        rows, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        self._db.executemany("UPDATE totals SET v = ? WHERE k = ?",
                             ((rows, "rows"), (size, "bytes")))
        self.stats.rows, self.stats.bytes = rows, size

    def _insert(self, new: Sequence[NewMessage]) -> list[Row]:
        rows = []
        seqs: dict[str, int] = {}
        execute = self._db.execute
        for m in new:
            size = len(m.topic.encode()) + len(m.payload)
            cur = execute(
                "INSERT INTO outbox (topic, payload, qos, ts, size, pinned, device) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m.topic, m.payload, m.qos, m.ts, size, m.pinned, m.device),
            )
            assert cur.lastrowid is not None
            rows.append(Row(cur.lastrowid, m.topic, m.payload, m.qos, m.ts, size, m.device))
            if m.device:
                seqs[m.device] = m.seq
        if seqs:
            self._db.executemany(
                "INSERT INTO seq VALUES (?, ?) "
                "ON CONFLICT(device) DO UPDATE SET seq = excluded.seq",
                seqs.items(),
            )
        self._add_totals(len(rows), sum(r.size for r in rows))
        return rows

    def _add_totals(self, rows: int, size: int) -> None:
        if rows or size:
            self._db.executemany(
                "UPDATE totals SET v = v + ? WHERE k = ?", ((rows, "rows"), (size, "bytes"))
            )
            self.stats.rows += rows
            self.stats.bytes += size

    def _reload_totals(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            totals = dict(self._db.execute("SELECT k, v FROM totals"))
            self.stats.rows, self.stats.bytes = totals["rows"], totals["bytes"]

    def _after_commit(self, new: Sequence[NewMessage], acked: list[Row], rows: list[Row]) -> None:
        for m in new:
            if m.device:
                self.seqs[m.device] = m.seq
        if rows:
            self.end_id = rows[-1].id + 1
        self.stats.committed += len(rows)
        self.stats.acked += len(acked)
        if not self.stats.rows:
            self.stats.oldest_ts = 0
        elif acked or not self.stats.oldest_ts:
            self._refresh_oldest()

    def _refresh_oldest(self) -> None:
        oldest = self._db.execute("SELECT ts FROM outbox ORDER BY id LIMIT 1").fetchone()
        self.stats.oldest_ts = oldest[0] if oldest else 0

    # -- bounds -------------------------------------------------------------------

    def _enforce_bytes(self, keep: frozenset[int]) -> list[Drop]:
        excess = self.stats.bytes - self.max_bytes
        if excess <= 0:
            return []
        if self.drop_policy == "newest":
            return self._drop_newest(excess, keep)
        drop = self._drop_head("max_bytes", keep, lambda _ts, freed: freed < excess)
        return [drop] if drop else []

    def _drop_newest(self, excess: int, keep: frozenset[int]) -> list[Drop]:
        picked: list[tuple[int, int, int]] = []
        freed = 0
        for rid, ts, size in self._db.execute(
                "SELECT id, ts, size FROM outbox WHERE pinned = 0 ORDER BY id DESC"):
            if freed >= excess:
                break
            if rid not in keep:
                picked.append((rid, ts, size))
                freed += size
        return [self._delete_picked("max_bytes", picked)] if picked else []

    def _drop_head(self, reason: str, keep: frozenset[int], more: _More, *,
                   pinned_too: bool = False) -> Drop | None:
        """Delete rows from the oldest on while ``more(ts, freed_bytes)`` holds; pinned
        rows (events) only with ``pinned_too``."""
        picked: list[tuple[int, int, int]] = []
        freed = 0
        after = 0
        while True:
            chunk = self._db.execute(
                "SELECT id, ts, size FROM outbox WHERE id > ? AND (pinned = 0 OR ?) "
                "ORDER BY id LIMIT ?",
                (after, pinned_too, _HEAD_CHUNK),
            ).fetchall()
            for rid, ts, size in chunk:
                if not more(ts, freed):
                    return self._delete_picked(reason, picked) if picked else None
                if rid not in keep:
                    picked.append((rid, ts, size))
                    freed += size
            if len(chunk) < _HEAD_CHUNK:
                return self._delete_picked(reason, picked) if picked else None
            after = chunk[-1][0]

    def _delete_picked(self, reason: str, picked: list[tuple[int, int, int]]) -> Drop:
        self._db.executemany("DELETE FROM outbox WHERE id = ?", [(p[0],) for p in picked])
        size = sum(p[2] for p in picked)
        self._add_totals(-len(picked), -size)
        self.stats.count_drop(reason, len(picked))
        return Drop(reason, len(picked), size, min(p[1] for p in picked),
                    max(p[1] for p in picked), min(p[0] for p in picked),
                    max(p[0] for p in picked))

    def expire(self, now_ms: int, keep: frozenset[int]) -> Drop | None:
        """Drop what is older than ``ttl_ms`` (oldest first); its own transaction."""
        cutoff = now_ms - self.ttl_ms
        if not self.stats.oldest_ts or self.stats.oldest_ts >= cutoff:
            return None
        try:
            with self._transaction():
                drop = self._drop_head("ttl", keep, lambda ts, _freed: ts < cutoff,
                                       pinned_too=True)
        except sqlite3.DatabaseError as e:
            self._reload_totals()
            raise self._translate(e) from e
        self._refresh_oldest()
        return drop

    def make_room(self, nbytes: int, keep: frozenset[int]) -> Drop | None:
        """On a full disk: give up the reserve file, fold the WAL into the database,
        stop the file from growing, drop the oldest ``nbytes`` of stored messages
        (reason ``disk_full``) in small transactions, each folded at once, and take the
        reserve back from what the WAL gave up. Later writes reuse the freed pages.
        Raises :class:`StoreFullError` when not even that can be written."""
        self._reserve.unlink(missing_ok=True)
        self.checkpoint()
        # no new pages from now on: the WAL then only ever holds pages inside the file,
        # so checkpoints need no room, and the freed pages are reused
        with contextlib.suppress(sqlite3.Error):
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count={int(pages)}")
        drops: list[Drop] = []
        freed = 0
        while freed < nbytes:
            goal = min(CHUNK_BYTES, nbytes - freed)
            drop = self._small(functools.partial(
                self._drop_head, "disk_full", keep, functools.partial(_below, goal)))
            if drop is None:
                break
            drops.append(drop)
            freed += drop.bytes
        self._take_reserve()
        self._refresh_oldest()
        if not drops:
            return None
        return Drop("disk_full", sum(d.count for d in drops), freed, drops[0].first_ts,
                    drops[-1].last_ts, drops[0].first_id, drops[-1].last_id)

    def delete_acked(self, acked: Sequence[Row]) -> None:
        """Delete acknowledged rows in small transactions of their own, each folded at
        once (a full disk needs the pages they free). Raises :class:`StoreFullError`."""
        for i in range(0, len(acked), CHUNK_ROWS):
            self._small(functools.partial(self._delete_acked, list(acked[i:i + CHUNK_ROWS])))
        self._refresh_oldest()

    def _small(self, work: Callable[[], _T]) -> _T:
        """``work()`` in a transaction, then a checkpoint (full-disk mode)."""
        try:
            with self._transaction():
                result = work()
        except sqlite3.DatabaseError as e:
            self._reload_totals()
            raise self._translate(e) from e
        self.checkpoint()
        return result

    def checkpoint(self) -> None:
        """Fold the WAL into the database file and truncate it (errors ignored: a
        checkpoint that cannot finish now is retried by the next one)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _take_reserve(self) -> bool:
        if self._reserve.exists() or not self._reserve_bytes:
            return True
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return True
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, self._reserve_bytes)
        except OSError:
            os.close(fd)
            self._reserve.unlink(missing_ok=True)
            return False
        os.close(fd)
        return True

    def room_again(self) -> bool:
        """After :meth:`make_room`: True once the disk has room for the reserve and as
        much again; the file may then grow again."""
        st = os.statvfs(self._reserve.parent)
        if st.f_bavail * st.f_frsize < 2 * self._reserve_bytes or not self._take_reserve():
            return False
        try:
            self._db.execute(f"PRAGMA max_page_count={MAX_PAGES}")
        except sqlite3.Error:
            return False
        return True

    # -- reading ------------------------------------------------------------------

    def first_id(self) -> int:
        """The smallest stored id, or :attr:`end_id` when empty."""
        row = self._db.execute("SELECT id FROM outbox ORDER BY id LIMIT 1").fetchone()
        return int(row[0]) if row else self.end_id

    def rows_from(self, first_id: int, limit: int, *, before: int | None = None) -> list[Row]:
        """Up to ``limit`` stored rows with ``first_id <= id < before``, ids ascending."""
        return self._select("id >= ? AND id < ?", (first_id, before or self.end_id), limit)

    def device_rows(self, device: str, first_id: int, before: int, limit: int) -> list[Row]:
        """Up to ``limit`` stored rows of ``device`` with ``first_id <= id < before``."""
        return self._select("device = ? AND id >= ? AND id < ?", (device, first_id, before),
                            limit)

    def _select(self, where: str, args: tuple[object, ...], limit: int) -> list[Row]:
        try:
            return [
                Row(*r)
                for r in self._db.execute(
                    "SELECT id, topic, payload, qos, ts, size, device FROM outbox "  # noqa: S608
                    f"WHERE {where} ORDER BY id LIMIT ?",
                    (*args, limit),
                )
            ]
        except sqlite3.DatabaseError as e:
            raise self._translate(e) from e
