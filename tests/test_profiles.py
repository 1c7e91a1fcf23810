"""Firmware profiles: the format (against its JSON Schema), the shipped profiles, and
their use from manifests (firmware ranges, overrides, SunSpec chains), with errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support import REPO
from test_config import TCP, device_doc, model_doc, prop

from edge.config.errors import ConfigError
from edge.config.load import load_manifests
from edge.config.model import RawType, Table, ValueType
from edge.config.sources import Report
from edge.profiles import sunspec
from edge.profiles.profile import (
    SHIPPED,
    json_schema,
    read_profile,
    read_profiles,
    shipped,
    with_local,
)

Doc = dict[str, Any]
SCHEMA = SHIPPED / "profile.schema.json"
SHIPPED_FILES = sorted(SHIPPED.rglob("*.yaml"))


def profile(name: str = "acme-m1", **spec: Any) -> Doc:
    """A profile document: an Acme M1 meter with firmware 1.x and 2.x maps."""
    body: Doc = {
        "vendor": "Acme", "model": "M1", "source": "the Acme M1 manual, table 4",
        "defaults": {"register": "InputRegister", "dataType": "float32"},
        "firmware": {"register": "HoldingRegister", "offset": 0xFC03, "format": "major.minor",
                     "known": [">=1.0,<2.0", ">=2.0,<3.0"]},
        "properties": [
            {"name": "voltage", "offset": 0, "unit": "V"},
            {"name": "energy", "offset": 0x48, "unit": "kWh"},
            {"name": "energy_l1", "offset": 0x15A, "unit": "kWh", "firmware": ">=2.0"},
            {"name": "power", "register": "HoldingRegister", "offset": 100,
             "dataType": "int16", "scaleFactor": 101, "unit": "W"},
        ],
    }
    return {"apiVersion": "gateway.edge/v1alpha1", "kind": "FirmwareProfile",
            "metadata": {"name": name}, "spec": {**body, **spec}}


def write_profile(directory: Path, doc: Doc, file: str = "acme.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def problems(path: Path) -> list[str]:
    report = Report()
    read_profile(path, report)
    return [f"{p.field}: {p.message}" for p in report.problems]


# --- the format ----------------------------------------------------------------------


def test_committed_schema_is_the_format() -> None:
    """Regenerate with: edge profiles schema > firmware_profiles/profile.schema.json"""
    assert json.loads(SCHEMA.read_text()) == json_schema()


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_every_shipped_profile_validates_and_loads(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(doc)
    assert problems(path) == []


def test_shipped_profiles_are_found_by_name() -> None:
    names = set(shipped())
    assert {"sunspec"} <= names
    assert len(names) == len(SHIPPED_FILES)


def test_the_sunspec_profile_decodes_the_supported_models() -> None:
    spec = shipped()["sunspec"].doc.spec
    assert spec.sunspec is not None
    assert tuple(spec.sunspec.models) == sunspec.SUPPORTED_MODELS


def test_the_schema_rejects_what_the_loader_rejects(tmp_path: Path) -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    bad = profile()
    bad["spec"]["properties"][0]["ofset"] = 3
    assert not validator.is_valid(bad)
    path = write_profile(tmp_path, bad)
    assert problems(path)[0].startswith("spec.properties[0].ofset: unknown key 'ofset'")


@pytest.mark.parametrize(("change", "expected"), [
    ({"properties": [{"name": "v", "offset": 0, "firmware": "two"}]},
     "spec.properties[0].firmware: must be PEP 440 version specifiers, e.g. '>=2.0,<3' "
     "(got 'two')"),
    ({"firmware": None},
     "spec: properties energy_l1 name a firmware range, but the profile has no firmware "
     "section saying how to read the version"),
    ({"properties": [{"name": "v", "offset": 0}, {"name": "v", "offset": 2}]},
     "spec: property names must be unique; twice: v"),
    ({"sunspec": {"models": [1]}},
     "spec: a profile has either properties or sunspec models, not both or neither"),
    ({"properties": [{"name": "v", "offset": 0, "limit": 1}]},
     "spec.properties[0].limit: limit 1 does not fit float32 (2 registers)"),
    ({"properties": [{"name": "v", "offset": 0, "dataType": "int16", "register":
                      "HoldingRegister", "scaleFactor": 200}]},
     "spec.properties[0].scaleFactor: scale factor register 200 is 201 registers from the "
     "property's end: more than one read of HoldingRegister carries (125)"),
    ({"identification": [{"register": "HoldingRegister", "offset": 65535,
                           "dataType": "uint32", "equals": [1]}]},
     "spec.identification[0].offset: offset 65535 + limit 2 runs past the last address "
     "(65535) of HoldingRegister"),
    ({"identification": [{"register": "HoldingRegister", "offset": 0xFC02,
                           "equals": ["0x70"]}]},
     "spec.identification[0].equals[0]: '0x70' can never be read from uint16: give an "
     "integer 0..65535"),
    ({"identification": [{"register": "HoldingRegister", "offset": 0xFC02,
                           "equals": [70000]}]},
     "spec.identification[0].equals[0]: 70000 can never be read from uint16: give an "
     "integer 0..65535"),
    ({"identification": [{"register": "HoldingRegister", "offset": 0, "dataType": "string",
                           "equals": ["SDM630"]}]},
     "spec.identification[0].limit: a string register needs limit (how many registers it "
     "spans)"),
    ({"firmware": {"register": "HoldingRegister", "offset": 0xFC03, "dataType": "uint32",
                   "format": "major.minor", "known": [">=1.0"]}},
     "spec.firmware.format: format major.minor reads uint16, not uint32"),
    ({"properties": [{"name": "v", "offset": True}]},
     "spec.properties[0].offset: Input should be a valid integer (got True)"),
])  # fmt: skip
def test_profile_errors_name_the_file_and_field(tmp_path: Path, change: Doc,
                                                expected: str) -> None:
    doc = profile()
    doc["spec"].update(change)
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    path = write_profile(tmp_path, doc)
    report = Report()
    assert read_profile(path, report) is None or report.has_errors
    (problem,) = [p for p in report.problems if p.severity == "error"]
    assert problem.file == str(path)
    assert f"{problem.field}: {problem.message}" == expected


def test_the_same_profile_name_twice_is_an_error(tmp_path: Path) -> None:
    write_profile(tmp_path / "a", profile())
    second = write_profile(tmp_path / "b", profile())
    report = Report()
    found = read_profiles([tmp_path / "a", tmp_path / "b"], report)
    assert set(found) == {"acme-m1"}
    (problem,) = report.problems
    assert problem.file == str(second)
    assert problem.message == f"profile acme-m1 is also defined in {tmp_path / 'a' / 'acme.yaml'}"


def test_edge_profiles_cli(tmp_path: Path) -> None:
    write_profile(tmp_path, profile())
    edge = [sys.executable, "-m", "edge", "profiles"]
    listed = subprocess.run([*edge, "list", "--profiles", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert "acme-m1  Acme M1  firmware >=1.0,<2.0; >=2.0,<3.0  4 properties" in listed
    assert "sunspec  SunSpec Alliance" in listed
    shown = subprocess.run([*edge, "show", "acme-m1", "--firmware", "1.4", "--profiles",
                            str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    assert "voltage" in shown
    assert "energy_l1" not in shown
    bad = write_profile(tmp_path / "bad", {**profile(), "kind": "Profile"})
    checked = subprocess.run([*edge, "check", str(bad)], cwd=REPO, capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 2
    assert "kind: Input should be 'FirmwareProfile'" in checked.stderr


# --- use from manifests --------------------------------------------------------------


def load(tmp_path: Path, *docs: Doc) -> Any:
    (tmp_path / "m").mkdir(exist_ok=True)
    path = tmp_path / "m" / "m.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return load_manifests([path], profile_dirs=[tmp_path / "profiles"])


def errors(tmp_path: Path, *docs: Doc) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, *docs)
    return [f"{p.field}: {p.message}" for p in raised.value.problems if p.severity == "error"]


def acme(**config: Any) -> Doc:
    return device_doc(config={**TCP, "profile": "acme-m1", **config}, properties=[])


def empty_model() -> Doc:
    return model_doc(name="meter-model", properties=[])


@pytest.fixture
def acme_dir(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "profiles", profile())


def device_props(device: Any) -> dict[str, Any]:
    return {p.name: p for p in device.properties}


@pytest.mark.usefixtures("acme_dir")
def test_a_model_without_properties_gets_the_profiles_for_the_firmware(tmp_path: Path) -> None:
    (old,), _ = load(tmp_path, {**empty_model(), "spec": {"protocol": "modbus"}},
                     acme(firmware="1.4"))
    assert list(device_props(old)) == ["voltage", "energy", "power"]
    (new,), _ = load(tmp_path, {**empty_model(), "spec": {"protocol": "modbus"}},
                     acme(firmware="2.3"))
    props = device_props(new)
    assert list(props) == ["voltage", "energy", "energy_l1", "power"]
    assert props["energy_l1"].visitor.offset == 0x15A
    assert props["energy_l1"].visitor.table is Table.INPUT_REGISTER
    assert props["energy_l1"].visitor.raw_type is RawType.FLOAT32
    assert props["energy_l1"].unit == "kWh"
    assert props["power"].visitor.scale_factor == 101
    assert props["power"].value_type is ValueType.FLOAT


def model_with(*names: str, **extra: Any) -> Doc:
    return model_doc(*({"name": n, **extra.get(n, {})} for n in names))


@pytest.mark.usefixtures("acme_dir")
def test_a_model_names_properties_and_a_device_overrides_a_visitor(tmp_path: Path) -> None:
    device = device_doc(
        prop("energy", scale=1000, offset=0x4A),
        config={**TCP, "profile": "acme-m1", "firmware": "2.0"})
    (loaded,), warnings = load(tmp_path, model_with("voltage", "energy"), device)
    assert warnings == ()
    props = device_props(loaded)
    assert list(props) == ["voltage", "energy"]
    assert props["energy"].visitor.scale == 1000
    assert props["energy"].visitor.offset == 0x4A
    assert props["energy"].visitor.raw_type is RawType.FLOAT32  # from the profile
    bad = device_doc(prop("energy", offset=70000),
                     config={**TCP, "profile": "acme-m1", "firmware": "2.0"})
    assert errors(tmp_path, model_with("voltage", "energy"), bad) == [
        "spec.properties[0].visitors.configData.offset: offset 70000 is out of range 0..65535"]


@pytest.mark.usefixtures("acme_dir")
def test_an_override_that_breaks_a_visitor_is_blamed_on_the_device(tmp_path: Path) -> None:
    device = device_doc(prop("voltage", dataType="uint16"),
                        config={**TCP, "profile": "acme-m1", "firmware": "2.0"})
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, {**empty_model(), "spec": {"protocol": "modbus"}}, device)
    (problem,) = raised.value.problems
    assert problem.file == str(tmp_path / "m" / "m.yaml")
    assert (problem.field, problem.message) == (
        "spec.properties[0].visitors.configData.limit", "limit 2 does not fit uint16 (1 register)")


@pytest.mark.usefixtures("acme_dir")
def test_a_device_entry_for_a_property_of_other_firmware(tmp_path: Path) -> None:
    device = device_doc(prop("energy_l1", scale=2),
                        config={**TCP, "profile": "acme-m1", "firmware": "1.2"})
    assert errors(tmp_path, {**empty_model(), "spec": {"protocol": "modbus"}}, device) == [
        "spec.properties[0]: property 'energy_l1' of profile acme-m1 exists in firmware >=2.0 "
        "only; this device's firmware is 1.2"]


def test_profiles_of_ones_own_are_directories_and_a_shipped_name_is_taken(
        tmp_path: Path) -> None:
    mine = write_profile(tmp_path / "mine", profile(name="sunspec"), file="own.yml")
    report = Report()
    found = with_local([tmp_path / "mine"], report)
    assert found is not None
    assert found["sunspec"].file == str(SHIPPED / "sunspec.yaml")
    (problem,) = report.problems
    assert (problem.file, problem.message) == (
        str(mine), f"profile sunspec is also defined in {SHIPPED / 'sunspec.yaml'}")
    agent = tmp_path / "edge.yaml"
    agent.write_text(f"node: gw\nprofiles: [{mine}]\n")
    done = subprocess.run([sys.executable, "-m", "edge", "check", "-c", str(agent)], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert f"profiles[0]: {mine}: is not a directory" in done.stderr


@pytest.mark.usefixtures("acme_dir")
@pytest.mark.parametrize(("config", "model", "expected"), [
    ({"firmware": "7.0"}, None,
     "spec.protocol.configData.firmware: firmware 7.0 is outside every range profile acme-m1 "
     "knows (>=1.0,<2.0; >=2.0,<3.0): its register map is not guessed; check the device "
     "(edge discover) or write a profile for this firmware"),
    ({}, None,
     "spec.protocol.configData.firmware: profile acme-m1's register map depends on the "
     "firmware (properties energy_l1 exist in some firmware only): give the device's "
     "firmware (configData firmware, as edge discover prints it)"),
    ({"firmware": 2.10}, None,
     "spec.protocol.configData.firmware: firmware 2.1 is a number in YAML, which drops "
     "trailing zeros (2.10 reads as 2.1): quote the version as the device reports it, "
     "e.g. firmware: \"2.10\""),
    ({"firmware": "new"}, None,
     "spec.protocol.configData.firmware: firmware 'new' is not a version (e.g. 2.01, 1.3.7)"),
    ({"profile": "acme-m2", "firmware": "1.0"}, None,
     "spec.protocol.configData.profile: profile 'acme-m2' is not known; profiles: acme-m1, "
     "eastron-sdm120, eastron-sdm630, sunspec"),
    ({"firmware": "1.2", "sunspecChain": [{"model": 1, "address": 40002}]}, None,
     "spec.protocol.configData.sunspecChain: sunspecChain is only used with a SunSpec "
     "profile, not acme-m1"),
    ({"firmware": "1.9"}, ["energy_l1"],
     "spec.properties[0]: property 'energy_l1' of profile acme-m1 exists in firmware >=2.0 "
     "only; this device's firmware is 1.9"),
    ({"firmware": "2.9"}, ["volts"],
     "spec.properties[0]: property 'volts' is not in profile acme-m1 and has no visitor of "
     "its own; the profile has: voltage, energy, energy_l1, power"),
])  # fmt: skip
def test_profile_use_errors(tmp_path: Path, config: Doc, model: list[str] | None,
                            expected: str) -> None:
    model_doc_ = model_with(*model) if model else {**empty_model(),
                                                   "spec": {"protocol": "modbus"}}
    assert errors(tmp_path, model_doc_, acme(**config)) == [expected]


def test_firmware_without_a_profile_is_an_error(tmp_path: Path) -> None:
    assert errors(tmp_path, model_doc(), device_doc(config={**TCP, "firmware": "1.0"})) == [
        "spec.protocol.configData.firmware: firmware is only used with profile"]


# --- SunSpec ---------------------------------------------------------------------------


def sunspec_device(chain: Any) -> Doc:
    config: Doc = {**TCP, "profile": "sunspec"}
    if chain is not None:
        config["sunspecChain"] = chain
    return device_doc(config=config, properties=[])


def test_a_sunspec_device_gets_the_points_of_its_chain(tmp_path: Path) -> None:
    chain = [{"model": 1, "address": 40002}, {"model": 103, "address": 40070}]
    (device,), _ = load(tmp_path, model_with("inverter_three_phase.W", "common.Mn"),
                        sunspec_device(chain))
    props = device_props(device)
    assert props["inverter_three_phase.W"].visitor.offset == 40084
    assert props["inverter_three_phase.W"].visitor.scale_factor == 40085
    assert props["inverter_three_phase.W"].visitor.missing == 0x8000
    assert props["common.Mn"].visitor.raw_type is RawType.STRING
    assert props["common.Mn"].visitor.limit == 16
    (everything,), _ = load(tmp_path, {**empty_model(), "spec": {"protocol": "modbus"}},
                            sunspec_device(chain))
    expected = {p["name"] for p in sunspec.chain_properties(sunspec.Chain(40000, (
        sunspec.ChainModel(1, 40002, 66), sunspec.ChainModel(103, 40070, 50))))}
    assert set(device_props(everything)) == expected


@pytest.mark.parametrize(("chain", "expected"), [
    (None, "spec.protocol.configData.sunspecChain: profile sunspec needs the device's "
           "SunSpec models: sunspecChain, a list of {model, address} as edge discover prints it"),
    ([{"model": 160, "address": 40002}],
     "spec.protocol.configData.sunspecChain[0].model: model 160 is not decoded by this "
     "profile; it decodes 1, 101, 102, 103, 111, 112, 113, 201, 202, 203, 204"),
    ([{"model": 1, "address": 40002}, {"model": 103, "address": 40060}],
     "spec.protocol.configData.sunspecChain[1].address: model 103 at 40060 overlaps the "
     "model before it, which ends at 40069"),
    ([{"model": 203, "address": 65500}],
     "spec.protocol.configData.sunspecChain[0].address: model 203 (107 registers) at 65500 "
     "runs past the last address 65535"),
    ([{"model": 1, "adress": 40002}],
     "spec.protocol.configData.sunspecChain[0].adress: unknown key 'adress'; accepted: "
     "model, address"),
    ([{"model": True, "address": 40002}],
     "spec.protocol.configData.sunspecChain[0].model: Input should be a valid integer "
     "(got True)"),
    ("1@40002", "spec.protocol.configData.sunspecChain: sunspecChain must be a non-empty "
                "list of {model, address}"),
])  # fmt: skip
def test_sunspec_chain_errors(tmp_path: Path, chain: Any, expected: str) -> None:
    found = errors(tmp_path, {**empty_model(), "spec": {"protocol": "modbus"}},
                   sunspec_device(chain))
    assert expected in found
