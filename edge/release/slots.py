"""Agent releases installed side by side, and the one state file that says which runs.

Layout under the releases directory ``R`` (``$EDGE_RELEASES``; the package's unit sets
``/var/lib/edge/releases``)::

    R/state.json          {"committed", "previous", "trial", "boots", "last"}
    R/<V>/release.json    {"version": V, "python": "3.11", "machine": "aarch64"}
    R/<V>/lib/            the import path of release V: edge and its dependencies
    R/.incoming/          a download or unpacking under way (cleared by the next one)

A version of ``null`` is the *factory* release: the one the package installed
(``/opt/edge/lib``), always there, the last resort. A release artifact is a tar
archive (gzip or not) of ``release.json`` and ``lib/``; ``packaging/build-deb.sh``
writes one next to each .deb. Its URL, size and SHA-256 come in a signed desired
bundle (:class:`ReleaseSpec`), so the archive needs no signature of its own.

An update goes through these steps. Each write is flushed to disk before the next
step and each switch is one rename of ``state.json``, so a power cut at any step
leaves a state the launcher boots a working release from:

========  ==============================================  ===========================
step      what it does                                    a cut here leaves
========  ==============================================  ===========================
fetch     download into ``R/.incoming/V.tar``              the committed release
verify    size and SHA-256 against the bundle               the committed release
unpack    ``R/.incoming/V/``; check release.json, compile  the committed release
install   rename to ``R/V``                                 the committed release
switch    ``trial = V``, ``boots = 0``                      V booted once, on trial
boot      the launcher: ``boots = 1``, then V runs          V on trial (its window)
(again)   a second boot of a trial that never committed   revert: the committed one
commit    ``committed = V``, ``previous`` = the old one     V, from now on
revert    ``trial = null``, ``last`` says why               the committed release
========  ==============================================  ===========================

``EDGE_RELEASE_KILL_AT=<step>`` SIGKILLs this process's group as the step begins: the
agent and the child that stages, as a power cut would (a failpoint, as etcd's gofail,
for the crash tests, which run the agent in a session of its own; unset, nothing).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Final

from edge.release.spec import ReleaseSpec

if TYPE_CHECKING:
    import tarfile

STATE: Final = "state.json"
INCOMING: Final = ".incoming"
MANIFEST: Final = "release.json"
CHUNK: Final = 1 << 16
UNPACKED_MAX: Final = 1 << 30
"""Bytes an archive may unpack to (a release is some 60 MB)."""
FETCH_TIMEOUT_S: Final = 60.0
SCHEMES: Final = ("http", "https", "file")


class ReleaseError(Exception):
    """A release that cannot be installed or booted; the message says what and where."""


@dataclass(frozen=True, slots=True)
class State:
    """``state.json``: ``committed`` runs, ``trial`` is on trial (``boots``: times the
    launcher started it), ``previous`` is what ran before the last commit; None is the
    factory release. ``last``: the newest outcome (``version``, ``outcome``
    committed/reverted/rolled_back, ``reason``)."""

    committed: str | None = None
    previous: str | None = None
    trial: str | None = None
    boots: int = 0
    last: dict[str, Any] = field(default_factory=dict)


def failpoint(step: str) -> None:
    """SIGKILL this process group if ``$EDGE_RELEASE_KILL_AT`` names ``step``."""
    if os.environ.get("EDGE_RELEASE_KILL_AT") == step:
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def machine() -> str:
    """The machine a release must be built for (``uname -m``: x86_64, aarch64, armv7l)."""
    return platform.machine()


def python_version() -> str:
    """The ``major.minor`` of this Python, which a release's wheels are built for."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class Releases:
    """The releases directory ``root`` (made when missing). Raises OSError when it
    cannot be read or written, ReleaseError for a state file that is not ours."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- the state --------------------------------------------------------------------

    def state(self) -> State:
        """The state (the default when there is none yet: the factory release runs)."""
        try:
            raw = json.loads((self.root / STATE).read_bytes())
        except FileNotFoundError:
            return State()
        except ValueError as e:
            raise ReleaseError(f"{self.root / STATE}: not JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ReleaseError(f"{self.root / STATE}: not a JSON object")
        try:
            return State(**raw)
        except TypeError as e:
            raise ReleaseError(f"{self.root / STATE}: {e}") from e

    def _save(self, state: State) -> None:
        """Replace the state at once: written, flushed, renamed, the directory flushed."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{STATE}.tmp"
        with tmp.open("wb") as f:
            f.write(json.dumps(asdict(state), indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.root / STATE)
        _fsync_dir(self.root)

    def lib(self, version: str | None) -> Path | None:
        """The import path of ``version`` (None: the factory release), None when that
        release is not installed (complete) here."""
        if version is None:
            return None
        tree = self.root / version
        return tree / "lib" if (tree / MANIFEST).is_file() else None

    # -- the launcher -----------------------------------------------------------------

    def boot(self) -> tuple[str | None, str]:
        """The launcher starting the agent: which release to run and why. A trial is
        booted once (``boots`` 1); booted again without a commit it is reverted (the
        agent restarted or lost power in its health window)."""
        state = self.state()
        if state.trial is not None:
            if state.boots >= 1 or self.lib(state.trial) is None:
                why = ("the agent restarted during its health window" if state.boots >= 1
                       else f"release {state.trial} is not installed in {self.root}")
                self._revert(state, why)
                return self._committed(state, f"release {state.trial} reverted: {why}")
            self._save(replace(state, boots=1))
            failpoint("boot")
            return state.trial, f"release {state.trial} on trial"
        return self._committed(state, "")

    def _committed(self, state: State, why: str) -> tuple[str | None, str]:
        if state.committed is not None and self.lib(state.committed) is None:
            return None, (f"release {state.committed} is not installed in {self.root}: "
                          "the factory release runs")
        return state.committed, why

    def current(self) -> str | None:
        """The release the agent runs now (for commands other than ``run``)."""
        state = self.state()
        if state.trial is not None and state.boots >= 1 and self.lib(state.trial):
            return state.trial
        return self._committed(state, "")[0]

    # -- the agent --------------------------------------------------------------------

    def stage(self, spec: ReleaseSpec) -> Path:
        """Fetch, verify, unpack and install ``spec`` beside the others (steps fetch …
        install); returns its import path. Nothing switches yet.

        Raises:
            ReleaseError: what failed (the download, the size or digest, the archive,
                a release for another machine or Python); nothing is left behind.
        """
        lib = self.lib(spec.version)
        if lib is not None:
            self._check_manifest(self.root / spec.version, spec)
            return lib
        incoming = self.root / INCOMING
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        archive = incoming / f"{spec.version}.tar"
        failpoint("fetch")
        _fetch(spec, archive)
        failpoint("verify")
        _verify(spec, archive)
        failpoint("unpack")
        tree = incoming / spec.version
        _unpack(archive, tree)
        self._check_manifest(tree, spec)
        _compile(tree / "lib")
        os.sync()  # every file of the tree on disk before it is installed
        failpoint("install")
        target = self.root / spec.version
        shutil.rmtree(target, ignore_errors=True)  # an incomplete one (no release.json)
        tree.rename(target)
        _fsync_dir(self.root)
        shutil.rmtree(incoming, ignore_errors=True)
        return target / "lib"

    @staticmethod
    def _check_manifest(tree: Path, spec: ReleaseSpec) -> None:
        where = f"release {spec.version} ({spec.url})"
        try:
            manifest = json.loads((tree / MANIFEST).read_bytes())
        except (OSError, ValueError) as e:
            raise ReleaseError(f"{where}: no readable {MANIFEST} ({e})") from e
        if not isinstance(manifest, dict):
            raise ReleaseError(f"{where}: {MANIFEST} is not a JSON object")
        for key, want in (("version", spec.version), ("machine", machine()),
                          ("python", python_version())):
            if manifest.get(key) != want:
                raise ReleaseError(f"{where}: {MANIFEST} says {key} {manifest.get(key)!r}, "
                                   f"this gateway needs {want!r}")
        if not (tree / "lib" / "edge" / "__main__.py").is_file():
            raise ReleaseError(f"{where}: lib/edge/__main__.py is missing: not an edge release")

    def switch(self, version: str) -> None:
        """Put the installed ``version`` on trial: the next boot starts it (step switch)."""
        if self.lib(version) is None:
            raise ReleaseError(f"release {version} is not installed in {self.root}")
        failpoint("switch")
        self._save(replace(self.state(), trial=version, boots=0))

    def commit(self, version: str) -> None:
        """The trial ``version`` passed its health window: it runs from now on (step
        commit); releases other than it and the previous one are removed."""
        state = self.state()
        if state.trial != version:
            raise ReleaseError(f"release {version} is not on trial (the trial is "
                               f"{state.trial})")
        failpoint("commit")
        self._save(State(committed=version, previous=state.committed, last={
            "version": version, "outcome": "committed", "reason": ""}))
        keep = {version, state.committed}
        for tree in self.root.iterdir():
            if tree.is_dir() and tree.name not in keep and (tree / MANIFEST).exists():
                shutil.rmtree(tree, ignore_errors=True)

    def revert(self, reason: str) -> None:
        """Take the trial off (step revert): the committed release boots next."""
        state = self.state()
        if state.trial is not None:
            self._revert(state, reason)

    def _revert(self, state: State, reason: str) -> None:
        failpoint("revert")
        self._save(replace(state, trial=None, boots=0, last={
            "version": state.trial, "outcome": "reverted", "reason": reason}))

    def roll_back(self) -> str | None:
        """An operator's rollback: the previous release is committed again (the factory
        release when there is none); returns it. Takes effect at the next start.

        Raises:
            ReleaseError: a trial is under way, or the previous release is gone.
        """
        state = self.state()
        if state.trial is not None:
            raise ReleaseError(f"release {state.trial} is on trial: wait for its health "
                               "window to end")
        if state.committed is None:
            raise ReleaseError("the factory release runs: there is nothing to roll back to")
        back = state.previous
        if back is not None and self.lib(back) is None:
            raise ReleaseError(f"the previous release {back} is no longer installed")
        self._save(State(committed=back, previous=None, last={
            "version": state.committed, "outcome": "rolled_back",
            "reason": "rolled back by the operator"}))
        return back


def _fetch(spec: ReleaseSpec, archive: Path) -> None:
    scheme = spec.url.partition(":")[0].lower()
    if scheme not in SCHEMES:
        raise ReleaseError(f"release {spec.version}: {spec.url}: only {', '.join(SCHEMES)} "
                           "URLs are fetched")
    import urllib.request  # noqa: PLC0415 (only where a release is fetched: the child)

    try:
        with urllib.request.urlopen(spec.url, timeout=FETCH_TIMEOUT_S) as src, \
                archive.open("wb") as out:  # noqa: S310 (scheme checked above)
            _copy(src, out, spec)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:  # URLError, HTTPError, timeouts, a full disk
        raise ReleaseError(f"release {spec.version}: cannot fetch {spec.url}: {e}") from e


def _copy(src: IO[bytes], out: IO[bytes], spec: ReleaseSpec) -> None:
    got = 0
    while chunk := src.read(CHUNK):
        got += len(chunk)
        if got > spec.size:
            raise ReleaseError(f"release {spec.version}: {spec.url} is larger than the "
                               f"{spec.size} bytes the bundle says")
        out.write(chunk)


def _verify(spec: ReleaseSpec, archive: Path) -> None:
    size = archive.stat().st_size
    if size != spec.size:
        raise ReleaseError(f"release {spec.version}: {spec.url} is {size} bytes, the bundle "
                           f"says {spec.size}")
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != spec.sha256:
        raise ReleaseError(f"release {spec.version}: {spec.url} has SHA-256 "
                           f"{digest.hexdigest()}, the bundle says {spec.sha256}")


def _unpack(archive: Path, tree: Path) -> None:
    """Regular files and directories under ``release.json`` and ``lib/`` only: no
    links, devices, absolute paths or ``..`` (what a hostile archive would use)."""
    import tarfile  # noqa: PLC0415 (only where a release is unpacked: the child)

    tree.mkdir()
    total = 0
    try:
        with tarfile.open(archive) as tar:
            for member in _members(tar, archive):
                dest = tree.joinpath(*PurePosixPath(member.name).parts)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                total += member.size
                if total > UNPACKED_MAX:
                    raise ReleaseError(f"{archive.name}: unpacks to more than "
                                       f"{UNPACKED_MAX} bytes")
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    raise ReleaseError(f"{archive.name}: {member.name}: unreadable")
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                dest.chmod(0o755 if member.mode & 0o111 else 0o644)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ReleaseError(f"{archive.name}: not a readable tar archive ({e})") from e


def _compile(lib: Path) -> None:
    """Byte-compile the release once (as Debian's py3compile does for packages): its
    every start then skips compiling, which is seconds on a slow ARM gateway."""
    import compileall  # noqa: PLC0415

    compileall.compile_dir(lib, quiet=2, workers=1)


def _members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        parts = PurePosixPath(member.name).parts
        if parts[:1] == (".",):
            parts = parts[1:]
        if not parts:
            continue
        if (member.name.startswith("/") or ".." in parts
                or not (parts == (MANIFEST,) or parts[0] == "lib")):
            raise ReleaseError(f"{archive.name}: {member.name!r}: only {MANIFEST} and lib/ "
                               "may be in a release")
        if not (member.isfile() or member.isdir()):
            raise ReleaseError(f"{archive.name}: {member.name!r}: only regular files and "
                               "directories may be in a release")
        member.name = "/".join(parts)
        yield member


def pack(lib: Path, version: str, out: Path, *, machine_name: str | None = None,
         python: str | None = None) -> ReleaseSpec:
    """Write the release archive ``out`` (gzip tar) of the import path ``lib`` as
    ``version``, for ``machine_name`` and ``python`` (default: this machine's); returns
    its spec with a ``file://`` URL (publish it anywhere, then name that URL)."""
    import tarfile  # noqa: PLC0415

    manifest = {"version": version, "machine": machine_name or machine(),
                "python": python or python_version()}
    with tarfile.open(out, "w:gz") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(lib, arcname="lib", filter=_no_caches)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return ReleaseSpec(version, out.resolve().as_uri(), digest, out.stat().st_size)


def _no_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name.split("/") else info
