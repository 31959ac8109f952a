// The guest kernel (hack/guest-kernel) from the test and benchmark side: where
// the cached build is, a busybox initramfs to boot it with, and the serial
// markers its /init prints. Used by test/lab/guest-boot.test.ts and
// hack/bench/boot.bench.ts; nothing here talks to a VMM.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../native/ts/testguest';

export interface GuestKernel {
  dir: string;
  /** ELF with the PVH entry note. */
  vmlinux: string;
  bzImage: string;
}

/**
 * The cached kernel for the current fragment/source/script, or the reason it is
 * not there. Never builds: a cold build takes ten minutes and belongs to hack/setup.
 */
export function findGuestKernel(): GuestKernel | { missing: string } {
  const script = join(repoRoot(), 'hack', 'guest-kernel');
  const r = spawnSync(script, ['--check'], { encoding: 'utf8' });
  if (r.status !== 0) {
    const why = `${r.stderr ?? ''}`.trim() || `${script} --check exited ${r.status ?? r.signal}`;
    return { missing: why };
  }
  const dir = r.stdout.trim();
  return { dir, vmlinux: join(dir, 'vmlinux'), bzImage: join(dir, 'bzImage') };
}

/** Printed by every test /init once it runs: the boot-to-init measurement point. */
export const INIT_MARKER = 'VMLET-INIT-REACHED';
/** Printed after the /init body ran to the end. */
export const DONE_MARKER = 'VMLET-INIT-DONE';

/** The static busybox the initramfs is built from (Debian busybox-static). */
export function busyboxStatic(): string {
  const candidates = ['/bin/busybox', '/usr/bin/busybox'];
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`no busybox at ${candidates.join(' or ')}: install busybox-static (hack/packages.d/kernel.txt)`);
  const file = execFileSync('file', ['-L', found], { encoding: 'utf8' });
  if (!/statically linked|static-pie linked/.test(file)) {
    throw new Error(`${found} is not statically linked (${file.trim()}): the guest has no libc; install busybox-static`);
  }
  return found;
}

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

/** The static agent built by `make -C native/guest` (npm run build:agent). */
export const agentBinary = join(repoRoot(), 'native', 'guest', 'build', 'vmlet-agent');

/**
 * Writes `<dir>/agent-initramfs.cpio.gz`: the agent as /init (PID 1, listening on
 * vsock port 1024) and a static busybox in /bin for the commands run through it.
 */
export function buildAgentInitramfs(dir: string, agent = agentBinary): string {
  if (!existsSync(agent)) throw new Error(`${agent} is missing: run npm run build:agent (make -C native/guest)`);
  const root = mkdtempSync(join(tmpdir(), 'vmlet-agent-initramfs-'));
  try {
    for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'run']) mkdirSync(join(root, d));
    copyFileSync(busyboxStatic(), join(root, 'bin', 'busybox'));
    chmodSync(join(root, 'bin', 'busybox'), 0o755);
    // Without its debug info (4.6 -> 1.9 MiB): the guest kernel gunzips and
    // copies every byte before the agent runs, and touches ~900 fewer pages
    // (nested page faults, hack/bench/boot.bench.ts) on the way.
    execFileSync('strip', ['-o', join(root, 'init'), agent]);
    chmodSync(join(root, 'init'), 0o755);
    const out = join(dir, 'agent-initramfs.cpio.gz');
    execFileSync('sh', ['-c', `cd "${root}" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "${out}"`]);
    return out;
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

/**
 * The command line the tests and the benchmark boot with. reboot=k: a guest reboot
 * goes straight to the i8042 reset our VMM reports as 'reset'; panic=-1 turns a panic
 * into a reboot so a broken boot ends instead of hanging.
 */
export function guestCmdline(extra = ''): string {
  return `console=ttyS0 reboot=k panic=-1 ${extra}`.trim();
}
