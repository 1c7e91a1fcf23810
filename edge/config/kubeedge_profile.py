"""A Device (or its DeviceModel) that names a firmware profile (:mod:`edge.profiles`).

``protocol.configData`` of the Device, or the DeviceModel's ``protocolConfigData``
(the Device's wins), may carry:

* ``profile``: the profile's ``metadata.name`` (e.g. ``eastron-sdm630``);
* ``firmware``: the device's firmware version as ``edge discover`` prints it; checked
  against the profile's known ranges, and it selects the properties of that firmware;
* ``sunspecChain``: for a SunSpec profile, the device's models as discovered, a list
  of ``{model: <id>, address: <address of its ID register>}``.

The profile fills in the visitors: a DeviceModel without properties gets all of the
profile's (for that firmware); one with properties gets the profile's visitor for each
property it names, under the model's own visitor keys and the Device's (so a device
can override any key, e.g. ``scale`` or ``offset``, and that is checked like any
visitor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from edge.config.kubeedge_docs import Config, Entry, ModelDoc, ModelProperty
from edge.config.model import ProfileRef
from edge.config.sources import Report, Where, join_field
from edge.profiles.profile import (
    KIND,
    Loaded,
    applies,
    firmware_dependent,
    known_range,
    model_property,
    parse_version,
    shipped,
    with_properties,
)
from edge.profiles.sunspec import Chain, ChainModel, chain_properties, model_definition


@dataclass(frozen=True, slots=True)
class ProfileUse:
    """The profile a device uses: its properties for the device's firmware by name,
    and the names left out because they belong to other firmware (with the range)."""

    profile: Loaded
    firmware: str | None
    properties: dict[str, ModelProperty]
    other_firmware: dict[str, str]
    chain: Chain | None = None

    @property
    def ref(self) -> ProfileRef:
        """What the device keeps of it (:class:`edge.config.model.ProfileRef`)."""
        chain = tuple((m.model_id, m.address) for m in self.chain.models) if self.chain else ()
        return ProfileRef(self.profile.doc.name, self.firmware, chain)


def _entry_error(entry: Entry, report: Report, message: str) -> None:
    report.error(entry.where, entry.field, message)


def _firmware(profile: Loaded, entry: Entry | None, report: Report) -> tuple[bool, str | None]:
    """(ok, the firmware version text) after checking it against the known ranges."""
    doc = profile.doc
    firmware = doc.spec.firmware
    if entry is None:
        return True, None
    if isinstance(entry.value, float):
        _entry_error(entry, report, (
            f"firmware {entry.value!r} is a number in YAML, which drops trailing zeros "
            "(2.10 reads as 2.1): quote the version as the device reports it, e.g. "
            'firmware: "2.10"'))
        return False, None
    text = str(entry.value)
    version = parse_version(text)
    if version is None:
        _entry_error(entry, report, f"firmware {text!r} is not a version (e.g. 2.01, 1.3.7)")
        return False, None
    if firmware is None:
        report.warning(entry.where, entry.field,
                       f"profile {doc.name} has one register map for every firmware; "
                       f"firmware {text} is not checked")
        return True, text
    if known_range(doc, version) is None:
        _entry_error(entry, report, (
            f"firmware {text} is outside every range profile {doc.name} knows "
            f"({'; '.join(firmware.known)}): its register map is not guessed; check "
            "the device (edge discover) or write a profile for this firmware"))
        return False, None
    return True, text


def _named_profile(
    config: Config, where: Where, field: str, report: Report, known: Mapping[str, Loaded]
) -> tuple[Loaded, Chain | None] | None:
    """The profile ``config`` names, a SunSpec one with its properties made from the
    device's ``sunspecChain``; None when there is none or it is wrong (reported)."""
    entry = config.get("profile")
    if entry is None:
        for key in ("firmware", "sunspecChain"):
            if key in config:
                _entry_error(config[key], report, f"{key} is only used with profile")
        return None
    profile = known.get(str(entry.value))
    if profile is None:
        _entry_error(entry, report, f"profile {entry.value!r} is not known; profiles: "
                     f"{', '.join(sorted(known)) or 'none'}")
        return None
    if profile.doc.spec.sunspec is not None:
        chain = _sunspec_chain(profile, config.get("sunspecChain"), where, field, report)
        if chain is None:
            return None
        return with_properties(profile, chain_properties(chain),
                               f"FirmwareProfile {profile.doc.name} for {where.obj}"), chain
    if "sunspecChain" in config:
        _entry_error(config["sunspecChain"], report,
                     f"sunspecChain is only used with a SunSpec profile, not {profile.doc.name}")
        return None
    return profile, None


