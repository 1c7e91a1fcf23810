"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest


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
