// A Sandbox is one microVM running vmlet-agent with a container rootfs stacked
// from squashfs layers: the unit `vmlet run`, the containerd shim and the CRI
// server all stand on. How the VM comes to exist is a VmLauncher: a cold boot
// of the guest kernel (coldBoot), or a restore from the template pool
// (template-pool.ts templateLauncher); everything after launch() (agent wait,
// rootfs, exec, stop) is the same code for both.
import { closeSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm, VmExit, VmStats } from '../../native/ts/vmm';
import { AgentClient, AgentError, AgentProcess, ExecOptions } from '../agent/client';
import { SandboxError } from './errors';
import { agentInitramfs, guestCmdline, requireGuestKernel } from './guest';

export { SandboxError } from './errors';
export type { SandboxErrorCode } from './errors';

/** The guest kernel is built with NR_CPUS=64 (native/guest/kernel/vmlet.config). */
export const MAX_CPUS = 64;
export const MIN_MEMORY_MIB = 64;
export const MAX_MEMORY_MIB = 65536;
/** virtio-mmio devices each take an IRQ line of the IOAPIC; leave room for vsock and later devices. */
export const MAX_LAYERS = 16;

export interface SandboxSpec {
  cpus: number;
  memoryMiB: number;
  /** squashfs images, lowest first; attached read-only as virtio-blk and stacked under overlayfs. */
  layers: string[];
  /** Parent of the sandbox's state directory (serial log, vsock socket); default the OS temp dir. */
  stateDir?: string;
  /** Bound on boot → agent answering; default $VMLET_AGENT_TIMEOUT_MS or 60 s. */
  agentTimeoutMs?: number;
  /** Extra guest kernel command line. */
  cmdline?: string;
}

/** A VM that runs (or is about to run) vmlet-agent, as a launcher hands it over. */
export interface LaunchedVm {
  vm: Vm;
  /** Host end of the guest's hybrid vsock. */
  vsockPath: string;
  serialLog: string;
  /** Guest device of each spec layer, in spec order (e.g. /dev/vda). */
  layerDevices: string[];
  /** For reports: 'cold boot' or 'template restore'. */
  origin: string;
  /** How the launcher got there, for --stats and logs. */
  report?: LaunchReport;
}

export interface LaunchReport {
  /** A restored VM: its template and the phases of the restore. */
  template?: {
    key: string;
    /** Set when this launch made the template first (boot + snapshot), in ms. */
    madeMs?: number;
    /** Vm.restore called → the agent answered HELLO. */
    restoreToAgentMs: number;
    /** Vm.restore called → first vCPU entry: the VMM's own part. */
    hostRestoreMs?: number;
    /** SET_IDENTITY's round trip (RNG reseed, clock, hostname). */
    identityMs: number;
  };
  /** A booted VM that a template should have given: why the template could not be used. */
  fallbackReason?: string;
}

export interface LaunchOptions {
  /** Aborts a launch in progress (Ctrl-C during boot); the launcher then throws SandboxError ABORTED. */
  signal?: AbortSignal;
}

/**
 * Produces a running VM for a spec inside `stateDir` (which the Sandbox owns
 * and removes). A template pool implements this with a restore; it must attach
 * the spec's layers (or refuse with BAD_SPEC) and never share a state dir.
 */
export interface VmLauncher {
  readonly name: string;
  launch(spec: SandboxSpec, stateDir: string, opts?: LaunchOptions): Promise<LaunchedVm>;
}

/** virtio-blk names in probe order: vda..vdz, vdaa... (the kernel's sd_format_disk_name scheme). */
export function virtioBlkDevice(index: number): string {
  let name = '';
  let i = index + 1;
  while (i > 0) {
    i -= 1;
    name = String.fromCharCode(97 + (i % 26)) + name;
    i = Math.floor(i / 26);
  }
  return `/dev/vd${name}`;
}

const SQUASHFS_MAGIC = Buffer.from('hsqs', 'latin1');