def use_profile(
    config: Config, where: Where, field: str, report: Report,
    profiles: Mapping[str, Loaded] | None = None,
) -> ProfileUse | None:
    """The profile ``config`` names with the properties of the device's firmware; None
    when it names none or when anything is wrong (reported). ``profiles`` defaults to
    the shipped ones."""
    named = _named_profile(config, where, field, report,
                           shipped() if profiles is None else profiles)
    if named is None:
        return None
    profile, chain = named
    doc = profile.doc
    firmware_entry = config.get("firmware")
    if firmware_entry is None and firmware_dependent(doc):
        report.error(where, join_field(field, "firmware"), (
            f"profile {doc.name}'s register map depends on the firmware (properties "
            f"{', '.join(firmware_dependent(doc))} exist in some firmware only): give the "
            "device's firmware (configData firmware, as edge discover prints it)"))
        return None
    ok, text = _firmware(profile, firmware_entry, report)
    if not ok:
        return None
    version = parse_version(text) if text else None
    chosen: dict[str, ModelProperty] = {}
    other: dict[str, str] = {}
    for index, prop in enumerate(doc.spec.properties):
        if applies(prop, version):
            chosen[prop.name] = model_property(profile, index)
        else:
            other[prop.name] = prop.firmware or ""
    return ProfileUse(profile, text, chosen, other, chain)


class _ChainItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: StrictInt = Field(ge=1, le=65534)
    address: StrictInt = Field(ge=0, le=65533)


def _chain_model(
    item: object, decoded: Sequence[int], end: int, where: Where, field: str, report: Report
) -> ChainModel | None:
    """One ``{model, address}`` of a chain whose previous model ends before ``end``."""
    try:
        parsed = _ChainItem.model_validate(item)
    except ValidationError as err:
        report.validation_error(err, where, field, model=_ChainItem)
        return None
    problem = None
    length = 0
    if parsed.model not in decoded:
        problem = "model", (f"model {parsed.model} is not decoded by this profile; it decodes "
                            f"{', '.join(map(str, decoded))}")
    else:
        length = model_definition(parsed.model).length
        if parsed.address < end:
            problem = "address", (f"model {parsed.model} at {parsed.address} overlaps the "
                                  f"model before it, which ends at {end - 1}")
        elif parsed.address + 2 + length > 65536:
            problem = "address", (f"model {parsed.model} ({2 + length} registers) at "
                                  f"{parsed.address} runs past the last address 65535")
    if problem:
        report.error(where, join_field(field, problem[0]), problem[1])
        return None
    return ChainModel(parsed.model, parsed.address, length)


def _sunspec_chain(
    profile: Loaded, entry: Entry | None, where: Where, field: str, report: Report
) -> Chain | None:
    """The chain ``sunspecChain`` lists: models the profile decodes, each after the
    one before it ends (ID, L and L registers); None when anything is wrong (reported)."""
    if entry is None:
        report.error(where, join_field(field, "sunspecChain"), (
            f"profile {profile.doc.name} needs the device's SunSpec models: sunspecChain, "
            "a list of {model, address} as edge discover prints it"))
        return None
    if not isinstance(entry.value, list) or not entry.value:
        _entry_error(entry, report, "sunspecChain must be a non-empty list of {model, address}")
        return None
    decoded = profile.doc.spec.sunspec.models if profile.doc.spec.sunspec else []
    models: list[ChainModel] = []
    for index, item in enumerate(entry.value):
        end = models[-1].address + 2 + models[-1].length if models else 0
        found = _chain_model(item, decoded, end, entry.where, join_field(entry.field, index),
                             report)
        if found is None:
            return None
        models.append(found)
    return Chain(models[0].address - 2, tuple(models))


def overridden(config: Config, override: Config | None, where: Where, field: str) -> Config:
    """``override`` (a Device's or DeviceModel's own visitor keys) over ``config``; when
    there is one, the profile's entries are reported at the overriding visitor
    (``field``) of ``where``: a problem the override makes is the override's, not the
    shipped profile file's."""
    if not override:
        return config
    rebased = {key: Entry(key, e.value, where, join_field(field, key))
               if e.where.obj and e.where.obj.startswith(KIND) else e
               for key, e in config.items()}
    return {**rebased, **override}


def profiled_properties(
    model: ModelDoc, use: ProfileUse | None, report: Report
) -> Sequence[ModelProperty]:
    """``model``'s properties with the profile's visitors under their own: all of the
    profile's when the model lists none. A listed property the profile has only in
    other firmware, or neither has nor gets a visitor from the model, is an error."""
    if use is None:
        return model.properties
    if not model.properties:
        return tuple(use.properties.values())
    doc = use.profile.doc
    merged: list[ModelProperty] = []
    for prop in model.properties:
        base = use.properties.get(prop.name)
        if base is not None:
            merged.append(dataclasses.replace(
                prop, visitor=overridden(base.visitor or {}, prop.visitor, prop.where,
                                         prop.visitor_field),
                type_name=prop.type_name or base.type_name, unit=prop.unit or base.unit))
        elif prop.name in use.other_firmware:
            report.error(prop.where, prop.field, (
                f"property {prop.name!r} of profile {doc.name} exists in firmware "
                f"{use.other_firmware[prop.name]} only; this device's firmware is "
                f"{use.firmware}"))
        elif prop.visitor:
            merged.append(prop)
        else:
            report.error(prop.where, prop.field, (
                f"property {prop.name!r} is not in profile {doc.name} and has no visitor "
                f"of its own; the profile has: {', '.join(use.properties) or 'none'}"))
    return tuple(merged)
