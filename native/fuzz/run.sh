#!/usr/bin/env bash
# Builds the layer converter's libFuzzer target with clang (ASan + UBSan) and
# runs it on a seed corpus of small tars. Not part of npm test: fuzzing is
# open-ended. Needs clang (`apt-get install clang`); the bounded mutation loop
# in native/tests/layer_fuzz_test.cc is what CI runs.
#
#   native/fuzz/run.sh [seconds]      default 60; findings land in $out/crash-*
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../src"
out="${VMLET_FUZZ_DIR:-/tmp/vmlet-layer-fuzz}"
secs="${1:-60}"
if ! command -v clang++ >/dev/null; then
  echo "native/fuzz/run.sh: clang++ is missing: apt-get install clang" >&2
  exit 1
fi
mkdir -p "$out/corpus"
clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$src" "$here/layer_fuzzer.cc" "$src"/image/*.cc \
  $(pkg-config --cflags --libs libsquashfs1 libarchive libzstd zlib libcrypto) -lpthread \
  -o "$out/layer_fuzzer"
# Seeds: a few small layers covering every entry type the converter handles.
seed="$(mktemp -d)"
trap 'rm -rf "$seed"' EXIT
mkdir -p "$seed/t/etc" "$seed/t/usr/bin"
echo vmlet > "$seed/t/etc/hostname"
head -c 70000 /dev/urandom > "$seed/t/usr/bin/tool"
ln -s /etc/hostname "$seed/t/abs"
ln "$seed/t/usr/bin/tool" "$seed/t/usr/bin/tool2"
mkfifo "$seed/t/fifo"
: > "$seed/t/.wh.gone"
tar --format=pax -C "$seed/t" -cf "$out/corpus/pax.tar" .
tar --format=gnu -C "$seed/t" -cf "$out/corpus/gnu.tar" .
gzip -c "$out/corpus/pax.tar" > "$out/corpus/pax.tar.gz"
zstd -q -c "$out/corpus/gnu.tar" > "$out/corpus/gnu.tar.zst"
cd "$out"
exec ./layer_fuzzer -max_total_time="$secs" -max_len=262144 -timeout=20 corpus
