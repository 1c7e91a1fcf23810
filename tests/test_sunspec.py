"""SunSpec (edge.profiles.sunspec): the definitions against the official JSON files,
the profile properties of a chain, chain discovery against a real pymodbus server,
and the expected values of a hand-made image.

Expected offsets and values are derived here from the official files
(../shared/data/sunspec, a byte-for-byte copy of sunspec/models) or written by hand.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import sunspec2
from sunspec2 import mb
from support import REPO, Image, ModbusServer

from edge.config.model import RawType, Table, TcpEndpoint, Visitor
from edge.modbus.client import Connection
from edge.modbus.codec import decoder_for
from edge.profiles.sunspec import (
    BASE_ADDRESSES,
    MARKER,
    SUPPORTED_MODELS,
    Chain,
    ChainModel,
    SunSpecError,
    chain_image,
    chain_properties,
    expected_values,
    model_definition,
    read_chain,
)

SHARED = REPO.parent / "shared" / "data"
if not SHARED.is_dir():  # a clone outside /work
    SHARED = Path("/work/shared/data")
UNKNOWN_ID = 65000  # no definition in pysunspec2


def official(model_id: int) -> dict[str, Any]:
    """The official file of the model: the shared copy (1, 103), else the one the
    pysunspec2 package ships (read here as plain JSON)."""
    path = SHARED / "sunspec" / f"model_{model_id}.json"
    if not path.is_file():
        path = Path(sunspec2.__file__).parent / "models" / "json" / f"model_{model_id}.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def official_offsets(model_id: int) -> dict[str, tuple[int, dict[str, Any]]]:
    """Point name -> (offset counting ID at 0, point) from the official file."""
    out, offset = {}, 0
    for p in official(model_id)["group"]["points"]:
        out[p["name"]] = (offset, p)
        offset += p["size"]
    return out


# ------------------------------------------------------------------- definitions


@pytest.mark.parametrize("model_id", SUPPORTED_MODELS)
def test_every_supported_model_loads(model_id: int) -> None:
    d = model_definition(model_id)
    assert d.id == model_id
    assert [p.name for p in d.points[:2]] == ["ID", "L"]
    assert d.length == sum(p.size for p in d.points) - 2
    offsets = [p.offset for p in d.points]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0
    for p in d.points:  # every named scale factor is a sunssf point of the same model
        if isinstance(p.sf, str):
            assert d.point(p.sf).type == "sunssf"
    assert model_definition(model_id) is d  # cached


@pytest.mark.parametrize("model_id", [1, 103])
def test_definitions_match_the_official_files(model_id: int) -> None:
    d = model_definition(model_id)
    group = official(model_id)["group"]
    assert "groups" not in group
    assert (d.name, d.label) == (group["name"], group["label"])
    want = official_offsets(model_id)
    assert [p.name for p in d.points] == list(want)
    for p in d.points:
        offset, o = want[p.name]
        assert (p.type, p.size, p.offset, p.sf, p.units, p.label) == (
            o["type"], o["size"], offset, o.get("sf"), o.get("units"), o.get("label")), p
        assert p.access == o.get("access", "R")
        assert p.mandatory == (o.get("mandatory") == "M")
    assert d.length == {1: 66, 103: 50}[model_id]


def test_unknown_model_and_repeating_groups_are_refused() -> None:
    with pytest.raises(SunSpecError, match=rf"{UNKNOWN_ID}.*pysunspec2 has no definition"):
        model_definition(UNKNOWN_ID)
    with pytest.raises(SunSpecError, match=r"160 .*repeating groups"):
        model_definition(160)  # MPPT: a repeating module group


# ------------------------------------------------------------------ properties

CHAIN_1_103_203 = Chain(40000, (ChainModel(1, 40002, 66), ChainModel(103, 40070, 50),
                                ChainModel(203, 40122, 105)))


def test_chain_properties_of_common_inverter_meter() -> None:
    props = {p["name"]: p for p in chain_properties(CHAIN_1_103_203)}
    expected_names = [
        f"{group}.{name}"
        for group, model_id in (("common", 1), ("inverter_three_phase", 103),
                                ("ac_meter_abcn", 203))
        for name, (_, p) in official_offsets(model_id).items()
        if name not in ("ID", "L") and p["type"] not in ("pad", "sunssf")
    ]
    assert list(props) == expected_names

    inv = official_offsets(103)
    w = props["inverter_three_phase.W"]
    assert w == {
        "name": "inverter_three_phase.W", "register": "HoldingRegister",
        "offset": 40070 + inv["W"][0], "dataType": "int16",
        "scaleFactor": 40070 + inv["W_SF"][0], "missing": 0x8000, "unit": "W",
        "description": inv["W"][1]["label"], "accessMode": "ReadOnly",
    }
    assert w["offset"] == 40084  # the usual addresses of an inverter's W and W_SF
    assert w["scaleFactor"] == 40085
    assert props["inverter_three_phase.PhVphA"]["missing"] == 0xFFFF
    assert props["inverter_three_phase.PhVphA"]["scaleFactor"] == 40070 + inv["V_SF"][0]
    assert (props["inverter_three_phase.WH"]["dataType"],
            props["inverter_three_phase.WH"]["missing"]) == ("uint32", 0)  # acc32
    assert (props["inverter_three_phase.St"]["dataType"],
            props["inverter_three_phase.St"]["missing"]) == ("uint16", 0xFFFF)  # enum16
    assert (props["inverter_three_phase.Evt1"]["dataType"],
            props["inverter_three_phase.Evt1"]["missing"]) == ("uint32", 0xFFFF_FFFF)
    assert "scaleFactor" not in props["inverter_three_phase.St"]

    met = official_offsets(203)
    assert props["ac_meter_abcn.TotWhImp"]["offset"] == 40122 + met["TotWhImp"][0]
    assert props["ac_meter_abcn.TotWhImp"]["scaleFactor"] == 40122 + met["TotWh_SF"][0]
    assert props["ac_meter_abcn.VARphB"]["scaleFactor"] == 40122 + met["VAR_SF"][0]
    assert props["ac_meter_abcn.PhV"]["missing"] == 0x8000  # int16 in the meter

    com = official_offsets(1)
    assert props["common.Mn"] == {
        "name": "common.Mn", "register": "HoldingRegister", "offset": 40002 + com["Mn"][0],
        "limit": 16, "dataType": "string", "description": "Manufacturer",
        "accessMode": "ReadOnly",
    }
    assert props["common.SN"]["offset"] == 40052
    assert props["common.DA"]["accessMode"] == "ReadWrite"
    assert props["common.DA"]["offset"] == 40068


def test_missing_values_are_pysunspec2s() -> None:
    """The table agrees with sunspec2/mb.py, as the registers carry the values."""
    from edge.profiles.sunspec import MISSING  # noqa: PLC0415

    for kind, missing in MISSING.items():
        unimpl = getattr(mb, f"SUNS_UNIMPL_{kind.upper()}", None)
        if kind == "count":
            unimpl = mb.SUNS_UNIMPL_UINT16
        if kind == "eui48":
            unimpl = int(mb.SUNS_UNIMPL_EUI48.replace(":", ""), 16)
        bits = {"int16": 16, "int32": 32, "int64": 64, "sunssf": 16}.get(kind, 64)
        assert missing == unimpl & ((1 << bits) - 1), kind


def test_a_repeated_model_is_suffixed_and_unsupported_ones_left_out() -> None:
    chain = Chain(0, (ChainModel(1, 2, 66), ChainModel(UNKNOWN_ID, 70, 4),
                      ChainModel(103, 76, 50), ChainModel(103, 128, 50)))
    names = [p["name"] for p in chain_properties(chain)]
    assert "inverter_three_phase.W" in names
    assert "inverter_three_phase_2.W" in names
    assert "inverter_three_phase_3.W" not in names
    assert {n.split(".")[0] for n in names} == {"common", "inverter_three_phase",
                                                "inverter_three_phase_2"}
    second = next(p for p in chain_properties(chain) if p["name"] == "inverter_three_phase_2.W")
    assert second["offset"] == 128 + 14
    assert second["scaleFactor"] == 128 + 15


# ------------------------------------------------------------ chain over Modbus


def image_list(image: dict[int, int], size: int | None = None) -> list[int]:
    words = [0] * (size or max(image) + 1)
    for a, w in image.items():
        words[a] = w
    return words


Read = Callable[[int, int], Awaitable[Sequence[int]]]
Serve = Callable[[list[int]], Read]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a pymodbus server (unit 1) with these holding registers; gives its
    ``read(address, count)`` through edge's own client."""
    started: list[tuple[ModbusServer, Connection]] = []

    def start(hr: list[int]) -> Read:
        server = ModbusServer({1: Image(hr=hr)})
        conn = Connection(TcpEndpoint("127.0.0.1", server.port), backoff_initial=0.1,
                          backoff_max=0.2)
        started.append((server, conn))

        async def read(address: int, count: int) -> Sequence[int]:
            words = await conn.read(1, Table.HOLDING_REGISTER, address, count, timeout=2)
            return [int(w) for w in words]

        return read

    yield start
    for server, conn in started:
        await conn.close()
        server.stop()


