"""Writes to devices in the running agent: the manifests' desired values, and direct
writes and method calls from signed commands (DESIGN.md §4 "Writes", §5 ``cmd/{name}``).

Desired values: each property with a ``desired`` value is written
(:func:`edge.modbus.writer.write_property`, range-checked, read back) when the agent
starts with it or a new configuration brings it, and again only when what would be
written changes: the device's endpoint or unit id, the property's visitor or the
desired text (its signature, remembered in the history file with the read-back, see
:class:`edge.store.history.History`). So a restart does not overwrite what an
operator set on the device since, and a rollback writes the old desired value back.
The read-back becomes the twin's ``observedDesired``. One task per device writes its
properties in manifest order; a write that failed for lack of an answer (``timeout``,
``connection``, or the exception responses ACKNOWLEDGE and SLAVE DEVICE BUSY) is tried
again after 5 s, doubling to at most 5 min, until it is done or the configuration
changes, and after a restart; other failures (``read_only``, ``mismatch``, another
exception response, …) are reported once, remembered with the signature and not
tried again until the desired value changes (``cmd/write`` writes at once). A write
that may have reached the device without being confirmed (failed at stage ``write``
or ``read_back``) leaves what the device holds unknown: its ``observedDesired`` goes
and its record is dropped, so that any later desired value, also an older one after
a rollback, is written.

Commands: ``write`` and ``method`` (verified by :mod:`edge.sync.controller`) are done at
once, not retried (the sender sees the reply and decides).

Events on ``…/events``: ``written`` (``origin``: ``desired``, ``cmd/write`` or
``cmd/method``; ``device``, ``property``, ``value`` asked for, ``read_back``; ``id`` and
``method`` for commands) per property written, and ``write_failed`` (the same, with
``kind`` and ``stage`` of :class:`~edge.modbus.writer.WriteError` and ``error`` instead
of ``read_back``; a ReadOnly property refuses with ``kind: read_only``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edge.config.model import DeviceSpec, PropertySpec, Value
from edge.modbus.client import ConnectionPool
from edge.modbus.writer import (
    SHOWN_CHARS,
    WriteError,
    WriteErrorKind,
    call_method,
    desired_value,
    find_property,
    shown,
    write_property,
)
from edge.store.history import History
from edge.uplink.twins import Twins

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 300.0
RETRIED: tuple[WriteErrorKind, ...] = ("timeout", "connection")
BUSY = (0x05, 0x06)
"""Exception codes ACKNOWLEDGE and SLAVE DEVICE BUSY (V1.1b3 §7): try again later."""


def retried(e: WriteError) -> bool:
    """A failure of a desired write that is tried again: the device did not answer,
    or said it is busy."""
    return e.kind in RETRIED or (e.kind == "device_error" and e.exception_code in BUSY)


def signature(device: DeviceSpec, prop: PropertySpec) -> str:
    """What a desired write writes where; it is written again when this changes."""
    return repr((device.endpoint.key, device.unit_id, prop.visitor, prop.value_type,
                 prop.desired))


class Writes:
    """The writes of one agent; every method is called from the event loop.

    ``event(kind, **fields)`` publishes an event (:meth:`edge.uplink.publisher.Uplink.
    publish_event`).
    """

    def __init__(self, pool: ConnectionPool, history: History, twins: Twins,
                 event: Callable[..., None]) -> None:
        self._pool = pool
        self._history = history
        self._twins = twins
        self._event = event
        self._devices: dict[str, DeviceSpec] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def configure(self, devices: Sequence[DeviceSpec]) -> None:
        """Take ``devices`` (at start, then after each new configuration): write every
        desired value not written yet with its signature; the ones written before are
        the twins' ``observedDesired`` at once. Writes still under way for the previous
        configuration are cancelled (each write is idempotent; the new ones start over).
        """
        self._devices = {d.key: d for d in devices}
        wanted = {(d.key, p.name): (d, p) for d in devices for p in d.properties
                  if p.desired is not None}
        self._history.forget_desired(set(wanted))
        done = self._history.desired_written()
        todo: dict[str, list[PropertySpec]] = {}
        for (key, name), (device, prop) in wanted.items():
            known = done.get((key, name))
            if known is None or known[0] != signature(device, prop):
                todo.setdefault(key, []).append(prop)
            elif known[1] == "written":
                self._twins.observed(key, name, known[2])
            # else: refused for good before, and reported then
        self._cancel()
        for key, props in todo.items():
            task = asyncio.create_task(self._write_desired(self._devices[key], props),
                                       name=f"desired[{key}]")
            task.add_done_callback(self._done)
            self._tasks[key] = task

    def _done(self, task: asyncio.Task[None]) -> None:
        """A bug in a desired write is said, never lost with its task."""
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())
            self._event("agent_error", task=task.get_name(), error=repr(task.exception()))

    def _cancel(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        return tasks

    async def stop(self) -> None:
        """Stop the desired writes under way (at the agent's stop)."""
        await asyncio.gather(*self._cancel(), return_exceptions=True)

    async def _write_desired(self, device: DeviceSpec, props: Sequence[PropertySpec]) -> None:
        conn = self._pool.get(device.endpoint)
        for prop in props:
            value, delay, reported = desired_value(prop), RETRY_INITIAL_S, ""
            while True:
                try:
                    read_back = await write_property(conn, device, prop, value)
                except WriteError as e:
                    if str(e) != reported:  # once per distinct failure, not per retry
                        reported = str(e)
                        self._failed(e, "desired")
                    if e.stage in ("write", "read_back"):
                        self._history.unknown_desired(device.key, prop.name)
                        self._twins.observed(device.key, prop.name, None)
                    if not retried(e):
                        if e.stage not in ("write", "read_back"):
                            self._history.record_desired(device.key, prop.name,
                                                         signature(device, prop), e.kind)
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                self._history.record_desired(device.key, prop.name, signature(device, prop),
                                             "written", read_back)
                self._twins.observed(device.key, prop.name, read_back)
                self._written(device.key, prop.name, value, read_back, "desired")
                break
        self._tasks.pop(device.key, None)

    def _device(self, key: str) -> DeviceSpec:
        device = self._devices.get(key)
        if device is None:
            known = ", ".join(self._devices) or "none"
            cause = f"no device {key!r} on this gateway; it has: {known}"
            raise WriteError("unknown_device", cause, device=key, cause=cause)
        return device

    async def write(self, key: str, prop: str, value: Any, *, cid: str) -> Value:
        """``cmd/write``: write ``value`` to ``key``'s property ``prop`` now; the
        read-back value.

        Raises:
            WriteError: as :func:`~edge.modbus.writer.write_property`; also
                ``unknown_device``, ``unknown_property``.
        """
        try:
            device = self._device(key)
            read_back = await write_property(self._pool.get(device.endpoint), device,
                                             find_property(device, prop), value)
        except WriteError as e:
            self._failed(e, "cmd/write", id=cid)
            raise
        self._written(key, prop, value, read_back, "cmd/write", id=cid)
        return read_back

    async def call(self, key: str, method: str, values: Mapping[str, Any], *,
                   cid: str) -> dict[str, Value]:
        """``cmd/method``: call ``key``'s Device method ``method`` with ``values``; the
        read-back values by property.

        Raises:
            WriteError: as :func:`~edge.modbus.writer.call_method`; also
                ``unknown_device``.
        """
        try:
            device = self._device(key)
            results = await call_method(self._pool.get(device.endpoint), device, method,
                                        values)
        except WriteError as e:
            for name in e.written_before:
                self._written(key, name, values[name], e.results[name], "cmd/method",
                              id=cid, method=method)
            self._failed(e, "cmd/method", id=cid, method=method)
            raise
        for name, read_back in results.items():
            self._written(key, name, values[name], read_back, "cmd/method", id=cid,
                          method=method)
        return results

    def _written(self, key: str, prop: str, value: Any, read_back: Value, origin: str,
                 **more: Any) -> None:
        log.info("%s: wrote %r to %s (%s), read back %r", key, value, prop, origin, read_back)
        self._event("written", origin=origin, device=key, property=prop, value=value,
                    read_back=read_back, **more)

    def _failed(self, e: WriteError, origin: str, **more: Any) -> None:
        log.error("%s (%s)", e, origin)
        value = e.value if len(repr(e.value)) <= SHOWN_CHARS else shown(e.value)
        self._event("write_failed", origin=origin, device=e.device, property=e.property,
                    value=value, kind=e.kind, stage=e.stage, error=str(e), **more)
