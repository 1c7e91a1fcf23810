"""The launcher: ``python3 -P -m edge.release.boot ARGS`` runs ``edge ARGS`` on the
release :class:`edge.release.slots.Releases` picks (the package's ``/opt/edge/bin/edge``).

It always runs from the factory release (``/opt/edge/lib``), which dpkg installed and
which no update touches, so a broken release can never break the launcher. With
``$EDGE_RELEASES`` unset, or when the factory release is the one to run, ``edge`` runs
in this process. Otherwise it executes ``python3 -P -m edge ARGS`` with that release's
``lib`` first on ``PYTHONPATH`` instead of the factory's. Either way
``$EDGE_LAUNCHER`` tells the agent how to come back through here when it restarts
itself (:func:`relaunch`), and ``$EDGE_RELEASE`` names the release that runs (empty:
the factory one).

Only ``run`` (the service) counts a boot of a release on trial; other commands use
the release that runs now. A releases directory that cannot be read is said on
stderr and the factory release runs: the launcher never fails for it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from edge.release.slots import ReleaseError, Releases

FACTORY_LIB = Path(__file__).resolve().parents[2]
"""The import path this launcher (the factory release) was loaded from."""


def _pythonpath(lib: Path) -> str:
    """``PYTHONPATH`` with ``lib`` in place of the factory release's directory."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != FACTORY_LIB]
    return os.pathsep.join([str(lib), *rest])


def choose(args: list[str]) -> tuple[str | None, Path | None]:
    """The release to run ``edge args`` on and its import path (None, None: the
    factory release)."""
    root = os.environ.get("EDGE_RELEASES")
    if not root:
        return None, None
    releases = Releases(Path(root))
    try:
        if args[:1] == ["run"]:
            version, why = releases.boot()
            if why:
                print(f"edge: {why}", file=sys.stderr)
        else:
            version = releases.current()
    except (OSError, ReleaseError) as e:
        print(f"edge: the releases in {root} cannot be used ({e}): running the factory "
              "release", file=sys.stderr)
        return None, None
    return version, releases.lib(version)


def relaunch(args: list[str]) -> NoReturn:
    """Start ``edge args`` again through the launcher that started this process (same
    PID), or this process's own command line when no launcher did."""
    launcher = os.environ.get("EDGE_LAUNCHER")
    if launcher:
        spec = json.loads(launcher)
        env = dict(os.environ, PYTHONPATH=spec["pythonpath"])
        os.execve(spec["argv"][0], [*spec["argv"], *args], env)  # noqa: S606 (our own)
    os.execv(sys.executable, sys.orig_argv)  # noqa: S606 (our own command line)


def main() -> None:
    args = sys.argv[1:]
    os.environ["EDGE_LAUNCHER"] = json.dumps({
        "argv": [sys.executable, "-P", "-m", "edge.release.boot"],
        "pythonpath": os.environ.get("PYTHONPATH", "")})
    version, lib = choose(args)
    os.environ["EDGE_RELEASE"] = version or ""
    if lib is not None:
        os.environ["PYTHONPATH"] = _pythonpath(lib)
        os.execv(sys.executable, [sys.executable, "-P", "-m", "edge", *args])  # noqa: S606
    from edge.cli import main as edge  # noqa: PLC0415

    edge(args=args, prog_name="edge")


if __name__ == "__main__":
    main()
