"""``edge simulate``: Modbus servers (pymodbus) that serve what manifests describe.

Every device is served at its manifest's endpoint and unit id: TCP endpoints on
their host:port (MBAP or RTU-over-TCP framing), serial endpoints on their port
(e.g. one end of a pty pair). Values are computed when a request is served, from
the wall clock: numbers follow a sine between the property's minimum and maximum
(or a range that fits its unit: 228–234 V, 49.95–50.05 Hz, …; or a small default
range) with a period of ``period_s``, booleans and coils toggle
every period, strings carry the device name and the cycle number. Everything is
written with the agent's own codec (:func:`edge.modbus.codec.encode`), so a decoded
value is exactly the simulated one. Registers and coils a client writes (FC
5/6/15/16/22) keep the written value from then on, and a property overlapping them is
no longer animated. A ReadWrite property with a ``desired`` value in its manifest
starts at that value and keeps it, as a device that was set to it before (a real one
keeps its setpoint across a restart; the agent does not write the same desired value
again after its own restart, see :mod:`edge.sync.writes`).

Read Device Identification (FC 43 / MEI 14) is answered per endpoint
(:mod:`edge.modbus.sim_identification`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge.config.model import (
    AccessMode,
    DeviceSpec,
    Framing,
    PropertySpec,
    RawType,
    SerialEndpoint,
    Table,
    TcpEndpoint,
    Value,
    Visitor,
)
from edge.modbus.codec import CodecError, bit_mask, encode
from edge.modbus.sim_identification import Identification, identification_pdu
from edge.modbus.writer import desired_value, write_problem

log = logging.getLogger(__name__)

_FC_TABLE = {
    1: Table.COIL,
    2: Table.DISCRETE_INPUT,
    3: Table.HOLDING_REGISTER,
    4: Table.INPUT_REGISTER,
}
_DEFAULT_RANGE = {True: (-100.0, 100.0), False: (0.0, 100.0)}  # keyed by "signed"
_UNIT_RANGE = {
    "V": (228.0, 234.0), "A": (0.5, 12.0), "W": (-400.0, 2800.0), "VA": (100.0, 2900.0),
    "var": (-300.0, 300.0), "VAr": (-300.0, 300.0), "Hz": (49.95, 50.05),
    "kWh": (1520.0, 1540.0), "Wh": (1520000.0, 1540000.0), "kvarh": (210.0, 212.0),
    "kVArh": (210.0, 212.0), "%": (1.0, 6.0), "Pct": (1.0, 6.0), "C": (30.0, 45.0),
}
"""Ranges (min, max) that look like a live low-voltage installation, by unit, for a
property without minimum/maximum: a meter at 230 V/50 Hz importing and exporting."""


def simulated_value(prop: PropertySpec, device: str, t: float, period_s: float) -> Value:
    """The value ``prop`` has at Unix time ``t`` (seconds).

    Phases differ per device and property (a CRC of the names) so that the values
    of one device do not all move together.
    """
    phase = zlib.crc32(f"{device}/{prop.name}".encode()) / 2**32
    cycle = int(t / period_s + phase)
    raw = prop.visitor.raw_type
    if raw is RawType.BOOLEAN or raw is RawType.BIT:
        return cycle % 2 == 0
    if raw is RawType.STRING:
        room = prop.visitor.limit * 2
        suffix = f"-{cycle % 100_000}"
        return (device[: max(room - len(suffix), 0)] + suffix)[-room:]
    if raw is RawType.BYTES:
        return (cycle % 2**16).to_bytes(2, "big").hex().ljust(prop.visitor.limit * 4, "0")
    if prop.visitor.table.is_bit:  # several coils packed into an unsigned integer
        return cycle % (1 << min(prop.visitor.limit, 16))
    return _number(prop, (0.5 + 0.5 * math.sin(2 * math.pi * (t / period_s + phase))))


def value_range(prop: PropertySpec) -> tuple[float, float]:
    """(lowest, highest) simulated value of a number: the property's minimum/maximum,
    else the range of its unit, else ±100 (0..100 unsigned); never below 0 for an
    unsigned raw type."""
    raw = prop.visitor.raw_type
    signed = raw.signed or raw in (RawType.FLOAT32, RawType.FLOAT64)
    lo, hi = _UNIT_RANGE.get(prop.unit or "", _DEFAULT_RANGE[signed])
    lo = prop.minimum if prop.minimum is not None else lo if signed else max(lo, 0.0)
    hi = prop.maximum if prop.maximum is not None else hi
    return lo, hi


def _number(prop: PropertySpec, fraction: float) -> float | int:
    """The number ``fraction`` (0..1) of the way through the property's range,
    representable exactly by its raw type and scale."""
    raw = prop.visitor.raw_type
    lo, hi = value_range(prop)
    x = lo + (hi - lo) * fraction
    scale = served_visitor(prop.visitor).scale
    if raw.is_integer:
        steps = math.floor(x / scale) if scale > 0 else math.ceil(x / scale)
        if float(scale).is_integer():
            return int(steps * scale)
        exact = Fraction(repr(float(scale)))  # as the codec decodes: 573 × 1 / 10 is 57.3
        return steps * exact.numerator / exact.denominator
    if raw is RawType.FLOAT32:  # 6 significant digits survive float32 exactly
        return float(f"{x:.6g}")
    return round(x, 3)


SCALE_FACTOR_EXPONENT = -1
"""What a simulated device holds in a property's scale factor register: its values
have one decimal (raw × 10^-1)."""


def served_visitor(visitor: Visitor) -> Visitor:
    """How the simulator writes a property: one with a scale factor register as raw ×
    scale × 10^:data:`SCALE_FACTOR_EXPONENT`, that exponent in its register."""
    if visitor.scale_factor is None:
        return visitor
    scale = float(Fraction(repr(visitor.scale)) * Fraction(10) ** SCALE_FACTOR_EXPONENT)
    return dataclasses.replace(visitor, scale=scale, scale_factor=None, missing=None)


Constants = Mapping[Table, Mapping[int, int]]
"""Register words (0..65535) by table and 0-based address."""


@dataclass(frozen=True, slots=True)
class _Served:
    device: str
    prop: PropertySpec


class SimulatedUnit:
    """The tables of one unit id, filled on demand by pymodbus's ``action`` hook."""

    def __init__(
        self, device: DeviceSpec, period_s: float, clock: Callable[[], float] = time.time,
        constants: Constants | None = None,
    ) -> None:
        self.device = device
        self.constants: Constants = constants or {}
        """Registers served as they are, by table and address (identification, a
        SunSpec chain): over the animated values, under what a client wrote."""
        self.period_s = period_s
        self.clock = clock
        self.by_table: dict[Table, list[_Served]] = defaultdict(list)
        for p in device.properties:
            self.by_table[p.visitor.table].append(_Served(device.name, p))
        self.written: dict[Table, dict[int, int | bool]] = defaultdict(dict)
        for p in device.properties:
            self._hold_desired(p)

    def _hold_desired(self, prop: PropertySpec) -> None:
        """Start ``prop`` at its manifest's desired value, as if it had been written,
        when it is ReadWrite, writable as a whole (coils, holding registers; not a bit
        of a register) and the value may be written."""
        v = prop.visitor
        if (prop.desired is None or prop.access_mode is not AccessMode.READ_WRITE
                or v.table not in (Table.COIL, Table.HOLDING_REGISTER)
                or v.raw_type is RawType.BIT):
            return
        value = desired_value(prop)
        if write_problem(prop, value) is not None:
            return
        try:
            words = encode(v, value)
        except (CodecError, ValueError):
            return
        self.written[v.table].update(
            enumerate((bool(w) if v.table.is_bit else int(w) for w in words), start=v.offset))

    def sim_device(self) -> SimDevice:
        """A pymodbus SimDevice with four distinct tables, each up to its last used address.

        Reading past a table's end is answered with ILLEGAL DATA ADDRESS, as a real
        device does (for bit tables: past the end of the last 16-bit group).
        """

        def block(table: Table) -> list[SimData]:
            ends = [s.prop.visitor.last_end for s in self.by_table.get(table, ())]
            ends += [a + 1 for a in self.constants.get(table, {})]
            size = max(ends, default=1)
            if table.is_bit:
                return [SimData(0, count=size, values=False, datatype=DataType.BITS)]
            return [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(
            id=self.device.unit_id,
            simdata=(
                block(Table.COIL),
                block(Table.DISCRETE_INPUT),
                block(Table.HOLDING_REGISTER),
                block(Table.INPUT_REGISTER),
            ),
            action=self._action,
        )

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is not None:  # a client write: it sticks from now on
            target = Table.COIL if function_code in (5, 15) else Table.HOLDING_REGISTER
            self.written[target].update(enumerate(set_values, start=address))
            return None
        table = _FC_TABLE.get(function_code)
        if table is None:
            return None
        if table.is_bit:  # pymodbus passes the count of packed registers here
            self.fill_bits(table, current, start_address, address, count)
        else:
            self.fill_registers(table, current, start_address, address, count)
        return None

    def fill_registers(self, table: Table, current: list[int], base: int, address: int,
                       count: int) -> None:
        """Write the current values of the properties overlapping ``address..+count``."""
        t = self.clock()
        end = address + count
        written = self.written[table]
        for served in self.by_table.get(table, ()):
            v = served.prop.visitor
            if v.end <= address or v.offset >= end:
                continue
            if written and any(a in written for a in range(v.offset, v.end)):
                continue  # a client wrote (part of) it: no longer animated
            value = simulated_value(served.prop, served.device, t, self.period_s)
            i = v.offset - base
            if v.raw_type is RawType.BIT:  # share the register with its other bits
                and_mask, or_mask = bit_mask(v, value)
                current[i] = (current[i] & and_mask) | (or_mask & ~and_mask)
                continue
            for k, w in enumerate(encode(served_visitor(v), value)):
                current[i + k] = int(w)
        for served in self.by_table.get(table, ()):
            sf = served.prop.visitor.scale_factor
            if sf is not None and address <= sf < end:
                current[sf - base] = SCALE_FACTOR_EXPONENT & 0xFFFF
        for a, w in self.constants.get(table, {}).items():
            if address <= a < end:
                current[a - base] = w
        for a, w in written.items():  # what was written (or held as desired) as it is
            if address <= a < end:
                current[a - base] = int(w)

    def fill_bits(self, table: Table, current: list[int], base: int, address: int,
                  registers: int) -> None:
        """Set the bits of ``registers`` packed registers from the one holding ``address``.

        pymodbus packs a bit table 16 to a register, bit ``a % 16`` of register
        ``a // 16 - base`` holding address ``a``.
        """
        lo = address // 16 * 16
        hi = lo + 16 * registers
        bits = dict(self._bits(table, lo, hi - lo))
        for a in range(lo, hi):
            i, mask = a // 16 - base, 1 << (a % 16)
            current[i] = (current[i] | mask) if bits.get(a) else (current[i] & ~mask)

    def _bits(self, table: Table, address: int, count: int) -> Iterator[tuple[int, bool]]:
        t = self.clock()
        end = address + count
        for served in self.by_table.get(table, ()):
            v = served.prop.visitor
            if v.end <= address or v.offset >= end:
                continue
            value = simulated_value(served.prop, served.device, t, self.period_s)
            yield from enumerate((bool(b) for b in encode(v, value)), start=v.offset)
        for a, b in self.written[table].items():
            if address <= a < end:
                yield a, bool(b)


class SimulatorError(Exception):
    """An endpoint could not be served (address in use, serial port missing, ...)."""


def _servers(
    devices: Iterable[DeviceSpec],
    period_s: float,
    clock: Callable[[], float],
    identification: Mapping[str, Identification] | None = None,
    constants: Mapping[str, Constants] | None = None,
) -> list[tuple[str, Any]]:
    """One pymodbus server per endpoint key; ``identification`` maps endpoint keys to
    the objects that endpoint answers FC 43 with (others: ILLEGAL FUNCTION)."""
    by_endpoint: dict[str, list[DeviceSpec]] = defaultdict(list)
    for d in devices:
        by_endpoint[d.endpoint.key].append(d)
    unknown = set(identification or ()) - set(by_endpoint)
    if unknown:
        raise ValueError(f"identification for endpoints not served: {sorted(unknown)}")
    servers: list[tuple[str, Any]] = []
    for key, group in by_endpoint.items():
        ep = group[0].endpoint
        sims = [SimulatedUnit(d, period_s, clock, (constants or {}).get(d.key)).sim_device()
                for d in group]
        custom = [identification_pdu((identification or {}).get(key))]
        if isinstance(ep, TcpEndpoint):
            framer = FramerType.SOCKET if ep.framing is Framing.MBAP else FramerType.RTU
            server: Any = ModbusTcpServer(
                sims, framer=framer, address=(ep.host, ep.port), custom_pdu=custom
            )
        elif isinstance(ep, SerialEndpoint):
            server = ModbusSerialServer(
                sims,
                port=ep.port,
                baudrate=ep.baudrate,
                bytesize=ep.bytesize,
                parity=ep.parity,
                stopbits=ep.stopbits,
                reconnect_delay=0,
                custom_pdu=custom,
            )
        servers.append((ep.key, server))
        units = ", ".join(f"{d.key} (unit {d.unit_id})" for d in group)
        log.info("simulating %s on %s", units, ep.key)
    return servers


async def run_simulator(
    devices: Iterable[DeviceSpec],
    stop: asyncio.Event,
    *,
    period_s: float = 10.0,
    clock: Callable[[], float] = time.time,
    identification: Mapping[str, Identification] | None = None,
    constants: Mapping[str, Constants] | None = None,
) -> None:
    """Serve ``devices`` until ``stop`` is set; ``clock`` gives the simulated time (s).

    ``identification`` maps endpoint keys (``DeviceSpec.endpoint.key``, e.g.
    ``tcp://127.0.0.1:5020``) to the Read Device Identification objects served there
    (FC 43 / MEI 14, basic to extended: see :data:`Identification`); per endpoint, so
    all unit ids behind one endpoint share them. Endpoints not in it (default: all)
    answer FC 43 with ILLEGAL FUNCTION. ``constants`` maps device keys to registers
    served as they are (:data:`Constants`).

    Raises:
        SimulatorError: an endpoint could not be served; names it.
        ValueError: ``identification`` names an endpoint not served or has objects
            :data:`Identification` does not allow.
    """
    servers = _servers(devices, period_s, clock, identification, constants)
    started: list[Any] = []
    try:
        for key, server in servers:
            try:
                await server.serve_forever(background=True)
            except (OSError, RuntimeError) as e:
                raise SimulatorError(f"cannot serve {key}: {e} (in use, or not a local "
                                     "address / serial port?)") from e
            started.append(server)
        await stop.wait()
    finally:
        for server in started:
            await server.shutdown()
