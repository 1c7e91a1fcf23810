"""``edge discover`` (edge.profiles.discover, edge.discover_cli) against real pymodbus
servers: SunSpec devices at 40000 and 50000, FC 43 identification, register profiles
matched by identification registers and checked by firmware range.

The register-profile tests use a profile written here into a tmp directory (the
shipped Eastron profiles are written elsewhere); the SunSpec values expected are
:func:`edge.profiles.sunspec.expected_values` of the served image.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO, Image, ModbusServer, edge_cli, free_port, start_pty_pair

from edge.config.load import load_manifests
from edge.config.model import DeviceSpec, Framing, TcpEndpoint
from edge.config.sources import Report
from edge.modbus.client import ConnectionPool
from edge.modbus.poller import DevicePoller
from edge.profiles.discover import Discovery, default_name, discover, manifests
from edge.profiles.profile import Loaded, read_profiles
from edge.profiles.sunspec import chain_image, chain_properties, expected_values, model_definition
from edge.reading import Reading

Serve = Callable[..., ModbusServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(hr, hr_start=0, identity=None, ir=None, framing="socket",
    serial_port=None)``: a pymodbus server (unit 1), stopped at teardown."""
    started: list[ModbusServer] = []

    def start(hr: list[int], hr_start: int = 0, identity: Mapping[int, str] | None = None,
              ir: list[int] | None = None, framing: str = "socket",
              serial_port: str | None = None) -> ModbusServer:
        server = ModbusServer({1: Image(hr=hr, hr_start=hr_start, ir=ir or [0])},
                              identity=identity, framing=framing, serial_port=serial_port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def probe(port: int, profiles: Mapping[str, Loaded] | None = None,
                timeout: float = 1.0, framing: Framing = Framing.MBAP,  # noqa: ASYNC109
                ) -> Discovery:
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.1)
    try:
        return await discover(pool.get(TcpEndpoint("127.0.0.1", port, framing)), 1,
                              timeout=timeout, profiles=profiles)
    finally:
        await pool.close()


def image_words(image: dict[int, int], start: int) -> list[int]:
    return [image.get(a, 0) for a in range(start, max(image) + 1)]


def load_text(tmp_path: Path, text: str, profile_dirs: tuple[Path, ...] = ()
              ) -> tuple[DeviceSpec, ...]:
    """Load the manifests ``text`` (with the profiles of ``profile_dirs`` as well as
    the shipped ones, as an agent file's ``profiles`` gives them); no warning."""
    path = tmp_path / "discovered.yaml"
    path.write_text(text)
    devices, warnings = load_manifests([path], profile_dirs=profile_dirs)
    assert warnings == (), [str(w) for w in warnings]
    return devices


async def poll_once(device: DeviceSpec) -> Reading:
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.1)
    readings: list[Reading] = []
    try:
        poller = DevicePoller(device, pool.get(device.endpoint), readings.append,
                              lambda *_: None)
        await poller.poll_once()
    finally:
        await pool.close()
    (reading,) = readings
    return reading


def point_address(chain_models: Any, model_id: int, point: str) -> int:
    model = next(m for m in chain_models if m.model_id == model_id)
    return int(model.address + model_definition(model_id).point(point).offset)


# -------------------------------------------------------------------- SunSpec


