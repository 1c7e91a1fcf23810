"""The systemd service notification protocol (sd_notify(3)), without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``,
the process meant). The agent sends ``READY=1`` once it polls and publishes,
``WATCHDOG=1`` every half watchdog interval from its event loop (a loop that hangs
stops the keepalives, and systemd restarts the service), ``STATUS=`` lines for
``systemctl status``, and ``STOPPING=1`` when it stops. Without ``NOTIFY_SOCKET``
every call does nothing. Sources: sd_notify(3), systemd.service(5) ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify(3) messages to ``environ``'s ``NOTIFY_SOCKET``, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        """Where messages go ("" when not run by systemd with Type=notify)."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        meant = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and meant else None
        """The watchdog interval in seconds, when systemd watches this process."""
        self._failed = False

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``READY=1``, ``STATUS=…``) as one message; errors are logged
        once and never raised: the agent runs on without its supervisor's ear."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self.address, e)
            self._failed = True

    async def keepalive(self) -> None:
        """``WATCHDOG=1`` every half watchdog interval, forever; returns at once when
        systemd does not watch this process."""
        if self.watchdog_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)
