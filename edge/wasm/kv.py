"""The ``kv`` capability: a small key-value store per plugin, in SQLite.

``plugins.db`` beside the outbox holds ``kv(plugin, key, value)``. A plugin reads and
writes its own keys only, in memory; what it changed during a call is written in one
transaction after the call (:meth:`KvStore.flush`), so it survives a restart and a
re-instantiated instance — and undone if the call failed (:meth:`KvStore.discard`): a
trapped or stopped call leaves nothing behind. Bounds per plugin: :data:`MAX_KEY` bytes a key,
:data:`MAX_VALUE` bytes a value, :data:`MAX_KEYS` keys; ``kv_set`` beyond them is
refused (returns -1), never an error of the agent.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MAX_KEY: Final = 256
MAX_VALUE: Final = 16 * 1024
MAX_KEYS: Final = 1024


class PluginKv:
    """One plugin's keys (bytes → bytes) and what changed since the last flush."""

    def __init__(self, items: dict[bytes, bytes]) -> None:
        self.items = items
        self.dirty: set[bytes] = set()
        self._undo: dict[bytes, bytes | None] = {}
        """What this call changed: each key's value before it (None: absent)."""

    def _touch(self, key: bytes) -> None:
        if key not in self._undo:
            self._undo[key] = self.items.get(key)

    def get(self, key: bytes) -> bytes | None:
        """The value, or None when absent."""
        return self.items.get(key)

    def set(self, key: bytes, value: bytes) -> bool:
        """Store ``value``; False (nothing stored) beyond the bounds."""
        if len(key) > MAX_KEY or len(value) > MAX_VALUE or (
                key not in self.items and len(self.items) >= MAX_KEYS):
            return False
        self._touch(key)
        self.items[key] = value
        self.dirty.add(key)
        return True

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False when it was absent."""
        if key not in self.items:
            return False
        self._touch(key)
        del self.items[key]
        self.dirty.add(key)
        return True

    def rollback(self) -> None:
        """Undo what this call changed."""
        for key, value in self._undo.items():
            if value is None:
                self.items.pop(key, None)
            else:
                self.items[key] = value
        self._undo.clear()

    def commit(self) -> None:
        """Keep what this call changed (it is written by the next flush)."""
        self._undo.clear()


class KvStore:
    """Every plugin's keys in ``path`` (created when first needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._plugins: dict[str, PluginKv] = {}

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS kv (plugin TEXT NOT NULL, key BLOB "
                             "NOT NULL, value BLOB NOT NULL, PRIMARY KEY (plugin, key))")
        return self._db

    def plugin(self, name: str) -> PluginKv:
        """The keys of plugin ``name``, read from the file the first time."""
        kv = self._plugins.get(name)
        if kv is None:
            rows = self._conn().execute("SELECT key, value FROM kv WHERE plugin = ?", (name,))
            kv = self._plugins[name] = PluginKv({bytes(k): bytes(v) for k, v in rows})
        return kv

    def flush(self, name: str) -> None:
        """Write what plugin ``name`` changed, in one transaction. A failing write
        (disk full) is logged and kept for the next flush."""
        kv = self._plugins.get(name)
        if kv is None:
            return
        kv.commit()
        if not kv.dirty:
            return
        db = self._conn()
        try:
            db.execute("BEGIN")
            for key in kv.dirty:
                value = kv.items.get(key)
                if value is None:
                    db.execute("DELETE FROM kv WHERE plugin = ? AND key = ?", (name, key))
                else:
                    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (name, key, value))
            db.execute("COMMIT")
            kv.dirty.clear()
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.error("plugin %s: cannot save its key-value store in %s: %s", name, self.path, e)

    def discard(self, name: str) -> None:
        """Undo what plugin ``name`` changed in the call that just failed."""
        kv = self._plugins.get(name)
        if kv is not None:
            kv.rollback()

    def close(self) -> None:
        """Close the file."""
        if self._db is not None:
            self._db.close()
            self._db = None