async def test_sunspec_at_40000_gives_the_chain_and_only_implemented_points(
        serve: Serve, tmp_path: Path) -> None:
    chain, image = chain_image([1, 103, 203], seed="roof")
    pf = point_address(chain.models, 103, "PF")
    image[pf] = 0x8000  # int16 not implemented
    hz_sf = point_address(chain.models, 203, "Hz_SF")
    image[hz_sf] = 0x8000  # the meter's Hz scale factor not implemented
    server = serve(image_words(image, 0))
    d = await probe(server.port)

    assert d.profile == "sunspec"
    assert d.sunspec == chain
    assert d.identification == {"Mn": "edge", "Md": "roof", "SN": d.identification["SN"],
                                "Vr": "1.0.0"}
    assert d.firmware == "1.0.0"
    assert d.device_identification == {}  # FC 43 answered ILLEGAL FUNCTION
    names = [p.name for p in d.properties]
    all_names = [str(p["name"]) for p in chain_properties(chain)]
    assert "inverter_three_phase.PF" not in names
    assert "ac_meter_abcn.Hz" not in names
    assert names == [n for n in all_names if n not in ("inverter_three_phase.PF",
                                                        "ac_meter_abcn.Hz")]
    kinds = {p.name: p.type.value for p in d.properties}
    assert kinds["common.Mn"] == "STRING"
    assert kinds["inverter_three_phase.W"] == "FLOAT"
    assert kinds["inverter_three_phase.St"] == "INT"
    assert {p.name: p.unit for p in d.properties}["inverter_three_phase.W"] == "W"
    assert {p.name: p.access_mode.value for p in d.properties}["common.DA"] == "ReadWrite"

    text = manifests(d, name=default_name(d))
    docs = list(yaml.safe_load_all(text))
    assert [doc["kind"] for doc in docs] == ["DeviceModel", "Device"]
    config = docs[1]["spec"]["protocol"]["configData"]
    assert config["profile"] == "sunspec"
    assert config["sunspecChain"] == [{"model": 1, "address": 40002},
                                      {"model": 103, "address": 40070},
                                      {"model": 203, "address": 40122}]
    assert "firmware" not in config  # the sunspec profile does not check firmware
    assert (config["communicateMode"], config["ip"], config["port"], config["slaveID"]) == (
        "TCP", "127.0.0.1", server.port, 1)
    assert docs[1]["metadata"]["name"] == default_name(d)
    assert default_name(d).startswith("edge-roof-sim")
    assert text.startswith("# edge discover:\n")
    assert "# SunSpec at 40000: models 1 at 40002, 103 at 40070, 203 at 40122" in text

    (device,) = load_text(tmp_path, text)
    assert [p.name for p in device.properties] == names
    reading = await poll_once(device)
    assert reading.quality == {}
    assert reading.values == expected_values(chain, image)


async def test_sunspec_at_50000_with_identity(serve: Serve, tmp_path: Path) -> None:
    chain, image = chain_image([1, 103, 203], base=50000, seed="far")
    identity = {0: "ACME Solar", 1: "INV-3P", 2: "4.2"}
    server = serve(image_words(image, 50000), hr_start=50000, identity=identity)
    d = await probe(server.port)
    assert d.sunspec == chain
    assert d.sunspec.base == 50000
    assert any("40000: ModbusExceptionError: exception 0x02 ILLEGAL DATA ADDRESS" in p
               for p in d.probes), d.probes
    assert d.device_identification == {"VendorName": "ACME Solar", "ProductCode": "INV-3P",
                                       "MajorMinorRevision": "4.2"}
    text = manifests(d, name="inverter-1", namespace="site")
    assert ("# FC 43 Read Device Identification: VendorName 'ACME Solar', "
            "ProductCode 'INV-3P', MajorMinorRevision '4.2'") in text
    config = list(yaml.safe_load_all(text))[1]["spec"]["protocol"]["configData"]
    assert config["sunspecChain"][0] == {"model": 1, "address": 50002}
    (device,) = load_text(tmp_path, text)
    assert device.key == "site/inverter-1"
    reading = await poll_once(device)
    assert reading.values == expected_values(chain, image)


# ------------------------------------------------------------ register profiles

IDENT, FIRMWARE = 0xFC02, 0xFC03


def profile_yaml(name: str, equals: int = 0x7E57) -> str:
    return f"""\
apiVersion: gateway.edge/v1alpha1
kind: FirmwareProfile
metadata: {{name: {name}}}
spec:
  vendor: Test Vendor
  model: {name.upper()}
  source: written for tests/test_discover.py
  identification:
    - {{register: HoldingRegister, offset: 0xFC02, dataType: uint16, equals: [{equals}]}}
  firmware:
    register: HoldingRegister
    offset: 0xFC03
    format: major.minor
    known: [">=1.0,<2.0", ">=2.0,<4.0"]
  properties:
    - {{name: voltage, register: InputRegister, offset: 0, dataType: float32, unit: V}}
    - {{name: energy, register: InputRegister, offset: 2, dataType: uint32, scale: 0.01,
       unit: kWh, firmware: ">=2.0"}}
    - {{name: setpoint, register: HoldingRegister, offset: 10, dataType: int16,
       accessMode: ReadWrite}}
"""


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "profiles"
    directory.mkdir()
    (directory / "test-meter.yaml").write_text(profile_yaml("test-meter"))
    return directory


def loaded_profiles(*dirs: Path) -> dict[str, Loaded]:
    report = Report()
    found = read_profiles(list(dirs), report)
    assert not report.problems, [str(p) for p in report.problems]
    return found


