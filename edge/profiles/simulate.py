"""``edge simulate --profile``: a device that answers as a profile says (demo, tests).

A register profile (e.g. ``eastron-sdm630``) becomes a Device of that profile and
firmware, made through the manifest path (so what is served is what an agent using the
profile reads), with its identification registers holding the first value they match,
its firmware register holding the firmware, and plausible animated values
(:mod:`edge.modbus.simulator`). A SunSpec profile becomes the register image of a model
chain (:func:`edge.profiles.sunspec.chain_image`) after the marker at ``base``. Both
answer Read Device Identification (FC 43/14) with the vendor, model and firmware.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from edge.config.errors import ConfigError
from edge.config.kubeedge import resolve_documents
from edge.config.model import DeviceSpec, Endpoint, Framing, SerialEndpoint, Table
from edge.config.sources import Document, Report
from edge.modbus.codec import encode
from edge.modbus.simulator import Constants
from edge.profiles.profile import (
    Firmware,
    Loaded,
    Register,
    known_range,
    parse_version,
    shipped,
)
from edge.profiles.sunspec import Chain, chain_image

DEFAULT_SUNSPEC_MODELS = (1, 103, 203)
"""The chain served when none is given: common, a three-phase inverter, a meter."""


@dataclass(frozen=True, slots=True)
class SimulatedProfile:
    """What to serve: the device (its properties animated), the registers that hold
    still (identification, firmware, a SunSpec image), the FC 43 objects, and the
    firmware or chain it stands for."""

    device: DeviceSpec
    constants: Constants
    identification: dict[int, str]
    firmware: str | None
    chain: Chain | None


def _words(register: Register, value: float | str) -> list[int]:
    return [int(w) for w in encode(register.visitor, value)]


def default_firmware(firmware: Firmware) -> str:
    """The newest version a ``known`` range starts at (``>=2.0`` → ``2.0``).

    Raises:
        ValueError: no range has a lower bound.
    """
    starts = [Version(s.version) for text in firmware.known for s in SpecifierSet(text)
              if s.operator in (">=", "==", "~=")]
    if not starts:
        raise ValueError("the profile's firmware ranges have no lower bound: give --firmware")
    return str(max(starts))


def _firmware_value(firmware: Firmware, text: str) -> int | str:
    """The register value that reads back as version ``text`` in ``firmware.format``."""
    if firmware.format == "string":
        return text
    version = parse_version(text)
    if version is None:
        raise ValueError(f"firmware {text!r} is not a version")
    if firmware.format == "decimal":
        if len(version.release) != 1:
            raise ValueError(f"firmware {text!r}: this profile reads the version as one number")
        return version.release[0]
    if len(version.release) > 2:
        raise ValueError(f"firmware {text!r}: this profile reads the version as major.minor")
    major, minor = (*version.release, 0)[:2]
    if major > 255 or minor > 255:
        raise ValueError(f"firmware {text!r}: major and minor must be 0..255 (one byte each)")
    return major << 8 | minor


def _connection_config(endpoint: Endpoint, unit_id: int) -> dict[str, Any]:
    if isinstance(endpoint, SerialEndpoint):
        return {"communicateMode": "RTU", "serialPort": endpoint.port,
                "baudRate": endpoint.baudrate, "parity": endpoint.parity,
                "dataBits": endpoint.bytesize, "stopBits": endpoint.stopbits,
                "slaveID": unit_id}
    mode = "TCP" if endpoint.framing is Framing.MBAP else "RTUoverTCP"
    return {"communicateMode": mode, "ip": endpoint.host, "port": endpoint.port,
            "slaveID": unit_id}


def _register_device(profile: Loaded, endpoint: Endpoint, unit_id: int,
                     firmware: str | None) -> DeviceSpec:
    """The Device of ``profile`` at ``endpoint``, resolved as a manifest would be."""
    name = f"sim-{profile.doc.name}"
    config = {**_connection_config(endpoint, unit_id), "profile": profile.doc.name}
    if firmware is not None:
        config["firmware"] = firmware
    docs = [
        {"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
         "metadata": {"name": name, "namespace": "default"}, "spec": {"protocol": "modbus"}},
        {"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"deviceModelRef": {"name": name},
                  "protocol": {"protocolName": "modbus", "configData": config}}},
    ]
    report = Report()
    source = f"edge simulate --profile {profile.doc.name}"
    found = resolve_documents([Document(source, i + 1, d) for i, d in enumerate(docs)],
                              node=None, report=report)
    if report.has_errors:
        raise ConfigError(report.problems)
    (device,) = found.devices
    return device


def _sunspec(profile: Loaded, models: Sequence[int], base: int
             ) -> tuple[Constants, dict[int, str], Chain]:
    chain, image = chain_image(models, base=base, seed=profile.doc.name)
    return ({Table.HOLDING_REGISTER: image},
            {0: "edge", 1: "simulated SunSpec device", 2: "1.0.0"}, chain)


def _registers(profile: Loaded, firmware: str | None) -> tuple[Constants, dict[int, str]]:
    """The identification and firmware registers of ``profile``'s device (firmware:
    as reported, already chosen), and its FC 43 objects."""
    spec = profile.doc.spec
    constants: dict[Table, dict[int, int]] = {}
    if spec.firmware is not None and firmware is not None:
        words = _words(spec.firmware, _firmware_value(spec.firmware, firmware))
        constants.setdefault(spec.firmware.table, {}).update(
            enumerate(words, start=spec.firmware.offset))
    for identify in spec.identification:
        words = _words(identify, identify.equals[0])
        constants.setdefault(identify.table, {}).update(enumerate(words, start=identify.offset))
    return constants, {0: spec.vendor, 1: spec.model, 2: firmware or "1.0"}


def _lookup(name: str, profiles: Mapping[str, Loaded] | None) -> Loaded:
    known = shipped() if profiles is None else profiles
    profile = known.get(name)
    if profile is None:
        raise KeyError(f"profile {name!r} is not known; profiles: {', '.join(sorted(known))}")
    return profile


def simulated_profile(
    name: str, *, endpoint: Endpoint, unit_id: int = 1, firmware: str | None = None,
    models: Sequence[int] = DEFAULT_SUNSPEC_MODELS, base: int = 40000,
    profiles: Mapping[str, Loaded] | None = None,
) -> SimulatedProfile:
    """The device to serve for profile ``name`` (firmware: the given one, else the
    newest a known range starts at; SunSpec: ``models`` after the marker at ``base``).
    A firmware outside every known range is reported by the device with the newest
    map the profile knows: a device newer than its profile, for trying discovery.

    Raises:
        KeyError: no such profile (the message lists them).
        ValueError: the firmware cannot be written as the profile reads it, or a
            SunSpec model is not supported.
        ConfigError: the profile does not give a valid Device.
    """
    profile = _lookup(name, profiles)
    spec = profile.doc.spec
    if spec.sunspec is not None:
        constants, objects, chain = _sunspec(profile, models, base)
        device = DeviceSpec(namespace="default", name=f"sim-{name}", model=name,
                            endpoint=endpoint, unit_id=unit_id, properties=())
        return SimulatedProfile(device, constants, objects, None, chain)
    map_firmware = firmware
    if spec.firmware is not None:
        newest = default_firmware(spec.firmware)
        firmware = map_firmware = firmware or newest
        version = parse_version(firmware)
        if version is None or known_range(profile.doc, version) is None:
            map_firmware = newest  # a device newer than its profile: the newest map known
    constants, objects = _registers(profile, firmware)
    device = _register_device(profile, endpoint, unit_id, map_firmware)
    return SimulatedProfile(device, constants, objects, firmware, None)


def profile_registers(
    device: DeviceSpec, profiles: Mapping[str, Loaded] | None = None
) -> tuple[Constants, dict[int, str]] | None:
    """For a manifest's device that names a profile (``device.profile``): the registers
    its profile says hold still (identification, firmware; a SunSpec device's whole
    chain image, as :func:`simulated_profile` serves it) and its FC 43 objects; None
    for a device without profile.

    Raises:
        KeyError: the profile is not among ``profiles``.
        ValueError: the SunSpec chain is not contiguous after its marker (it cannot be
            served as one image), or the firmware cannot be written.
    """
    ref = device.profile
    if ref is None:
        return None
    profile = _lookup(ref.name, profiles)
    if not ref.sunspec_chain:
        return _registers(profile, ref.firmware)
    models = [m for m, _ in ref.sunspec_chain]
    constants, objects, chain = _sunspec(profile, models, ref.sunspec_chain[0][1] - 2)
    laid = tuple((m.model_id, m.address) for m in chain.models)
    if laid != ref.sunspec_chain:
        raise ValueError(f"{device.key}: its sunspecChain {list(ref.sunspec_chain)} is not one "
                         f"model after the other ({list(laid)}); it cannot be simulated")
    return constants, objects
