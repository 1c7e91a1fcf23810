"""``edge release status|rollback|pack``: the agent releases of this gateway
(:mod:`edge.release.slots`), read and acted on locally, and release archives made."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from edge import __version__

RELEASES_OPTION = click.option(
    "--releases", "root", type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("EDGE_RELEASES") or "/var/lib/edge/releases",
    show_default="$EDGE_RELEASES, else /var/lib/edge/releases",
    help="The releases directory.")


@click.group()
def release() -> None:
    """The agent releases installed on this gateway (self-update)."""


@release.command()
@RELEASES_OPTION
def status(root: Path) -> None:
    """Print the running release and the releases state as JSON."""
    from edge.release.slots import ReleaseError, Releases  # noqa: PLC0415

    releases = Releases(root)
    try:
        state = releases.state()
    except (OSError, ReleaseError) as e:
        raise click.ClickException(str(e)) from e
    installed = sorted(p.name for p in root.iterdir() if releases.lib(p.name)) \
        if root.is_dir() else []
    click.echo(json.dumps({"running": __version__, "release": os.environ.get("EDGE_RELEASE")
                           or None, "dir": str(root), "installed": installed,
                           **asdict(state)}, indent=1))


@release.command()
@RELEASES_OPTION
def rollback(root: Path) -> None:
    """Commit the previous release again (the factory one when there is none); it runs
    from the agent's next start (systemctl restart edge)."""
    from edge.release.slots import ReleaseError, Releases  # noqa: PLC0415

    try:
        back = Releases(root).roll_back()
    except (OSError, ReleaseError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"release {back or 'of the package (factory)'} runs from the next start")


@release.command()
@click.argument("lib", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--version", "version", required=True, help="The release's version (PEP 440).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The archive to write (.tar.gz).")
@click.option("--machine", default=None, help="uname -m it is built for [default: this one].")
@click.option("--python", default=None, help="major.minor it is built for [default: this one].")
@click.option("--url", default=None, help="Where it will be served [default: its file:// URL].")
def pack(lib: Path, version: str, out: Path, machine: str | None, python: str | None,
         url: str | None) -> None:
    """Write the release archive of the import path LIB (edge and its dependencies, as
    /opt/edge/lib) and print the agent.release section that names it."""
    import yaml  # noqa: PLC0415

    from edge.release.slots import pack as write  # noqa: PLC0415

    if not (lib / "edge" / "__main__.py").is_file():
        raise click.ClickException(f"{lib} holds no edge package (edge/__main__.py)")
    spec = write(lib, version, out, machine_name=machine, python=python)
    body = {**asdict(spec), **({"url": url} if url else {})}
    click.echo(yaml.safe_dump({"release": body}, sort_keys=False), nl=False)
