"""The shipped WASM plugins (plugins/): the committed modules are what plugins/build.sh
makes from the sources, byte for byte; each manifest's sha256 is its module's; each
module has the ABI's exports and imports nothing but module ``edge``."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import wasmtime
import yaml

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DIR = ROOT / "plugins"
PLUGINS = ("deadband", "derive", "units")
MODULES = (*(f"{n}/{n}.wasm" for n in PLUGINS), "example/minimal.wasm")
EDGE_IMPORTS = {"log", "now_ms", "kv_get", "kv_set", "kv_delete"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """plugins/build.sh run into a temporary directory."""
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (Debian: clang lld wasi-libc "
                    "libclang-rt-14-dev-wasm32, as .ci/apt-packages lists)")
    out = tmp_path_factory.mktemp("plugins-build")
    subprocess.run([str(PLUGINS_DIR / "build.sh"), str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("module", MODULES)
def test_build_gives_the_committed_module(built: Path, module: str) -> None:
    produced = (built / module).read_bytes()
    committed = (PLUGINS_DIR / module).read_bytes()
    assert produced == committed, f"{module}: plugins/build.sh no longer makes the " \
        "committed module (run plugins/build.sh and commit the result)"


@pytest.mark.parametrize("name", PLUGINS)
def test_manifest_sha256_is_the_committed_modules(name: str) -> None:
    manifest = yaml.safe_load((PLUGINS_DIR / name / "manifest.yaml").read_text())
    assert manifest["name"] == name
    wasm = PLUGINS_DIR / name / manifest["wasm"]
    assert manifest["sha256"] == hashlib.sha256(wasm.read_bytes()).hexdigest()
    assert "signature" not in manifest
    assert manifest["hooks"] == ["readings"]
    assert manifest["capabilities"] == ["log"]


@pytest.mark.parametrize("module", MODULES)
def test_module_exports_and_imports(module: str) -> None:
    engine = wasmtime.Engine()
    m = wasmtime.Module(engine, (PLUGINS_DIR / module).read_bytes())
    exports = {e.name for e in m.exports}
    wanted = {"memory", "alloc", "process"}
    if not module.startswith("example/"):
        wanted.add("init")
    assert wanted <= exports, f"{module} lacks {wanted - exports}"
    imports = [(i.module, i.name) for i in m.imports]
    assert all(mod == "edge" and name in EDGE_IMPORTS for mod, name in imports), imports


@pytest.mark.parametrize("name", PLUGINS)
def test_initial_memory_fits_the_manifests_limit(name: str) -> None:
    manifest = yaml.safe_load((PLUGINS_DIR / name / "manifest.yaml").read_text())
    m = wasmtime.Module(wasmtime.Engine(), (PLUGINS_DIR / name / f"{name}.wasm").read_bytes())
    (memory,) = (e.type for e in m.exports if e.name == "memory")
    assert isinstance(memory, wasmtime.MemoryType)
    # room for a batch of a few hundred KiB on top of static data and the stack
    assert memory.limits.min + 4 <= manifest["limits"]["memory_pages"]


def test_guide_shows_the_minimal_example_as_it_is() -> None:
    guide = (PLUGINS_DIR / "README.md").read_text()
    source = (PLUGINS_DIR / "example" / "minimal.c").read_text()
    assert f"```c\n{source}```" in guide