def meter_registers(ident: int, firmware: int) -> list[int]:
    """Holding registers from 0 to 0xFC03: the identification and firmware words."""
    hr = [0] * (FIRMWARE + 1)
    hr[10] = 42
    hr[IDENT], hr[FIRMWARE] = ident, firmware
    return hr


IR = [0x4366, 0x0000, 0x0001, 0xE240]  # 230.0 V; 123456 × 0.01 kWh


async def test_register_profile_and_known_firmware(serve: Serve, profiles_dir: Path,
                                                   tmp_path: Path) -> None:
    server = serve(meter_registers(0x7E57, 0x0203), ir=IR)
    profiles = loaded_profiles(profiles_dir)
    d = await probe(server.port, profiles)
    assert d.found
    assert (d.profile, d.firmware, d.firmware_unknown) == ("test-meter", "2.3", False)
    assert [(p.name, p.type.value, p.unit) for p in d.properties] == [
        ("voltage", "FLOAT", "V"), ("energy", "FLOAT", "kWh"), ("setpoint", "INT", None)]
    text = manifests(d, name=default_name(d))
    assert default_name(d) == "test-vendor-test-meter"
    config = list(yaml.safe_load_all(text))[1]["spec"]["protocol"]["configData"]
    assert (config["profile"], config["firmware"]) == ("test-meter", "2.3")
    assert "# profile test-meter, firmware 2.3" in text
    # the agent knows the profile when it is one of its profiles
    (device,) = load_text(tmp_path, text, (profiles_dir,))
    reading = await poll_once(device)
    assert reading.values == {"voltage": 230.0, "energy": 1234.56, "setpoint": 42}


async def test_register_profile_over_rtu_over_tcp(serve: Serve, profiles_dir: Path,
                                                  tmp_path: Path) -> None:
    server = serve(meter_registers(0x7E57, 0x0203), ir=IR, framing="rtu")
    profiles = loaded_profiles(profiles_dir)
    d = await probe(server.port, profiles, framing=Framing.RTU)
    assert (d.profile, d.firmware, d.endpoint_key) == ("test-meter", "2.3",
                                                       f"rtu+tcp://127.0.0.1:{server.port}")
    text = manifests(d, name="meter-rtu")
    config = list(yaml.safe_load_all(text))[1]["spec"]["protocol"]["configData"]
    assert config["communicateMode"] == "RTUoverTCP"
    (device,) = load_text(tmp_path, text, (profiles_dir,))
    assert device.endpoint == TcpEndpoint("127.0.0.1", server.port, Framing.RTU)
    reading = await poll_once(device)
    assert reading.values == {"voltage": 230.0, "energy": 1234.56, "setpoint": 42}


async def test_older_firmware_leaves_its_properties_out(serve: Serve,
                                                        profiles_dir: Path) -> None:
    server = serve(meter_registers(0x7E57, 0x0103))
    d = await probe(server.port, loaded_profiles(profiles_dir))
    assert d.firmware == "1.3"
    assert [p.name for p in d.properties] == ["voltage", "setpoint"]


async def test_firmware_outside_every_range_is_reported(serve: Serve,
                                                       profiles_dir: Path) -> None:
    server = serve(meter_registers(0x7E57, 0x0701))
    d = await probe(server.port, loaded_profiles(profiles_dir))
    assert (d.profile, d.firmware, d.firmware_unknown, d.found) == ("test-meter", "7.1",
                                                                   True, False)
    assert any("firmware 7.1" in p and "outside every known range" in p for p in d.problems)
    with pytest.raises(ValueError, match="no manifest"):
        manifests(d, name="meter")


async def test_two_matching_profiles_are_ambiguous(serve: Serve, profiles_dir: Path) -> None:
    (profiles_dir / "twin.yaml").write_text(profile_yaml("test-twin"))
    (profiles_dir / "other.yaml").write_text(profile_yaml("test-other", equals=0x7E58))
    server = serve(meter_registers(0x7E57, 0x0203))
    d = await probe(server.port, loaded_profiles(profiles_dir))
    assert d.profile is None
    assert d.ambiguous == ("test-meter", "test-twin")
    assert any("test-meter, test-twin" in p for p in d.problems)
    assert any("test-other: HoldingRegister 64514 is 32343 (0x7E57), not 32344 (0x7E58)" in p
               for p in d.probes), d.probes