/** Refuses, before any VM exists, a layer the guest could not mount. */
export function checkLayer(path: string): void {
  let size: number;
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new SandboxError('BAD_LAYER', `layer ${path} is not a regular file: give a squashfs image (a directory must be converted first)`);
    size = st.size;
  } catch (e) {
    if (e instanceof SandboxError) throw e;
    throw new SandboxError('BAD_LAYER', `layer ${path} cannot be read: ${(e as Error).message}`);
  }
  const superblock = Buffer.alloc(96);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, superblock, 0, 96, 0);
  } finally {
    closeSync(fd);
  }
  if (size < 96 || !superblock.subarray(0, 4).equals(SQUASHFS_MAGIC)) {
    throw new SandboxError('BAD_LAYER', `layer ${path} is not a squashfs image (no 'hsqs' superblock): build one with mksquashfs -comp zstd, or pass a directory to vmlet run`);
  }
  // The guest kernel is built with zstd only (native/guest/kernel/vmlet.config); any
  // other compressor fails at mount time inside the guest with a bare EINVAL.
  const compressor = superblock.readUInt16LE(20);
  if (compressor !== SQUASHFS_ZSTD) {
    const name = SQUASHFS_COMPRESSORS[compressor] ?? `unknown compressor id ${compressor}`;
    throw new SandboxError('BAD_LAYER', `layer ${path} is a ${name} squashfs; the vmlet guest kernel reads only zstd: rebuild it with mksquashfs -comp zstd, or pass a directory to vmlet run`);
  }
}

const SQUASHFS_ZSTD = 6;
const SQUASHFS_COMPRESSORS: Record<number, string> = { 1: 'gzip', 2: 'lzma', 3: 'lzo', 4: 'xz', 5: 'lz4', 6: 'zstd' };

export function checkSpec(spec: SandboxSpec): void {
  const bad = (m: string): never => {
    throw new SandboxError('BAD_SPEC', m);
  };
  if (!Number.isInteger(spec.cpus) || spec.cpus < 1 || spec.cpus > MAX_CPUS) bad(`cpus is ${spec.cpus}: use a whole number from 1 to ${MAX_CPUS} (the guest kernel's NR_CPUS)`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < MIN_MEMORY_MIB || spec.memoryMiB > MAX_MEMORY_MIB)
    bad(`memory is ${spec.memoryMiB} MiB: use a whole number from ${MIN_MEMORY_MIB} to ${MAX_MEMORY_MIB}`);
  if (spec.layers.length === 0) bad('a sandbox needs at least one rootfs layer');
  if (spec.layers.length > MAX_LAYERS) bad(`${spec.layers.length} layers: at most ${MAX_LAYERS} can be attached (flatten the image)`);
  for (const l of spec.layers) checkLayer(l);
}

/** Boots the guest kernel with the agent initramfs; layers become virtio-blk disks in order. */
export const coldBoot: VmLauncher = {
  name: 'cold boot',
  async launch(spec, stateDir) {
    const kernel = requireGuestKernel();
    const initrd = agentInitramfs();
    const vsockPath = join(stateDir, 'vsock.sock');
    const serialLog = join(stateDir, 'serial.log');
    // quiet: every console byte is a VM exit; a panic still prints (KERN_EMERG).
    const vm = await Vm.create({
      kernel: kernel.vmlinux,
      initrd,
      cmdline: guestCmdline(`quiet ${spec.cmdline ?? ''}`),
      memoryMiB: spec.memoryMiB,
      cpus: spec.cpus,
      serialLog,
      // The vmlinux's 64-bit entry, not its PVH note: PVH makes the kernel look for
      // Xen first, 256 CPUIDs over 0x40000000..0x4000ff00, each a VM exit (~300 fewer
      // exits and ~80 ms to agent ready in the lab; hack/bench/boot.bench.ts).
      bootProtocol: 'linux',
      disks: spec.layers.map((path) => ({ path, readOnly: true })),
      vsock: { cid: 3, udsPath: vsockPath },
    });
    vm.start();
    return { vm, vsockPath, serialLog, layerDevices: spec.layers.map((_, i) => virtioBlkDevice(i)), origin: 'cold boot' };
  },
};

