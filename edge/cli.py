"""The ``edge`` command line: run, check, simulate, tail, faultproxy, config, rollback,
cloud, web, plugin, policy, profiles, discover."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edge import __version__
from edge.cloud import cloud
from edge.config.errors import ConfigError, Problem
from edge.discover_cli import discover
from edge.history_cli import config, rollback
from edge.plugin_cli import plugin
from edge.policy_cli import policy
from edge.profiles_cli import known_profiles, profiles
from edge.release_cli import release
from edge.web_cli import web

if TYPE_CHECKING:
    from edge.config.runtime import PendingConfig, RuntimeConfig

log = logging.getLogger("edge")

CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="edge.yaml",
    show_default=True,
    help="The agent file.",
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _print_problems(problems: tuple[Problem, ...] | list[Problem]) -> None:
    for p in problems:
        click.echo(str(p), err=True)


def _problems_exit(path: Path, e: ConfigError, *, starting: bool) -> SystemExit:
    _print_problems(e.problems)
    errors = sum(1 for p in e.problems if p.severity == "error")
    warnings = len(e.problems) - errors
    click.echo(f"{path}: not valid: {errors} error(s), {warnings} warning(s)"
               + ("; nothing was started" if starting else ""), err=True)
    return SystemExit(2)


def runtime_or_exit(
    path: Path, *, warn: bool = True, pending: PendingConfig | None = None,
    starting: bool = False,
) -> RuntimeConfig:
    """Load and validate in a child process, so the agent never holds the validators;
    on problems, print them and exit 2 (``starting``: say that nothing was started)."""
    from edge.config.runtime import load_runtime_config  # noqa: PLC0415

    try:
        cfg = pending.result() if pending else load_runtime_config(path)
    except ConfigError as e:
        raise _problems_exit(path, e, starting=starting) from None
    if warn:
        _print_problems(cfg.warnings)
    return cfg


def _run_until_signal(main: Any) -> None:
    """Run ``main(stop_event)`` in a new event loop until SIGINT or SIGTERM sets the event.

    asyncio is imported here, after `edge run` has forked its validating child.
    """
    import asyncio  # noqa: PLC0415

    async def until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(until_signal())


@click.group()
@click.version_option(__version__, prog_name="edge")
def main() -> None:
    """edge: poll Modbus devices described by KubeEdge manifests and publish over MQTT."""


@main.command()
@CONFIG_OPTION
def run(config_path: Path) -> None:
    """Run the agent until SIGINT/SIGTERM."""
    from edge.config.runtime import PendingConfig  # noqa: PLC0415

    pending = PendingConfig(config_path)
    from edge.agent import Agent  # noqa: PLC0415 (imported while the child validates)

    cfg = runtime_or_exit(config_path, pending=pending, starting=True)
    _setup_logging(cfg.log_level)
    from edge.store.history import History, history_file  # noqa: PLC0415
    from edge.sync.controller import ConfigSync, start_up  # noqa: PLC0415

    history = History(history_file(cfg.store.path))
    start = start_up(history, config_path, cfg)
    agent = Agent(start.cfg, history)
    sync = ConfigSync(agent, config_path, history, start)
    agent.services.append(sync.run)
    from edge.wasm.watch import PluginWatch  # noqa: PLC0415

    agent.services.append(PluginWatch(agent, config_path).run)
    if start.cfg.web.enabled:
        from edge.web.server import WebServer  # noqa: PLC0415 (aiohttp only when it serves)

        agent.services.append(WebServer(agent, history, start.cfg.web).run)
    _run_until_signal(agent.run)
    if agent.restart_for:  # the same command again, in this process (same PID), through
        history.close()  # the launcher when one started it (it picks the release)
        from edge.release.boot import relaunch  # noqa: PLC0415

        relaunch(sys.argv[1:])


@main.command()
@CONFIG_OPTION
def check(config_path: Path) -> None:
    """Validate the agent file and every manifest it names; exit 0 only when all is valid."""
    from edge.modbus.planner import plan_device  # noqa: PLC0415
    from edge.policy.evaluator import rules as policy_rules  # noqa: PLC0415

    cfg = runtime_or_exit(config_path)  # the same bounded child as `edge run`
    if cfg.plugins:  # started here, as `edge run` would: limits, init and its config
        from edge.wasm.host import trial  # noqa: PLC0415

        failing = trial(cfg.plugins, cfg.plugin_cache)
        for message in failing:
            click.echo(f"error: {message}", err=True)
        if failing:
            click.echo(f"{config_path}: not valid: {len(failing)} plugin(s) do not start",
                       err=True)
            raise SystemExit(2)
    props = sum(len(d.properties) for d in cfg.devices)
    requests = sum(len(r) for d in cfg.devices for r in plan_device(d).values())
    click.echo(
        f"{config_path}: OK: node {cfg.node}, {len(cfg.files)} manifest file(s), "
        f"{len(cfg.devices)} device(s), {props} properties, {requests} read request(s) per round"
        + (f", {len(cfg.plugins)} plugin(s)" if cfg.plugins else "")
        + (f", {len(cfg.policy.policies)} network policy(ies) in "
           f"{len(policy_rules(cfg.policy))} rules" if cfg.policy.policies else "")
        + (f", {len(cfg.warnings)} warning(s)" if cfg.warnings else "")
    )


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An agent file: simulate every device it names.",
)
@click.argument("manifests", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--period", default=60.0, show_default=True, help="Seconds per value cycle.")
@click.option("--at", "frozen_at", type=float, metavar="UNIX_TIME",
              help="Serve the values of this moment, unchanging (for tests that compare).")
@click.option("--profile", metavar="NAME",
              help="Simulate one device of this firmware profile instead (edge profiles list).")
@click.option("--firmware", metavar="VERSION",
              help="With --profile: the firmware it reports (default: the newest known).")
@click.option("--models", metavar="ID,ID,...", default="1,103,203", show_default=True,
              help="With a SunSpec profile: the model chain.")
@click.option("--base", type=click.Choice(["40000", "0", "50000"]), default="40000",
              show_default=True, help="With a SunSpec profile: where the SunS marker is.")
@click.option("--listen", metavar="HOST:PORT", default="127.0.0.1:5020", show_default=True,
              help="With --profile: the Modbus TCP address to serve.")
@click.option("--rtu-over-tcp", is_flag=True, help="With --profile: RTU framing over TCP.")
@click.option("--serial", "serial_port", metavar="PORT",
              help="With --profile: serve RTU on this serial port instead of TCP.")
@click.option("--baud", type=int, default=9600, show_default=True, help="With --serial.")
@click.option("--unit", type=click.IntRange(1, 247), default=1, show_default=True,
              help="With --profile: the unit id.")
@click.option("--profiles", "profile_dirs", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A directory of firmware profiles of one's own (repeatable; with -c: the "
                   "agent file's profiles).")
@click.option("--log-level", default="info", show_default=True)
def simulate(config_path: Path | None, manifests: tuple[Path, ...], period: float,
             frozen_at: float | None, profile: str | None, firmware: str | None, models: str,
             base: str, listen: str, rtu_over_tcp: bool, serial_port: str | None, baud: int,
             unit: int, profile_dirs: tuple[Path, ...], log_level: str) -> None:
    """Serve simulated Modbus devices for the manifests' TCP endpoints (pymodbus server).

    Every device is served at the host:port and unit id of its manifest, with values
    that change over time inside each property's minimum..maximum. With --profile, one
    device that answers as the profile says: its identification and firmware
    registers, FC 43 identification, plausible values (a SunSpec profile: a model
    chain), for the demo, for tests and for trying edge discover.
    """
    from edge.modbus.simulator import SimulatorError, run_simulator  # noqa: PLC0415

    _setup_logging(log_level)
    identification: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    if profile is not None:
        if config_path is not None or manifests:
            raise click.UsageError("--profile simulates one device: give no manifests or -c")
        sim = _simulated_profile(profile, firmware, models, int(base), listen, rtu_over_tcp,
                                 serial_port, baud, unit, list(profile_dirs))
        devices: tuple[Any, ...] = (sim.device,)
        identification[sim.device.endpoint.key] = sim.identification
        constants[sim.device.key] = sim.constants
        what = (f"SunSpec models {models} at {base}" if sim.chain
                else f"firmware {sim.firmware}" if sim.firmware else "")
        click.echo(f"simulating profile {profile} ({what}) on {sim.device.endpoint.key} "
                   f"unit {unit}", err=True)
    else:
        devices, dirs = _manifest_devices(config_path, manifests, list(profile_dirs))
        _profile_registers(devices, dirs, identification, constants)
    try:
        _run_until_signal(lambda stop: run_simulator(
            devices, stop, period_s=period, identification=identification,
            constants=constants,
            clock=time.time if frozen_at is None else lambda: frozen_at))
    except SimulatorError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None


def _manifest_devices(config_path: Path | None, manifests: tuple[Path, ...],
                      profile_dirs: list[Path]) -> tuple[tuple[Any, ...], list[Path]]:
    """The devices to simulate and the profile directories they may use (the agent
    file's, or ``profile_dirs`` with manifests)."""
    from edge.config.load import load_config, load_manifests  # noqa: PLC0415

    try:
        if config_path is not None:
            loaded = load_config(config_path)
            devices, profile_dirs = loaded.devices, list(loaded.agent.profiles)
        else:
            devices, warnings = load_manifests(list(manifests), profile_dirs=profile_dirs)
            _print_problems(warnings)
    except ConfigError as e:
        _print_problems(e.problems)
        raise SystemExit(2) from None
    if not devices:
        raise click.UsageError("no devices to simulate: give -c edge.yaml or manifest paths")
    return tuple(devices), profile_dirs


def _profile_registers(devices: tuple[Any, ...], profile_dirs: list[Path],
                       identification: dict[str, Any], constants: dict[str, Any]) -> None:
    """What the profiles of the devices that name one say holds still (identification,
    firmware, SunSpec chains), and their FC 43 objects (the first device's on an
    endpoint)."""
    from edge.config.sources import Report  # noqa: PLC0415
    from edge.profiles.profile import with_local  # noqa: PLC0415
    from edge.profiles.simulate import profile_registers  # noqa: PLC0415

    profiles = with_local(profile_dirs, Report())  # already read without errors
    for device in devices:
        try:
            found = profile_registers(device, profiles)
        except (KeyError, ValueError) as e:
            raise click.UsageError(str(e.args[0])) from None
        if found is not None:
            constants[device.key], objects = found
            identification.setdefault(device.endpoint.key, objects)


def _simulated_profile(profile: str, firmware: str | None, models: str, base: int,
                       listen: str, rtu_over_tcp: bool, serial_port: str | None, baud: int,
                       unit: int, profile_dirs: list[Path]) -> Any:
    from edge.config.model import Framing, SerialEndpoint, TcpEndpoint  # noqa: PLC0415
    from edge.faultproxy import parse_address  # noqa: PLC0415
    from edge.profiles.simulate import simulated_profile  # noqa: PLC0415

    profiles = known_profiles(profile_dirs)

    endpoint: SerialEndpoint | TcpEndpoint
    if serial_port is not None:
        endpoint = SerialEndpoint(serial_port, baud)
    else:
        try:
            host, port = parse_address(listen)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--listen") from None
        endpoint = TcpEndpoint(host, port, Framing.RTU if rtu_over_tcp else Framing.MBAP)
    try:
        chain = tuple(int(m) for m in models.split(","))
    except ValueError:
        raise click.BadParameter(f"{models!r} is not a list of model ids",
                                 param_hint="--models") from None
    try:
        return simulated_profile(profile, endpoint=endpoint, unit_id=unit, firmware=firmware,
                                 models=chain, base=base, profiles=profiles)
    except ConfigError as e:
        _print_problems(e.problems)
        raise SystemExit(2) from None
    except (KeyError, ValueError) as e:
        raise click.UsageError(str(e.args[0])) from None


@main.command()
@click.option("--listen", required=True, metavar="127.0.0.1:PORT",
              help="Where Modbus clients connect (port 0: any free one).")
@click.option("--target", required=True, metavar="127.0.0.1:PORT",
              help="The Modbus TCP server to forward to (only 127.0.0.1).")
@click.option("--control", required=True, metavar="127.0.0.1:PORT",
              help='Line-based JSON control port, e.g. {"mode":"delay","ms":500}.')
@click.option("--framing", type=click.Choice(["mbap", "rtu"]), default="mbap",
              show_default=True, help="How answers are delimited for corrupt (rtu: RTU over TCP).")
@click.option("--log-level", default="info", show_default=True)
def faultproxy(listen: str, target: str, control: str, framing: str, log_level: str) -> None:
    """Forward to a Modbus server and inject faults on command (tests, benchmark).

    Modes: pass, delay (ms, direction up|down|both), drop, cut, corrupt (flavour
    byte|truncate|unit|tid|function|garble); see edge/faultproxy.py. Prints one line
    with the ports once listening; runs until SIGINT/SIGTERM.
    """
    from edge.faultproxy import parse_address, run_proxy  # noqa: PLC0415

    for name, value in (("--listen", listen), ("--target", target), ("--control", control)):
        try:
            parse_address(value)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=name) from None
    _setup_logging(log_level)

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    _run_until_signal(
        lambda stop: run_proxy(listen, target, control, stop, framing=framing, announce=announce)
    )


