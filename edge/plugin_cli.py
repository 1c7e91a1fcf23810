"""``edge plugin sign`` and ``edge plugin run``: for whoever writes or deploys a WASM
plugin (plugins/README.md)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import click

from edge.config.errors import ConfigError


@click.group()
def plugin() -> None:
    """Sign and try WASM plugins."""


def _set_key(text: str, key: str, value: str) -> str:
    """``text`` (a YAML manifest) with its top-level ``key`` set to ``value``; the
    rest, comments included, untouched."""
    line = f"{key}: {value}"
    pattern = re.compile(rf"^{key}:.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    return text.rstrip("\n") + "\n" + line + "\n"


def _manifest(path: Path) -> dict[str, object]:
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise click.ClickException(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: is not a plugin manifest (a mapping)")
    return data


@plugin.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "key_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The Ed25519 private key (PEM), e.g. from edge cloud keygen.")
def sign(manifest: Path, key_file: Path) -> None:
    """Fill in MANIFEST's sha256 (of its wasm file) and signature, in place."""
    from edge.config.plugins import Manifest  # noqa: PLC0415
    from edge.config.plugins import sign as sign_manifest  # noqa: PLC0415
    from edge.sync.bundle import BundleError, load_private_key  # noqa: PLC0415

    data = _manifest(manifest)
    wasm = data.get("wasm")
    if not isinstance(wasm, str):
        raise click.ClickException(f"{manifest}: wasm must name the module file")
    try:
        digest = hashlib.sha256((manifest.parent / wasm).read_bytes()).hexdigest()
        key = load_private_key(key_file.read_bytes(), where=str(key_file))
    except OSError as e:
        raise click.ClickException(f"{e.filename}: {e.strerror}") from e
    except BundleError as e:
        raise click.ClickException(str(e)) from e
    data.update(sha256=digest, signature=None)
    try:
        m = Manifest.model_validate(data)
    except ValueError as e:
        raise click.ClickException(f"{manifest}: not a valid manifest:\n{e}") from e
    text = _set_key(manifest.read_text(encoding="utf-8"), "sha256", digest)
    manifest.write_text(_set_key(text, "signature", sign_manifest(m, key)), encoding="utf-8")
    click.echo(f"{manifest}: signed {m.name}@{m.version} ({digest[:12]})")


@plugin.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--agent-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Check the signature against this agent file's trust.keys (default: an "
                   "agent that trusts no key: any plugin runs, its signature unchecked).")
def run(manifest: Path, agent_file: Path | None) -> None:
    """Run MANIFEST's plugin once: a JSON batch of readings on stdin (an array of
    {namespace, device, ts, seq, values, quality}), its answer on stdout."""
    from edge.config.load import load_agent_file  # noqa: PLC0415
    from edge.config.plugins import PluginLoader  # noqa: PLC0415
    from edge.config.sources import Report, Where, read_yaml_file  # noqa: PLC0415
    from edge.reading import Reading  # noqa: PLC0415
    from edge.wasm.host import decode, encode  # noqa: PLC0415
    from edge.wasm.instance import Instance, PluginError  # noqa: PLC0415
    from edge.wasm.spec import read_module  # noqa: PLC0415

    report = Report()
    cache = tempfile.TemporaryDirectory(prefix="edge-plugin-run-")  # compiled once, here
    try:
        agent = load_agent_file(agent_file) if agent_file else None
        if agent is None:
            from edge.config.agent import AgentFile  # noqa: PLC0415

            agent = AgentFile.model_validate({"node": "try", "store": {"path": "/nonexistent"}},
                                             context={"base_dir": Path.cwd()})
        loader = PluginLoader(agent, report)
        loader.runtime.cache_dir = Path(cache.name)
        readable, data = read_yaml_file(manifest, report)
        spec = loader.check(data, Where(str(manifest)), manifest.parent) if readable else None
        if spec is None:
            raise ConfigError(report.problems)
    except ConfigError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        raise SystemExit(2) from e
    for p in report.warnings:
        click.echo(str(p), err=True)
    try:
        batch = [Reading(r["namespace"], r["device"], int(r["ts"]), int(r["seq"]),
                         r.get("values", {}), r.get("quality", {}))
                 for r in json.load(sys.stdin)]
    except (ValueError, KeyError, TypeError) as e:
        raise click.ClickException(f"stdin: not a JSON array of readings ({e!r})") from e
    try:
        module = loader.runtime.compile(read_module(spec.wasm), spec.sha256)
        instance = Instance(loader.runtime, module, spec)
        instance.init(spec.config.encode())
        out = decode(instance.process(encode(batch)), batch)
    except PluginError as e:
        raise click.ClickException(f"{spec.ident}: {e.kind}: {e}") from e
    finally:
        loader.runtime.stop()
        cache.cleanup()
    click.echo(json.dumps(json.loads(encode(out)), indent=2, ensure_ascii=False))

