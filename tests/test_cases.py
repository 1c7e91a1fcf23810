"""Data-driven configuration cases (Telegraf style), one folder per case under cases/.

Each ``cases/<name>/`` holds an agent file ``edge.yaml`` (with the manifests it names)
and either

* ``expected.err``: every non-empty line must appear in the text of one problem of the
  :class:`ConfigError` that loading raises (so N lines naming N different faults prove
  that all of them are reported at once), and nothing is returned. A line starting
  with ``! `` must appear in no problem (a follow-on message that is not wanted);
  ``{case}`` stands for the case's absolute directory (messages that name a resolved
  path); or
* ``expected.json``: the summary of what loads (devices, manifest files, warnings),
  compared for equality.

The case name says which fault (or which dialect) it pins. ``EDGE_UPDATE_CASES=1``
rewrites the ``expected.json`` files from what loads now; review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from edge.config.errors import ConfigError, Problem
from edge.config.load import LoadedConfig, load_config
from edge.config.model import DeviceSpec

CASES = Path(__file__).parent / "cases"
CASE_DIRS = sorted(p for p in CASES.iterdir() if (p / "edge.yaml").is_file())


def _relative(path: str, root: Path) -> str:
    return path.replace(f"{root}/", "")


def _device(device: DeviceSpec, root: Path) -> dict[str, object]:
    summary = dataclasses.asdict(device)
    summary["endpoint"] = {"key": device.endpoint.key, **summary["endpoint"]}
    summary["source"] = _relative(device.source, root)
    return summary


def _problem(problem: Problem, root: Path) -> str:
    return _relative(str(problem), root)


def summarize(config: LoadedConfig, root: Path) -> dict[str, object]:
    """The JSON-comparable summary of a loaded case."""
    summary = {
        "node": config.agent.node,
        "files": [_relative(f, root) for f in config.files],
        "devices": [_device(d, root) for d in config.devices],
        "warnings": [_problem(w, root) for w in config.warnings],
    }
    plain: dict[str, object] = json.loads(json.dumps(summary))  # enums → values, tuples → lists
    return plain


def test_there_are_cases() -> None:
    names = {p.name for p in CASE_DIRS}
    assert len(names) >= 30
    assert all(
        ((CASES / n / "expected.err").exists()) != ((CASES / n / "expected.json").exists())
        for n in names
    )


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_case(case: Path) -> None:
    expected_err = case / "expected.err"
    expected_json = case / "expected.json"
    if expected_err.exists():
        text = expected_err.read_text().replace("{case}", str(case.absolute()))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        unwanted = [line.removeprefix("! ") for line in lines if line.startswith("! ")]
        lines = [line for line in lines if not line.startswith("! ")]
        assert lines, f"{expected_err} names no problem that must be reported"
        loaded: LoadedConfig | None = None
        with pytest.raises(ConfigError) as raised:
            loaded = load_config(case / "edge.yaml")
        assert loaded is None
        problems = [str(p) for p in raised.value.problems]
        assert any(p.severity == "error" for p in raised.value.problems)
        missing = [line for line in lines if not any(line in p for p in problems)]
        assert not missing, (
            "not reported: " + "\n".join(missing) + "\nreported:\n" + "\n".join(problems)
        )
        found = [line for line in unwanted if any(line in p for p in problems)]
        assert not found, "reported, but unwanted: " + "\n".join(found)
        return
    actual = summarize(load_config(case / "edge.yaml"), case)
    if os.environ.get("EDGE_UPDATE_CASES") == "1":
        expected_json.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n")
    assert actual == json.loads(expected_json.read_text())
