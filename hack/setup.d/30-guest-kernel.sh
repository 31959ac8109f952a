#!/usr/bin/env bash
# The guest kernel (vmlinux with a PVH entry, and bzImage) built from Debian's
# linux-source-6.1 and cached under $VMLET_CACHE/guest-kernel/<hash of inputs>/ by
# hack/guest-kernel. Idempotent: once built, a rerun only hashes the inputs.
# A cold build is ~10 minutes on two idle cores (under nice -n 19).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="$("$here/guest-kernel")"
echo "guest-kernel: vmlinux and bzImage in $dir"
