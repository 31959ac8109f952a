#!/usr/bin/env bash
# The KVM lab's L2 kernel and initramfs (hack/kvm-lab): Debian's linux-image-amd64
# fetched with `apt-get download` and unpacked with `dpkg -x` (the host's /boot is
# never touched), plus a busybox initramfs with the modules L2 needs, all under
# $VMLET_CACHE/kvm-lab/<hash of inputs>/. Idempotent: a second run only hashes.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="$("$here/lab/prepare")"
echo "kvm-lab: L2 artefacts in $dir"
