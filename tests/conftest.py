"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from support import Image, ModbusServer


class Stoppable(Protocol):
    """Anything a test starts: a broker, a server, an agent process, a pty pair."""

    def stop(self) -> Any: ...


StopLater = Callable[[Stoppable], Any]


@pytest.fixture
def stop_later() -> Iterator[StopLater]:
    """``thing = stop_later(start_x(...))``: stopped at teardown, newest first, even
    when the test fails before it could stop it itself."""
    started: list[Stoppable] = []

    def register(thing: Stoppable) -> Any:
        started.append(thing)
        return thing

    yield register
    for thing in reversed(started):
        try:
            thing.stop()
        except Exception as e:
            print(f"stopping {thing!r} failed: {e!r}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own, to fill up (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def two_units() -> Iterator[ModbusServer]:
    """A Modbus TCP server with unit 1 (holding register 0 = 11) and unit 2 (22)."""
    server = ModbusServer({1: Image(hr=[11]), 2: Image(hr=[22])})
    yield server
    server.stop()
