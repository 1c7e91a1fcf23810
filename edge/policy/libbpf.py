"""The few libbpf calls the datapath needs, through ctypes on the system's
``libbpf.so.1`` (Debian ``libbpf1``, LGPL-2.1 OR BSD-2-Clause; libbpf's API and ABI are
stable within a major version: https://libbpf.readthedocs.io/en/latest/api.html).

Loading an object costs about a millisecond and under a megabyte, against bcc's
0.4 s and 70 MiB per compiled program (../shared/reference, §2.6), which is why the
agent loads the prebuilt ``policy.bpf.o`` this way.

Every failing call raises :class:`BpfError` with the errno, what was being done, and
the messages libbpf printed meanwhile (the verifier's log when a program is refused).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

_P = ctypes.c_void_p
_INT = ctypes.c_int
_STR = ctypes.c_char_p
_PRINT_FN = ctypes.CFUNCTYPE(_INT, _INT, _STR, _P)
SAMPLE_FN = ctypes.CFUNCTYPE(_INT, _P, _P, ctypes.c_size_t)
"""ring_buffer_sample_fn: (ctx, data, size) -> 0 to go on."""
LIBRARY: Final = "libbpf.so.1"
_LEVELS: Final = ("warning", "info", "debug")

_PROTOTYPES: Final[dict[str, tuple[object, list[object]]]] = {
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (_INT, []),
    "bpf_object__open_file": (_P, [_STR, _P]),
    "bpf_object__load": (_INT, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__pin_maps": (_INT, [_P, _STR]),
    "bpf_object__find_program_by_name": (_P, [_P, _STR]),
    "bpf_program__fd": (_INT, [_P]),
    "bpf_link_create": (_INT, [_INT, _INT, _INT, _P]),
    "bpf_link_update": (_INT, [_INT, _INT, _P]),
    "bpf_obj_pin": (_INT, [_INT, _STR]),
    "bpf_obj_get": (_INT, [_STR]),
    "bpf_map_update_elem": (_INT, [_INT, _P, _P, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (_INT, [_INT, _P, _P]),
    "bpf_map_delete_elem": (_INT, [_INT, _P]),
    "bpf_map_get_next_key": (_INT, [_INT, _P, _P]),
    "ring_buffer__new": (_P, [_INT, SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (_INT, [_P, _INT]),
    "ring_buffer__free": (None, [_P]),
}
BPF_ANY: Final = 0


class BpfError(OSError):
    """A libbpf or bpf(2) call failed: ``errno``, ``strerror`` (what was done and why),
    and ``log``, the lines libbpf printed during the call."""

    def __init__(self, code: int, what: str, log: list[str]) -> None:
        detail = "\n".join(log[-40:])
        super().__init__(code, f"{what}: {os.strerror(code)}" + (f"\n{detail}" if detail
                                                                  else ""))
        self.log = log


class Libbpf:
    """``libbpf.so.1`` with typed prototypes. One per process (:func:`libbpf`).

    Raises:
        OSError: the library is not installed (``apt-get install libbpf1``).
    """

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as e:
            raise OSError(errno.ENOENT, f"{LIBRARY} is not installed (Debian: apt-get "
                          f"install libbpf1): {e}") from e
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(self.lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self._lock = threading.RLock()
        self._depth = 0
        self._log: list[str] = []
        self._libc = ctypes.CDLL(None)
        self._vsnprintf = self._libc.vsnprintf
        self._vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, _STR, _P]
        self._print = _PRINT_FN(self._on_print)  # kept: libbpf holds the pointer
        self.lib.libbpf_set_print(self._print)
        self.cpus = int(self.lib.libbpf_num_possible_cpus())

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(2048)
        self._vsnprintf(buf, len(buf), fmt, args)
        if level < len(_LEVELS) - 1:  # debug is the verifier's success chatter
            self._log.append(buf.value.decode(errors="replace").rstrip())
        return 0

    @contextmanager
    def call(self) -> Iterator[list[str]]:
        """Serializes libbpf calls and collects what libbpf prints meanwhile (a call
        within a call shares the outer one's lines)."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._log = []
            try:
                yield self._log
            finally:
                self._depth -= 1

    def check(self, result: int, what: str, log: list[str]) -> int:
        """``result`` when it is ≥ 0; raises BpfError for a negative errno (libbpf 1.x
        returns ``-errno``) or for -1 with ``errno`` set (the bpf(2) wrappers)."""
        if result >= 0:
            return result
        code = -result if result != -1 else (ctypes.get_errno() or errno.EPERM)
        raise BpfError(code, what, list(log))

    def pointer(self, result: int | None, what: str, log: list[str]) -> int:
        """A non-NULL pointer result, else BpfError from ``errno``."""
        if not result:
            raise BpfError(ctypes.get_errno() or errno.EINVAL, what, list(log))
        return result


_instance: Libbpf | None = None
_instance_lock = threading.Lock()


def libbpf() -> Libbpf:
    """The process's :class:`Libbpf` (loaded on first use).

    Raises:
        OSError: libbpf is not installed.
    """
    global _instance  # noqa: PLW0603 - one library handle per process
    with _instance_lock:
        if _instance is None:
            _instance = Libbpf()
        return _instance


class Map:
    """A BPF map by file descriptor: fixed-size keys and values as bytes.

    ``value_size`` is the size user space reads and writes: for a per-CPU map, the
    value size rounded up to 8 times the number of possible CPUs."""

    def __init__(self, fd: int, key_size: int, value_size: int, name: str) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.name = name

    def update(self, key: bytes, value: bytes) -> None:
        """Sets ``key`` to ``value`` (BPF_ANY). Raises BpfError (ENOSPC when full)."""
        b = libbpf()
        with b.call() as log:
            b.check(b.lib.bpf_map_update_elem(self.fd, key, value, BPF_ANY),
                    f"update {self.name}", log)

    def lookup(self, key: bytes) -> bytes | None:
        """The value of ``key``, None when absent."""
        b = libbpf()
        out = ctypes.create_string_buffer(self.value_size)
        if b.lib.bpf_map_lookup_elem(self.fd, key, out) != 0:
            if ctypes.get_errno() == errno.ENOENT:
                return None
            raise BpfError(ctypes.get_errno(), f"lookup in {self.name}", [])
        return out.raw

    def delete(self, key: bytes) -> None:
        """Removes ``key`` (absent: nothing)."""
        b = libbpf()
        if b.lib.bpf_map_delete_elem(self.fd, key) != 0 and ctypes.get_errno() not in (
                errno.ENOENT, 0):
            raise BpfError(ctypes.get_errno(), f"remove a key of {self.name}", [])

    def all_keys(self) -> list[bytes]:
        """Every key (a snapshot)."""
        b = libbpf()
        out: list[bytes] = []
        nxt = ctypes.create_string_buffer(self.key_size)
        prev: bytes | None = None
        while b.lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            prev = nxt.raw
            out.append(prev)
        return out

    def close(self) -> None:
        """Closes the descriptor (a pinned map lives on)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Ring:
    """A BPF ring buffer map (its descriptor ``fd``, which the reader owns from then
    on), read through libbpf: :meth:`poll` calls ``on_event`` with each record's
    bytes."""

    def __init__(self, fd: int, on_event: Callable[[bytes], None]) -> None:
        b = libbpf()
        self._fd = fd  # owned: closed with the reader

        def sample(_ctx: int, data: int, size: int) -> int:
            on_event(ctypes.string_at(data, size))
            return 0

        self._sample = SAMPLE_FN(sample)  # kept alive as long as the ring
        with b.call() as log:
            self._rb = b.pointer(b.lib.ring_buffer__new(fd, self._sample, None, None),
                                 "open the event ring", log)

    def poll(self, timeout_ms: int = 0) -> int:
        """Reads what is in the ring (waits up to ``timeout_ms``); the record count."""
        b = libbpf()
        n: int = b.lib.ring_buffer__poll(self._rb, timeout_ms)
        if n < 0 and -n != errno.EINTR:
            raise BpfError(-n, "read the event ring", [])
        return max(n, 0)

    def close(self) -> None:
        """Frees the reader (the ring map itself lives on while pinned)."""
        if self._rb:
            libbpf().lib.ring_buffer__free(self._rb)
            self._rb = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
