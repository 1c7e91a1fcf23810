"""Plugin manifests as `edge check` sees them: hash, signature, module shape,
capabilities, order; in the agent file's plugins.dir and in a bundle."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import edge_cli
from wasm_modules import ECHO, LOGS, NO_PROCESS, REFUSES_CONFIG, WASI, wasm, write_plugin

from edge.config.errors import ConfigError
from edge.config.load import load_bundle_config, load_config
from edge.sync.bundle import new_key_pair


def agent_file(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({"node": "gw", "store": {"path": "./edge.db"},
                                    "plugins": {"dir": "./plugins"}, **extra}))
    return path


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return [f"{p.field}: {p.message}" for p in e.value.problems if p.severity == "error"]


def keys(tmp_path: Path, name: str = "cloud") -> Path:
    private, public = new_key_pair()
    (tmp_path / f"{name}.pub").write_bytes(public)
    (tmp_path / f"{name}.key").write_bytes(private)
    return tmp_path / f"{name}.key"


def test_plugins_load_in_file_name_order(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "second", ECHO, file="20-second.yaml")
    write_plugin(plugins, "first", ECHO, file="10-first.yaml", devices=["plant/*"],
                 limits={"memory_pages": 4, "timeout_ms": 50}, on_failure="drop",
                 quarantine={"failures": 2, "window": "5m"}, config={"k": [1, "ä"]})
    (plugins / "notes.txt").write_text("not a manifest")
    cfg = load_config(agent_file(tmp_path))
    assert [p.name for p in cfg.plugins] == ["first", "second"]
    first = cfg.plugins[0]
    assert (first.devices, first.memory_pages, first.timeout_ms, first.on_failure,
            first.failures, first.window_s, first.config) == (
        ("plant/*",), 4, 50, "drop", 2, 300.0, '{"k":[1,"ä"]}')
    assert first.wasm == (plugins / "first.wasm").resolve()
    assert first.source == str(plugins / "10-first.yaml")


def test_no_plugin_directory_is_no_plugin(tmp_path: Path) -> None:
    assert load_config(agent_file(tmp_path)).plugins == ()


def test_a_module_that_does_not_match_its_sha256_is_refused(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "echo", ECHO, sha256="0" * 64)
    actual = hashlib.sha256(wasm(ECHO)).hexdigest()
    [error] = errors(agent_file(tmp_path))
    assert error == (f"sha256: does not match the module {(tmp_path / 'plugins/echo.wasm')} "
                     f"(its SHA-256 is {actual})")


@pytest.mark.parametrize(("wat", "capabilities", "expected"), [
    (NO_PROCESS, [], "wasm: the module does not export the function 'process'"),
    (LOGS, ["log"], "wasm: the module imports edge.now_ms, which needs the capability "
                    "'now_ms' that its manifest does not grant"),
    (WASI, [], "wasm: the module imports wasi_snapshot_preview1.fd_write, which edge does "
               "not provide (only edge.{log, now_ms, kv_get, kv_set, kv_delete}; no WASI, "
               "files, network or environment)"),
])
def test_a_module_that_is_no_plugin_is_refused(tmp_path: Path, wat: str,
                                               capabilities: list[str], expected: str) -> None:
    write_plugin(tmp_path / "plugins", "p", wat, capabilities=capabilities)
    assert errors(agent_file(tmp_path)) == [expected]


def test_bytes_that_are_no_wasm_module_are_refused(tmp_path: Path) -> None:
    path = write_plugin(tmp_path / "plugins", "p", ECHO)
    (tmp_path / "plugins/p.wasm").write_bytes(b"\0asm garbage")
    doc = yaml.safe_load(path.read_text())
    doc["sha256"] = hashlib.sha256(b"\0asm garbage").hexdigest()
    path.write_text(yaml.safe_dump(doc))
    [error] = errors(agent_file(tmp_path))
    assert error.startswith("wasm: the module is not a valid WASM module: ")


def test_manifest_fields_are_checked(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "twice", ECHO, capabilities=["log", "log"])
    write_plugin(tmp_path / "plugins", "Bad Name", ECHO, capabilities=["net"],
                 hooks=["mqtt"], limits={"memory_pages": 5000, "timeout_ms": 5000},
                 on_failure="retry", colour="blue")
    found = errors(agent_file(tmp_path))
    for expected in ("name: String should match pattern",
                     "capabilities[0]: Input should be 'log', 'now_ms' or 'kv'",
                     "capabilities: lists a value more than once",
                     "hooks[0]: Input should be 'readings'",
                     "limits.memory_pages: Input should be less than or equal to 1024",
                     "limits.timeout_ms: Input should be less than or equal to 1000",
                     "on_failure: Input should be 'pass' or 'drop'",
                     "colour: unknown key 'colour'"):
        assert any(e.startswith(expected) for e in found), (expected, found)


def test_two_plugins_of_one_name_are_refused(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "echo", ECHO, file="a.yaml")
    write_plugin(tmp_path / "plugins", "echo", ECHO, file="b.yaml")
    [error] = errors(agent_file(tmp_path))
    assert error.startswith("plugins: two plugins are named 'echo'")


BAD_SIGNATURE = ("signature: does not verify with any trusted key (trust.keys): signed by "
                 "another key, or name, version, sha256 or capabilities changed since it was "
                 "signed (edge plugin sign again)")


def test_without_trusted_keys_a_signature_is_not_checked_and_says_so(tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "plugins", "echo", ECHO)
    edge_cli("plugin", "sign", str(manifest), "--key", str(keys(tmp_path)))
    cfg = load_config(agent_file(tmp_path))
    assert [p.name for p in cfg.plugins] == ["echo"]
    assert [(p.field, p.message) for p in cfg.warnings if p.field == "signature"] == [
        ("signature", "is not checked: this agent trusts no key (trust.keys), so it runs "
                      "plugins unsigned")]


def test_a_missing_sha256_says_where_to_get_it(tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "plugins", "echo", ECHO)
    manifest.write_text("\n".join(ln for ln in manifest.read_text().splitlines()
                                  if not ln.startswith("sha256")))
    assert errors(agent_file(tmp_path)) == [
        "sha256: is required: the SHA-256 (hex) of the module, from `sha256sum` or "
        "`edge plugin sign`"]


def test_with_trusted_keys_a_plugin_must_be_signed_by_one(tmp_path: Path) -> None:
    key = keys(tmp_path)
    other = keys(tmp_path, "other")
    path = agent_file(tmp_path, trust={"keys": ["./cloud.pub"]})
    manifest = write_plugin(tmp_path / "plugins", "echo", ECHO, capabilities=[])
    assert errors(path) == ["signature: is required: this agent trusts keys (trust.keys), so "
                            "every plugin must be signed by one of them (edge plugin sign)"]
    edge_cli("plugin", "sign", str(manifest), "--key", str(other))
    assert errors(path) == [BAD_SIGNATURE]
    out = edge_cli("plugin", "sign", str(manifest), "--key", str(key))
    assert out.stdout.startswith(f"{manifest}: signed echo@1.0.0")
    assert [p.name for p in load_config(path).plugins] == ["echo"]
    signed = manifest.read_text()
    # the signature covers the capabilities: granting one more needs a new signature
    manifest.write_text(signed.replace("capabilities: []", "capabilities: [log]"))
    assert errors(path) == [BAD_SIGNATURE]
    manifest.write_text(signed.replace("version: 1.0.0", "version: 1.0.1"))
    assert errors(path) == [BAD_SIGNATURE]


def test_a_bundle_carries_its_modules_inline(tmp_path: Path) -> None:
    path = agent_file(tmp_path)
    blob = wasm(ECHO)
    sha = hashlib.sha256(blob).hexdigest()
    entry = {"name": "echo", "version": "2.0.0", "sha256": sha,
             "module": base64.b64encode(blob).decode()}
    cfg = load_bundle_config(path, {"version": 3, "plugins": [entry]})
    [spec] = cfg.plugins
    assert spec.wasm == tmp_path / "plugins" / f"{sha}.wasm"
    assert spec.wasm.read_bytes() == blob
    assert spec.source == "bundle version 3 plugins #1"
    with pytest.raises(ConfigError) as e:
        load_bundle_config(path, {"version": 4, "plugins": [
            {**entry, "module": "!!"}, {"name": "x", "version": "1", "sha256": sha,
                                        "wasm": "x.wasm"}]})
    assert [(p.document, p.field, p.message) for p in e.value.problems] == [
        (1, "module", "is not valid base64"),
        (2, "module", "is required in a bundle: the module in base64 (wasm paths are for "
                      "manifest files)")]


def test_signing_keeps_the_rest_of_the_manifest(tmp_path: Path) -> None:
    key = keys(tmp_path)
    manifest = write_plugin(tmp_path / "plugins", "echo", ECHO, sha256="0" * 64)
    manifest.write_text("# the echo plugin\n" + manifest.read_text())
    edge_cli("plugin", "sign", str(manifest), "--key", str(key))
    text = manifest.read_text()
    assert text.startswith("# the echo plugin\n")
    assert f"sha256: {hashlib.sha256(wasm(ECHO)).hexdigest()}" in text
    assert len(yaml.safe_load(text)["signature"]) == 86  # 64 bytes, base64url unpadded


def test_a_module_path_that_is_no_regular_file_is_refused_without_blocking(
        tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "plugins", "echo", ECHO)
    fifo = tmp_path / "plugins" / "fifo.wasm"
    os.mkfifo(fifo)
    manifest.write_text(manifest.read_text().replace("wasm: echo.wasm", "wasm: fifo.wasm"))
    assert errors(agent_file(tmp_path)) == [f"wasm: {fifo}: is not a regular file"]
    manifest.write_text(manifest.read_text().replace("wasm: fifo.wasm", "wasm: /dev/zero"))
    assert errors(agent_file(tmp_path)) == ["wasm: /dev/zero: is not a regular file"]


def test_a_config_that_is_not_plain_json_is_refused(tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "plugins", "echo", ECHO)
    manifest.write_text(manifest.read_text() + "config: {since: 2024-01-01, x: .nan}\n")
    [error] = errors(agent_file(tmp_path))
    assert error.startswith("config: must be plain JSON (strings, numbers, booleans, null, "
                            "lists, mappings): ")
    manifest.write_text(manifest.read_text().replace("since: 2024-01-01, ", ""))
    assert errors(agent_file(tmp_path)) == [
        "config: must be plain JSON: .nan and .inf are no JSON numbers"]


def test_a_directory_named_like_a_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "plugins" / "odd.yaml").mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        load_config(agent_file(tmp_path))
    [p] = e.value.problems
    assert (p.file, p.message) == (str(tmp_path / "plugins" / "odd.yaml"), (
        "is not a regular file (a plugin manifest was expected: every *.yaml, *.yml and "
        "*.json in plugins.dir is one)"))


def test_edge_check_starts_each_plugin_as_the_agent_would(tmp_path: Path) -> None:
    path = agent_file(tmp_path)
    write_plugin(tmp_path / "plugins", "echo", ECHO)
    ok = edge_cli("check", "-c", str(path))
    assert ok.returncode == 0, ok.stderr
    assert ", 1 plugin(s)" in ok.stdout
    write_plugin(tmp_path / "plugins", "picky", REFUSES_CONFIG)
    write_plugin(tmp_path / "plugins", "big", ECHO, limits={"memory_pages": 1})
    out = edge_cli("check", "-c", str(path))
    assert out.returncode == 2
    assert out.stderr.splitlines()[-3:] == [
        f"error: {tmp_path / 'plugins/big.yaml'}: plugin big@1.0.0 "
        f"({hashlib.sha256(wasm(ECHO)).hexdigest()[:12]}) cannot be instantiated: memory "
        "minimum size of 2 pages exceeds memory limits",
        f"error: {tmp_path / 'plugins/picky.yaml'}: plugin picky@1.0.0 "
        f"({hashlib.sha256(wasm(REFUSES_CONFIG)).hexdigest()[:12]}) refused: init refused "
        "its config (status 7)",
        f"{path}: not valid: 2 plugin(s) do not start"]
