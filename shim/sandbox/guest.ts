// What every vmlet microVM boots: the guest kernel built by hack/guest-kernel
// and an initramfs whose /init is vmlet-agent (native/guest). Shared by
// `vmlet run`, the containerd shim and the CRI server (through Sandbox), and by
// the tests and benchmarks (test/helpers/guest-kernel.ts re-exports these).
import { spawnSync, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../native/ts/testguest';
import { SandboxError } from './errors';

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

/** findGuestKernel() or a SandboxError saying how to build it. */
export function requireGuestKernel(): GuestKernel {
  const found = findGuestKernel();
  if ('missing' in found) throw new SandboxError('NO_GUEST_KERNEL', `the vmlet guest kernel is not built: ${found.missing}`);
  return found;
}

/** The static busybox the agent initramfs carries (Debian busybox-static). */
export function busyboxStatic(): string {
  const candidates = ['/bin/busybox', '/usr/bin/busybox'];
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new SandboxError('NO_GUEST_AGENT', `no busybox at ${candidates.join(' or ')}: install busybox-static (hack/packages.d/kernel.txt)`);
  const file = execFileSync('file', ['-L', found], { encoding: 'utf8' });
  if (!/statically linked|static-pie linked/.test(file)) {
    throw new SandboxError('NO_GUEST_AGENT', `${found} is not statically linked (${file.trim()}): the guest has no libc; install busybox-static`);
  }
  return found;
}

/** The static agent built by `make -C native/guest` (npm run build:agent). */
export const agentBinary = join(repoRoot(), 'native', 'guest', 'build', 'vmlet-agent');

function requireAgent(agent: string): void {
  if (!existsSync(agent)) throw new SandboxError('NO_GUEST_AGENT', `${agent} is missing: run npm run build:agent (make -C native/guest)`);
}

/** Bumped whenever the initramfs layout below changes, so cached copies are rebuilt. */
const INITRAMFS_LAYOUT = 'agent-initramfs/2: /init=stripped agent, /bin/busybox, dirs bin dev proc sys tmp run';

/**
 * Writes `<dir>/agent-initramfs.cpio.gz`: the agent as /init (PID 1, listening on
 * vsock port 1024) and a static busybox in /bin for commands run in the agent's
 * own root (diagnosis; container processes run in their stacked rootfs).
 */
export function buildAgentInitramfs(dir: string, agent = agentBinary): string {
  requireAgent(agent);
  const out = join(dir, 'agent-initramfs.cpio.gz');
  writeAgentInitramfs(out, agent);
  return out;
}

function writeAgentInitramfs(out: string, agent: string): void {
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
    // The kernel wants newc cpio; root-owned entries so /init runs as it would in production.
    execFileSync('sh', ['-c', `cd "${root}" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 -n > "${out}"`]);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

/** $VMLET_CACHE (default /var/cache/vmlet), or a per-user temp cache when that is not writable. */
function cacheRoots(): string[] {
  const uid = typeof process.getuid === 'function' ? process.getuid() : 0;
  return [process.env.VMLET_CACHE || '/var/cache/vmlet', join(tmpdir(), `vmlet-cache-${uid}`)];
}

/**
 * The agent initramfs for the built agent and busybox, built once and cached
 * under `<cache>/agent-initramfs/<sha256 of its inputs>.cpio.gz`: every boot
 * would otherwise pay a cpio + gzip of ~3 MB. Written aside and renamed, so
 * concurrent runs never read a half-written file.
 */
export function agentInitramfs(agent = agentBinary): string {
  requireAgent(agent);
  const key = createHash('sha256')
    .update(INITRAMFS_LAYOUT)
    .update(readFileSync(agent))
    .update(readFileSync(busyboxStatic()))
    .digest('hex');
  let lastError: Error | undefined;
  for (const root of cacheRoots()) {
    const dir = join(root, 'agent-initramfs');
    const out = join(dir, `${key}.cpio.gz`);
    if (existsSync(out)) return out;
    try {
      mkdirSync(dir, { recursive: true });
      const tmp = `${out}.${process.pid}.tmp`;
      try {
        writeAgentInitramfs(tmp, agent);
        renameSync(tmp, out);
      } finally {
        rmSync(tmp, { force: true });
      }
      return out;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // A read-only or foreign cache is not an error while another root remains.
      if (code !== 'EACCES' && code !== 'EPERM' && code !== 'EROFS') throw e;
      lastError = e as Error;
    }
  }
  throw new SandboxError('NO_GUEST_AGENT', `cannot cache the agent initramfs: ${lastError?.message}; set VMLET_CACHE to a writable directory`);
}

/**
 * The command line vmlet boots the guest kernel with. reboot=k: a guest reboot
 * goes straight to the i8042 reset our VMM reports as 'reset'; panic=-1 turns a
 * panic into a reboot so a dead guest ends its VM instead of hanging.
 */
export function guestCmdline(extra = ''): string {
  return `console=ttyS0 reboot=k panic=-1 ${extra}`.trim();
}