@pytest.mark.parametrize("base", BASE_ADDRESSES)
async def test_read_chain_at_each_base(serve: Serve, base: int) -> None:
    chain, image = chain_image([1, 103, 203], base=base, seed="meter")
    # base 0: the image ends near 240, so reading 40000 is an exception response;
    # base 50000: 40000 and 0 answer zeros
    read = serve(image_list(image))
    found = await read_chain(read)
    assert found == chain
    assert found.base == base
    assert [(m.model_id, m.length) for m in found.models] == [(1, 66), (103, 50), (203, 105)]
    assert found.models[0].address == base + 2
    assert found.models[1].address == base + 2 + 68


async def test_no_marker_names_every_base(serve: Serve) -> None:
    read = serve([0x1234] * 100)  # 0 answers words, 40000 and 50000 are out of range
    with pytest.raises(SunSpecError) as err:
        await read_chain(read)
    message = str(err.value)
    assert "0: 0x1234 0x1234" in message
    for base in (40000, 50000):
        assert re.search(rf"\b{base}: ModbusExceptionError", message), message
    assert message.index("40000:") < message.index("; 0:") < message.index("50000:")


async def test_l_mismatch_names_the_model(serve: Serve) -> None:
    _, image = chain_image([1, 103])
    image[40071] = 52
    with pytest.raises(SunSpecError, match=r"model 103 at address 40070: L is 52, .* 50"):
        await read_chain(serve(image_list(image)))