async def test_profiles_that_match_alike_are_told_apart_by_firmware(
        serve: Serve, profiles_dir: Path) -> None:
    """A profile written for firmware 7 beside the shipped-style one for 1.x/2.x: the
    same identification registers, the firmware read decides."""
    newer = profile_yaml("test-meter-v7").replace('[">=1.0,<2.0", ">=2.0,<4.0"]',
                                                  '[">=7.0,<8.0"]')
    (profiles_dir / "v7.yaml").write_text(newer)
    server = serve(meter_registers(0x7E57, 0x0701))
    d = await probe(server.port, loaded_profiles(profiles_dir))
    assert (d.profile, d.firmware, d.found) == ("test-meter-v7", "7.1", True)
    old = serve(meter_registers(0x7E57, 0x0203))
    d = await probe(old.port, loaded_profiles(profiles_dir))
    assert (d.profile, d.firmware, d.found) == ("test-meter", "2.3", True)


async def test_a_named_profile_without_identification_is_taken(serve: Serve,
                                                               tmp_path: Path) -> None:
    """The shipped SDM120 profile has no identification registers: discovery cannot
    recognise the meter, but --profile says what it is."""
    server = serve([0] * 10, ir=[0x4366, 0] * 60)
    d = await probe(server.port)
    assert d.profile is None
    pool = ConnectionPool(backoff_initial=0.05, backoff_max=0.1)
    try:
        d = await discover(pool.get(TcpEndpoint("127.0.0.1", server.port)), 1, timeout=1.0,
                           named="eastron-sdm120")
    finally:
        await pool.close()
    assert (d.profile, d.found, len(d.properties)) == ("eastron-sdm120", True, 22)
    (device,) = load_text(tmp_path, manifests(d, name="meter-120"))
    reading = await poll_once(device)
    assert reading.values["voltage"] == 230.0


def test_cli_names_the_profiles_it_cannot_recognise(serve: Serve) -> None:
    server = serve([0] * 10)
    done = edge_cli("discover", "--tcp", f"127.0.0.1:{server.port}", "--timeout", "0.5")
    assert done.returncode == 1
    assert ("profiles eastron-sdm120 have no identification registers: if the device is one "
            "of them, give --profile NAME") in done.stderr


async def test_no_profile_matches(serve: Serve, profiles_dir: Path) -> None:
    server = serve([0] * 100)  # 0xFC02 answers ILLEGAL DATA ADDRESS
    d = await probe(server.port, loaded_profiles(profiles_dir))
    assert (d.profile, d.found, d.ambiguous) == (None, False, ())
    assert any("test-meter: HoldingRegister 64514: exception 0x02" in p for p in d.probes)
    # and with the shipped profiles: no SunSpec marker, nothing else matches
    d = await probe(server.port)
    assert d.profile is None
    assert any('no SunSpec marker "SunS"' in p for p in d.probes)


async def test_unreachable_endpoint() -> None:
    d = await probe(free_port(), timeout=0.3)
    assert (d.profile, d.answered) == (None, False)
    assert any("cannot reach tcp://127.0.0.1:" in p for p in d.problems), d.problems


async def test_a_sunspec_chain_without_a_decoded_model_gives_no_manifest(serve: Serve) -> None:
    """The marker, one model edge does not decode (120, nameplate), the end marker."""
    hr = [0x5375, 0x6E53, 120, 2, 0, 0, 0xFFFF, 0]
    server = serve(hr, hr_start=40000)
    d = await probe(server.port)
    assert (d.profile, d.found, d.answered) == (None, False, True)
    assert "SunSpec chain at 40000 has no model profile sunspec decodes: no manifest" in (
        d.problems)


def test_cli_says_when_the_device_gives_no_answer() -> None:
    done = edge_cli("discover", "--tcp", f"127.0.0.1:{free_port()}", "--timeout", "0.3")
    assert done.returncode == 1
    assert "the device gave no answer" in done.stderr
    assert "no profile matches" not in done.stderr


# ---------------------------------------------------------------------- CLI


