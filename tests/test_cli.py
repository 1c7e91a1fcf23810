"""The `edge` command line as a user runs it: exit codes and what it prints."""

from __future__ import annotations

from pathlib import Path

import yaml
from support import REPO, device_docs, edge_cli, free_port, write_agent_file

from edge import __version__


def test_version() -> None:
    out = edge_cli("--version")
    assert out.returncode == 0
    assert __version__ in out.stdout


def test_check_accepts_the_examples() -> None:
    out = edge_cli("check", "-c", str(REPO / "examples" / "edge.yaml"))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    assert "3 device(s), 15 properties, 9 read request(s) per round" in out.stdout


def _bad_setup(tmp_path: Path) -> Path:
    docs = device_docs("meter", 1502, 1, [
        {"name": "a", "type": "INT",
         "visitor": {"register": "HoldingRegister", "offset": 70000, "dataType": "int16"}},
        {"name": "b", "type": "INT",
         "visitor": {"register": "FancyRegister", "offset": 1, "dataType": "int16"}},
    ])
    return write_agent_file(tmp_path, free_port(), docs)


def test_check_prints_every_error_and_fails(tmp_path: Path) -> None:
    out = edge_cli("check", "-c", str(_bad_setup(tmp_path)))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) >= 2, out.stderr
    offset = next(line for line in lines if "offset" in line)
    assert "manifests.yaml" in offset
    assert "Device default/meter" in offset
    assert "spec.properties[0]" in offset
    assert "70000" in offset
    assert any("FancyRegister" in line and "spec.properties[1]" in line for line in lines)


def test_run_with_invalid_configuration_starts_nothing(tmp_path: Path) -> None:
    out = edge_cli("run", "-c", str(_bad_setup(tmp_path)), timeout=30)
    assert out.returncode == 2
    assert "nothing was started" in out.stderr


def test_check_missing_agent_file(tmp_path: Path) -> None:
    out = edge_cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "nope.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_reports_unknown_agent_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"node": "gw", "uplnk": {"host": "x"}}))
    out = edge_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "uplnk" in out.stderr
