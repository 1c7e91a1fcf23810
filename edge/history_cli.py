"""``edge config history|diff`` and ``edge rollback``: the gateway's configuration
versions (:mod:`edge.store.history`), read and acted on locally."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from edge.store.history import History

CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    default="edge.yaml", show_default=True, help="The agent file.")


def _history(config_path: Path) -> History:
    """The history of the agent configured by ``config_path`` (validated first)."""
    from edge.cli import runtime_or_exit  # noqa: PLC0415 (cli imports this module)
    from edge.store.history import History, history_file  # noqa: PLC0415

    cfg = runtime_or_exit(config_path, warn=False)
    path = history_file(cfg.store.path)
    if not path.exists():
        raise click.ClickException(f"{path} does not exist: the agent has not run yet")
    return History(path)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
def config() -> None:
    """The configuration versions this gateway received."""


@config.command()
@CONFIG_OPTION
def history(config_path: Path) -> None:
    """List the kept versions, oldest first: state, when, devices, why."""
    h = _history(config_path)
    click.echo(f"{'version':>10}  {'state':<11}  {'received':<20}  {'decided':<20}  devices")
    for v in h.versions():
        devices = "(agent file)" if v.version == 0 else len(v.content.get("devices", []))
        line = (f"{v.version:>10}  {v.state:<11}  {_when(v.received_ms):<20}  "
                f"{_when(v.decided_ms):<20}  {devices}")
        click.echo(line + (f"  ({v.reason})" if v.reason else ""))


@config.command()
@CONFIG_OPTION
@click.argument("old", type=int)
@click.argument("new", type=int)
def diff(config_path: Path, old: int, new: int) -> None:
    """A unified diff of two kept versions' content (JSON, keys sorted)."""
    try:
        lines = _history(config_path).diff(old, new)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    for line in lines:
        click.echo(line)


@click.command()
@CONFIG_OPTION
@click.argument("version", type=int, required=False)
def rollback(config_path: Path, version: int | None) -> None:
    """Ask the running agent to go back to VERSION (default: the one before the
    running version); it does within a second, or at its next start."""
    h = _history(config_path)
    if version is not None:
        kept = h.get(version)
        if kept is None:
            raise click.ClickException(f"version {version} is not in the history")
        if kept.state == "rolled_back":
            raise click.ClickException(f"version {version} was rolled back ({kept.reason})")
    elif h.previous() is None:
        raise click.ClickException("there is no earlier version to roll back to")
    h.request_rollback(version)
    click.echo(f"rollback to {'the previous version' if version is None else version} "
               "requested; the agent reports it on …/events (config_rolled_back)")
