"""Read-request planner: merge a device's properties into few Modbus reads (DESIGN.md §4).

Peers read every tag with its own request (ThingsBoard IoT Gateway #406, #1589) or cap
batches far below the protocol maximum; here one request covers as many properties of
one table as the protocol (125 registers for FC 3/4, 2000 bits for FC 1/2), the
device (``ModbusOptions.max_registers``/``max_bits``) and the gap rule allow.

Minimality of the greedy (:func:`plan_requests`), for one table. Sort properties by
offset: o_1 <= ... <= o_n, ends e_j. A request is feasible when its span
(max end - min offset) is <= M and every hole in the union of its properties is
<= g registers. Greedy takes the longest feasible run P_1..P_k (E = max end of the
run) and recurses on P_{k+1}..P_n. P_{k+1} was refused for one of two reasons:

* gap: o_{k+1} - E > g. Every P_j with j <= k ends <= E and every later property
  starts >= o_{k+1}, so no feasible request mixes the two sides: any plan for all
  properties is a plan for P_1..P_k (>= 1 request) plus one for the rest.
* span: e_{k+1} > o_1 + M (the run itself spans <= M). In an optimal plan the
  request H1 holding P_1 ends <= o_1 + M < e_{k+1}, so P_{k+1} sits in another
  request H*, and every later (index > k) property of H1 lies inside P_{k+1}.
  Remove P_1..P_k everywhere and move every later property lying inside P_{k+1}
  into H*; H1 empties. Coverage is lost only below o_1 + M < e_{k+1}: in H* from
  o_{k+1} on P_{k+1} covers it; in any other request the leftmost remaining
  property y ends beyond e_{k+1} and covers it from o_y on. Spans and holes only
  shrink, so this plans P_{k+1}..P_n with one request fewer than the optimum.

Either way optimum(all) >= 1 + optimum(rest) = greedy(all) by induction; tests also
cross-check against an exhaustive search on random small layouts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from edge.config.model import DeviceSpec, PropertySpec, Table

MAX_REGISTERS = 125
"""Protocol maximum of registers per read (FC 3/4: 250 data bytes)."""
MAX_BITS = 2000
"""Protocol maximum of coils/discrete inputs per read (FC 1/2)."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: ``count`` registers (or bits) of ``table`` from ``address``.

    ``properties`` are sorted by offset; each decodes at index
    ``prop.visitor.offset - address`` of the response data. A property with a scale
    factor register (``Visitor.scale_factor``) is planned as the extent from
    ``Visitor.first`` to ``Visitor.last_end``, so its exponent is in the same response.
    """

    table: Table
    address: int
    count: int
    properties: tuple[PropertySpec, ...]


def plan_requests(
    properties: Sequence[PropertySpec],
    *,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
    max_gap: int = 16,
) -> tuple[ReadRequest, ...]:
    """The fewest read requests that cover ``properties``, sorted by table then address.

    Per table, properties sorted by offset join the current request while its span
    stays <= ``max_registers`` (register tables) or ``max_bits`` (bit tables) and the
    hole before the next property is <= ``max_gap`` unused registers/bits (0: only
    adjacent or overlapping properties merge). Overlapping properties (several bits
    of one register, a sub-range of another property) share a request. The count is
    minimal for these constraints (proof in the module docstring). Cycles are not
    looked at: :func:`plan_device` plans each collect cycle separately.

    Raises:
        ValueError: a maximum is outside 1..125 / 1..2000, ``max_gap`` is negative,
            or a property is longer than one request may be.
    """
    if not 1 <= max_registers <= MAX_REGISTERS:
        raise ValueError(f"max_registers must be 1..{MAX_REGISTERS}, got {max_registers}")
    if not 1 <= max_bits <= MAX_BITS:
        raise ValueError(f"max_bits must be 1..{MAX_BITS}, got {max_bits}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    by_table: defaultdict[Table, list[PropertySpec]] = defaultdict(list)
    for prop in properties:
        by_table[prop.visitor.table].append(prop)
    requests: list[ReadRequest] = []
    for table in sorted(by_table, key=lambda t: t.read_function_code):
        span = max_bits if table.is_bit else max_registers
        requests.extend(_plan_table(table, by_table[table], span, max_gap))
    return tuple(requests)


def plan_device(device: DeviceSpec) -> dict[int, tuple[ReadRequest, ...]]:
    """``{collect_cycle_ms: requests}`` for ``device``, cycles ascending, each planned
    by :func:`plan_requests` with the device's ``options`` (max_registers, max_bits,
    max_gap).

    Raises:
        ValueError: as :func:`plan_requests`, naming the device.
    """
    by_cycle: defaultdict[int, list[PropertySpec]] = defaultdict(list)
    for prop in device.properties:
        by_cycle[prop.collect_cycle_ms].append(prop)
    opts = device.options
    try:
        return {
            cycle: plan_requests(
                by_cycle[cycle],
                max_registers=opts.max_registers,
                max_bits=opts.max_bits,
                max_gap=opts.max_gap,
            )
            for cycle in sorted(by_cycle)
        }
    except ValueError as e:
        raise ValueError(f"device {device.key}: {e}") from e


def _plan_table(
    table: Table, properties: list[PropertySpec], span: int, max_gap: int
) -> list[ReadRequest]:
    unit = "bits" if table.is_bit else "registers"
    ordered = sorted(properties, key=lambda p: (p.visitor.first, p.visitor.last_end, p.name))
    requests: list[ReadRequest] = []
    members: list[PropertySpec] = []
    start = end = 0
    for prop in ordered:
        first, last_end = prop.visitor.first, prop.visitor.last_end
        if last_end - first > span:
            with_sf = "" if prop.visitor.scale_factor is None else " with its scale factor"
            raise ValueError(
                f"property {prop.name!r} reads {last_end - first} {unit} of {table}{with_sf}; "
                f"one request may read at most {span}"
            )
        if members and first - end <= max_gap and max(end, last_end) - start <= span:
            members.append(prop)
            end = max(end, last_end)
            continue
        if members:
            requests.append(ReadRequest(table, start, end - start, tuple(members)))
        members, start, end = [prop], first, last_end
    if members:
        requests.append(ReadRequest(table, start, end - start, tuple(members)))
    return requests
