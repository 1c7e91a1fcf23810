"""``edge profiles list|show|check|schema``: the firmware profiles (:mod:`edge.profiles`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from edge.profiles.profile import Loaded

_DIRS = click.option("--profiles", "dirs", multiple=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="A directory of profiles of one's own, besides the shipped ones "
                          "(as the agent file's profiles).")


@click.group()
def profiles() -> None:
    """Firmware profiles: register maps per vendor, model and firmware."""


def known_profiles(dirs: Sequence[Path]) -> dict[str, Loaded]:
    """The shipped profiles and those of ``dirs``, as the agent file's ``profiles``
    gives them; their problems printed and exit status 2 when any is an error."""
    from edge.cli import _print_problems  # noqa: PLC0415 (edge.cli imports this module)
    from edge.config.sources import Report  # noqa: PLC0415
    from edge.profiles.profile import shipped, with_local  # noqa: PLC0415

    report = Report()
    found = with_local(list(dirs), report)
    if report.has_errors:
        _print_problems(report.problems)
        raise SystemExit(2)
    return dict(shipped()) if found is None else found


@profiles.command("list")
@_DIRS
def list_profiles(dirs: tuple[Path, ...]) -> None:
    """One line per profile: name, vendor and model, firmware ranges, what it reads."""
    for name, loaded in sorted(known_profiles(dirs).items()):
        spec = loaded.doc.spec
        ranges = ("firmware " + "; ".join(spec.firmware.known) if spec.firmware
                  else "any firmware")
        reads = (f"SunSpec models {', '.join(map(str, spec.sunspec.models))}" if spec.sunspec
                 else f"{len(spec.properties)} properties")
        click.echo(f"{name}  {spec.vendor} {spec.model}  {ranges}  {reads}  "
                   f"({loaded.file})")


@profiles.command()
@click.argument("name")
@click.option("--firmware", metavar="VERSION", help="Only the properties of this firmware.")
@_DIRS
def show(name: str, firmware: str | None, dirs: tuple[Path, ...]) -> None:
    """The properties of profile NAME: register, address, type, unit, firmware range."""
    from edge.profiles.profile import applies, known_range, parse_version  # noqa: PLC0415

    known = known_profiles(dirs)
    if name not in known:
        raise click.UsageError(f"profile {name!r} is not known; profiles: "
                               f"{', '.join(sorted(known))}")
    spec = known[name].doc.spec
    version = parse_version(firmware) if firmware else None
    if firmware and version is None:
        raise click.BadParameter(f"{firmware!r} is not a version", param_hint="--firmware")
    if version is not None and spec.firmware and known_range(known[name].doc, version) is None:
        raise click.BadParameter(f"firmware {firmware} is outside every range {name} knows "
                                 f"({'; '.join(spec.firmware.known)})", param_hint="--firmware")
    click.echo(f"{name}: {spec.vendor} {spec.model}. {spec.description}".rstrip())
    click.echo(f"source: {spec.source}")
    if spec.sunspec:
        click.echo("properties: from the device's SunSpec model chain (edge discover)")
        return
    defaults = spec.defaults
    for p in spec.properties:
        if firmware and not applies(p, version):
            continue
        table = p.table or defaults.table
        raw = p.data_type or defaults.data_type
        extra = [f"scale {p.scale:g}" if p.scale not in (None, 1) else "",
                 f"scale factor at {p.scale_factor}" if p.scale_factor is not None else "",
                 "ReadWrite" if p.access_mode.value == "ReadWrite" else "",
                 f"firmware {p.firmware}" if p.firmware else ""]
        click.echo(f"  {p.name:32} {table} {p.offset:#06x} {raw} {p.unit or '-'}"
                   + "".join(f"  {e}" for e in extra if e))


@profiles.command()
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check(files: tuple[Path, ...]) -> None:
    """Check profile FILES as the agent will read them; exit 2 on any error."""
    from edge.cli import _print_problems  # noqa: PLC0415
    from edge.config.sources import Report  # noqa: PLC0415
    from edge.profiles.profile import read_profile, shipped  # noqa: PLC0415

    report = Report()
    for file in files:
        errors = sum(p.severity == "error" for p in report.problems)
        loaded = read_profile(file, report)
        taken = shipped().get(loaded.doc.name) if loaded else None
        if loaded and taken and taken.file != str(file.resolve()):
            report.error(loaded.where, "metadata.name", (
                f"{loaded.doc.name} is the name of a shipped profile ({taken.file}): the "
                "agent refuses a profile of one's own with it; rename it"))
        elif loaded and sum(p.severity == "error" for p in report.problems) == errors:
            spec = loaded.doc.spec
            reads = (f"SunSpec models {', '.join(map(str, spec.sunspec.models))}"
                     if spec.sunspec else f"{len(spec.properties)} properties")
            click.echo(f"{file}: valid: profile {loaded.doc.name}, {spec.vendor} "
                       f"{spec.model}, {reads}")
    _print_problems(report.problems)
    if report.has_errors:
        raise SystemExit(2)


@profiles.command()
def schema() -> None:
    """Print the JSON Schema of a profile (firmware_profiles/profile.schema.json)."""
    from edge.profiles.profile import json_schema  # noqa: PLC0415

    click.echo(json.dumps(json_schema(), indent=2, sort_keys=True))
