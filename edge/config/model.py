"""The validated, internal device model that the planner, codec and poller consume.

Loaders (:mod:`edge.config.kubeedge`) turn KubeEdge ``devices.kubeedge.io`` Device and
DeviceModel documents (v1beta1 in both layouts, v1alpha2) into these types; nothing
downstream sees KubeEdge's free-form ``configData`` again. Every instance here is
immutable and already checked: offsets fit the table, limits fit the raw type, cycles
are positive milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Table(StrEnum):
    """The four Modbus data tables, named as in KubeEdge's ``register`` key."""

    COIL = "CoilRegister"
    DISCRETE_INPUT = "DiscreteInputRegister"
    HOLDING_REGISTER = "HoldingRegister"
    INPUT_REGISTER = "InputRegister"

    @property
    def is_bit(self) -> bool:
        """True for the single-bit tables (coils, discrete inputs)."""
        return self in (Table.COIL, Table.DISCRETE_INPUT)

    @property
    def read_function_code(self) -> int:
        """Modbus read function code: 1 coils, 2 discrete inputs, 3 holding, 4 input."""
        return _READ_FC[self]

    @property
    def writable(self) -> bool:
        """Coils (FC 5/15) and holding registers (FC 6/16) can be written."""
        return self in (Table.COIL, Table.HOLDING_REGISTER)


_READ_FC = {
    Table.COIL: 1,
    Table.DISCRETE_INPUT: 2,
    Table.HOLDING_REGISTER: 3,
    Table.INPUT_REGISTER: 4,
}


class RawType(StrEnum):
    """How the registers of one property are interpreted (DESIGN.md §4).

    Register tables: fixed-width integers and IEEE-754 floats use exactly
    :attr:`register_count` registers; ``string``/``bytes`` use ``limit`` registers;
    ``boolean`` is one register, true when non-zero; ``bit`` is one bit (0 = LSB) of
    one register. Bit tables: ``boolean`` reads one bit as true/false; an unsigned
    integer type reads ``limit`` bits packed first-address-first into bit 0.
    """

    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"
    BYTES = "bytes"
    BOOLEAN = "boolean"
    BIT = "bit"

    @property
    def register_count(self) -> int | None:
        """Registers this type occupies, or None when ``limit`` decides (string, bytes)."""
        return _REGISTER_COUNT.get(self)

    @property
    def is_integer(self) -> bool:
        """True for the fixed-width integer types."""
        return self in _INTEGER_BITS

    @property
    def bits(self) -> int | None:
        """Width in bits of an integer type, else None."""
        return _INTEGER_BITS.get(self)

    @property
    def signed(self) -> bool:
        """True for int16/int32/int64."""
        return self in (RawType.INT16, RawType.INT32, RawType.INT64)


_REGISTER_COUNT = {
    RawType.INT16: 1,
    RawType.UINT16: 1,
    RawType.INT32: 2,
    RawType.UINT32: 2,
    RawType.INT64: 4,
    RawType.UINT64: 4,
    RawType.FLOAT32: 2,
    RawType.FLOAT64: 4,
    RawType.BOOLEAN: 1,
    RawType.BIT: 1,
}
_INTEGER_BITS = {
    RawType.INT16: 16,
    RawType.UINT16: 16,
    RawType.INT32: 32,
    RawType.UINT32: 32,
    RawType.INT64: 64,
    RawType.UINT64: 64,
}


class ValueType(StrEnum):
    """DeviceModel property types (KubeEdge v1beta1 ``spec.properties[].type``)."""

    INT = "INT"
    FLOAT = "FLOAT"
    DOUBLE = "DOUBLE"
    STRING = "STRING"
    BOOLEAN = "BOOLEAN"
    BYTES = "BYTES"


class AccessMode(StrEnum):
    """DeviceModel ``accessMode``."""

    READ_ONLY = "ReadOnly"
    READ_WRITE = "ReadWrite"


class Framing(StrEnum):
    """Modbus application data unit framing on a TCP connection."""

    MBAP = "mbap"  # Modbus TCP: MBAP header, transaction ids
    RTU = "rtu"  # RTU over TCP: unit id + PDU + CRC-16, one request at a time


Value = bool | int | float | str
"""A decoded property value as it appears in a reading (bytes are hex strings)."""


