// Can this host's KVM run a Linux guest at all? vmlet's guests need hardware
// virtualization under /dev/kvm; the development machines' paravirtual KVM
// emulates guest kernel mode and a Linux never finishes booting there.
import { existsSync, readFileSync } from 'node:fs';

/** The CPU's virtualization extension as /proc/cpuinfo shows it, or '' when there is none. */
export function hostVirtualization(cpuinfo = existsSync('/proc/cpuinfo') ? readFileSync('/proc/cpuinfo', 'latin1') : ''): string {
  if (/\bvmx\b/.test(cpuinfo)) return 'Intel VT-x (vmx)';
  if (/\bsvm\b/.test(cpuinfo)) return 'AMD-V (svm)';
  return '';
}

/**
 * Why a Linux guest cannot run here, or null when it can (or the caller vouches
 * for the KVM: `force`, VMLET_FORCE_KVM=1, or inside hack/kvm-lab).
 */
export function linuxGuestRefusal(opts: { force?: boolean; env?: NodeJS.ProcessEnv; cpuinfo?: string } = {}): string | null {
  const env = opts.env ?? process.env;
  if (opts.force || env.VMLET_FORCE_KVM === '1' || env.VMLET_LAB === 'inside') return null;
  if (hostVirtualization(opts.cpuinfo) !== '') return null;
  return 'this host\'s CPU shows no hardware virtualization (no vmx/svm flag in /proc/cpuinfo), so its /dev/kvm cannot run a Linux guest ' +
    '(a paravirtual KVM emulates guest kernel mode and the guest never finishes booting). Run it in the standard-KVM lab instead: ' +
    'hack/kvm-lab run -- vmlet run ...; if you know this KVM runs Linux guests, pass --force-kvm (or set VMLET_FORCE_KVM=1)';
}
