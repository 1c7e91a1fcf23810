"""Store-and-forward: messages go into the SQLite outbox first, then to the broker.

One thread (``edge-forwarder``) owns the :class:`~edge.store.outbox.Outbox`. Each
turn it commits what arrived since the last turn — new readings and events in
transactions of at most 256 KiB, together with the deletion of every message the
broker acknowledged (PUBACK at QoS 1; written to the socket at QoS 0) — and then
hands the broker committed messages. Nothing is deleted before its acknowledgement;
a message is never published before it is committed.

Order and pacing: a device's readings reach the broker in the order they were read,
across reconnects and restarts (``order="device"``). Messages committed while the
connection is up (live) go out first, each right after whatever older messages of
its own device are still unsent — or at once with ``order="live"``, where after an
outage a device's live readings overtake its own backlog. Everything stored before
(the backlog of an outage or of a previous run) drains in id order, at most
``rate`` messages per second (a token bucket of ``inflight`` tokens). At most
``inflight`` messages are unacknowledged at a time, and a backlog never takes the
last quarter of that window: it stays free for live readings. After a reconnect, paho re-sends
the messages that were in flight (DUP) before anything newer goes out.

Faults: a full disk drops the oldest stored messages to make room (counted, reason
``disk_full``) and holds what still cannot be written in memory (at most
``held_max`` messages, oldest dropped beyond); a damaged file is moved aside and a
fresh one started, with whatever is still in memory (in flight, not yet sent) written
to it again; any other store error is logged and retried a second later. Each of these
and every drop becomes an event on ``…/events`` (``outbox_dropped``, ``store_full``,
``store_corrupt``, ``store_error``), itself sent through the outbox.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edge.store.outbox import (
    CHUNK_BYTES,
    Drop,
    NewMessage,
    Outbox,
    Row,
    StoreCorruptError,
    StoreFullError,
)
from edge.uplink.client import BrokerClient
from edge.uplink.payload import json_bytes, now_ms
from edge.uplink.settings import ForwardSettings

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 60.0
RETRY_S = 1.0
FULL_DROP_FRACTION = 0.05
TXN_MAX_BYTES = CHUNK_BYTES


def _chunk_len(messages: list[NewMessage]) -> int:
    """How many of ``messages`` (at least one) fit in TXN_MAX_BYTES of payload."""
    total = 0
    for i, m in enumerate(messages):
        total += len(m.payload)
        if total > TXN_MAX_BYTES:
            return max(1, i)
    return len(messages)
IDLE_S = 1.0
RATE_WINDOW_S = 10
DRAIN_BURST = 25
"""Backlog messages sent per turn at most: the drain goes in small steps between live
readings, not in bursts of a whole window that hold the GIL against the poller."""
LIVE_RESERVE = 4
"""One slot in LIVE_RESERVE of the in-flight window is never taken by a backlog: a
reading taken while a backlog drains goes out at once instead of waiting for the
acknowledgements of a full window of old ones."""
DROP_REPORT_S = 5.0
RECENT_EVENTS = 200
"""Events kept in memory for the web page."""


@dataclass(slots=True)
class _PendingDrop:
    first_ts: int
    last_ts: int = 0
    count: int = 0
    bytes: int = 0


@dataclass(slots=True)
class ForwardStats:
    """Counters since start (the outbox's own are in ``Outbox.stats``): messages
    ``published`` (handed to the broker), ``acked`` (PUBACK), ``read_back`` from the
    file (a backlog), ``resent_after_reconnect`` (paho's DUP re-sends), ``store_errors``,
    ``held`` in memory now (full disk); ``acked_window`` holds (second, acks) of the
    last RATE_WINDOW_S seconds for :meth:`publish_rate`."""

    published: int = 0
    acked: int = 0
    read_back: int = 0
    resent_after_reconnect: int = 0
    store_errors: int = 0
    held: int = 0
    acked_window: collections.deque[list[int]] = field(default_factory=collections.deque)

    def count_acked(self, n: int, now_s: float) -> None:
        """Add ``n`` acknowledgements at monotonic time ``now_s``."""
        self.acked += n
        second = int(now_s)
        w = self.acked_window
        if w and w[-1][0] == second:
            w[-1][1] += n
        else:
            w.append([second, n])
        while w and w[0][0] <= second - RATE_WINDOW_S:
            w.popleft()

    def publish_rate(self, now_s: float) -> float:
        """Acknowledged messages per second over the last RATE_WINDOW_S seconds."""
        since = int(now_s) - RATE_WINDOW_S
        return sum(n for sec, n in list(self.acked_window) if sec > since) / RATE_WINDOW_S


class Forwarder:
    """Runs the forwarding thread; :meth:`submit` from any thread, then :meth:`stop`."""

    def __init__(
        self,
        outbox: Outbox,
        client: BrokerClient,
        *,
        events_topic: str,
        settings: ForwardSettings | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.settings = settings or ForwardSettings()
        self._in_device_order = self.settings.order == "device"
        self.stats = ForwardStats()
        self._events_topic = events_topic
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=RECENT_EVENTS)
        """The last events, oldest first (for the web page)."""
        self.events_total = 0
        """Events since start."""
        self._incoming: collections.deque[NewMessage] = collections.deque()
        self._acked_mids: collections.deque[int] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._stop_by = 0.0
        self._thread = threading.Thread(target=self._run, name="edge-forwarder", daemon=True)
        # owned by the thread
        self._inflight: dict[int, Row] = {}
        self._to_delete: list[Row] = []
        self._first_ack_at = 0.0
        self._held: list[NewMessage] = []
        self._tail: collections.deque[Row] = collections.deque()
        self._next_id = outbox.first_id()
        self._live_from = outbox.end_id
        self._tokens = float(self.settings.inflight)
        self._tokens_at = time.monotonic()
        self._connects_seen = 0
        self._hold_new = False
        self._retry_at = 0.0
        self._full_since = 0.0
        self._next_expire = 0.0
        self._drops: dict[str, _PendingDrop] = {}
        self._drops_reported_at = -DROP_REPORT_S
        client.on_acked = self._on_acked
        client.add_connect_hook(self._wake.set)

    # -- any thread ---------------------------------------------------------------

    def start(self) -> None:
        """Start the forwarding thread."""
        self._thread.start()

    def submit(self, message: NewMessage) -> None:
        """Queue one message for the outbox (never blocks)."""
        self._incoming.append(message)
        self._wake.set()

    def event(self, kind: str, /, **fields: Any) -> None:
        """Queue ``{"ts", "type": kind, **fields}`` for ``…/events`` (QoS 1); the last
        RECENT_EVENTS are also kept in :attr:`recent_events` (any thread)."""
        ts = now_ms()
        body = {"ts": ts, "type": kind, **fields}
        self.recent_events.append(body)
        self.events_total += 1
        self.submit(NewMessage(self._events_topic, json_bytes(body), 1, ts, pinned=True))

    def stop(self, timeout_s: float = 2.0) -> None:
        """Commit what was submitted, wait up to ``timeout_s`` for the acknowledgement
        of what is in flight, record it, close the outbox (blocking)."""
        self._stop_by = time.monotonic() + timeout_s
        self._stopping = True
        self._report_drops(now=True)
        self._wake.set()
        self._thread.join(timeout_s + 5.0)

    @property
    def inflight(self) -> int:
        """Messages published and not yet acknowledged."""
        return len(self._inflight)

    def _on_acked(self, mid: int) -> None:  # paho's thread: no lock we also hold
        self._acked_mids.append(mid)
        self._wake.set()

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._wait_s())
            self._wake.clear()
            try:
                done = self._turn()
            except Exception as e:  # a store fault must never stop forwarding
                self._store_error(e)
                continue
            if done:
                break
        try:
            self.outbox.close()
        except Exception:
            log.exception("closing the outbox failed")

    def _turn(self) -> bool:
        """One turn; True when stopping is complete."""
        self._take_acks()
        now = time.monotonic()
        stopping = self._stopping
        has_new = bool(self._incoming) or bool(self._held)
        acks_due = bool(self._to_delete) and (
            stopping or now - self._first_ack_at >= self.settings.ack_delay_s
        )
        if (has_new or acks_due) and now >= self._retry_at:
            self._commit()
        if self._full_since and now >= self._retry_at:
            self._check_room()
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            self._expire()
        self._report_drops(now=stopping)
        if not stopping or now < self._stop_by:
            self._send()
        if not stopping:
            return False
        # stopping: what is connected goes on until sent or the deadline, then the
        # acknowledgements are recorded; the rest waits in the file for the next start
        busy = self._inflight or (self._has_unsent() and self.client.stats.connected)
        if busy and now < self._stop_by:
            return False
        if self._to_delete or self._incoming:
            self._commit()
        if self._held:
            log.error("outbox: %d messages could not be written (disk full) and are lost "
                      "with this stop", len(self._held))
        return not self._incoming

    def _wait_s(self) -> float:
        waits = [IDLE_S]
        if self._to_delete:
            waits.append(self._first_ack_at + self.settings.ack_delay_s - time.monotonic())
        if self._drops:
            waits.append(self._drops_reported_at + DROP_REPORT_S - time.monotonic())
        if self._held or self._incoming:
            waits.append(self._retry_at - time.monotonic())
        if self._has_unsent() and self.client.stats.connected:
            waits.append((1.0 - self._tokens) / self.settings.rate)
        if self._stopping:
            waits.append(0.05)
        return max(0.001, min(waits))

    def _take_acks(self) -> None:
        n = 0
        while self._acked_mids:
            row = self._inflight.pop(self._acked_mids.popleft(), None)
            if row is None:
                continue  # from before a damaged store was replaced
            if not self._to_delete:
                self._first_ack_at = time.monotonic()
            self._to_delete.append(row)
            n += 1
        if n:
            self.stats.count_acked(n, time.monotonic())

    def _keep(self) -> frozenset[int]:
        return frozenset(r.id for r in (*self._inflight.values(), *self._to_delete))

    def _commit(self) -> None:
        held = self._held
        while self._incoming:
            held.append(self._incoming.popleft())
        while True:
            # bounded transactions keep the WAL small: on a full disk it must fit
            n = _chunk_len(held)
            new, self._held = held[:n], held[n:]
            try:
                rows, drops = self.outbox.write(new, self._to_delete, keep=self._keep())
            except StoreFullError as e:
                self._held[:0] = new
                self._disk_full(sum(len(m.payload) for m in new), e)
                return
            except BaseException as e:
                self._held[:0] = new
                if isinstance(e, StoreCorruptError):
                    self._replace_damaged(e)
                    return
                raise
            self._to_delete = []
            if self.client.stats.connected:
                self._tail.extend(rows)
                self._trim_tail()
            for d in drops:
                self._dropped(d)
            held = self._held
            if self._full_since:
                self.outbox.checkpoint()  # give the WAL's disk back at once
                if held:
                    self._wake.set()  # one transaction a turn until the disk has room
                    break
            if not held:
                break
        self.stats.held = len(self._held)

    def _trim_tail(self) -> None:
        extra = len(self._tail) - self.settings.tail
        if extra > 0:  # the oldest live rows wait in the file with the backlog
            for _ in range(extra):
                self._tail.popleft()
            self._live_from = self._tail[0].id

    def _dropped(self, d: Drop) -> None:
        tail = self._tail
        if tail and d.first_id <= tail[-1].id and d.last_id >= tail[0].id:
            self._tail = collections.deque(r for r in tail
                                           if not d.first_id <= r.id <= d.last_id)
        p = self._drops.setdefault(d.reason, _PendingDrop(d.first_ts))
        p.count += d.count
        p.bytes += d.bytes
        p.first_ts, p.last_ts = min(p.first_ts, d.first_ts), max(p.last_ts, d.last_ts)
        self._report_drops()

    def _report_drops(self, *, now: bool = False) -> None:
        """One ``outbox_dropped`` event per reason and DROP_REPORT_S, with the count
        since the last one and the ``total`` since start."""
        t = time.monotonic()
        if not self._drops or (not now and t - self._drops_reported_at < DROP_REPORT_S):
            return
        self._drops_reported_at = t
        for reason, p in self._drops.items():
            total = self.outbox.stats.dropped.get(reason, 0)
            log.warning("outbox: dropped %d messages (%d bytes, read %d..%d) for %s; %d since "
                        "start", p.count, p.bytes, p.first_ts, p.last_ts, reason, total)
            self.event("outbox_dropped", reason=reason, count=p.count, bytes=p.bytes,
                       first_ts=p.first_ts, last_ts=p.last_ts, total=total)
        self._drops.clear()

    def _disk_full(self, batch_bytes: int, e: StoreFullError) -> None:
        if not self._full_since:
            self._full_since = time.monotonic()
            log.error("outbox %s: the disk is full (%s); dropping the oldest messages to "
                      "make room", self.outbox.path, e)
            self.event("store_full", state="full", error=str(e))
        self._retry_at = time.monotonic() + RETRY_S
        if self._to_delete:  # what the broker has frees room first
            try:
                self.outbox.delete_acked(self._to_delete)
                self._to_delete = []
            except StoreFullError:
                pass
        room = max(int(self.outbox.stats.bytes * FULL_DROP_FRACTION), 2 * batch_bytes)
        try:
            drop = self.outbox.make_room(room, self._keep())
        except StoreFullError:
            drop = None
        if drop is not None:
            self._dropped(drop)
            self._retry_at = 0.0  # room was made: try again at once
        held = self._held
        overflow = len(held) - self.settings.held_max
        if overflow > 0:
            lost, self._held = held[:overflow], held[overflow:]
            self.outbox.stats.count_drop("disk_full", overflow)
            self._dropped(Drop("disk_full", overflow, sum(len(m.payload) for m in lost),
                               lost[0].ts, lost[-1].ts, 0, 0))
        self.stats.held = len(self._held)

    def _check_room(self) -> None:
        """While the disk is full: is there room again (the reserve can be taken back)?"""
        if not self.outbox.room_again():
            self._retry_at = time.monotonic() + RETRY_S
            return
        log.warning("outbox: room on the disk again after %.0f s",
                    time.monotonic() - self._full_since)
        self.event("store_full", state="cleared")
        self._full_since = 0.0

    def _replace_damaged(self, e: Exception) -> None:
        survivors = sorted({r.id: r for r in (*self._inflight.values(), *self._tail)}.values(),
                           key=lambda r: r.id)
        lost = max(0, self.outbox.stats.rows - len(survivors))
        moved = self.outbox.reopen_fresh()
        self.outbox.stats.count_drop("corrupt", lost)
        log.error("outbox %s is damaged (%s): moved to %s and started afresh; %d messages "
                  "kept from memory, %d lost with the file", self.outbox.path, e, moved,
                  len(survivors), lost)
        self._inflight.clear()
        self._to_delete = []
        self._tail.clear()
        self._next_id = self._live_from = self.outbox.end_id
        self._held[:0] = [NewMessage(r.topic, r.payload, r.qos, r.ts,
                                     pinned=r.topic == self._events_topic) for r in survivors]
        self.event("store_corrupt", moved_to=moved, kept=len(survivors), lost=lost,
                   error=str(e))
        self._retry_at = 0.0

    def _store_error(self, e: Exception) -> None:
        self.stats.store_errors += 1
        self._retry_at = time.monotonic() + RETRY_S
        if isinstance(e, StoreCorruptError):
            self._replace_damaged(e)
            return
        log.error("outbox %s: %s; retrying in %.0f s", self.outbox.path, e, RETRY_S,
                  exc_info=self.stats.store_errors == 1)
        self.event("store_error", error=repr(e))

    def _expire(self) -> None:
        drop = self.outbox.expire(now_ms(), self._keep())
        if drop is not None:
            self._dropped(drop)

    # -- sending ------------------------------------------------------------------
    #
    # Rows with id >= _live_from were committed while the current connection was up
    # (the live ones): they wait in _tail and go out first, each right after whatever
    # older rows of its own device are still unsent. Everything older is the backlog,
    # drained in id order from the file (cursor _next_id), paced by the token bucket;
    # rows already sent in flight or acknowledged (_skip) are passed over.

    def _has_unsent(self) -> bool:
        return bool(self._tail) or self._next_id < self._live_from

    def _send(self) -> None:
        c = self.client
        if not c.stats.connected:
            return
        if c.stats.connects != self._connects_seen:
            self._connects_seen = c.stats.connects
            self._live_from = self.outbox.end_id  # all that is stored now is backlog
            self._tail.clear()
            # paho re-sends what was in flight first; nothing newer may overtake it
            self._hold_new = bool(self._inflight)
            self.stats.resent_after_reconnect += len(self._inflight)
        if self._hold_new:
            if self._inflight:
                return
            self._hold_new = False
        s = self.settings
        skip = {r.id for r in (*self._inflight.values(), *self._to_delete)}
        budget = s.inflight - len(self._inflight)
        budget = self._send_live(budget, skip)
        now = time.monotonic()
        self._tokens = min(float(s.inflight), self._tokens + (now - self._tokens_at) * s.rate)
        self._tokens_at = now
        paced = min(budget - s.inflight // LIVE_RESERVE, int(self._tokens), DRAIN_BURST)
        while paced > 0 and self._next_id < self._live_from:
            rows = self.outbox.rows_from(self._next_id, paced, before=self._live_from)
            if not rows:
                self._next_id = self._live_from  # everything left was dropped
                break
            self.stats.read_back += len(rows)
            for r in rows:
                if r.id not in skip:
                    if not self._publish(r, skip):
                        return
                    self._tokens -= 1
                    paced -= 1
                self._next_id = r.id + 1

    def _send_live(self, budget: int, skip: set[int]) -> int:
        tail = self._tail
        while budget > 0 and tail:
            row = tail[0]
            if self._in_device_order and self._next_id < self._live_from and row.device:
                older = [r for r in self.outbox.device_rows(
                    row.device, self._next_id, self._live_from, budget + len(skip))
                    if r.id not in skip][:budget]
                if older:
                    self.stats.read_back += len(older)
                    for r in older:
                        if not self._publish(r, skip):
                            return 0
                    budget -= len(older)
                    continue
            if not self._publish(row, skip):
                return 0
            tail.popleft()
            budget -= 1
        return budget

    def _publish(self, r: Row, skip: set[int]) -> bool:
        mid = self.client.publish_mid(r.topic, r.payload, qos=r.qos)
        if mid is None:
            return False  # paho refused (e.g. the connection just went): next turn
        self._inflight[mid] = r
        skip.add(r.id)
        self.stats.published += 1
        return True
