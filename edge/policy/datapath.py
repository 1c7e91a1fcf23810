"""The kernel datapath: the prebuilt ``policy.bpf.o`` loaded through libbpf, attached to
the cgroup v2 root, pinned in bpffs, and fed the rule tables of
:mod:`edge.policy.tables`.

Pinned layout under ``pin`` (default ``/sys/fs/bpf/edge``)::

    link-egress, link-ingress   the cgroup_skb attachments (bpf_link)
    maps-<object>/<map>         the maps of that build of the object

The pins keep the programs enforcing while no agent runs; :meth:`Datapath.remove`
(``edge policy remove``) is what takes them away. An agent that starts finds the pins
and takes over the maps without reloading anything; a new build of the object is
loaded, filled, and swapped in through ``BPF_LINK_UPDATE`` (atomic), then the old
maps are unpinned.

:meth:`Datapath.apply` writes a policy into the generation that is not in use and
then flips ``active`` with one map write: a packet sees the old tables or the new ones,
never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Final, Literal

from edge.policy.libbpf import BpfError, Map, Ring, libbpf
from edge.policy.tables import MAX_RULES, Tables, bits_bytes

log = logging.getLogger(__name__)

BPFFS: Final = "/sys/fs/bpf"
PIN: Final = "/sys/fs/bpf/edge"
OBJECT: Final = "policy.bpf.o"
SOURCE: Final = "policy.bpf.c"
PROGRAMS: Final = {"egress": "edge_egress", "ingress": "edge_ingress"}
ATTACH: Final = {"egress": 1, "ingress": 0}
"""enum bpf_attach_type: BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS."""
BCC_PYTHON: Final = "/usr/bin/python3"
"""The system Python, which has Debian's python3-bpfcc (the bcc backend)."""
BCC_TIMEOUT_S: Final = 120
Backend = Literal["libbpf", "bcc"]
_U32: Final = struct.Struct("<I")
_GEN_INFO: Final = struct.Struct("<32s32sIII4x")
_ADDR4_KEY: Final = struct.Struct("<II4s")
_ADDR6_KEY: Final = struct.Struct("<II16s")
_PORT_KEY: Final = struct.Struct("<IIB2sx")
_WORKLOAD_KEY: Final = struct.Struct("<QII")
_COUNTER: Final = struct.Struct("<QQ")
_EVENT: Final = struct.Struct("<QQIHBBBBBxH2x16s")
_BITS: Final = 32
_KEY_SIZES: Final = {"addr4": _ADDR4_KEY.size, "addr6": _ADDR6_KEY.size,
                     "ports": _PORT_KEY.size, "workloads": _WORKLOAD_KEY.size}
_VALUE_SIZES: Final = {"addr4": _BITS, "addr6": _BITS, "ports": _BITS,
                       "workloads": 2 * _BITS}
STATS: Final = ("events_lost", "unmatched", "unparsed")
"""The datapath's own counters, by index in its ``stats`` map."""
Verdict = Literal["drop", "would-drop"]