def test_cli_sunspec_end_to_end(serve: Serve, tmp_path: Path) -> None:
    chain, image = chain_image([1, 103, 203], seed="cli")
    server = serve(image_words(image, 0), identity={0: "ACME", 1: "X1", 2: "1.0"})
    out = edge_cli("discover", "--tcp", f"127.0.0.1:{server.port}", cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"probed tcp://127.0.0.1:{server.port} unit 1:" in out.stderr
    assert 'SunSpec: marker "SunS" at 40000' in out.stderr
    assert "VendorName 'ACME'" in out.stderr
    assert "found: profile sunspec" in out.stderr
    load_text(tmp_path, out.stdout)
    docs = list(yaml.safe_load_all(out.stdout))
    assert docs[1]["spec"]["protocol"]["configData"]["sunspecChain"] == [
        {"model": m.model_id, "address": m.address} for m in chain.models]

    written = tmp_path / "out.yaml"
    out = edge_cli("discover", "--tcp", f"127.0.0.1:{server.port}", "--name", "inv",
                   "-o", str(written), cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert list(yaml.safe_load_all(written.read_text()))[1]["metadata"]["name"] == "inv"


def test_cli_register_profile(serve: Serve, profiles_dir: Path) -> None:
    server = serve(meter_registers(0x7E57, 0x0203))
    out = edge_cli("discover", "--tcp", f"127.0.0.1:{server.port}", "--profiles",
                   str(profiles_dir), "--timeout", "0.5", cwd=REPO)
    assert out.returncode == 0, out.stderr
    config = list(yaml.safe_load_all(out.stdout))[1]["spec"]["protocol"]["configData"]
    assert (config["profile"], config["firmware"]) == ("test-meter", "2.3")
    assert "found: profile test-meter, firmware 2.3, 3 properties" in out.stderr


def test_cli_unknown_firmware_exits_1_without_manifest(serve: Serve,
                                                       profiles_dir: Path) -> None:
    server = serve(meter_registers(0x7E57, 0x0701))
    out = edge_cli("discover", "--tcp", f"127.0.0.1:{server.port}", "--profiles",
                   str(profiles_dir), cwd=REPO)
    assert out.returncode == 1, out.stderr
    assert out.stdout == ""
    assert "firmware 7.1" in out.stderr
    assert "outside every known range" in out.stderr
    assert "error: profile test-meter matches, but its firmware 7.1" in out.stderr


def test_cli_nothing_matches_exits_1(serve: Serve) -> None:
    server = serve([0] * 100, identity={0: "Nobody", 1: "N-1", 2: "0.1"})
    out = edge_cli("discover", "--tcp", f"127.0.0.1:{server.port}", cwd=REPO)
    assert out.returncode == 1, out.stderr
    assert out.stdout == ""
    assert ("error: no profile matches this device (FC 43 identification: VendorName "
            "'Nobody', ProductCode 'N-1', MajorMinorRevision '0.1')") in out.stderr


def test_cli_serial_sunspec(serve: Serve, tmp_path: Path) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed: no pty pair")
    pair = start_pty_pair(tmp_path)
    try:
        chain, image = chain_image([1, 203], base=0, seed="rs485")
        serve(image_words(image, 0), serial_port=pair.b)
        out = edge_cli("discover", "--serial", pair.a, "--baud", "19200", "--name", "meter",
                       cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "probed serial://" in out.stderr
        config = list(yaml.safe_load_all(out.stdout))[1]["spec"]["protocol"]["configData"]
        assert {k: config[k] for k in ("communicateMode", "serialPort", "baudRate", "parity",
                                       "dataBits", "stopBits", "slaveID")} == {
            "communicateMode": "RTU", "serialPort": pair.a, "baudRate": 19200, "parity": "N",
            "dataBits": 8, "stopBits": 1, "slaveID": 1}
        assert config["sunspecChain"] == [{"model": 1, "address": 2},
                                          {"model": 203, "address": 70}]
        assert [(m.model_id, m.address) for m in chain.models] == [(1, 2), (203, 70)]
        load_text(tmp_path, out.stdout)
    finally:
        pair.stop()


@pytest.mark.parametrize("args", [
    [],
    ["--tcp", "127.0.0.1", "--serial", "/dev/null"],
    ["--serial", "/dev/null", "--rtu-over-tcp"],
    ["--tcp", "127.0.0.1", "--baud", "19200"],
    ["--tcp", "127.0.0.1:99999"],
    ["--tcp", "127.0.0.1", "--name", "Not_A_Label"],
    ["--serial", "/dev/null", "--unit", "0"],
])
def test_cli_usage_errors_exit_2(args: list[str]) -> None:
    out = edge_cli("discover", *args, cwd=REPO)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