@main.command()
@CONFIG_OPTION
@click.option("--count", type=int, default=0, help="Stop after this many messages (0: never).")
@click.option("--session", metavar="CLIENT_ID", default=None,
              help="Keep a session on the broker under this client id, so that what is "
                   "published while tail is disconnected arrives when it is back.")
def tail(config_path: Path, count: int, session: str | None) -> None:
    """Print what the agent publishes (subscribes to the node's topics on its broker)."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    from edge.uplink.client import BrokerClient  # noqa: PLC0415
    from edge.uplink.topics import Topics  # noqa: PLC0415

    cfg = runtime_or_exit(config_path, warn=False)
    topics = Topics(cfg.topic_prefix)
    client = BrokerClient(dataclasses.replace(
        cfg.broker, client_id=session or f"{cfg.broker.client_id}-tail-{os.getpid()}",
        clean_session=session is None))
    done = threading.Event()
    seen = 0

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal seen
        rel = msg.topic.removeprefix(topics.prefix + "/")
        try:
            body = json.dumps(json.loads(msg.payload), separators=(",", ":"))
        except ValueError:
            # a signed bundle or command: a JWS, too long to be worth printing
            body = (f"(signed, {len(msg.payload)} bytes)" if msg.payload.count(b".") == 2
                    else repr(msg.payload[:200]))
        try:
            click.echo(f"{rel} {body}")
        except BrokenPipeError:  # e.g. `edge tail | head`: the reader is gone
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            done.set()
            return
        seen += 1
        if count and seen >= count:
            done.set()

    client.paho.on_message = on_message
    def subscribe() -> None:
        client.paho.subscribe(f"{topics.prefix}/#", qos=1)

    client.add_connect_hook(subscribe)
    client.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()


main.add_command(cloud)
main.add_command(config)
main.add_command(rollback)
main.add_command(web)
main.add_command(plugin)
main.add_command(policy)
main.add_command(profiles)
main.add_command(discover)
main.add_command(release)
