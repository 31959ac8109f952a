// What every vmlet microVM boots: the guest kernel built by hack/guest-kernel
// and an initramfs whose /init is vmlet-agent (native/guest). Shared by
// `vmlet run`, the containerd shim and the CRI server (through Sandbox), and by
// the tests and benchmarks (test/helpers/guest-kernel.ts re-exports these).
import { spawnSync, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../native/ts/repo-root';
import { SandboxError } from './errors';
import { FILE_HASH_CACHE, sha256File } from './file-hash';

export interface GuestKernel {
  dir: string;
  /** ELF with the PVH entry note. */
  vmlinux: string;
  bzImage: string;
}

/**
 * The cached kernel for the current fragment/source/script, or the reason it is
 * not there. Never builds: a cold build takes ten minutes and belongs to hack/setup.
 * The cache key is computed here exactly as hack/guest-kernel computes it
 * (a unit test holds the two together): running the script costs a bash, a
 * dpkg-query and a sha256sum per `vmlet run`, about a second in the lab. The
 * script is asked only when the kernel is not there, for its message.
 */
export function findGuestKernel(): GuestKernel | { missing: string } {
  const dir = guestKernelDir();
  if (dir && existsSync(join(dir, 'vmlinux')) && existsSync(join(dir, 'bzImage'))) return { dir, vmlinux: join(dir, 'vmlinux'), bzImage: join(dir, 'bzImage') };
  const script = join(repoRoot(), 'hack', 'guest-kernel');
  const r = spawnSync(script, ['--check'], { encoding: 'utf8' });
  if (r.status !== 0) {
    const why = `${r.stderr ?? ''}`.trim() || `${script} --check exited ${r.status ?? r.signal}`;
    return { missing: why };
  }
  const found = r.stdout.trim();
  return { dir: found, vmlinux: join(found, 'vmlinux'), bzImage: join(found, 'bzImage') };
}

/** hack/guest-kernel's cache directory for this checkout (built or not), or undefined when its inputs are missing. */
export function guestKernelDir(dpkgStatus = '/var/lib/dpkg/status'): string | undefined {
  const version = dpkgVersion(KERNEL_SOURCE_PACKAGE, dpkgStatus);
  if (version === undefined || !existsSync(KERNEL_SOURCE_TARBALL)) return undefined;
  const script = join(repoRoot(), 'hack', 'guest-kernel');
  const fragment = join(repoRoot(), 'native', 'guest', 'kernel', 'vmlet.config');
  let key: string;
  try {
    // { cat fragment; echo "pkg=version"; cat script; } | sha256sum
    key = createHash('sha256').update(readFileSync(fragment)).update(`${KERNEL_SOURCE_PACKAGE}=${version}\n`).update(readFileSync(script)).digest('hex');
  } catch {
    return undefined;
  }
  return join(process.env.VMLET_CACHE || '/var/cache/vmlet', 'guest-kernel', key);
}

const KERNEL_SOURCE_PACKAGE = 'linux-source-6.1';
const KERNEL_SOURCE_TARBALL = '/usr/src/linux-source-6.1.tar.xz';

/**
 * The Version dpkg records for a package (what `dpkg-query -W -f='${Version}'` prints), from dpkg's status file.
 * The file is ~0.7 MiB on a developer host and is read on every `vmlet run`:
 * searched as bytes (native indexOf) and only the package's stanza decoded,
 * which costs a tenth of decoding it all and running a multiline RegExp.
 */
export function dpkgVersion(pkg: string, statusFile = '/var/lib/dpkg/status'): string | undefined {
  let status: Buffer;
  try {
    status = readFileSync(statusFile);
  } catch {
    return undefined;
  }
  const header = `Package: ${pkg}\n`;
  let at = status.indexOf(header);
  // A match must start a line: "Package: foo" inside another field is not a stanza.
  while (at > 0 && status[at - 1] !== 0x0a) at = status.indexOf(header, at + 1);
  if (at < 0) return undefined;
  const end = status.indexOf('\n\n', at);
  const stanza = status.subarray(at, end < 0 ? undefined : end).toString('utf8');
  const m = /^Version: (.+)$/m.exec(stanza);
  return m ? m[1].trim() : undefined;
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
  const why = notStaticElf(found);
  if (why) throw new SandboxError('NO_GUEST_AGENT', `${found} ${why}: the guest has no libc; install busybox-static`);
  return found;
}

/**
 * Why `path` is not a statically linked ELF executable (it asks for a program
 * interpreter, PT_INTERP, or is no ELF at all), or undefined if it is one.
 * Read from the ELF header rather than with file(1), which cost a process
 * per `vmlet run`. Static-pie binaries have no PT_INTERP either.
 */
export function notStaticElf(path: string): string | undefined {
  const fd = openSync(path, 'r');
  try {
    const head = Buffer.alloc(64);
    if (readSync(fd, head, 0, 64, 0) < 52 || head.readUInt32BE(0) !== 0x7f454c46) return 'is not an ELF file';
    const is64 = head[4] === 2;
    const le = head[5] === 1;
    const u16 = (b: Buffer, o: number) => (le ? b.readUInt16LE(o) : b.readUInt16BE(o));
    const u32 = (b: Buffer, o: number) => (le ? b.readUInt32LE(o) : b.readUInt32BE(o));
    const phoff = is64 ? Number(le ? head.readBigUInt64LE(32) : head.readBigUInt64BE(32)) : u32(head, 28);
    const phentsize = u16(head, is64 ? 54 : 42);
    const phnum = u16(head, is64 ? 56 : 44);
    if (phnum === 0) return 'has no program headers (not an executable)';
    if (phentsize < 4 || phnum > 4096) return 'has a malformed ELF header';
    const ph = Buffer.alloc(phentsize * phnum);
    if (readSync(fd, ph, 0, ph.length, phoff) !== ph.length) return 'has truncated program headers';
    const PT_INTERP = 3;
    for (let i = 0; i < phnum; i++) if (u32(ph, i * phentsize) === PT_INTERP) return 'is dynamically linked (it names a program interpreter)';
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** The static agent built by `make -C native/guest` (npm run build:agent). */
export const agentBinary = join(repoRoot(), 'native', 'guest', 'build', 'vmlet-agent');

function requireAgent(agent: string): void {
  if (!existsSync(agent)) throw new SandboxError('NO_GUEST_AGENT', `${agent} is missing: run npm run build:agent (make -C native/guest)`);
}

/** Bumped whenever the initramfs layout below changes, so cached copies are rebuilt. */
const INITRAMFS_LAYOUT = 'agent-initramfs/4: uncompressed; /init=stripped agent, dirs bin dev proc sys tmp run; /bin/busybox on request';

export interface AgentInitramfsOptions {
  /** The agent binary; default the one `npm run build:agent` builds. */
  agent?: string;
  /**
   * Adds a static busybox as /bin/busybox, for commands run in the agent's own
   * root (tests, diagnosis). Off for vmlet's guests: container processes run in
   * their stacked rootfs, and its 2 MiB cost every cold boot ~55 ms in the lab
   * (unpacked, then kept: see guestCmdline's retain_initrd).
   */
  busybox?: boolean;
}

/**
 * Writes `<dir>/agent-initramfs.cpio`: the agent as /init (PID 1, listening on
 * vsock port 1024), and busybox if asked for.
 *
 * Uncompressed: the guest kernel unpacks the initramfs on every cold boot, and
 * gunzipping 4 MiB took ~120 ms of an ~850 ms cold boot in the lab (median of
 * 11); reading the bytes from the host's page cache costs ~1 ms. Templates
 * boot it once and restores never unpack it.
 */
export function buildAgentInitramfs(dir: string, options: AgentInitramfsOptions = {}): string {
  const agent = options.agent ?? agentBinary;
  requireAgent(agent);
  const out = join(dir, 'agent-initramfs.cpio');
  writeAgentInitramfs(out, agent, options.busybox === true);
  return out;
}

function writeAgentInitramfs(out: string, agent: string, busybox: boolean): void {
  const root = mkdtempSync(join(tmpdir(), 'vmlet-agent-initramfs-'));
  try {
    for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'run']) mkdirSync(join(root, d));
    if (busybox) {
      copyFileSync(busyboxStatic(), join(root, 'bin', 'busybox'));
      chmodSync(join(root, 'bin', 'busybox'), 0o755);
    }
    // Without its debug info (4.6 -> 1.9 MiB): the guest kernel copies every
    // byte before the agent runs, and touches ~900 fewer pages (nested page
    // faults, hack/bench/boot.bench.ts) on the way.
    execFileSync('strip', ['-o', join(root, 'init'), agent]);
    chmodSync(join(root, 'init'), 0o755);
    // The kernel wants newc cpio; root-owned entries so /init runs as it would in production.
    execFileSync('sh', ['-c', `cd "${root}" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 > "${out}"`]);
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
 * The agent initramfs (buildAgentInitramfs) for the built agent, built once and
 * cached under `<cache>/agent-initramfs/<sha256 of its inputs>.cpio`: every
 * boot would otherwise pay a strip and a cpio. Written aside and renamed, so
 * concurrent runs never read a half-written file.
 */
export function agentInitramfs(options: AgentInitramfsOptions = {}): string {
  const agent = options.agent ?? agentBinary;
  const busybox = options.busybox === true;
  requireAgent(agent);
  // The inputs' hashes come from a cache beside the output: hashing the agent
  // and busybox again took ~0.2 s per `vmlet run` on the host, seconds in the lab.
  const hashes = join(cacheRoots()[0], 'agent-initramfs', FILE_HASH_CACHE);
  const hash = createHash('sha256').update(INITRAMFS_LAYOUT).update(sha256File(agent, hashes));
  if (busybox) hash.update('busybox').update(sha256File(busyboxStatic(), hashes));
  const key = hash.digest('hex');
  let lastError: Error | undefined;
  for (const root of cacheRoots()) {
    const dir = join(root, 'agent-initramfs');
    const out = join(dir, `${key}.cpio`);
    if (existsSync(out)) return out;
    try {
      mkdirSync(dir, { recursive: true });
      const tmp = `${out}.${process.pid}.tmp`;
      try {
        writeAgentInitramfs(tmp, agent, busybox);
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
 *
 * Three settings only make the boot shorter (lab medians of cold boots to the
 * agent's ready line, native/guest/kernel/README.md):
 * - noreplace-smp: on one vCPU the kernel otherwise rewrites each of its ~6,000
 *   LOCK prefixes through text_poke(), two page-table switches and a TLB flush
 *   apiece (~250 ms in the lab; ~1 us each on hardware). The prefixes stay.
 * - retain_initrd: the initramfs (~1 MiB, uncompressed) is not overwritten with
 *   poison and freed once unpacked (~65 ms in the lab for 4 MiB). The guest
 *   keeps that RAM out of use.
 * - no_timer_check: the kernel otherwise checks that the timer interrupt comes
 *   through the IOAPIC by spinning until 4 jiffies (16 ms at HZ=250) have passed,
 *   a guard for broken chipsets; KVM's in-kernel PIT and IOAPIC always deliver it.
 *   The same setting Kata Containers boots its guests with.
 */
export function guestCmdline(extra = ''): string {
  return `console=ttyS0 reboot=k panic=-1 noreplace-smp retain_initrd no_timer_check ${extra}`.trim();
}
