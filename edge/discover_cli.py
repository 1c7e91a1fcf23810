"""``edge discover``: probe one Modbus device and print its KubeEdge manifests.

What is probed and what answered goes to stderr; the manifests (DeviceModel and
Device, v1beta1, naming the firmware profile found) to stdout or ``-o FILE``. Exit
status: 0 with a manifest; 1 when nothing matched, several profiles matched, the
firmware is outside every known range or the device did not answer; 2 for usage
errors. See :mod:`edge.profiles.discover` for the probes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from edge.config.model import Endpoint
    from edge.profiles.discover import Discovery
    from edge.profiles.profile import Loaded


def _host_port(text: str) -> tuple[str, str]:
    """HOST[:PORT], [IPv6][:PORT] or a bare IPv6 address; port 502 when not given."""
    host, port_text = text, "502"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest else "502"
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise click.BadParameter(f"{text!r} is not HOST[:PORT] (port 1..65535)",
                                 param_hint="--tcp")
    return host, port_text


def _endpoint(tcp: str | None, serial: str | None, rtu_over_tcp: bool, baud: int | None,
              parity: str | None, data_bits: int | None, stop_bits: int | None) -> Endpoint:
    from edge.config.model import Framing, SerialEndpoint, TcpEndpoint  # noqa: PLC0415

    if (tcp is None) == (serial is None):
        raise click.UsageError("give exactly one of --tcp HOST[:PORT] and --serial PORT")
    if tcp is not None:
        given = [n for n, v in (("--baud", baud), ("--parity", parity),
                                ("--data-bits", data_bits), ("--stop-bits", stop_bits))
                 if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: serial line settings, only with --serial")
        host, port_text = _host_port(tcp)
        return TcpEndpoint(host, int(port_text),
                           Framing.RTU if rtu_over_tcp else Framing.MBAP)
    if rtu_over_tcp:
        raise click.UsageError("--rtu-over-tcp is RTU framing on a TCP connection: use it "
                               "with --tcp (a serial line always speaks RTU)")
    assert serial is not None
    return SerialEndpoint(serial, baud or 9600, data_bits or 8, parity or "N", stop_bits or 1)


def _echo(line: str) -> None:
    click.echo(line, err=True)


def _report(d: Discovery) -> None:
    _echo(f"probed {d.endpoint_key} unit {d.unit_id}:")
    for line in d.probes:
        _echo(f"  {line}")
    for line in d.problems:
        _echo(f"  problem: {line}")


def _failure(d: Discovery, profiles: Mapping[str, Loaded]) -> str:
    if d.firmware_unknown:
        return (f"profile {d.profile} matches, but its firmware "
                f"{d.firmware or '(not readable)'} is not one the profile knows: no manifest")
    if d.ambiguous:
        return f"ambiguous: profiles {', '.join(d.ambiguous)} all match: no manifest"
    if not d.answered:
        return ("the device gave no answer (no connection, timeouts or frames that are not "
                "answers): check the address, unit id, framing and line settings, or give a "
                "longer --timeout; no manifest")
    fc43 = (", ".join(f"{k} {v!r}" for k, v in d.device_identification.items())
            or "not supported")
    unknowable = sorted(n for n, p in profiles.items()
                        if not p.doc.spec.identification and not p.doc.spec.sunspec)
    hint = (f"; profiles {', '.join(unknowable)} have no identification registers: if the "
            "device is one of them, give --profile NAME" if unknowable else "")
    return ("no profile matches this device (FC 43 identification: "
            f"{fc43}): no manifest; write a firmware profile for it and give --profiles DIR"
            + hint)


@click.command()
@click.option("--tcp", metavar="HOST[:PORT]", help="A Modbus TCP server (port 502 by default).")
@click.option("--serial", metavar="PORT", help="A serial port (RTU), e.g. /dev/ttyUSB0.")
@click.option("--rtu-over-tcp", is_flag=True, help="RTU framing on the --tcp connection "
              "(a serial-to-Ethernet gateway in transparent mode).")
@click.option("--baud", type=click.IntRange(300, 4_000_000), help="Serial baud rate [9600].")
@click.option("--parity", type=click.Choice(["N", "E", "O"]), help="Serial parity [N].")
@click.option("--data-bits", type=click.IntRange(5, 8), help="Serial data bits [8].")
@click.option("--stop-bits", type=click.IntRange(1, 2), help="Serial stop bits [1].")
@click.option("--unit", type=click.IntRange(0, 255), default=1, show_default=True,
              help="The unit id (slave id) to probe.")
@click.option("--timeout", type=click.FloatRange(0.01, 60), default=1.0, show_default=True,
              help="Seconds each request may take.")
@click.option("--name", help="The Device's name (DNS-1123 label); default from the vendor, "
              "model and serial number found.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--profiles", "profile_dirs", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A directory of extra firmware profiles (*.yaml; repeatable).")
@click.option("--profile", "named", metavar="NAME",
              help="Probe as this profile only (the model is known; a profile without "
                   "identification registers is then taken as named).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the manifests here instead of stdout.")
def discover(tcp: str | None, serial: str | None, rtu_over_tcp: bool, baud: int | None,
             parity: str | None, data_bits: int | None, stop_bits: int | None, unit: int,
             timeout: float, name: str | None, namespace: str, profile_dirs: tuple[Path, ...],
             named: str | None, output: Path | None) -> None:
    """Probe one Modbus device (SunSpec chain, FC 43 identification, the firmware
    profiles' identification registers) and print a DeviceModel and Device for it."""
    import asyncio  # noqa: PLC0415

    from edge.config.model import Framing, SerialEndpoint  # noqa: PLC0415
    from edge.profiles import discover as found  # noqa: PLC0415

    endpoint = _endpoint(tcp, serial, rtu_over_tcp, baud, parity, data_bits, stop_bits)
    rtu = isinstance(endpoint, SerialEndpoint) or endpoint.framing is Framing.RTU
    if rtu and not 1 <= unit <= 247:
        raise click.BadParameter(f"{unit} is not a unit id of RTU framing (1..247)",
                                 param_hint="--unit")
    if name is not None and not found.valid_name(name):
        raise click.BadParameter(f"{name!r} is not a DNS-1123 label of at most "
                                 f"{found.MAX_NAME} characters", param_hint="--name")
    if not found.valid_name(namespace):
        raise click.BadParameter(f"{namespace!r} is not a DNS-1123 label",
                                 param_hint="--namespace")
    from edge.profiles_cli import known_profiles  # noqa: PLC0415

    profiles = known_profiles(profile_dirs)
    if named is not None and named not in profiles:
        raise click.BadParameter(f"profile {named!r} is not known; profiles: "
                                 f"{', '.join(sorted(profiles))}", param_hint="--profile")

    async def probe() -> found.Discovery:
        from edge.modbus.client import ConnectionPool  # noqa: PLC0415

        pool = ConnectionPool(connect_timeout=max(timeout, 1.0))
        try:
            return await found.discover(pool.get(endpoint), unit, timeout=timeout,
                                        profiles=profiles, named=named)
        finally:
            await pool.close()

    d = asyncio.run(probe())
    _report(d)
    if not d.found:
        _echo(f"error: {_failure(d, profiles)}")
        raise SystemExit(1)
    text = found.manifests(d, name=name or found.default_name(d), namespace=namespace)
    _echo(f"found: profile {d.profile}" + (f", firmware {d.firmware}" if d.firmware else "")
          + f", {len(d.properties)} properties")
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        _echo(f"wrote {output}")
