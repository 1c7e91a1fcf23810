"""Hot reload of the plugins in the agent file's ``plugins.dir``.

Every :data:`INTERVAL_S` the manifests there and the modules they name are looked at
(name, size, mtime); a change that has held still for one more look (a copy has
finished) revalidates the configuration in the forked child, like ``edge check``, and
hands the agent the new plugin list (:meth:`edge.agent.Agent.apply_plugins`), which
swaps each changed plugin between two batches. A manifest that does not validate is
reported (log and a ``plugin_refused`` event with the problems) and changes nothing:
what ran before keeps running. Plugins that came with a desired bundle are the
bundle's: the directory is not watched then.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edge.config.errors import ConfigError
from edge.config.runtime import load_runtime_config
from edge.wasm.spec import manifest_files

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger(__name__)

INTERVAL_S: Final = 2.0
MAX_PROBLEMS: Final = 20

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path, modules: list[Path]) -> Fingerprint:
    """(path, size, mtime in ns) of every manifest in ``directory`` and of ``modules``."""
    out = []
    for p in [*manifest_files(directory), *modules]:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


class PluginWatch:
    """Watches ``agent.cfg.plugin_dir`` for the agent run from ``agent_file``."""

    def __init__(self, agent: Agent, agent_file: Path, interval_s: float = INTERVAL_S) -> None:
        self.agent = agent
        self.agent_file = agent_file
        self.interval_s = interval_s

    def _now(self) -> Fingerprint | None:
        cfg = self.agent.cfg
        if cfg.plugin_dir is None:
            return None
        return fingerprint(cfg.plugin_dir, [s.wasm for s in cfg.plugins])

    async def run(self) -> None:
        """Until cancelled."""
        seen = self._now()
        while True:
            await asyncio.sleep(self.interval_s)
            now = self._now()
            if now is None or now == seen:
                seen = now
                continue
            await asyncio.sleep(self.interval_s)
            if self._now() != now:
                continue  # still being written: look again next time
            seen = now
            await self.reload()

    async def reload(self) -> None:
        """Revalidate and apply the directory's plugins now."""
        directory = self.agent.cfg.plugin_dir
        try:
            new = await asyncio.to_thread(load_runtime_config, self.agent_file)
        except ConfigError as e:
            errors = [str(p) for p in e.problems if p.severity == "error"]
            log.error("the plugins in %s were not reloaded: %d problem(s); what ran before "
                      "goes on", directory, len(errors))
            for p in errors:
                log.error("  %s", p)
            self.agent.uplink.publish_event("plugin_refused", error="the plugin directory "
                                            "does not validate", directory=str(directory),
                                            problems=errors[:MAX_PROBLEMS])
            self.agent.plugin_problems(errors)
            return
        if self.agent.cfg.plugin_dir is None:  # a bundle was applied meanwhile
            return
        self.agent.plugin_problems([])
        self.agent.apply_plugins(new.plugins)