@dataclass(frozen=True, slots=True)
class Visitor:
    """Where and how one property lives on the device.

    ``offset`` is the 0-based protocol address; ``limit`` counts registers for
    register tables and bits for bit tables. Decoding (DESIGN.md §4): take ``limit``
    registers, reverse their order if ``is_register_swap``, then swap the two bytes
    of each register if ``is_swap``, decode big-endian as ``raw_type``, multiply by
    ``scale``. ``bit`` is the bit index (0 = least significant) for ``RawType.BIT``.

    ``scale_factor`` (integer raw types only) is the address, in the same table, of an
    int16 power-of-ten exponent e read in the same request: the value is then
    raw × scale × 10^e (SunSpec's ``sunssf`` points). ``missing`` is the raw value that
    means "not implemented" (the registers as the device carries them, first register
    most significant; SunSpec's 0x8000 for int16, 0xFFFF for uint16, …): such a reading
    is a bad value, not a number.
    """

    table: Table
    offset: int
    limit: int
    raw_type: RawType
    scale: float = 1.0
    is_swap: bool = False
    is_register_swap: bool = False
    bit: int | None = None
    scale_factor: int | None = None
    missing: int | None = None

    @property
    def end(self) -> int:
        """One past the last address this visitor reads."""
        return self.offset + self.limit

    @property
    def first(self) -> int:
        """The first address its request must cover: its own or its scale factor's."""
        sf = self.scale_factor
        return self.offset if sf is None else min(self.offset, sf)

    @property
    def last_end(self) -> int:
        """One past the last address its request must cover (scale factor included)."""
        sf = self.scale_factor
        return self.end if sf is None else max(self.end, sf + 1)


@dataclass(frozen=True, slots=True)
class MqttPush:
    """A property's ``pushMethod.mqtt`` sink: an extra broker, topic, QoS, retain flag."""

    host: str
    port: int
    topic: str
    qos: int = 0
    retained: bool = False
    tls: bool = False


@dataclass(frozen=True, slots=True)
class PropertySpec:
    """One property of one device, merged from its DeviceModel and Device entries.

    Cycles are milliseconds. ``minimum``/``maximum`` bound writes (and are checked
    against what the raw type can hold). ``desired`` is the KubeEdge desired value as
    the string the manifest carries, or None.
    """

    name: str
    visitor: Visitor
    value_type: ValueType
    access_mode: AccessMode = AccessMode.READ_ONLY
    collect_cycle_ms: int = 1000
    report_cycle_ms: int = 1000
    report_to_cloud: bool = True
    minimum: float | None = None
    maximum: float | None = None
    unit: str | None = None
    desired: str | None = None
    push_mqtt: MqttPush | None = None


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """A Modbus TCP server (``framing=MBAP``) or an RTU-over-TCP gateway (``RTU``)."""

    host: str
    port: int = 502
    framing: Framing = Framing.MBAP

    @property
    def key(self) -> str:
        """Identity of the shared connection: one connection per key."""
        scheme = "tcp" if self.framing is Framing.MBAP else "rtu+tcp"
        return f"{scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SerialEndpoint:
    """A serial line (RS-232/RS-485) spoken with RTU framing; one request at a time."""

    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # N, E or O
    stopbits: int = 1

    @property
    def key(self) -> str:
        """Identity of the shared bus: one owner per serial port."""
        return f"serial://{self.port}"


Endpoint = TcpEndpoint | SerialEndpoint


@dataclass(frozen=True, slots=True)
class ModbusOptions:
    """Per-device protocol options (from ``protocol.configData``, all optional).

    ``timeout_s`` bounds one request; ``retries`` is how many more times a timed-out
    request is sent before the property is marked bad; ``max_registers`` /
    ``max_bits`` cap one read request (protocol maxima 125 and 2000; lower for picky
    devices); ``max_gap`` is how many unused registers (or bits) the planner may read
    to merge two neighbouring requests into one.
    """

    timeout_s: float = 1.0
    retries: int = 1
    max_registers: int = 125
    max_bits: int = 2000
    max_gap: int = 16


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A Device ``methods[]`` entry: a named group of writable properties."""

    name: str
    property_names: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class ProfileRef:
    """The firmware profile a device's visitors came from (:mod:`edge.profiles`): its
    name, the device's firmware as the manifest gives it, and for SunSpec the device's
    chain as ``(model id, address of its ID register)`` pairs."""

    name: str
    firmware: str | None = None
    sunspec_chain: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One Modbus device instance, ready to poll.

    ``source`` says where it came from (``file: document N``) for messages; ``profile``
    the firmware profile it names, if any.
    """

    namespace: str
    name: str
    model: str
    endpoint: Endpoint
    unit_id: int
    properties: tuple[PropertySpec, ...]
    options: ModbusOptions = ModbusOptions()
    methods: tuple[MethodSpec, ...] = ()
    source: str = ""
    profile: ProfileRef | None = None

    @property
    def key(self) -> str:
        """``namespace/name``, unique per gateway."""
        return f"{self.namespace}/{self.name}"