/** The last `lines` lines of a serial log ('' when there is none). */
export async function serialTail(serialLog: string, lines = 40): Promise<string> {
  let text: string;
  try {
    const buf = await readFile(serialLog);
    // A panic dump can be long; the tail is what says why.
    text = buf.subarray(Math.max(0, buf.length - 64 * 1024)).toString('latin1');
  } catch {
    return '';
  }
  return text.replace(/\r/g, '').split('\n').slice(-lines - 1).join('\n').trimEnd();
}

export function describeExit(exit: VmExit): string {
  switch (exit.reason) {
    case 'guest-exit':
      return `guest exit code ${exit.code}`;
    case 'reset':
      return 'the guest reset (a kernel panic reboots it)';
    case 'emulation-failure':
      return `emulation failure at RIP 0x${exit.rip.toString(16)}: ${exit.message}`;
    case 'shutdown':
    case 'error':
      return `${exit.reason}: ${exit.message}`;
    case 'killed':
      return 'killed';
  }
}

export interface SandboxTimings {
  /** launch() called (ms since the epoch, Date.now()). */
  launchStartMs: number;
  /** launch() returned: the VM exists and runs (a cold boot has read the kernel and created the VM). */
  launchedMs?: number;
  /** The agent answered HELLO. */
  agentReadyMs?: number;
  /** The rootfs is stacked. */
  rootfsReadyMs?: number;
}

const ROOTFS = 'rootfs';

export class Sandbox {
  private stopped: Promise<void> | null = null;
  private vmExit: VmExit | null = null;
  readonly timings: SandboxTimings;

  private constructor(
    readonly launched: LaunchedVm,
    readonly client: AgentClient,
    private readonly stateDir: string,
    timings: SandboxTimings,
  ) {
    this.timings = timings;
    void launched.vm.wait().then((e) => {
      this.vmExit = e;
    }, () => undefined);
  }

  /**
   * Launches a VM, waits for its agent (bounded), sets the guest clock and
   * stacks the layers as the rootfs processes run in. Any failure tears the VM
   * down and removes the state directory before it is thrown.
   */
  static async start(spec: SandboxSpec, opts: { launcher?: VmLauncher; signal?: AbortSignal } = {}): Promise<Sandbox> {
    checkSpec(spec);
    const launcher = opts.launcher ?? coldBoot;
    const aborted = (): void => {
      if (opts.signal?.aborted) throw new SandboxError('ABORTED', 'the sandbox start was interrupted');
    };
    aborted();
    const stateDir = mkdtempSync(join(spec.stateDir ?? tmpdir(), 'vmlet-sandbox-'));
    const timings: SandboxTimings = { launchStartMs: Date.now() };
    let launched: LaunchedVm | undefined;
    let client: AgentClient | undefined;
    try {
      launched = await launcher.launch(spec, stateDir, { signal: opts.signal });
      timings.launchedMs = Date.now();
      const timeout = spec.agentTimeoutMs ?? (Number(process.env.VMLET_AGENT_TIMEOUT_MS) || 60_000);
      client = await waitForAgent(launched, timeout, opts.signal);
      timings.agentReadyMs = Date.now();
      aborted();
      await client.setClock();
      try {
        await client.mountRootfs(ROOTFS, launched.layerDevices);
      } catch (e) {
        throw new SandboxError('ROOTFS_FAILED', `the agent could not stack the rootfs from ${spec.layers.join(', ')}: ${(e as Error).message}`, {
          serialTail: await serialTail(launched.serialLog),
        });
      }
      timings.rootfsReadyMs = Date.now();
      return new Sandbox(launched, client, stateDir, timings);
    } catch (e) {
      client?.destroy();
      if (launched) await launched.vm.kill();
      rmSync(stateDir, { recursive: true, force: true });
      if (e instanceof AgentError && launched) {
        // The connection broke between HELLO and the rootfs: say whether the guest died.
        const exit = await Promise.race([launched.vm.wait(), new Promise<null>((r) => setTimeout(() => r(null), 1000))]);
        throw new SandboxError('AGENT_LOST', `the agent failed during start-up: ${e.message}${exit ? ` (${describeExit(exit)})` : ''}`);
      }
      throw e;
    }
  }