@pytest.mark.timeout(30)
async def test_a_chain_without_end_marker_stops(serve: Serve) -> None:
    words = [0] * 65536
    words[40000:40002] = MARKER
    words[40002:40004] = [UNKNOWN_ID, 20000]  # next at 60004, then past 65535
    words[60004:60006] = [UNKNOWN_ID, 20000]
    with pytest.raises(SunSpecError, match=r"past address 65535"):
        await read_chain(serve(words))
    zeros = [0] * 40200  # ID 0 L 0 over and over
    zeros[40000:40002] = MARKER
    with pytest.raises(SunSpecError, match=r"more than 64 models"):
        await read_chain(serve(zeros))


async def test_unknown_models_are_kept(serve: Serve) -> None:
    _, first = chain_image([1])  # model 1 at 40002..40069, end marker at 40070
    _, last = chain_image([203], base=40076 + 28 - 2)  # 203 at 40104
    image = {**{a: w for a, w in last.items() if a >= 40104}, **first}
    image.update(dict(enumerate([UNKNOWN_ID, 4, 1, 2, 3, 4], start=40070)))
    image.update(dict(enumerate([120, 26], start=40076)))  # nameplate: known, unsupported
    found = await read_chain(serve(image_list(image)))
    assert [(m.model_id, m.address, m.length) for m in found.models] == [
        (1, 40002, 66), (UNKNOWN_ID, 40070, 4), (120, 40076, 26), (203, 40104, 105)]
    values = expected_values(found, image)
    assert values["common.Mn"] == "edge"
    assert {n.split(".")[0] for n in values} == {"common", "ac_meter_abcn"}


# ------------------------------------------------------------ image and values


