#!/usr/bin/env bash
# Install what edge needs on a Debian machine: Debian packages (mosquitto for the
# demo and the tests, socat for the serial tests), a venv in .venv with edge and its
# test dependencies. Idempotent; uses sudo when not root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
mapfile -t PKGS < <(grep -v '^\s*#' "$ROOT/.ci/apt-packages" | grep -v '^\s*$')
PKGS=("${PKGS[@]//@ARCH@/$(dpkg --print-architecture)}")  # e.g. linux-headers-amd64
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
"$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 \
  | grep -v "is ignored: it is neither" || true
