#!/usr/bin/env bash
# Build the policy datapath: edge/policy/bpf/build.sh [OUT.o]
#
# Compiles policy.bpf.c into the eBPF object the agent loads (default: policy.bpf.o
# next to it). Little-endian BPF (-target bpfel: amd64, arm64 and armhf gateways alike),
# BTF kept (libbpf needs it for the maps), DWARF stripped, the checkout's directory
# mapped to "." (BTF names the source file); deterministic: the same source and clang
# give the same bytes in any checkout, which tests/test_policy_datapath.py checks.
# Needs (Debian): clang llvm linux-libc-dev
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/policy.bpf.o}"
CLANG="${CLANG:-clang}"
STRIP="${STRIP:-llvm-strip}"
missing() { echo "edge/policy/bpf/build.sh: $1 is missing: apt-get install $2" >&2; exit 1; }
command -v "$CLANG" >/dev/null 2>&1 || missing "clang" "clang"
command -v "$STRIP" >/dev/null 2>&1 || missing "llvm-strip" "llvm"
[ -f /usr/include/linux/bpf.h ] || missing "/usr/include/linux/bpf.h" "linux-libc-dev"
ARCH_INC="/usr/include/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)"
TMP="$(mktemp "${OUT}.XXXXXX")"
trap 'rm -f "$TMP"' EXIT
(cd "$HERE" && "$CLANG" -O2 -g -target bpfel -std=gnu11 -Wall -Wextra -Werror \
   -fdebug-prefix-map="$HERE"=. -I"$ARCH_INC" -c policy.bpf.c -o "$TMP")
"$STRIP" -g "$TMP"
mv "$TMP" "$OUT"
trap - EXIT
echo "built $OUT ($(wc -c <"$OUT") bytes)"
