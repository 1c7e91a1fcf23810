#!/usr/bin/env bash
# Build the WASM plugins with Debian's clang: plugins/build.sh [OUTDIR]
#
# Without OUTDIR the modules are written next to their sources (plugins/NAME/NAME.wasm,
# plugins/example/minimal.wasm) and each manifest.yaml's sha256 is rewritten (also in
# the demo's examples/plugins/*.yaml that run a shipped module). With
# OUTDIR they go to OUTDIR/NAME/NAME.wasm and OUTDIR/example/minimal.wasm and no
# manifest is touched. The output is deterministic: no paths, timestamps or debug info.
# Needs (Debian): clang lld wasi-libc libclang-rt-14-dev-wasm32
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Every plugins/NAME/NAME.c is a plugin (with the shared include/edge_plugin.c).
PLUGINS=()
for d in "$HERE"/*/; do
  n="$(basename "$d")"
  if [ -f "$d/$n.c" ]; then PLUGINS+=("$n"); fi
done

CLANG="${CLANG:-clang}"
missing() { echo "plugins/build.sh: $1 is missing: apt-get install $2" >&2; exit 1; }
command -v "$CLANG" >/dev/null 2>&1 || missing "clang" "clang"
command -v wasm-ld >/dev/null 2>&1 || missing "wasm-ld (the WASM linker)" "lld"
[ -f /usr/include/wasm32-wasi/stdio.h ] && [ -f /usr/lib/wasm32-wasi/libc.a ] \
  || missing "wasi-libc (/usr/lib/wasm32-wasi/libc.a)" "wasi-libc"
RT="$("$CLANG" --target=wasm32-wasi -print-libgcc-file-name)"
[ -f "$RT" ] || missing "the compiler runtime for wasm32 ($RT)" "libclang-rt-14-dev-wasm32"

if [ $# -gt 0 ]; then
  mkdir -p "$1"
  OUT="$(cd "$1" && pwd)"
else
  OUT="$HERE"
fi

CFLAGS=(--target=wasm32-wasi -O2 -std=c11 -g0 -DNDEBUG -Wall -Wextra -Werror
        -fno-exceptions "-ffile-prefix-map=$HERE=.")
# No entry point and no start files (a library of exports, not a WASI program); the
# stack (64 KiB) goes first so an overflow traps instead of overwriting static data.
LDFLAGS=(-Wl,--no-entry -Wl,--strip-all -Wl,--gc-sections -Wl,--stack-first
         -Wl,-z,stack-size=65536)

build() { # build OUTFILE SOURCE... (compiled from inside $HERE, with relative paths)
  local out="$1"; shift
  mkdir -p "$(dirname "$out")"
  (cd "$HERE" && "$CLANG" "${CFLAGS[@]}" "$@" "${LDFLAGS[@]}" -o "$out.tmp")
  mv "$out.tmp" "$out"
  echo "built ${out#"$OUT"/} ($(wc -c <"$out") bytes)"
}

for name in "${PLUGINS[@]}"; do
  build "$OUT/$name/$name.wasm" -nostartfiles -Iinclude "$name/$name.c" include/edge_plugin.c
done
build "$OUT/example/minimal.wasm" -nostdlib example/minimal.c

set_sha() {  # MANIFEST SHA256: the new hash; a signature of the old one is dropped
  if ! grep -Eq "^sha256: \"?$2\"?$" "$1" && grep -q "^signature:" "$1"; then
    sed -i "/^signature:/d" "$1"
    echo "$1: the module changed: its signature was dropped (edge plugin sign it again)"
  fi
  sed -i "s/^sha256:.*/sha256: \"$2\"/" "$1"
}

if [ "$OUT" = "$HERE" ]; then
  for name in "${PLUGINS[@]}"; do
    [ -f "$HERE/$name/manifest.yaml" ] || continue
    sum="$(sha256sum "$HERE/$name/$name.wasm" | cut -d' ' -f1)"
    set_sha "$HERE/$name/manifest.yaml" "$sum"
    # the demo's manifests (examples/plugins) that run a shipped module
    for m in "$HERE"/../examples/plugins/*.yaml; do
      if [ -f "$m" ] && grep -q "^wasm: \.\./\.\./plugins/$name/$name.wasm$" "$m"; then
        set_sha "$m" "$sum"
      fi
    done
  done
fi