  /** Starts a process in the sandbox's rootfs. */
  exec(opts: Omit<ExecOptions, 'rootfs'>): Promise<AgentProcess> {
    return this.client.exec({ ...opts, rootfs: ROOTFS });
  }

  /** Resolves when the VM stops, for whatever reason (a panic, stop(), ...). */
  exited(): Promise<VmExit> {
    return this.launched.vm.wait();
  }

  /** The VM's exit when it has already stopped. */
  get exit(): VmExit | null {
    return this.vmExit;
  }

  stats(): VmStats {
    return this.launched.vm.stats();
  }

  serialTail(lines = 40): Promise<string> {
    return serialTail(this.launched.serialLog, lines);
  }

  /** Tears the VM down and removes every file of the sandbox; idempotent. */
  stop(): Promise<void> {
    if (!this.stopped) {
      this.stopped = (async () => {
        this.client.destroy();
        try {
          await this.launched.vm.kill();
        } finally {
          rmSync(this.stateDir, { recursive: true, force: true });
        }
      })();
    }
    return this.stopped;
  }
}

/**
 * Polls the hybrid vsock until the agent answers HELLO. The host end refuses
 * CONNECT until the guest listens, so a refusal means "not yet"; the VM
 * stopping or the bound passing ends the wait with the serial tail.
 */
export async function waitForAgent(launched: LaunchedVm, timeoutMs: number, signal?: AbortSignal): Promise<AgentClient> {
  const t0 = Date.now();
  let exit: VmExit | null = null;
  void launched.vm.wait().then((e) => {
    exit = e;
  }, () => undefined);
  let lastError = '';
  for (;;) {
    if (signal?.aborted) throw new SandboxError('ABORTED', 'the sandbox start was interrupted while the guest booted');
    if (exit) {
      throw new SandboxError('GUEST_DIED', `the guest stopped before its agent answered: ${describeExit(exit)}`, {
        exit,
        serialTail: await serialTail(launched.serialLog),
      });
    }
    if (Date.now() - t0 > timeoutMs) {
      throw new SandboxError('AGENT_TIMEOUT', `the guest agent did not answer within ${timeoutMs} ms (last: ${lastError || 'no attempt'}); raise VMLET_AGENT_TIMEOUT_MS if this host is slow`, {
        serialTail: await serialTail(launched.serialLog),
      });
    }
    // One attempt can hang: the VMM holds a CONNECT until the guest's vsock driver
    // answers, and a guest that is up but not serving vsock never does. Bound it by
    // what is left of the wait; a late success is closed.
    const attempt = AgentClient.connectHybridVsock(launched.vsockPath);
    const left = Math.max(1, timeoutMs - (Date.now() - t0));
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const r = await Promise.race([
      attempt.then((client) => ({ client }), (e: Error) => ({ error: e.message })),
      new Promise<{ error: string }>((resolve) => {
        timer = setTimeout(() => resolve({ error: `CONNECT unanswered after ${left} ms` }), left);
        onAbort = () => resolve({ error: 'aborted' });
        signal?.addEventListener('abort', onAbort, { once: true });
      }),
    ]);
    clearTimeout(timer);
    if (onAbort) signal?.removeEventListener('abort', onAbort);
    if ('client' in r) return r.client;
    attempt.then((c) => c.destroy(), () => undefined);
    lastError = r.error;
    await new Promise((res) => setTimeout(res, 50));
  }
}
