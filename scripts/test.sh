#!/usr/bin/env bash
# The test command: installs what the tests need, then lint, types and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k codec).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/ruff check edge tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