def test_expected_values_of_a_hand_made_image() -> None:
    inv = {n: o for n, (o, _) in official_offsets(103).items()}
    flt = {n: o for n, (o, _) in official_offsets(113).items()}
    chain = Chain(0, (ChainModel(103, 2, 50), ChainModel(113, 54, 60)))
    image = {0: MARKER[0], 1: MARKER[1], 2: 103, 3: 50, 54: 113, 55: 60}

    def put(address: int, fmt: str, *values: object) -> None:
        data = struct.pack(">" + fmt, *values)
        image.update(dict(enumerate(struct.unpack(f">{len(data) // 2}H", data),
                                    start=address)))

    put(2 + inv["W"], "hh", -12345, -2)  # W, W_SF
    put(2 + inv["VAr"], "hh", -1, 0)  # VAr, VAr_SF
    put(2 + inv["A"], "H", 12345)
    put(2 + inv["A_SF"], "h", -3)
    put(2 + inv["PhVphA"], "H", 2315)
    put(2 + inv["V_SF"], "h", -1)
    put(2 + inv["PF"], "hh", -32768, -1)  # not implemented
    put(2 + inv["Hz"], "Hh", 5001, -32768)  # its scale factor not implemented
    put(2 + inv["WH"], "Ih", 123456789, -1)
    put(2 + inv["DCW"], "h", 250)
    put(2 + inv["DCW_SF"], "h", 2)
    put(2 + inv["St"], "H", 4)
    put(54 + flt["W"], "I", 0x4365CCCD)
    put(54 + flt["VAr"], "f", -12.5)
    put(54 + flt["Hz"], "I", 0x7FC00000)  # not implemented
    values = expected_values(chain, image)
    assert values["inverter_three_phase.W"] == -123.45
    assert values["inverter_three_phase.VAr"] == -1
    assert isinstance(values["inverter_three_phase.VAr"], int)
    assert values["inverter_three_phase.A"] == 12.345
    assert values["inverter_three_phase.PhVphA"] == 231.5
    assert values["inverter_three_phase.WH"] == 12345678.9
    assert values["inverter_three_phase.DCW"] == 25000
    assert isinstance(values["inverter_three_phase.DCW"], int)
    assert values["inverter_three_phase.St"] == 4
    assert "inverter_three_phase.PF" not in values
    assert "inverter_three_phase.Hz" not in values
    assert "inverter_three_phase.WH" in values
    assert "inverter_three_phase.DCA" in values  # 0 with sf 0: a plain 0
    assert values["inverter_three_phase_float.W"] == 229.8
    assert values["inverter_three_phase_float.VAr"] == -12.5
    assert "inverter_three_phase_float.Hz" not in values


def test_chain_image_is_plausible_and_deterministic() -> None:
    chain, image = chain_image([1, 103, 203, 113], seed="site-7")
    assert chain_image([1, 103, 203, 113], seed="site-7") == (chain, image)
    assert chain_image([1, 103, 203, 113], seed="other")[1] != image
    end = chain.models[-1].address + 2 + chain.models[-1].length
    assert (image[end], image[end + 1]) == (0xFFFF, 0)
    assert (image[40000], image[40001]) == MARKER
    assert sorted(image) == list(range(40000, end + 2))

    values = expected_values(chain, image)
    names = [p["name"] for p in chain_properties(chain)]
    assert list(values) == names  # nothing simulated as "not implemented"
    assert values["common.Mn"] == "edge"
    assert values["common.Md"] == "site-7"
    assert values["common.Vr"] == "1.0.0"
    assert values["common.Opt"] == ""
    assert str(values["common.SN"]).startswith("SIM")
    assert values["common.DA"] == 1
    assert 220 < float(values["inverter_three_phase.PhVphA"]) < 240
    assert 390 < float(values["ac_meter_abcn.PhVphAB"]) < 410
    assert 49.9 < float(values["inverter_three_phase.Hz"]) < 50.1
    assert 100 <= float(values["inverter_three_phase.W"]) <= 5000
    assert 0 < float(values["ac_meter_abcn.AphA"]) < 20
    assert float(values["inverter_three_phase.VAr"]) < 0
    assert float(values["ac_meter_abcn.VAR"]) < 0
    assert float(values["inverter_three_phase_float.VAr"]) < 0
    assert float(values["ac_meter_abcn.TotWhImp"]) >= 100_000
    for p in chain_properties(chain):
        if "scaleFactor" in p:
            sf = struct.unpack(">h", struct.pack(">H", image[int(p["scaleFactor"])]))[0]
            assert -3 <= sf <= 0, p
    st = values["inverter_three_phase.St"]
    assert st in {v for _, v in model_definition(103).point("St").symbols}
    assert chain_image([1, 103], seed="a")[1] != chain_image([1, 103], seed="b")[1]
    with pytest.raises(SunSpecError, match="160"):
        chain_image([1, 160])


def test_expected_values_agree_with_edges_codec_where_no_scale_factor_applies() -> None:
    chain, image = chain_image([1, 113], base=0, seed="codec")
    values = expected_values(chain, image)
    checked = 0
    for p in chain_properties(chain):
        if "scaleFactor" in p:
            continue
        raw = RawType(str(p["dataType"]))
        limit = int(p.get("limit", raw.register_count or 1))
        offset = int(p["offset"])
        dec = decoder_for(Visitor(Table.HOLDING_REGISTER, offset, limit, raw))
        words = [image[a] for a in range(offset, offset + limit)]
        assert dec(words, 0) == values[str(p["name"])], p["name"]
        checked += 1
    assert checked > 30
