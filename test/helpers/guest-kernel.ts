// The guest kernel (hack/guest-kernel) from the test and benchmark side: a
// busybox initramfs to boot it with and the serial markers its /init prints,
// beside the runtime parts (kernel lookup, agent initramfs, command line)
// re-exported from shim/sandbox/guest.ts. Used by test/lab/guest-boot.test.ts
// and hack/bench/boot.bench.ts; nothing here talks to a VMM.
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { busyboxStatic, findGuestKernel, GuestKernel } from '../../shim/sandbox/guest';
import { requireKvm } from './kvm';

export { agentBinary, buildAgentInitramfs, busyboxStatic, findGuestKernel, guestCmdline } from '../../shim/sandbox/guest';
export type { GuestKernel } from '../../shim/sandbox/guest';

/**
 * For a `before` hook of a test/lab suite: skips it loudly unless it runs inside
 * hack/kvm-lab with a usable /dev/kvm and the guest kernel built; returns the kernel.
 */
export function requireLabGuestKernel(ctx: Mocha.Context): GuestKernel {
  if (process.env.VMLET_LAB !== 'inside') {
    console.log('      !!! SKIPPED (runs only inside hack/kvm-lab; test/run.mjs puts it there)');
    ctx.skip();
  }
  requireKvm(ctx);
  const found = findGuestKernel();
  if ('missing' in found) {
    console.log(`      !!! SKIPPED (the guest kernel is not built): ${found.missing}`);
    ctx.skip();
  }
  return found as GuestKernel;
}

/** Printed by every test /init once it runs: the boot-to-init measurement point. */
export const INIT_MARKER = 'VMLET-INIT-REACHED';
/** Printed after the /init body ran to the end. */
export const DONE_MARKER = 'VMLET-INIT-DONE';

/**
 * Writes `<dir>/initramfs.cpio.gz` whose /init is `#!/bin/busybox sh` + `body`.
 * /init prints INIT_MARKER first, runs `body`, prints DONE_MARKER and reboots, so a
 * VMM sees the guest end (an i8042 reset with reboot=k, a triple fault under QEMU microvm).
 */
export function buildBusyboxInitramfs(dir: string, body: string): string {
  const root = mkdtempSync(join(tmpdir(), 'vmlet-initramfs-'));
  try {
    for (const d of ['bin', 'dev', 'proc', 'sys', 'mnt', 'tmp']) mkdirSync(join(root, d));
    copyFileSync(busyboxStatic(), join(root, 'bin', 'busybox'));
    chmodSync(join(root, 'bin', 'busybox'), 0o755);
    writeFileSync(
      join(root, 'init'),
      [
        '#!/bin/busybox sh',
        `/bin/busybox echo ${INIT_MARKER}`,
        '/bin/busybox --install -s /bin',
        'export PATH=/bin',
        body,
        `echo ${DONE_MARKER}`,
        'reboot -f',
        '',
      ].join('\n'),
      { mode: 0o755 },
    );
    const out = join(dir, 'initramfs.cpio.gz');
    // The kernel wants newc cpio; root-owned entries so /init runs as it would in production.
    execFileSync('sh', ['-c', `cd "${root}" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "${out}"`]);
    return out;
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}
