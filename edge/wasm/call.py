"""Calls into a plugin instance and its linear memory, through wasmtime's C API.

wasmtime-py's ``Func.__call__`` converts every argument and result through ``Val``
and costs 20–70 µs a call here; the C API's unchecked entry point
(``wasmtime_func_call_unchecked``) with the arguments in a reused
``wasmtime_val_raw_t`` array costs 2–3 µs (measured on this machine; plugins/README.md).
This module is the only place that reaches into wasmtime-py's ctypes layer
(``wasmtime._ffi``); the dependency is pinned to one major version and
tests/test_wasm_call.py checks that both paths give the same answers, traps included.

Only the signatures of the plugin ABI are supported: i32 parameters and one i32 or
i64 result or none. The C functions are called without ctypes' argument conversion
(their own symbols, no ``argtypes``), with arguments made once per function. Memory is
addressed from its base, taken once: the engine must not move linear memories
(:class:`edge.wasm.instance.Runtime` sets ``memory_may_move = False``).
"""

from __future__ import annotations

import ctypes
from typing import Any, Literal

import wasmtime
from wasmtime import _ffi
from wasmtime import _func as _wasmtime_func
from wasmtime._error import WasmtimeError as _Error
from wasmtime._trap import Trap as _Trap

Result = Literal["i32", "i64", ""]


def _c(name: str, restype: type | None) -> Any:
    """The C function ``name`` of wasmtime's library, without argument conversion."""
    fn = _ffi.dll[name]
    fn.restype = restype
    return fn


_CALL = _c("wasmtime_func_call_unchecked", ctypes.c_void_p)
_DATA_SIZE = _c("wasmtime_memory_data_size", ctypes.c_size_t)
_DATA = _c("wasmtime_memory_data", ctypes.c_void_p)
_DEADLINE = _c("wasmtime_context_set_epoch_deadline", None)


class RawFunc:
    """An exported function of ``nparams`` i32 parameters and a ``result``.

    Calling it returns the result (0 for none). Raises :class:`wasmtime.Trap` on a
    trap (``trap_code`` ``INTERRUPT`` when its epoch deadline passed) and
    :class:`wasmtime.WasmtimeError` on other failures, as ``Func.__call__`` does.
    """

    __slots__ = ("_args", "_ctx", "_fn", "_func", "_n", "_result", "_trap", "_trap_p")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, nparams: int,
                 result: Result) -> None:
        self._func = func  # keeps what _fn points into alive
        self._result = result
        self._n = ctypes.c_size_t(max(1, nparams))
        self._ctx = store._context()
        self._fn = ctypes.byref(func._func)
        self._args = (_ffi.wasmtime_val_raw_t * max(1, nparams))()
        self._trap = ctypes.POINTER(_ffi.wasm_trap_t)()
        self._trap_p = ctypes.byref(self._trap)

    def __call__(self, *params: int) -> int:
        args = self._args
        for i, p in enumerate(params):
            args[i].i32 = p
        error = _CALL(self._ctx, self._fn, args, self._n, self._trap_p)
        if self._trap:
            trap = _Trap._from_ptr(self._trap)  # takes ownership of the trap
            self._trap = ctypes.POINTER(_ffi.wasm_trap_t)()
            self._trap_p = ctypes.byref(self._trap)
            _wasmtime_func.maybe_raise_last_exn()  # a host function's own exception
            raise trap
        if error:
            raise _Error._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t)))
        if self._result == "i64":
            return int(args[0].i64)
        return int(args[0].i32) if self._result == "i32" else 0


class RawMemory:
    """An instance's exported linear memory: bounds-checked reads and writes at byte
    offsets. Raises :class:`IndexError` for a range outside the memory."""

    __slots__ = ("_base", "_ctx", "_mem", "_memory")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._memory = memory
        self._ctx = store._context()
        self._mem = ctypes.byref(memory._memory)
        self._base = int(_DATA(self._ctx, self._mem))

    def size(self) -> int:
        """The memory's current size in bytes."""
        return int(_DATA_SIZE(self._ctx, self._mem))

    def _address(self, offset: int, n: int) -> int:
        size = self.size()
        if offset < 0 or n < 0 or offset + n > size:
            raise IndexError(f"bytes {offset}..{offset + n} are outside the memory of "
                             f"{size} bytes")
        return self._base + offset

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the memory at ``offset``."""
        ctypes.memmove(self._address(offset, len(data)), data, len(data))

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the memory from ``offset``."""
        return ctypes.string_at(self._address(offset, n), n)


def set_deadline(store: wasmtime.Store, ticks: int) -> None:
    """Let the store's next calls run until ``ticks`` epoch increments from now."""
    _DEADLINE(store._context(), ctypes.c_uint64(ticks))