def object_path() -> Path:
    """The prebuilt object shipped in the package (built by
    ``edge/policy/bpf/build.sh``)."""
    return Path(__file__).with_name("bpf") / OBJECT


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """``(mount point, file system type)`` of every mount (proc(5) mountinfo: the fifth
    field is the mount point, the field after ``-`` the type)."""
    out = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            out.append((head.split(" ")[4], tail.split(" ", 1)[0]))
    return out


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` on a unified host,
    ``/sys/fs/cgroup/unified`` on a hybrid one), None without one."""
    found = [point for point, kind in _mounts(mountinfo) if kind == "cgroup2"]
    return Path(min(found, key=len)) if found else None


def _fs_type(path: Path) -> str | None:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    target = str(path)
    under = [(point, kind) for point, kind in _mounts()
             if target == point or target.startswith(point.rstrip("/") + "/")]
    return max(under, key=lambda m: len(m[0]))[1] if under else None


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def mount_bpffs(target: Path) -> None:
    """Mounts a bpf file system (a new instance) at ``target``.

    Raises:
        OSError: not permitted (needs CAP_SYS_ADMIN), or ``target`` is no directory.
    """
    if _libc().mount(b"bpf", str(target).encode(), b"bpf", 0, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mounting a bpf file system at {target} failed: "
                      f"{os.strerror(code)}")


def unmount(target: Path) -> None:
    """Detaches the file system at ``target`` (MNT_DETACH: what is pinned in a bpffs
    is freed once nothing holds it)."""
    _libc().umount2(str(target).encode(), 2)


def ensure_bpffs(pin: Path) -> None:
    """Makes sure ``pin``'s parent is on a bpf file system. At the standard place,
    ``/sys/fs/bpf``, one is mounted when nothing is (as systemd does at boot);
    anywhere else that is the operator's to do.

    Raises:
        OSError: it is another file system, or mounting failed (not root).
    """
    parent = pin.parent
    if _fs_type(parent) == "bpf":
        return
    if parent != Path(BPFFS):
        raise OSError(errno.ENOTDIR, f"{parent} is not on a bpf file system (mount one: "
                      f"mount -t bpf bpf {parent})")
    mount_bpffs(parent)


@dataclass(frozen=True, slots=True)
class Event:
    """One drop (enforced) or would-drop (audit) from the kernel's ring: when
    (``ts_ns``, CLOCK_MONOTONIC), the socket's ``cgroup`` id, the rule (``rule`` id in
    generation ``gen``), the connection's ``direction`` (as opened), whether the
    packet was coming in, the remote ``address``, the IP ``protocol`` number and the
    rule's ``port`` (remote for egress, local for ingress; 0 for ICMP)."""

    ts_ns: int
    cgroup: int
    gen: int
    rule: int
    verdict: Verdict
    direction: Literal["egress", "ingress"]
    packet_ingress: bool
    address: IPv4Address | IPv6Address
    protocol: int
    port: int

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        """From the ring's 48-byte record (``struct event`` in policy.bpf.c)."""
        (ts, cgroup, gen, rule, verdict, direction, pin, family, proto, port,
         addr) = _EVENT.unpack_from(raw)
        address = (IPv4Address(addr[:4]) if family == 4 else IPv6Address(addr))
        return cls(ts, cgroup, gen, rule, "drop" if verdict == 1 else "would-drop",
                   "egress" if direction == 1 else "ingress", bool(pin), address, proto,
                   port)


@dataclass(frozen=True, slots=True)
class Applied:
    """What :meth:`Datapath.apply` did: the generation now ``gen``, how long it took
    (``seconds``), the entries written, and the workload cgroup ids (None: the cgroup
    does not exist now, so nothing of it runs to be policed)."""

    gen: int
    seconds: float
    entries: int
    cgroups: dict[str, int | None] = field(default_factory=dict)


def cgroup_ids(root: Path, workloads: Iterable[str]) -> dict[str, int | None]:
    """The cgroup v2 id of each workload path under ``root`` (its directory's inode
    number), None for one that does not exist."""
    out: dict[str, int | None] = {}
    for path in workloads:
        try:
            out[path] = os.stat(root / path).st_ino
        except FileNotFoundError:
            out[path] = None
    return out


def _tag(backend: Backend, obj: Path) -> str:
    digest = hashlib.sha256(obj.read_bytes()).hexdigest()[:12]
    return digest if backend == "libbpf" else f"bcc-{digest}"


@dataclass
class _Loaded:
    """Programs in the kernel, not attached yet: their descriptors by direction, and
    the libbpf object that owns them (None: the descriptors are ours)."""

    programs: dict[str, int]
    handle: int | None = None

    def close(self) -> None:
        if self.handle is not None:
            libbpf().lib.bpf_object__close(self.handle)
        else:
            for fd in self.programs.values():
                os.close(fd)
        self.programs = {}


def _load_libbpf(obj: Path, maps_dir: Path) -> _Loaded:
    b = libbpf()
    with b.call() as log:
        handle = b.pointer(b.lib.bpf_object__open_file(str(obj).encode(), None),
                           f"open {obj}", log)
        try:
            b.check(b.lib.bpf_object__load(handle), f"load {obj} into the kernel", log)
            b.check(b.lib.bpf_object__pin_maps(handle, str(maps_dir).encode()),
                    f"pin its maps in {maps_dir}", log)
            programs = {d: b.check(b.lib.bpf_program__fd(b.pointer(
                b.lib.bpf_object__find_program_by_name(handle, name.encode()),
                f"find program {name}", log)), f"program {name}", log)
                for d, name in PROGRAMS.items()}
        except BpfError:
            b.lib.bpf_object__close(handle)
            raise
    return _Loaded(programs, handle)


def _load_bcc(source: Path, maps_dir: Path) -> _Loaded:
    """bcc compiles and loads in a process of its own (bpf/bcc_load.py), which pins the
    maps and the programs in ``maps_dir``."""
    script = source.with_name("bcc_load.py")
    try:
        done = subprocess.run([BCC_PYTHON, str(script), str(source), str(maps_dir),
                               str(maps_dir)], capture_output=True, text=True,
                              timeout=BCC_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OSError(errno.EIO, f"the bcc backend ({BCC_PYTHON} {script}) did not run: "
                      f"{e}") from e
    if done.returncode != 0:
        shutil.rmtree(maps_dir, ignore_errors=True)
        tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        raise OSError(errno.EIO, f"the bcc backend failed (exit {done.returncode}):\n{tail}")
    log.info("bcc compiled and loaded the datapath: %s", done.stdout.strip())
    return _Loaded({d: Datapath._get(maps_dir / f"program-{d}") for d in PROGRAMS})


class Datapath:
    """The pinned datapath under ``pin``; see the module docstring. Not thread-safe:
    one owner (the agent's policy task, or a CLI command).

    Raises (from :meth:`open`):
        OSError / BpfError: no bpffs, not permitted (needs root or CAP_BPF +
            CAP_NET_ADMIN + CAP_PERFMON, as packaging/edge.service gives), no cgroup
            v2, libbpf missing, or the kernel refusing the programs (the verifier's
            log is in the message); with the bcc backend, bcc missing or failing (no
            kernel headers).
    """

    def __init__(self, pin: Path, cgroup_root: Path, attach: Path, tag: str,
                 maps: dict[str, Map], pending: _Loaded | None) -> None:
        self.pin = pin
        self.cgroup_root = cgroup_root
        self.attach = attach
        self.tag = tag
        self.maps = maps
        self._pending = pending

    @classmethod
    def open(cls, pin: Path = Path(PIN), cgroup_root: Path | None = None,
             attach: Path | None = None, obj: Path | None = None, *,
             load: bool = True, backend: Backend = "libbpf") -> Datapath:
        """Takes over the pinned datapath at ``pin``, or loads it when nothing of this
        build is pinned there: with ``backend`` ``libbpf`` the prebuilt object ``obj``
        (default: the shipped one), with ``bcc`` the C source compiled at run time,
        out of this process. The programs are attached (to ``attach``, default the
        cgroup v2 root) by the first :meth:`apply`, once the tables are in. ``load``
        False only takes over (for a look at the counters): FileNotFoundError when
        nothing of this build is pinned. (A build pinned by the other backend is left
        for :meth:`apply` to swap out.)"""
        root = cgroup_root or cgroup2_root()
        if root is None:
            raise OSError(errno.ENOENT, "no cgroup v2 hierarchy is mounted (cgroup_skb "
                          "programs attach to cgroup v2)")
        if backend == "bcc":
            obj = object_path().with_name(SOURCE)
        obj = obj or object_path()
        ensure_bpffs(pin)
        tag = _tag(backend, obj)
        maps_dir = pin / f"maps-{tag}"
        b = libbpf()
        pending: _Loaded | None = None
        if not ((maps_dir / "active").exists() and all(
                (pin / f"link-{d}").exists() for d in PROGRAMS)):
            if not load:
                raise FileNotFoundError(errno.ENOENT, f"no datapath of this build is "
                                        f"pinned at {pin}")
            pin.mkdir(mode=0o700, exist_ok=True)
            if maps_dir.exists():
                shutil.rmtree(maps_dir)
            pending = (_load_bcc(obj, maps_dir) if backend == "bcc"
                       else _load_libbpf(obj, maps_dir))
        maps = {name: Map(cls._get(maps_dir / name), _KEY_SIZES.get(name, 4),
                          _value_size(name, b.cpus), name)
                for name in ("active", "gens", "addr4", "addr6", "ports", "workloads",
                             "counters", "stats")}
        return cls(pin, root, attach or root, tag, maps, pending)

    @staticmethod
    def _get(path: Path) -> int:
        b = libbpf()
        with b.call() as log:
            return b.check(b.lib.bpf_obj_get(str(path).encode()), f"open {path}", log)

    def active_gen(self) -> int:
        """The generation packets are judged by now (0 or 1)."""
        raw = self.maps["active"].lookup(_U32.pack(0))
        return _U32.unpack(raw[:4])[0] & 1 if raw else 0

    def apply(self, tables: Tables, cgroups: Mapping[str, int | None] | None = None
              ) -> Applied:
        """Makes ``tables`` the policy, atomically: writes them into the unused
        generation, zeroes its counters, then flips ``active``. ``cgroups`` gives each
        workload's cgroup id (default: looked up under the cgroup root now); a workload
        without one is left out until it exists (see :func:`cgroup_ids`).

        Raises:
            BpfError: a map write failed (the generation in use is untouched).
        """
        start = time.perf_counter()
        ids = dict(cgroups) if cgroups is not None else cgroup_ids(
            self.cgroup_root, tables.workloads)
        old = self.active_gen()
        new = 1 - old
        raw = self.maps["gens"].lookup(_U32.pack(old))
        epoch = (_GEN_INFO.unpack(raw)[4] if raw else 0) % 0xFFFFFFFF + 1
        entries = self._clear(new)
        for name, key, value in self._entries(tables, ids, new):
            self.maps[name].update(key, value)
            entries += 1
        levels = 0
        for path, cg in ids.items():
            if cg is not None:
                levels |= 1 << len(path.split("/"))
        self.maps["gens"].update(_U32.pack(new), _GEN_INFO.pack(
            bits_bytes(tables.deny), bits_bytes(tables.enforce), levels,
            len(tables.rules), epoch))
        self.maps["active"].update(_U32.pack(0), _U32.pack(new))
        if self._pending is not None:
            self._attach()
        return Applied(new, time.perf_counter() - start, entries, ids)

    def _clear(self, gen: int) -> int:
        """Removes generation ``gen``'s entries and zeroes its counters; the count of
        writes."""
        n = 0
        for name in ("addr4", "addr6", "ports"):
            m = self.maps[name]
            for key in m.all_keys():
                if _U32.unpack_from(key, 4)[0] == gen:
                    m.delete(key)
                    n += 1
        m = self.maps["workloads"]
        for key in m.all_keys():
            if _U32.unpack_from(key, 8)[0] == gen:
                m.delete(key)
                n += 1
        zero = bytes(self.maps["counters"].value_size)
        for i in range(MAX_RULES):
            self.maps["counters"].update(_U32.pack(gen * MAX_RULES + i), zero)
        return n + MAX_RULES

    @staticmethod
    def _entries(tables: Tables, ids: Mapping[str, int | None], gen: int
                 ) -> Iterable[tuple[str, bytes, bytes]]:
        for net4, bits in tables.addr4:
            yield "addr4", _ADDR4_KEY.pack(32 + net4.prefixlen, gen,
                                           net4.network_address.packed), bits_bytes(bits)
        for net6, bits in tables.addr6:
            yield "addr6", _ADDR6_KEY.pack(32 + net6.prefixlen, gen,
                                           net6.network_address.packed), bits_bytes(bits)
        for length, proto, port, bits in tables.ports:
            yield "ports", _PORT_KEY.pack(32 + length, gen, proto,
                                          port.to_bytes(2, "big")), bits_bytes(bits)
        for path, (egress, ingress) in tables.workloads.items():
            cg = ids.get(path)
            if cg is not None:
                yield ("workloads", _WORKLOAD_KEY.pack(cg, gen, 0),
                       bits_bytes(egress) + bits_bytes(ingress))

    def _attach(self) -> None:
        """Attaches the loaded programs (a pinned link's program is swapped in one
        step, BPF_LINK_UPDATE), then drops the maps of other builds."""
        b = libbpf()
        loaded = self._pending
        assert loaded is not None
        fd = os.open(self.attach, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with b.call() as log:
                for direction, prog in loaded.programs.items():
                    path = self.pin / f"link-{direction}"
                    if path.exists():
                        link = self._get(path)
                        try:
                            b.check(b.lib.bpf_link_update(link, prog, None),
                                    f"swap the {direction} program in {path}", log)
                        finally:
                            os.close(link)
                        continue
                    link = b.check(b.lib.bpf_link_create(prog, fd, ATTACH[direction], None),
                                   f"attach the {direction} program to {self.attach}", log)
                    try:
                        b.check(b.lib.bpf_obj_pin(link, str(path).encode()), f"pin {path}",
                                log)
                    finally:
                        os.close(link)
        finally:
            os.close(fd)
            loaded.close()
            self._pending = None
        for old in self.pin.glob("maps-*"):
            if old.name != f"maps-{self.tag}":
                shutil.rmtree(old)

    def counters(self, gen: int | None = None) -> dict[int, tuple[int, int]]:
        """``{rule id: (packets, bytes)}`` of generation ``gen`` (default: the active
        one), summed over CPUs; rules that matched nothing are left out."""
        g = self.active_gen() if gen is None else gen
        m = self.maps["counters"]
        out: dict[int, tuple[int, int]] = {}
        for i in range(MAX_RULES):
            raw = m.lookup(_U32.pack(g * MAX_RULES + i))
            if raw is None:
                continue
            packets = total = 0
            for cpu in range(len(raw) // _COUNTER.size):
                p, n = _COUNTER.unpack_from(raw, cpu * _COUNTER.size)
                packets += p
                total += n
            if packets:
                out[i + 1] = (packets, total)
        return out

    def stats(self) -> dict[str, int]:
        """The datapath's own counters (:data:`STATS`), summed over CPUs."""
        out: dict[str, int] = {}
        for i, name in enumerate(STATS):
            raw = self.maps["stats"].lookup(_U32.pack(i)) or b""
            out[name] = sum(struct.unpack_from("<Q", raw, o)[0]
                            for o in range(0, len(raw), 8))
        return out

    def ring(self, on_event: Callable[[Event], None]) -> Ring:
        """A reader of the drop events; each is decoded and given to ``on_event``."""
        fd = self._get(self.pin / f"maps-{self.tag}" / "events")
        try:
            return Ring(fd, lambda raw: on_event(Event.decode(raw)))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Lets go of the maps; what is pinned stays in force."""
        for m in self.maps.values():
            m.close()
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    @staticmethod
    def remove(pin: Path = Path(PIN)) -> bool:
        """Detaches the programs and frees the maps pinned at ``pin`` (unpinning the
        links detaches them); False when nothing was pinned there."""
        if not pin.exists():
            return False
        for direction in PROGRAMS:
            (pin / f"link-{direction}").unlink(missing_ok=True)
        shutil.rmtree(pin)
        return True


def _value_size(name: str, cpus: int) -> int:
    if name == "counters":
        return _COUNTER.size * cpus
    if name == "stats":
        return 8 * cpus
    if name == "gens":
        return _GEN_INFO.size
    return _VALUE_SIZES.get(name, 4)
