"""Read Device Identification (FC 43 / MEI 14) served by ``edge simulate``.

Read Device Identification (FC 43 / MEI 14, Application Protocol V1.1b3 §6.21) is
answered per endpoint from an optional mapping of object id → value
(:func:`identification_pdu`, ``identification=`` of
:func:`edge.modbus.simulator.run_simulator`); an
endpoint without one answers ILLEGAL FUNCTION. pymodbus's own ``identity=`` server
argument is not used: in pymodbus 3.16 it updates the ``ModbusControlBlock``
singleton, so one identity would be served by every server of the process (the last
one given, merged into the earlier ones), also by servers given none — which answer
an empty object list rather than an exception — and ``SimDevice.identity`` is
accepted but never read. Identification here is per server (one endpoint), not per
unit id: every unit id behind the endpoint answers with the same objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from edge.modbus.pdu import (
    DEVICE_ID_BASIC,
    DEVICE_ID_EXTENDED,
    DEVICE_ID_REGULAR,
    DEVICE_ID_SPECIFIC,
    ENCAPSULATED_INTERFACE,
    MAX_PDU,
    MEI_READ_DEVICE_ID,
    MORE_FOLLOWS,
)

Identification = Mapping[int, str | bytes]
"""Read Device Identification objects: object id (0–6 standard, see
:data:`edge.modbus.pdu.STANDARD_OBJECTS`; 0x80–0xFF extended) → value (text is
sent UTF-8 encoded). 0, 1 and 2 (VendorName, ProductCode, MajorMinorRevision) are
mandatory (V1.1b3 §6.21)."""

_OBJECT_ROOM: Final = MAX_PDU - 7  # a response PDU's room for objects after its header
_LEVEL_IDS: Final = {
    DEVICE_ID_BASIC: range(3), DEVICE_ID_REGULAR: range(7), DEVICE_ID_EXTENDED: range(256)
}


def _identification_objects(objects: Identification) -> dict[int, bytes]:
    """The objects as bytes in id order; ValueError for a reserved id (7–0x7F), a
    missing basic object or a value too long for one response."""
    out: dict[int, bytes] = {}
    for object_id in sorted(objects):
        if not (0 <= object_id <= 6 or 0x80 <= object_id <= 0xFF):
            raise ValueError(f"identification object id {object_id}: not 0..6 or 0x80..0xFF")
        value = objects[object_id]
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if 2 + len(raw) > _OBJECT_ROOM:
            raise ValueError(f"identification object {object_id}: {len(raw)} bytes, at most "
                             f"{_OBJECT_ROOM - 2} fit in a response")
        out[object_id] = raw
    missing = [i for i in range(3) if i not in out]
    if missing:
        raise ValueError(f"identification lacks the mandatory basic object(s) {missing}")
    return out


class _IdentificationResponse(ModbusPDU):
    """An encoded FC 43 / MEI 14 response (the framer puts the function code first)."""

    function_code = ENCAPSULATED_INTERFACE

    def __init__(self, body: bytes = b"") -> None:
        super().__init__()
        self.body = body

    def encode(self) -> bytes:
        return self.body


def identification_response(objects: Mapping[int, bytes], code: int, object_id: int) -> bytes:
    """The response PDU after its function code (MEI type first) to ReadDevId ``code``
    (1–3 a stream, 4 one object) from ``object_id``, served from ``objects`` (id → value,
    as :func:`identification_pdu` checked them). V1.1b3 §6.21: a stream sends the
    objects of its level from ``object_id`` in id order, as many as fit in the PDU
    (MoreFollows 0xFF and NextObjectId the first one left out otherwise); an
    ``object_id`` the device does not have at that level restarts at object 0.
    Conformity level 0x81/0x82/0x83 (individual access supported, up to the highest
    level the objects reach). Raises KeyError for code 4 and an object it lacks.
    """
    highest = 3 if any(i >= 0x80 for i in objects) else 2 if any(i >= 3 for i in objects) else 1
    conformity = 0x80 | highest
    if code == DEVICE_ID_SPECIFIC:
        chosen = [object_id]
        raw = objects[object_id]
        parts = [bytes((object_id, len(raw))) + raw]
        more, next_id = 0, 0
    else:
        level = [i for i in objects if i in _LEVEL_IDS[code]]
        if object_id not in level:
            object_id = 0
        chosen, parts, more, next_id, room = [], [], 0, 0, _OBJECT_ROOM
        for i in level:
            if i < object_id:
                continue
            raw = objects[i]
            if 2 + len(raw) > room:
                more, next_id = MORE_FOLLOWS, i
                break
            room -= 2 + len(raw)
            chosen.append(i)
            parts.append(bytes((i, len(raw))) + raw)
    return bytes((MEI_READ_DEVICE_ID, code, conformity, more, next_id, len(chosen))) + b"".join(
        parts)


def identification_pdu(objects: Identification | None) -> type[ModbusPDU]:
    """A pymodbus request PDU class that serves FC 43 for one server.

    Pass it in the server's ``custom_pdu=[...]``: it replaces pymodbus's handling of
    function code 43 in that server's decoder only (MEI type 14 Read Device
    Identification with ``objects``, answered by :func:`identification_response`;
    any other MEI type ILLEGAL FUNCTION). With ``objects`` None every FC 43 request
    is answered ILLEGAL FUNCTION (exception 1), as a device without identification.
    Exceptions (V1.1b3 §6.21): a ReadDevId code outside 1..4 is ILLEGAL DATA VALUE
    (3), code 4 for an object the device lacks ILLEGAL DATA ADDRESS (2). Raises
    ValueError for objects :data:`Identification` does not allow.
    """
    table = None if objects is None else _identification_objects(objects)

    class ReadDeviceIdentification(ModbusPDU):
        function_code = ENCAPSULATED_INTERFACE
        rtu_frame_size = 7  # unit id, fc, MEI type, code, object id, CRC

        def __init__(self, dev_id: int = 0, transaction_id: int = 0) -> None:
            super().__init__(dev_id=dev_id, transaction_id=transaction_id)
            self.mei_type = self.read_code = self.object_id = 0

        def decode(self, data: bytes) -> None:
            self.mei_type, self.read_code, self.object_id = data[0], data[1], data[2]

        def encode(self) -> bytes:
            return bytes((self.mei_type, self.read_code, self.object_id))

        async def datastore_update(
            self, context: ModbusServerContext, device_id: int
        ) -> ModbusPDU:
            _ = context, device_id
            if table is None or self.mei_type != MEI_READ_DEVICE_ID:
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)
            if not DEVICE_ID_BASIC <= self.read_code <= DEVICE_ID_SPECIFIC:
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
            if self.read_code == DEVICE_ID_SPECIFIC and self.object_id not in table:
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
            return _IdentificationResponse(
                identification_response(table, self.read_code, self.object_id))

    return ReadDeviceIdentification
