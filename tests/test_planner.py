"""Read-request planning: exact request lists for real layouts, boundaries, and an
exhaustive cross-check that the greedy plan is minimal.

Expected requests are written out by hand or derived here from first principles
(contiguous runs); none comes from calling the planner.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge.config.model import (
    DeviceSpec,
    ModbusOptions,
    PropertySpec,
    RawType,
    Table,
    TcpEndpoint,
    ValueType,
    Visitor,
)
from edge.modbus.planner import ReadRequest, plan_device, plan_requests

HR = Table.HOLDING_REGISTER
IR = Table.INPUT_REGISTER
COIL = Table.COIL
DI = Table.DISCRETE_INPUT
SDM630 = Path("/work/shared/data/registermaps/Eastron_SDM630.csv")


def prop(
    name: str,
    offset: int,
    raw: RawType = RawType.UINT16,
    *,
    limit: int | None = None,
    table: Table = HR,
    cycle: int = 1000,
    bit: int | None = None,
) -> PropertySpec:
    count = limit if limit is not None else (raw.register_count or 1)
    return PropertySpec(
        name,
        Visitor(table, offset, count, raw, bit=bit),
        ValueType.INT,
        collect_cycle_ms=cycle,
    )


def spans(requests: Sequence[ReadRequest]) -> list[tuple[int, int]]:
    return [(r.address, r.count) for r in requests]


def device(props: Sequence[PropertySpec], options: ModbusOptions | None = None) -> DeviceSpec:
    return DeviceSpec(
        "default",
        "meter",
        "model",
        TcpEndpoint("127.0.0.1"),
        1,
        tuple(props),
        options or ModbusOptions(),
    )


# -- Eastron SDM630: 85 float32 input registers ------------------------------------


def sdm630() -> list[PropertySpec]:
    with SDM630.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["function"] == "4" and r["type"] == "Float" for r in rows)
    return [prop(r["name"], int(r["addr"].strip(), 16), RawType.FLOAT32, table=IR) for r in rows]


def contiguous_runs(props: Sequence[PropertySpec]) -> list[tuple[int, int]]:
    """(address, count) of maximal runs where each property starts where the last ended."""
    runs: list[list[int]] = []
    for p in sorted(props, key=lambda p: p.visitor.offset):
        if runs and runs[-1][1] == p.visitor.offset:
            runs[-1][1] = p.visitor.end
        else:
            runs.append([p.visitor.offset, p.visitor.end])
    return [(a, b - a) for a, b in runs]


def test_sdm630_map_parses() -> None:
    props = sdm630()
    assert len(props) == 85
    assert props[0].visitor.offset == 0
    assert props[-1].visitor.offset == 0x17C
    assert {p.visitor.table for p in props} == {IR}


def test_sdm630_without_gap_fill_reads_contiguous_runs() -> None:
    props = sdm630()
    by_hand = [
        (0x000, 44),  # phase volts .. average L-N volts, 22 floats
        (0x02E, 4),
        (0x034, 2),
        (0x038, 2),
        (0x03C, 4),
        (0x042, 2),
        (0x046, 18),  # frequency .. maximum total power demand
        (0x064, 8),
        (0x0C8, 8),
        (0x0E0, 2),
        (0x0EA, 12),
        (0x0F8, 4),
        (0x102, 12),
        (0x14E, 48),  # line THDs .. L3 total kVArh, 24 floats
    ]
    assert contiguous_runs(props) == by_hand
    requests = plan_requests(props, max_gap=0)
    assert spans(requests) == by_hand
    assert all(r.table is IR for r in requests)
    assert sum(len(r.properties) for r in requests) == 85


def test_sdm630_default_gap_fill() -> None:
    # holes: 2 regs between the small runs, 12 before 0x064, 92 before 0x0C8,
    # 16 before 0x0E0 (== max_gap: merged), 8, 2, 6, then 64 before 0x14E
    requests = plan_requests(sdm630())
    assert spans(requests) == [(0x000, 108), (0x0C8, 70), (0x14E, 48)]
    assert [len(r.properties) for r in requests] == [42, 19, 24]


def test_sdm630_picky_device_40_registers() -> None:
    requests = plan_requests(sdm630(), max_registers=40)
    assert spans(requests) == [
        (0, 40),  # 0x000..0x026: 20 floats
        (40, 40),  # 0x028..0x04E
        (80, 28),  # 0x050..0x06A, hole of 12 filled
        (200, 40),  # 0x0C8..0x0EE
        (240, 30),  # 0x0F0..0x10C
        (334, 40),  # 0x14E..0x174
        (374, 8),  # 0x176..0x17C
    ]
    assert all(r.count <= 40 for r in requests)


def test_sdm630_through_plan_device_uses_the_device_options() -> None:
    requests = plan_device(device(sdm630(), ModbusOptions(max_registers=40, max_gap=0)))
    assert list(requests) == [1000]
    assert all(r.count <= 40 for r in requests[1000])
    # the 44- and 48-register runs no longer fit: each splits in two
    assert len(requests[1000]) == 14 + 2


# -- the benchmark layouts (bench/sim_devices.py) ----------------------------------


def bench_layout(tags: int) -> list[PropertySpec]:
    return [
        prop("read_ts", 0, RawType.UINT64),
        prop("change_ts", 4, RawType.UINT64),
        prop("counter", 8, RawType.UINT32),
    ] + [prop(f"s{j:03d}", 10 + j, RawType.INT16) for j in range(tags - 3)]


@pytest.mark.parametrize(("tags", "count"), [(50, 57), (20, 27)])
def test_benchmark_layout_is_one_request(tags: int, count: int) -> None:
    for gap in (0, 16):
        requests = plan_requests(bench_layout(tags), max_gap=gap)
        assert spans(requests) == [(0, count)]
        assert requests[0].table is HR
        assert [p.name for p in requests[0].properties][:4] == [
            "read_ts",
            "change_ts",
            "counter",
            "s000",
        ]
        assert len(requests[0].properties) == tags


# -- boundaries --------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0, 1, 5, 16])
def test_max_gap_boundary(gap: int) -> None:
    merged = plan_requests([prop("a", 0), prop("b", 1 + gap)], max_gap=gap)
    assert spans(merged) == [(0, 2 + gap)]
    split = plan_requests([prop("a", 0), prop("b", 2 + gap)], max_gap=gap)
    assert spans(split) == [(0, 1), (2 + gap, 1)]


def test_gap_is_measured_from_the_furthest_end() -> None:
    # a long string ends at 10; the short property inside it does not shorten the end
    props = [prop("s", 0, RawType.STRING, limit=10), prop("x", 2), prop("y", 12)]
    assert spans(plan_requests(props, max_gap=2)) == [(0, 13)]
    assert spans(plan_requests(props, max_gap=1)) == [(0, 10), (12, 1)]


def test_125_register_boundary() -> None:
    assert spans(plan_requests([prop("a", 0), prop("b", 124)], max_gap=200)) == [(0, 125)]
    assert spans(plan_requests([prop("a", 0), prop("b", 125)], max_gap=200)) == [
        (0, 1),
        (125, 1),
    ]
    f_in = [prop("a", 0), prop("f", 123, RawType.FLOAT32)]
    assert spans(plan_requests(f_in, max_gap=200)) == [(0, 125)]
    f_out = [prop("a", 0), prop("f", 124, RawType.FLOAT32)]
    assert spans(plan_requests(f_out, max_gap=200)) == [(0, 1), (124, 2)]


def test_130_contiguous_registers_split_at_125() -> None:
    props = [prop(f"r{i}", i) for i in range(130)]
    assert spans(plan_requests(props, max_gap=0)) == [(0, 125), (125, 5)]


def test_a_whole_125_register_string() -> None:
    props = [prop("name", 10, RawType.STRING, limit=125)]
    assert spans(plan_requests(props)) == [(10, 125)]


def test_coils_past_2000_bits_split() -> None:
    coils = [prop(f"c{i}", i, RawType.BOOLEAN, table=COIL) for i in range(2500)]
    requests = plan_requests(coils, max_gap=0)
    assert spans(requests) == [(0, 2000), (2000, 500)]
    assert all(r.table is COIL for r in requests)
    assert [len(r.properties) for r in requests] == [2000, 500]


def test_bit_tables_use_max_bits_not_max_registers() -> None:
    inputs = [prop(f"d{i}", i * 100, RawType.BOOLEAN, table=DI) for i in range(5)]
    # 401 bits apart from first to last: one request when holes of 99 may be read
    assert spans(plan_requests(inputs, max_gap=99, max_registers=10)) == [(0, 401)]
    assert spans(plan_requests(inputs, max_gap=99, max_bits=250)) == [(0, 201), (300, 101)]
    assert len(plan_requests(inputs, max_gap=98)) == 5


def test_packed_coils_count_bits() -> None:
    props = [
        prop("mode", 0, RawType.UINT16, limit=4, table=COIL),
        prop("run", 4, RawType.BOOLEAN, table=COIL),
        prop("flags", 8, RawType.UINT16, limit=16, table=COIL),
    ]
    assert spans(plan_requests(props, max_gap=3)) == [(0, 24)]
    assert spans(plan_requests(props, max_gap=2)) == [(0, 5), (8, 16)]


# -- overlapping properties --------------------------------------------------------


def test_bits_of_one_register_share_a_request() -> None:
    props = [prop(f"b{i}", 5, RawType.BIT, bit=i) for i in (15, 0, 7)]
    props.append(prop("status", 5, RawType.UINT16))
    requests = plan_requests(props, max_gap=0)
    assert spans(requests) == [(5, 1)]
    assert {p.name for p in requests[0].properties} == {"b0", "b7", "b15", "status"}


def test_sub_range_property_shares_the_request() -> None:
    props = [
        prop("serial", 0, RawType.STRING, limit=8),
        prop("serial_hi", 2, RawType.UINT32),
        prop("after", 8, RawType.UINT16),
    ]
    requests = plan_requests(props, max_gap=0)
    assert spans(requests) == [(0, 9)]
    assert [p.name for p in requests[0].properties] == ["serial", "serial_hi", "after"]


def test_properties_are_decoded_at_their_index() -> None:
    props = [prop("c", 20), prop("a", 10, RawType.FLOAT32), prop("b", 13)]
    (request,) = plan_requests(props)
    assert (request.address, request.count) == (10, 11)
    assert [(p.name, p.visitor.offset - request.address) for p in request.properties] == [
        ("a", 0),
        ("b", 3),
        ("c", 10),
    ]


# -- tables and cycles -------------------------------------------------------------


def test_mixed_tables_are_planned_apart_in_table_order() -> None:
    props = [
        prop("ir", 0, table=IR),
        prop("hr", 0, table=HR),
        prop("di", 0, RawType.BOOLEAN, table=DI),
        prop("coil", 0, RawType.BOOLEAN, table=COIL),
        prop("hr2", 1, table=HR),
        prop("ir2", 300, table=IR),
    ]
    requests = plan_requests(props)
    assert [(r.table, r.address, r.count) for r in requests] == [
        (COIL, 0, 1),
        (DI, 0, 1),
        (HR, 0, 2),
        (IR, 0, 1),
        (IR, 300, 1),
    ]


def test_mixed_cycles_are_planned_separately() -> None:
    props = [
        prop("slow_a", 0, cycle=10000),
        prop("fast_a", 1, cycle=100),
        prop("slow_b", 2, cycle=10000),
        prop("fast_b", 3, cycle=100),
        prop("mid", 4, RawType.BOOLEAN, table=COIL, cycle=1000),
    ]
    plan = plan_device(device(props))
    assert list(plan) == [100, 1000, 10000]
    assert [(r.table, r.address, r.count) for r in plan[100]] == [(HR, 1, 3)]
    assert [(r.table, r.address, r.count) for r in plan[1000]] == [(COIL, 4, 1)]
    assert [(r.table, r.address, r.count) for r in plan[10000]] == [(HR, 0, 3)]
    assert [p.name for p in plan[100][0].properties] == ["fast_a", "fast_b"]


def test_plan_is_deterministic_under_input_order() -> None:
    props = sdm630() + bench_layout(20)
    expected = plan_requests(props)
    rng = random.Random(11)
    for _ in range(5):
        shuffled = list(props)
        rng.shuffle(shuffled)
        assert plan_requests(shuffled) == expected


def test_empty_device() -> None:
    assert plan_requests([]) == ()
    assert plan_device(device([])) == {}


# -- refusals ----------------------------------------------------------------------


def test_property_longer_than_a_request_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'serial' reads 50 registers .* at most 40"):
        plan_requests([prop("serial", 0, RawType.STRING, limit=50)], max_registers=40)
    with pytest.raises(ValueError, match=r"device default/meter: property 'serial'"):
        plan_device(
            device([prop("serial", 0, RawType.STRING, limit=50)], ModbusOptions(max_registers=40))
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_registers": 0}, r"max_registers must be 1\.\.125, got 0"),
        ({"max_registers": 126}, r"max_registers must be 1\.\.125, got 126"),
        ({"max_bits": 2001}, r"max_bits must be 1\.\.2000, got 2001"),
        ({"max_gap": -1}, r"max_gap must be >= 0, got -1"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_requests([prop("a", 0)], **kwargs)


# -- minimality: exhaustive search on small random layouts -------------------------


def feasible(group: Sequence[tuple[int, int]], span: int, gap: int) -> bool:
    """One request can serve these (offset, end) intervals: span and every hole fit."""
    lo = min(o for o, _ in group)
    hi = max(e for _, e in group)
    if hi - lo > span:
        return False
    covered = {a for o, e in group for a in range(o, e)}
    hole = 0
    for address in range(lo, hi):
        hole = 0 if address in covered else hole + 1
        if hole > gap:
            return False
    return True


def minimum_requests(intervals: Sequence[tuple[int, int]], span: int, gap: int) -> int:
    """Fewest groups in any partition into feasible groups (DP over subsets)."""
    n = len(intervals)
    ok = [
        mask != 0 and feasible([intervals[i] for i in range(n) if mask >> i & 1], span, gap)
        for mask in range(1 << n)
    ]
    best = [0] + [n + 1] * ((1 << n) - 1)
    for mask in range(1, 1 << n):
        low = mask & -mask
        sub = mask
        while sub:
            if sub & low and ok[sub]:
                best[mask] = min(best[mask], best[mask ^ sub] + 1)
            sub = (sub - 1) & mask
    return best[(1 << n) - 1]


def test_greedy_is_minimal_on_random_small_layouts() -> None:
    rng = random.Random(20261129)
    for case in range(1500):
        n = rng.randint(1, 7)
        span = rng.randint(3, 12)
        gap = rng.randint(0, 3)
        props = []
        for i in range(n):
            limit = rng.randint(1, min(span, 6))
            props.append(prop(f"p{i}", rng.randint(0, 24), RawType.STRING, limit=limit))
        requests = plan_requests(props, max_registers=span, max_gap=gap)
        intervals = [(p.visitor.offset, p.visitor.end) for p in props]
        # every property exactly once, inside its request, and every request feasible
        served = sorted(p.name for r in requests for p in r.properties)
        assert served == sorted(p.name for p in props), case
        for r in requests:
            assert all(
                r.address <= p.visitor.offset and p.visitor.end <= r.address + r.count
                for p in r.properties
            )
            group = [(p.visitor.offset, p.visitor.end) for p in r.properties]
            assert min(o for o, _ in group) == r.address
            assert max(e for _, e in group) == r.address + r.count
            assert feasible(group, span, gap), (case, intervals, span, gap)
        assert len(requests) == minimum_requests(intervals, span, gap), (
            case,
            intervals,
            span,
            gap,
        )


def test_greedy_is_minimal_on_all_three_property_layouts() -> None:
    shapes = [(o, o + w) for o in range(6) for w in (1, 2, 3)]
    for span, gap in ((3, 0), (4, 1), (5, 0), (6, 2)):
        for a in shapes:
            for b in shapes:
                for c in shapes:
                    intervals = [a, b, c]
                    if any(e - o > span for o, e in intervals):
                        continue
                    props = [
                        prop(f"p{i}", o, RawType.STRING, limit=e - o)
                        for i, (o, e) in enumerate(intervals)
                    ]
                    got = len(plan_requests(props, max_registers=span, max_gap=gap))
                    assert got == minimum_requests(intervals, span, gap), (intervals, span, gap)
