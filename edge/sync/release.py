"""The agent's side of self-update: which pushed release is due, installing it in a
forked child, putting it on trial, and committing or reverting it at the end of the
health window of the bundle that brought it (:mod:`edge.sync.controller`).

A bundle's ``agent.release`` whose version is not the running agent's is due. It is
staged (fetched, verified, installed beside the running one: :mod:`edge.release.slots`)
before anything else of the bundle is applied; a release that cannot be staged gets
the bundle refused (reason ``release``) and nothing changes. Otherwise the bundle is
applied by a restart through the launcher onto the release, on trial
(:mod:`edge.release.boot`); the new process opens the health window and commits both,
or rolls back the bundle and reverts the release, and restarts onto the committed
one. Self-update needs the launcher's ``$EDGE_RELEASES``; without it a due release
is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from edge import __version__
from edge.config.errors import ConfigError
from edge.config.runtime import ChildCall, RuntimeConfig
from edge.release.slots import ReleaseError, Releases
from edge.release.spec import ReleaseSpec

log = logging.getLogger(__name__)
STAGE_TIMEOUT_S = 900.0
"""How long fetching and unpacking a release may take (slow links, slow flash)."""


def _stage(root: Path, spec: ReleaseSpec) -> str:
    """In the child: "" once ``spec`` is installed, else why not."""
    try:
        Releases(root).stage(spec)
    except (ReleaseError, OSError) as e:
        return str(e)
    return ""


class ReleaseSwitch:
    """The releases of this gateway (``$EDGE_RELEASES``; None: self-update is off)."""

    def __init__(self, root: Path | None) -> None:
        self.releases = Releases(root) if root is not None else None

    @classmethod
    def from_env(cls) -> ReleaseSwitch:
        root = os.environ.get("EDGE_RELEASES")
        return cls(Path(root) if root else None)

    @staticmethod
    def due(new: RuntimeConfig) -> ReleaseSpec | None:
        """``new``'s release when it is not the one running."""
        return new.release if new.release and new.release.version != __version__ else None

    async def stage(self, spec: ReleaseSpec) -> str:
        """Install ``spec`` beside the running release, in a forked child (the fetch
        and unpack libraries stay there); "" when done, else why not."""
        if self.releases is None:
            return (f"release {spec.version} cannot be installed: self-update needs the "
                    "package's launcher (/opt/edge/bin/edge sets EDGE_RELEASES)")
        root = self.releases.root
        log.info("installing release %s from %s", spec.version, spec.url)
        try:
            outcome = await asyncio.to_thread(ChildCall(
                lambda: _stage(root, spec), label=f"release {spec.version}",
                timeout_s=STAGE_TIMEOUT_S).outcome)
        except ConfigError as e:
            return str(e.problems[0].message)
        return str(outcome)

    def not_running(self, version: str) -> str:
        """Why the release ``version`` that a configuration was applied on does not run."""
        try:
            last = self.releases.state().last if self.releases else {}
        except (ReleaseError, OSError):
            last = {}
        if last.get("version") == version and last.get("outcome") == "reverted":
            return f"its release {version} was reverted: {last.get('reason')}"
        return f"its release {version} is not running (it was never switched to)"

    def switch(self, version: str) -> str:
        """Put ``version`` on trial for the next start; "" when done, else why not."""
        assert self.releases is not None  # stage() refused otherwise
        try:
            self.releases.switch(version)
        except (ReleaseError, OSError) as e:
            return str(e)
        return ""

    def on_trial(self) -> bool:
        """This process runs the release on trial."""
        if self.releases is None or not os.environ.get("EDGE_RELEASE"):
            return False
        try:
            state = self.releases.state()
        except (ReleaseError, OSError):
            return False
        return state.trial == os.environ["EDGE_RELEASE"] == __version__ and state.boots >= 1

    def commit(self) -> None:
        """The trial running here passed its window: it runs from now on."""
        if self.on_trial():
            assert self.releases is not None
            self.releases.commit(__version__)
            log.info("release %s committed", __version__)

    def revert(self, why: str) -> None:
        """The trial running here failed its window: the committed one starts next."""
        if self.on_trial():
            assert self.releases is not None
            self.releases.revert(why)
            log.error("release %s reverted: %s", __version__, why)
