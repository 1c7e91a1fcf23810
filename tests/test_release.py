"""Self-update: releases side by side, the launcher, and the agent updating itself.

Real parts: release archives made by ``edge release pack`` from a copy of this
checkout (its ``__version__`` changed), real files under a releases directory, the
launcher (``python -P -m edge.release.boot``) started and restarted as systemd's
``Restart=on-failure`` would, mosquitto, a pymodbus device and signed bundles. A power
cut is a SIGKILL of the agent's process group at the named step (the failpoint of
:mod:`edge.release.slots`), once; the agent must come back on a working release.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import StopLater
from support import (
    REPO,
    Broker,
    Gateway,
    Image,
    ModbusServer,
    Subscriber,
    device_docs,
    edge_cli,
    events,
    free_port,
    start_broker,
    wait_event,
)

from edge import __version__
from edge.release.slots import (
    ReleaseError,
    Releases,
    State,
    machine,
    pack,
    python_version,
)
from edge.release.spec import ReleaseSpec

NEW = "0.2.0"
NODE = "gw-release"
PREFIX = f"edge/v1/{NODE}"
PROPS = [{"name": "level", "type": "INT", "collectCycle": 200,
          "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]


def release_lib(tmp: Path, version: str, *, crash: bool = False) -> Path:
    """A copy of this checkout's edge package as release ``version`` (``crash``: its
    ``python -m edge`` dies at once, as a release broken at start would)."""
    lib = tmp / f"src-{version}" / "lib"
    shutil.copytree(REPO / "edge", lib / "edge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = lib / "edge" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"',
                                             f'__version__ = "{version}"'))
    if crash:
        (lib / "edge" / "__main__.py").write_text("raise SystemExit('broken release')\n")
    return lib


def archive(tmp: Path, version: str = NEW, **kw: Any) -> ReleaseSpec:
    return pack(release_lib(tmp, version, crash=kw.pop("crash", False)), version,
                tmp / f"edge-{version}.tar.gz", **kw)


# -- the releases directory -------------------------------------------------------------


def test_a_release_is_staged_beside_booted_once_on_trial_and_committed(tmp_path: Path) -> None:
    spec = archive(tmp_path)
    releases = Releases(tmp_path / "releases")
    lib = releases.stage(spec)
    assert lib == tmp_path / "releases" / NEW / "lib"
    assert (lib / "edge" / "__init__.py").read_text().count(f'"{NEW}"') == 1
    assert releases.state() == State()  # staged, nothing switched
    assert releases.boot() == (None, "")
    releases.switch(NEW)
    assert releases.boot() == (NEW, f"release {NEW} on trial")
    assert releases.current() == NEW
    releases.commit(NEW)
    assert releases.state() == State(committed=NEW, last={
        "version": NEW, "outcome": "committed", "reason": ""})
    assert releases.boot() == (NEW, "")
    assert not (tmp_path / "releases" / ".incoming").exists()


def test_a_trial_booted_again_without_a_commit_is_reverted(tmp_path: Path) -> None:
    releases = Releases(tmp_path / "releases")
    releases.stage(archive(tmp_path))
    releases.switch(NEW)
    assert releases.boot()[0] == NEW
    version, why = releases.boot()  # the agent died in its health window
    assert (version, why) == (None, f"release {NEW} reverted: the agent restarted during "
                                    "its health window")
    assert releases.state().last == {"version": NEW, "outcome": "reverted",
                                     "reason": "the agent restarted during its health window"}
    assert releases.boot() == (None, "")


def test_commit_keeps_the_previous_release_and_rollback_goes_back_to_it(
    tmp_path: Path
) -> None:
    releases = Releases(tmp_path / "releases")
    for version in ("0.2.0", "0.3.0", "0.4.0"):
        releases.stage(archive(tmp_path, version))
        releases.switch(version)
        releases.boot()
        releases.commit(version)
    assert releases.state().committed == "0.4.0"
    assert releases.state().previous == "0.3.0"
    assert releases.lib("0.2.0") is None  # pruned: only the committed and previous stay
    assert releases.roll_back() == "0.3.0"
    assert releases.boot() == ("0.3.0", "")
    assert releases.roll_back() is None  # then the factory release
    with pytest.raises(ReleaseError, match="the factory release runs"):
        releases.roll_back()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    import io  # noqa: PLC0415

    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _spec_of(path: Path, version: str = NEW) -> ReleaseSpec:
    import hashlib  # noqa: PLC0415

    data = path.read_bytes()
    return ReleaseSpec(version, path.as_uri(), hashlib.sha256(data).hexdigest(), len(data))


def _hostile(tmp: Path, kind: str) -> ReleaseSpec:
    manifest = json.dumps({"version": NEW, "machine": machine(), "python": python_version()})
    good = (tarfile.TarInfo("release.json"), manifest.encode())
    path = tmp / f"{kind}.tar.gz"
    if kind == "traversal":
        _tar(path, [good, (tarfile.TarInfo("lib/../../escaped"), b"x")])
    elif kind == "absolute":
        _tar(path, [good, (tarfile.TarInfo("/tmp/escaped"), b"x")])
    elif kind == "symlink":
        link = tarfile.TarInfo("lib/edge")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        _tar(path, [good, (link, b"")])
    elif kind == "other-file":
        _tar(path, [good, (tarfile.TarInfo("etc/passwd"), b"x")])
    elif kind == "not-edge":
        _tar(path, [good, (tarfile.TarInfo("lib/other.py"), b"x")])
    elif kind == "not-tar":
        path.write_bytes(b"not a tar archive at all")
    return _spec_of(path)


@pytest.mark.parametrize(("kind", "message"), [
    ("traversal", "only release.json and lib/ may be in a release"),
    ("absolute", "only release.json and lib/ may be in a release"),
    ("other-file", "only release.json and lib/ may be in a release"),
    ("symlink", "only regular files and directories may be in a release"),
    ("not-edge", "lib/edge/__main__.py is missing: not an edge release"),
    ("not-tar", "not a readable tar archive"),
])
def test_a_hostile_or_wrong_archive_is_refused_and_leaves_nothing(
    tmp_path: Path, kind: str, message: str
) -> None:
    releases = Releases(tmp_path / "releases")
    with pytest.raises(ReleaseError, match=message):
        releases.stage(_hostile(tmp_path, kind))
    assert releases.lib(NEW) is None
    assert not (tmp_path / "escaped").exists()
    assert releases.state() == State()


def _bad_spec(tmp: Path, kind: str) -> ReleaseSpec:
    if kind == "machine":
        return archive(tmp, machine_name="sparc64")
    if kind == "python":
        return archive(tmp, python="2.7")
    spec = archive(tmp)
    changes = {"sha256": {"sha256": "0" * 64}, "size": {"size": spec.size + 1},
               "smaller": {"size": spec.size - 1},
               "version": {"version": "0.9.0"},
               "unreachable": {"url": (tmp / "nowhere.tar.gz").as_uri()},
               "scheme": {"url": "ftp://127.0.0.1/edge.tar.gz"}}[kind]
    return ReleaseSpec(**{**asdict(spec), **changes})


@pytest.mark.parametrize(("kind", "message"), [
    ("sha256", "has SHA-256 [0-9a-f]{64}, the bundle says 0000"),
    ("size", r"is \d+ bytes, the bundle says \d+"),
    ("smaller", r"is larger than the \d+ bytes the bundle says"),
    ("version", "release.json says version '0.2.0', this gateway needs '0.9.0'"),
    ("machine", "release.json says machine 'sparc64', this gateway needs"),
    ("python", "release.json says python '2.7', this gateway needs"),
    ("unreachable", "cannot fetch file://"),
    ("scheme", "only http, https, file URLs are fetched"),
])
def test_a_release_that_does_not_match_its_bundle_is_refused(
    tmp_path: Path, kind: str, message: str
) -> None:
    releases = Releases(tmp_path / "releases")
    spec = _bad_spec(tmp_path, kind)
    with pytest.raises(ReleaseError, match=message):
        releases.stage(spec)
    assert releases.lib(spec.version) is None
    assert releases.state() == State()


# -- the launcher -------------------------------------------------------------------------


def launcher(args: list[str], releases: Path | None, **kw: Any) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["PYTHONPATH"] = str(REPO)
    if releases is not None:
        env["EDGE_RELEASES"] = str(releases)
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-P", "-m", "edge.release.boot", *args],
                            env=env, text=True, **kw)


def launch(args: list[str], releases: Path | None) -> subprocess.CompletedProcess[str]:
    proc = launcher(args, releases, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_launcher_runs_the_committed_release_and_falls_back_to_the_factory_one(
    tmp_path: Path
) -> None:
    root = tmp_path / "releases"
    assert json.loads(launch(["release", "status"], None).stdout)["running"] == __version__
    releases = Releases(root)
    releases.stage(archive(tmp_path))
    releases.switch(NEW)
    releases.boot()
    releases.commit(NEW)
    status = json.loads(launch(["release", "status"], root).stdout)
    assert (status["running"], status["release"], status["committed"]) == (NEW, NEW, NEW)
    assert status["installed"] == [NEW]
    shutil.rmtree(root / NEW)  # gone (a full disk, an operator): the factory one runs
    done = launch(["release", "status"], root)
    assert json.loads(done.stdout)["running"] == __version__
    (root / "state.json").write_text("{not json")
    done = launch(["--version"], root)
    assert (done.returncode, done.stdout) == (0, f"edge, version {__version__}\n")
    assert "cannot be used" in done.stderr
    assert "running the factory release" in done.stderr
    assert "state.json: not JSON" in launch(["release", "status"], root).stderr


# -- the agent updating itself -------------------------------------------------------------


class Supervisor:
    """The launcher's ``run`` restarted whenever it dies, as systemd's Restart=on-failure
    (RestartSec 0.2 s here); ``kill_at`` is set for the first start only: one power cut."""

    def __init__(self, gw: Gateway, root: Path, kill_at: str | None = None) -> None:
        self.gw, self.root, self.kill_at = gw, root, kill_at
        self.exits: list[int] = []
        self._stop = threading.Event()
        self.proc = self._start()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[str]:
        env = {"EDGE_RELEASE_KILL_AT": self.kill_at} if self.kill_at and not self.exits else {}
        log = (self.gw.tmp / f"agent-{len(self.exits)}.log").open("w")
        return launcher(["run", "-c", str(self.gw.agent_file)], self.root, env=env,
                        cwd=self.gw.tmp, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            code = self.proc.wait()
            if self._stop.is_set() or code == 0:
                return
            self.exits.append(code)
            time.sleep(0.2)
            self.proc = self._start()

    def output(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.gw.tmp.glob("agent-*.log")))

    def stop(self) -> int:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            self._thread.join(5)


def wait_state(sub: Subscriber, agent: str, applied: int, timeout: float = 60, *,
               rolled_back: bool = False) -> Any:
    """The first retained state of ``agent`` (version) running bundle ``applied`` with
    none pending (``rolled_back``: once version 1 was rolled back)."""
    def match(m: Any) -> bool:
        if m.topic != f"{PREFIX}/state":
            return False
        s = m.json()
        return bool(s.get("agent") == agent and s["state"] == "online"
                    and s["config"]["pending"] is None and s["config"]["applied"] == applied
                    and s["config"]["last_error"].startswith("version 1 rolled back")
                    == rolled_back)
    try:
        return sub.wait_for(match, timeout=timeout)[0]
    except TimeoutError as e:
        states = [m.payload.decode()[:300] for m in sub.on(f"{PREFIX}/state")]
        raise TimeoutError(f"no state of agent {agent} running {applied}; states:\n"
                           + "\n".join(states)) from e


def update_gateway(tmp: Path, stop_later: StopLater, kill_at: str | None = None,
                   ) -> tuple[Gateway, Supervisor, Subscriber, Broker, ModbusServer]:
    server = stop_later(ModbusServer({1: Image(hr=[7])}))
    broker = stop_later(start_broker(tmp))
    gw = Gateway(tmp, broker, device_docs("tank", server.port, 1, PROPS), node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/#"))
    sup = stop_later(Supervisor(gw, tmp / "releases", kill_at))
    wait_state(sub, __version__, 0)
    return gw, sup, sub, broker, server


def push_release(gw: Gateway, spec: ReleaseSpec, port: int, version: int = 1) -> None:
    gw.push(version, device_docs("tank", port, 1, PROPS), agent={"release": asdict(spec)})


def publishes(sub: Subscriber, after: float) -> None:
    """Telemetry comes from the agent that runs now."""
    sub.wait_for(lambda m: m.topic == f"{PREFIX}/telemetry/default/tank" and m.at > after,
                 timeout=20)


def test_a_pushed_release_is_installed_run_on_trial_and_committed(
    tmp_path: Path, stop_later: StopLater
) -> None:
    gw, sup, sub, _broker, server = update_gateway(tmp_path, stop_later)
    push_release(gw, archive(tmp_path), server.port)
    applied = wait_event(sub, PREFIX, "config_applied", version=1)
    assert applied["restart"] == ["release"]
    state = wait_state(sub, NEW, 1)
    publishes(sub, state.at)
    assert wait_event(sub, PREFIX, "config_committed", version=1)
    assert Releases(tmp_path / "releases").state().committed == NEW
    assert sup.exits == []  # restarted by exec (same PID), never died
    status = json.loads(edge_cli("release", "status", "--releases",
                                 str(tmp_path / "releases")).stdout)
    assert (status["committed"], status["trial"]) == (NEW, None)


def test_a_release_that_dies_at_start_is_reverted_and_its_bundle_rolled_back(
    tmp_path: Path, stop_later: StopLater
) -> None:
    gw, sup, sub, _broker, server = update_gateway(tmp_path, stop_later)
    push_release(gw, archive(tmp_path, crash=True), server.port)
    rolled = wait_event(sub, PREFIX, "config_rolled_back", version=1, timeout=60)
    assert rolled["reason"] == (f"its release {NEW} was reverted: the agent restarted during "
                                "its health window")
    publishes(sub, wait_state(sub, __version__, 0, rolled_back=True).at)
    assert sup.exits == [1]  # the broken release's one start
    last = Releases(tmp_path / "releases").state().last
    assert (last["version"], last["outcome"]) == (NEW, "reverted")
    assert "broken release" in sup.output()


def test_a_release_whose_bundle_fails_its_health_window_is_reverted(
    tmp_path: Path, stop_later: StopLater
) -> None:
    gw, sup, sub, _broker, _server = update_gateway(tmp_path, stop_later)
    push_release(gw, archive(tmp_path), free_port())  # the device on a dead port
    rolled = wait_event(sub, PREFIX, "config_rolled_back", version=1, timeout=60)
    assert rolled["reason"] == "device(s) default/tank not online after the change"
    publishes(sub, wait_state(sub, __version__, 0, rolled_back=True).at)
    assert Releases(tmp_path / "releases").state().last["outcome"] == "reverted"
    assert sup.exits == []


def test_a_release_that_cannot_be_staged_refuses_the_bundle_and_changes_nothing(
    tmp_path: Path, stop_later: StopLater
) -> None:
    gw, _sup, sub, _broker, server = update_gateway(tmp_path, stop_later)
    spec = archive(tmp_path)
    push_release(gw, ReleaseSpec(**{**asdict(spec), "sha256": "f" * 64}), server.port)
    refused = wait_event(sub, PREFIX, "config_refused", version=1)
    assert refused["reason"] == "release"
    assert "has SHA-256" in refused["error"]
    assert "the bundle says ffff" in refused["error"]
    assert Releases(tmp_path / "releases").state() == State()
    publishes(sub, time.time())


# a power cut at each step: (step, scenario, the release that runs at the end, its
# configuration version, why the bundle was rolled back — None: it was not)
POWER_CUTS = [
    ("fetch", "good", NEW, 1, None),
    ("verify", "good", NEW, 1, None),
    ("unpack", "good", NEW, 1, None),
    ("install", "good", NEW, 1, None),
    ("switch", "good", __version__, 0, f"its release {NEW} is not running (it was never "
                                        "switched to)"),
    ("boot", "good", __version__, 0, f"its release {NEW} was reverted: the agent restarted "
                                      "during its health window"),
    ("commit", "good", __version__, 0, "the agent restarted during the health window"),
    ("revert", "unhealthy", __version__, 0, "device(s) default/tank not online"),
]


@pytest.mark.parametrize(("step", "scenario", "runs", "applied", "why"), POWER_CUTS,
                         ids=[c[0] for c in POWER_CUTS])
def test_a_power_cut_at_any_step_of_an_update_leaves_a_working_release(
    tmp_path: Path, stop_later: StopLater, step: str, scenario: str, runs: str,
    applied: int, why: str | None
) -> None:
    gw, sup, sub, _broker, server = update_gateway(tmp_path, stop_later, kill_at=step)
    push_release(gw, archive(tmp_path), server.port if scenario == "good" else free_port())
    state = wait_state(sub, runs, applied, timeout=90, rolled_back=why is not None)
    publishes(sub, state.at)
    assert sup.exits == [-signal.SIGKILL]  # the one power cut, at that step
    if why is None:
        assert events(sub, PREFIX, "config_rolled_back") == []
        assert Releases(tmp_path / "releases").state().committed == NEW
    else:  # the retained state says why (an event under way when the power went is lost)
        assert why in state.json()["config"]["last_error"]
        state_file = Releases(tmp_path / "releases").state()
        assert (state_file.committed, state_file.trial) == (None, None)
    assert not (tmp_path / "releases" / ".incoming").exists() or runs == __version__


# -- configuration -----------------------------------------------------------------------


def test_release_is_for_bundles_only_and_checked_field_by_field(tmp_path: Path) -> None:
    agent_file = tmp_path / "edge.yaml"
    agent_file.write_text(yaml.safe_dump({"node": NODE, "release": {"version": NEW}}))
    done = edge_cli("check", "-c", str(agent_file))
    assert done.returncode != 0
    assert "release: is set by a desired bundle only" in done.stdout + done.stderr

    from edge.config.errors import ConfigError  # noqa: PLC0415
    from edge.config.load import load_bundle_config  # noqa: PLC0415

    agent_file.write_text(yaml.safe_dump({"node": NODE}))
    bad = {"version": "not a version", "url": "ftp://x/y", "sha256": "ABC", "size": 0}
    with pytest.raises(ConfigError) as err:
        load_bundle_config(agent_file, {"version": 3, "agent": {"release": bad}})
    said = {p.field: p.message for p in err.value.problems}
    assert "not a PEP 440 version" in said["release.version"]
    assert "http://, https:// or file://" in said["release.url"]
    assert "release.sha256" in said
    assert "release.size" in said


def test_cloud_push_names_a_release_archive_by_its_version_size_and_digest(
    tmp_path: Path, stop_later: StopLater
) -> None:
    broker = stop_later(start_broker(tmp_path))
    spec = archive(tmp_path)
    docs = tmp_path / "m.yaml"
    docs.write_text(yaml.safe_dump_all(device_docs("tank", 1502, 1, PROPS)))
    gw = Gateway(tmp_path, broker, [], node=NODE)
    sub = stop_later(Subscriber(broker.port, f"{PREFIX}/desired"))
    done = edge_cli("cloud", "push", "--node", NODE, "--key", str(gw.key_file), "--broker",
                    f"127.0.0.1:{broker.port}", "--release", str(tmp_path / f"edge-{NEW}.tar.gz"),
                    "--release-url", "https://files.example/edge.tar.gz", str(docs))
    assert done.returncode == 0, done.stderr
    token = sub.wait_for(lambda m: True)[0].payload.split(b".")[1]
    import base64  # noqa: PLC0415

    body = json.loads(base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4)))
    assert body["agent"]["release"] == {**asdict(spec), "url": "https://files.example/edge.tar.gz"}
