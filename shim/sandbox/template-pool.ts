// The template pool: a guest booted once per (kernel, agent initramfs, cpus,
// memory, command line, VMM build, host CPU) and snapshotted when its agent
// answers; every acquire() is a restore of that snapshot (memory mapped
// copy-on-write by the VMM) with a fresh identity set through the agent
// (SET_IDENTITY: RNG reseed, wall clock, hostname). Templates live in a
// TemplateStore (template-store.ts): made on first use, keyed by the hash of
// their inputs, made again once when a restore calls them corrupt.
//
// Disks: a restore re-opens the snapshot's disks (same count, order, mode),
// and the guest keeps what it learnt of them at boot (virtio-blk capacity,
// the block devices' page cache), so a disk with content must be the very
// bytes the template saw (`disks`, content-keyed). What makes one template
// serve every image is its empty disk slots (`diskSlots`): read-only disks of
// 0 sectors, probed at boot, never read; each restore puts a sandbox's layers
// in them and the guest learns their size from a configuration-change
// interrupt (devices/blk.h), the agent waiting for it before it mounts. So a
// template is per (kernel, agent, cpus, memory, command line); an image with
// more layers than slots gets a template made with its layers as `disks`.
// templateLauncher() plugs this into Sandbox (a VmLauncher).
import { randomBytes, createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { addonPath } from '../../native/ts/addon';
import { DiskConfig, MAX_VM_SHELLS, SnapshotError, Vm, VmConfig, VmmError } from '../../native/ts/vmm';
import { AgentClient, AgentError, IdentityResult } from '../agent/client';
import { agentInitramfs, guestCmdline, requireGuestKernel } from './guest';
import { LaunchedVm, LaunchOptions, SandboxError, SandboxSpec, virtioBlkDevice, VmLauncher, waitForAgent } from './sandbox';
import { FILE_HASH_CACHE, sha256File } from './file-hash';
import { ensureTextFile, hugeTextDir, kernelTextRange } from './huge-text';
import { Template, TemplateError, TemplateInputs, TemplateStore, templateKey, templateLog } from './template-store';

// Where the file hashes of the template key are cached (re-exported for the CLI and tests).
export { FILE_HASH_CACHE, pruneFileHashes, sha256File } from './file-hash';

/**
 * Bumped when what a template directory holds, or how it is made, changes
 * (e.g. the agent's state when snapshotted): older templates then get another
 * key and are made anew instead of being misread.
 */
export const TEMPLATE_LAYOUT = 'vmlet-template/2: snapshot/ from Vm.snapshot after the agent answered PING; vsock cid 3; disks, then empty read-only slots';

/**
 * Empty disk slots of the templates templateLauncher() makes: how many layers
 * an image may have and still share the one template. Each is a virtio-mmio
 * device (GSIs 5..23 hold 19 with vsock, machine.cc); 16 covers the images
 * commonly run (most have under 10 layers) and costs the template's boot 16
 * virtio-blk probes, once.
 */
export const DEFAULT_DISK_SLOTS = 16;

/** The most slots a template can have: 19 virtio-mmio devices (GSIs 5..23) less vsock. */
export const MAX_DISK_SLOTS = 18;

/** The guest's vsock CID in every template and restore (each VM's vsock is its own Unix socket). */
const GUEST_CID = 3;

export interface TemplateSpec {
  /** PVH vmlinux of the guest kernel. */
  kernel: string;
  /** Initramfs whose /init is vmlet-agent (shim/sandbox/guest.ts agentInitramfs()). */
  initrd: string;
  cpus: number;
  memoryMiB: number;
  /** The whole guest command line the template boots with. */
  cmdline: string;
  /** Read-only disks (image layers), attached in this order at boot and at every restore; content-keyed. */
  disks?: string[];
  /**
   * Empty read-only disk slots after `disks` (default 0, at most
   * MAX_DISK_SLOTS - disks): each acquire() may put layers in them.
   */
  diskSlots?: number;
}

/** A restore that failed because the snapshot itself is bad: the pool makes the template anew. */
export function isSnapshotCorrupt(e: unknown): boolean {
  return e instanceof SnapshotError;
}

/**
 * What makes the pool discard a template and make it anew (once): a snapshot
 * the VMM refuses, or a clone that dies or stays silent before its agent
 * answers (restore → agent is ~0.3 s even in the lab, the bound 20 s: a
 * template that restores into a dead or deaf guest is no template).
 */
export function isTemplateUnusable(e: unknown): boolean {
  return isSnapshotCorrupt(e) || (e instanceof SandboxError && (e.code === 'GUEST_DIED' || e.code === 'AGENT_TIMEOUT'));
}

/** Default bound on restore → agent answering: ~0.3 s in the lab, so far beyond it the clone is broken, not slow. */
export const DEFAULT_RESTORE_TIMEOUT_MS = 20_000;

/**
 * What a snapshot's vCPU state depends on in the host CPU: vendor, family,
 * model, stepping and feature flags of the first processor in /proc/cpuinfo
 * (the VMM hands the guest KVM's supported CPUID, which follows these). The
 * snapshot refuses another CPU itself; keying on it keeps a store shared by
 * several hosts from offering one it would refuse.
 */
export function hostCpuFingerprint(cpuinfo = readFileSync('/proc/cpuinfo', 'utf8')): string {
  const first = cpuinfo.split(/\n\s*\n/)[0] ?? '';
  const fields = new Map<string, string>();
  for (const line of first.split('\n')) {
    const m = line.match(/^([^:]+?)\s*:\s*(.*)$/);
    if (m) fields.set(m[1], m[2]);
  }
  const parts = ['vendor_id', 'cpu family', 'model', 'stepping', 'flags'].map((k) => `${k}=${fields.get(k) ?? ''}`);
  return createHash('sha256').update(parts.join('\n')).digest('hex').slice(0, 32);
}

/** The inputs a template is keyed by; the files by content. */
export function templateInputs(spec: TemplateSpec, hashCache?: string): TemplateInputs {
  const sha256 = (path: string) => sha256File(path, hashCache);
  return {
    layout: TEMPLATE_LAYOUT,
    kernel: sha256(spec.kernel),
    initrd: sha256(spec.initrd),
    cpus: spec.cpus,
    memoryMiB: spec.memoryMiB,
    cmdline: spec.cmdline,
    // The snapshot format and the device state layout are the addon's: a new
    // build may read old snapshots, but nothing says so, so it gets new ones.
    vmm: sha256(addonPath),
    cpu: hostCpuFingerprint(),
    disks: (spec.disks ?? []).map(sha256).join(','),
    diskSlots: spec.diskSlots ?? 0,
  };
}

/** A clone restored and its agent connected, identity not yet refreshed (what the warm queue holds). */
interface PreparedClone {
  launched: LaunchedVm;
  client: AgentClient;
  template: Template;
  stateDir: string;
  restoreNs: bigint;
  agentReadyNs: bigint;
  /** Set when this acquire made the template (boot + snapshot) before restoring it. */
  madeMs?: number;
}

export interface RestoredGuest extends LaunchedVm {
  client: AgentClient;
  /** The hostname SET_IDENTITY gave the guest. */
  hostname: string;
  identity: IdentityResult;
  template: Template;
  /**
   * CLOCK_MONOTONIC (process.hrtime.bigint()) at the restore call, the agent's
   * HELLO, and SET_IDENTITY's reply. For a clone taken from the warm queue the
   * first two are from when it was prepared.
   */
  timings: { restoreNs: bigint; agentReadyNs: bigint; identityNs: bigint };
  /** Whether the clone came from the warm queue. */
  warm: boolean;
  /** Set when this acquire had to make the template first (boot + snapshot), in ms. */
  madeMs?: number;
  /** Kills the VM and removes its state directory; idempotent. */
  close(): Promise<void>;
}

export interface TemplatePoolOptions {
  spec: TemplateSpec;
  /** The TemplateStore root; default $VMLET_TEMPLATE_DIR or /var/lib/vmlet/templates. */
  root?: string;
  /** Parent of each restored VM's state directory (serial log, vsock socket); default the OS temp dir. */
  stateDir?: string;
  /** Bound on the template's boot → agent answering; default 60 s (a template boot in the lab takes ~10 s). */
  agentTimeoutMs?: number;
  /** Bound on restore → agent answering; default $VMLET_RESTORE_TIMEOUT_MS or 20 s. */
  restoreTimeoutMs?: number;
  /**
   * Clones kept restored with their agent connected, so acquire() only pays
   * SET_IDENTITY; refilled in the background after each acquire. Default 0.
   * They run (idle, the agent only) and hold their private pages meanwhile.
   */
  warm?: number;
  /**
   * VM shells (Vm.fillShells) kept made for the next restores: KVM VMs whose
   * KVM_CREATE_VM already ran, topped up in the background after each
   * acquire, so the restore path skips it (~12 ms in the KVM lab on a host
   * with kvm.nx_huge_pages on). Default 0. For long-running processes; the
   * reserve is process-wide and close() drains it.
   */
  shells?: number;
}

export class TemplatePool {
  readonly store: TemplateStore;
  private readonly spec: TemplateSpec;
  private readonly stateParent: string;
  private readonly agentTimeoutMs: number;
  private readonly restoreTimeoutMs: number;
  private readonly warmTarget: number;
  private readonly warmQueue: Promise<PreparedClone>[] = [];
  private readonly shellTarget: number;
  private shellFill: Promise<void> = Promise.resolve();
  private readonly hugeTextByTemplate = new Map<string, { gpa: number; path: string }[]>();
  private closed = false;

  constructor(opts: TemplatePoolOptions) {
    this.spec = opts.spec;
    this.store = new TemplateStore({ root: opts.root });
    this.stateParent = opts.stateDir ?? tmpdir();
    this.agentTimeoutMs = opts.agentTimeoutMs ?? 60_000;
    this.restoreTimeoutMs = opts.restoreTimeoutMs ?? (Number(process.env.VMLET_RESTORE_TIMEOUT_MS) || DEFAULT_RESTORE_TIMEOUT_MS);
    this.warmTarget = opts.warm ?? 0;
    if (!Number.isInteger(this.warmTarget) || this.warmTarget < 0 || this.warmTarget > 64)
      throw new TemplateError('BAD_POOL_OPTIONS', `warm is ${String(opts.warm)}: keep 0 to 64 clones warm`);
    this.shellTarget = opts.shells ?? 0;
    if (!Number.isInteger(this.shellTarget) || this.shellTarget < 0 || this.shellTarget > MAX_VM_SHELLS)
      throw new TemplateError('BAD_POOL_OPTIONS', `shells is ${String(opts.shells)}: keep 0 to ${MAX_VM_SHELLS} VM shells made ahead`);
    const slots = this.spec.diskSlots ?? 0;
    const fixed = this.spec.disks?.length ?? 0;
    if (!Number.isInteger(slots) || slots < 0 || fixed + slots > MAX_DISK_SLOTS)
      throw new TemplateError('BAD_POOL_OPTIONS', `diskSlots is ${String(this.spec.diskSlots)} beside ${fixed} disk(s): a template holds at most ${MAX_DISK_SLOTS} disks in all`);
  }

  /** The template's inputs now, the files' hashes cached beside the templates. */
  private inputs(): TemplateInputs {
    return templateInputs(this.spec, join(this.store.root, FILE_HASH_CACHE));
  }

  /** The key of this pool's template, from the current inputs (files hashed, memoised). */
  key(): string {
    return templateKey(this.inputs());
  }

  /** The template, made now (a cold boot + snapshot) if the store has none for the current inputs. */
  template(): Promise<Template> {
    const inputs = this.inputs();
    return this.store.ensure(templateKey(inputs), inputs, (dir) => this.make(dir));
  }

  /**
   * A VM restored from the template, running, its agent connected and its
   * identity fresh (own RNG state, the host's wall clock, `hostname`).
   */
  async acquire(opts: { hostname?: string; stateDir?: string; signal?: AbortSignal; layers?: string[] } = {}): Promise<RestoredGuest> {
    if (this.closed) throw new TemplateError('POOL_CLOSED', 'acquire() after close(): make a new TemplatePool');
    const layers = opts.layers ?? [];
    const slots = this.spec.diskSlots ?? 0;
    if (layers.length > slots)
      throw new TemplateError('TOO_MANY_LAYERS', `${layers.length} layer(s) for a template with ${slots} disk slot(s): use a template made with these layers as its disks`);
    const hostname = opts.hostname ?? `vmlet-${randomBytes(4).toString('hex')}`;
    // The first acquire finds no shell made: start one now, beside the store
    // lookup; the restore takes it, or waits for it if it is still being made.
    if (this.shellTarget > 0 && Vm.heldShells() === 0) this.refillShells();
    let prepared: PreparedClone | null = null;
    let warm = false;
    // A clone for a caller-owned state directory is restored there; warm ones live in their own.
    const queued = opts.stateDir === undefined ? this.warmQueue.shift() : undefined;
    if (queued) {
      try {
        prepared = await queued;
        warm = true;
      } catch (e) {
        templateLog.warn(`a warm clone failed to come up, restoring one now: ${(e as Error).message}`);
      }
    }
    this.refill();
    prepared ??= await this.prepareFromStore(opts.stateDir, opts.signal, layers);
    try {
      // A warm clone was restored before anyone said which layers it runs:
      // its slots are empty and take the layers now, while it runs.
      if (warm) prepared = this.attachLayers(prepared, layers);
      // Before anything else runs in the clone: until this returns it shares
      // its siblings' RNG state, a stale clock and the template's hostname.
      const identity = await prepared.client.setIdentity({ clock: true, hostname });
      this.refillShells();
      return this.handOver(prepared, hostname, identity, warm);
    } catch (e) {
      await this.discardClone(prepared);
      throw e;
    }
  }

  /** `layers` put into the empty slots of a running clone, and its layer devices with them. */
  private attachLayers(p: PreparedClone, layers: string[]): PreparedClone {
    const fixed = this.spec.disks?.length ?? 0;
    layers.forEach((path, i) => p.launched.vm.attachDisk(fixed + i, { path }));
    return { ...p, launched: { ...p.launched, layerDevices: this.layerDevices(layers) } };
  }

  /** Starts warm clones up to the target (no-op when warm is 0). */
  refill(): void {
    while (!this.closed && this.warmQueue.length < this.warmTarget) {
      const p = this.prepareFromStore();
      // Consumed by acquire() or close(); never an unhandled rejection meanwhile.
      p.catch(() => undefined);
      this.warmQueue.push(p);
    }
  }

  /**
   * Tops the process's VM shells up to `shells`, in the background: after a
   * clone is handed over, so the next restore finds one made (and a restore
   * that comes while it is being made waits for it, kvm/vm_shell.h).
   */
  private refillShells(): void {
    if (this.shellTarget === 0 || this.closed) return;
    this.shellFill = this.shellFill.then(() =>
      Vm.fillShells(this.shellTarget).then(
        () => undefined,
        (e: Error) => templateLog.warn(`could not make VM shells ahead (${e.message}); restores make their own VMs`),
      ));
  }

  /** Kills the warm clones and drains the VM shells; clones already handed out stay their holders' to close. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.shellTarget > 0) {
      await this.shellFill;
      Vm.drainShells();
    }
    const queued = this.warmQueue.splice(0);
    for (const q of queued) {
      try {
        await this.discardClone(await q);
      } catch {
        // It never came up: nothing to kill.
      }
    }
  }

  private async prepareFromStore(stateDir?: string, signal?: AbortSignal, layers: string[] = []): Promise<PreparedClone> {
    const inputs = this.inputs();
    let madeMs: number | undefined;
    const make = async (dir: string): Promise<Record<string, unknown>> => {
      const t0 = Date.now();
      const meta = await this.make(dir, signal);
      madeMs = Date.now() - t0;
      return meta;
    };
    const p = await this.store.use(templateKey(inputs), inputs, make, (t) => this.prepare(t, stateDir, signal, layers), isTemplateUnusable);
    return { ...p, madeMs };
  }

  private handOver(p: PreparedClone, hostname: string, identity: IdentityResult, warm: boolean): RestoredGuest {
    const identityNs = process.hrtime.bigint();
    let closed: Promise<void> | null = null;
    return {
      ...p.launched,
      client: p.client,
      hostname,
      identity,
      template: p.template,
      timings: { restoreNs: p.restoreNs, agentReadyNs: p.agentReadyNs, identityNs },
      warm,
      madeMs: p.madeMs,
      close: () => {
        closed ??= this.discardClone(p);
        return closed;
      },
    };
  }

  private async discardClone(p: PreparedClone): Promise<void> {
    p.client.destroy();
    try {
      await p.launched.vm.kill();
    } finally {
      rmSync(p.stateDir, { recursive: true, force: true });
    }
  }
  /** Cold-boots the template guest into `dir`: the agent answers, then the VM is paused and snapshotted. */
  private async make(dir: string, signal?: AbortSignal): Promise<Record<string, unknown>> {
    const work = mkdtempSync(join(this.stateParent, 'vmlet-template-boot-'));
    const vsockPath = join(work, 'vsock.sock');
    const serialLog = join(work, 'serial.log');
    const config: VmConfig = {
      kernel: this.spec.kernel,
      initrd: this.spec.initrd,
      cmdline: this.spec.cmdline,
      memoryMiB: this.spec.memoryMiB,
      cpus: this.spec.cpus,
      serialLog,
      // The 64-bit entry as for a cold boot (sandbox.ts coldBoot): PVH would add 256 CPUID exits.
      bootProtocol: 'linux',
      disks: this.templateDisks([]),
      vsock: { cid: GUEST_CID, udsPath: vsockPath },
    };
    const t0 = Date.now();
    const vm = await Vm.create(config);
    try {
      vm.start();
      const client = await waitForAgent({ vm, vsockPath, serialLog, layerDevices: [], origin: 'template boot' }, this.agentTimeoutMs, signal);
      await client.ping();
      // The restore's transport reset drops this connection in every clone;
      // closing it first just spares the agent a dead peer.
      client.destroy();
      const bootMs = Date.now() - t0;
      await vm.pause();
      const snapshot = await vm.snapshot(join(dir, 'snapshot'));
      templateLog.info(`template booted in ${bootMs} ms, snapshot ${snapshot.memoryFileBytes} bytes on disk`);
      return {
        bootMs,
        // For people reading `vmlet templates list`; the key has their content.
        layers: this.spec.disks ?? [],
        diskSlots: this.spec.diskSlots ?? 0,
        cpus: this.spec.cpus,
        memoryMiB: this.spec.memoryMiB,
        agentVersion: client.hello?.agentVersion ?? '',
        snapshot: { version: snapshot.version, memoryBytes: snapshot.memoryBytes, memoryFileBytes: snapshot.memoryFileBytes, cpus: snapshot.cpus, kernelSha256: snapshot.kernelSha256, refusedMsrs: snapshot.refusedMsrs, skipped: snapshot.skipped, durationMs: Number(snapshot.durationNs) / 1e6 },
      };
    } finally {
      await vm.kill();
      rmSync(work, { recursive: true, force: true });
    }
  }

  /** The guest devices of the rootfs, lowest first: the fixed disks, then the slots holding `layers`. */
  private layerDevices(layers: string[]): string[] {
    return Array.from({ length: (this.spec.disks?.length ?? 0) + layers.length }, (_, i) => virtioBlkDevice(i));
  }

  /** The template's disks in device order: the fixed ones, then the slots, the first filled with `layers`. */
  private templateDisks(layers: string[]): DiskConfig[] {
    const slots = Array.from({ length: this.spec.diskSlots ?? 0 }, (_, i): DiskConfig =>
      i < layers.length ? { path: layers[i], readOnly: true } : { empty: true, readOnly: true });
    return [...(this.spec.disks ?? []).map((path): DiskConfig => ({ path, readOnly: true })), ...slots];
  }

  /**
   * The template's kernel text as a huge-page overlay (huge-text.ts), worked
   * out once per template per pool: none when the kernel is not an ELF
   * vmlinux, VMLET_HUGE_TEXT=0, or no huge tmpfs can be had here.
   */
  private hugeText(template: Template): { gpa: number; path: string }[] {
    // Keyed by the memory file itself: a template remade in the same directory is another file.
    const memory = join(template.dir, 'snapshot', 'memory');
    let id: string;
    try {
      const st = statSync(memory);
      id = `${memory}:${st.ino}:${st.mtimeMs}`;
    } catch {
      return []; // the restore reports the missing file
    }
    const known = this.hugeTextByTemplate.get(id);
    if (known) return known;
    let overlays: { gpa: number; path: string }[] = [];
    try {
      const range = kernelTextRange(this.spec.kernel);
      const dir = range ? hugeTextDir() : null;
      if (range && dir) overlays = [{ gpa: range.gpa, path: ensureTextFile(dir, template.key, memory, range) }];
    } catch (e) {
      templateLog.warn(`restores of template ${template.key} map kernel text in 4 KiB pages: ${(e as Error).message}`);
    }
    this.hugeTextByTemplate.set(id, overlays);
    return overlays;
  }

  /** Restores a clone and waits for its agent; SnapshotError here makes the store remake the template. */
  private async prepare(template: Template, givenStateDir?: string, signal?: AbortSignal, layers: string[] = []): Promise<PreparedClone> {
    const stateDir = givenStateDir ?? mkdtempSync(join(this.stateParent, 'vmlet-restored-'));
    const vsockPath = join(stateDir, 'vsock.sock');
    const serialLog = join(stateDir, 'serial.log');
    let vm: Vm | undefined;
    try {
      const restoreNs = process.hrtime.bigint();
      vm = await Vm.restore({
        snapshot: join(template.dir, 'snapshot'),
        serialLog,
        disks: this.templateDisks(layers),
        vsock: { cid: GUEST_CID, udsPath: vsockPath },
        memoryOverlays: this.hugeText(template),
        // The key already names the kernel and initrd; this catches a template
        // directory that does not hold what its key says (copied, tampered).
        expect: { kernelSha256: String(template.manifest.inputs.kernel), initrdSha256: String(template.manifest.inputs.initrd) },
      });
      vm.start();
      const launched: LaunchedVm = { vm, vsockPath, serialLog, layerDevices: this.layerDevices(layers), origin: 'template restore' };
      const client = await waitForAgent(launched, this.restoreTimeoutMs, signal);
      return { launched, client, template, stateDir, restoreNs, agentReadyNs: process.hrtime.bigint() };
    } catch (e) {
      // The store logs the message; whether the guest got its vsock reset and
      // what it printed are only here, and the VM and state dir go next.
      if (e instanceof SandboxError && vm) {
        const reset = vm.stats().vsockResetSent;
        templateLog.warn(`a clone of template ${template.key} failed (${e.code}); vsock transport reset ${reset === undefined ? 'unknown' : reset ? 'sent' : 'NOT sent'}` +
          `${e.serialTail ? `; its serial log ends:\n${e.serialTail}` : '; its serial log is empty'}`);
      }
      if (vm) await vm.kill();
      if (givenStateDir === undefined) rmSync(stateDir, { recursive: true, force: true });
      throw e;
    }
  }
}

/**
 * Why a failed restore should give way to a cold boot, or null when the error
 * is not the template's (the caller's abort, a missing guest kernel, a bug)
 * and must reach the caller as it is.
 */
export function templateFailureReason(e: unknown): string | null {
  if (e instanceof SandboxError) {
    if (e.code === 'GUEST_DIED' || e.code === 'AGENT_TIMEOUT' || e.code === 'AGENT_LOST') return `the restored guest failed: ${e.message}`;
    return null;
  }
  if (e instanceof TemplateError) return e.message;
  if (e instanceof VmmError) return `${e.name}: ${e.message}`;
  if (e instanceof AgentError) return `the restored guest's agent refused its new identity: ${e.message}`;
  return null;
}

/** Empties dir, creating it again when a discarded clone took it along. */
function clearDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const n of readdirSync(dir)) rmSync(join(dir, n), { recursive: true, force: true });
}

export interface TemplateLauncherOptions {
  /** The TemplateStore root; default $VMLET_TEMPLATE_DIR or /var/lib/vmlet/templates. */
  root?: string;
  /** Bound on a template's boot → agent answering (default: the spec's, else 60 s). */
  agentTimeoutMs?: number;
  /** Bound on restore → agent answering (TemplatePoolOptions.restoreTimeoutMs). */
  restoreTimeoutMs?: number;
  /**
   * Where a sandbox goes when its template cannot be used (cannot be made,
   * corrupt again after a remake, a restore the VMM or the guest refuses):
   * usually coldBoot. The reason is logged (warn) and put in the LaunchedVm's
   * report. Without it such failures reach the caller.
   */
  fallback?: VmLauncher;
  /** Guest kernel and agent initramfs; default hack/guest-kernel's and agentInitramfs(). */
  guest?: { kernel: string; initrd: string };
}

/**
 * A Sandbox launcher (sandbox.ts VmLauncher) that restores instead of booting:
 * one pool per (cpus, memory, command line) whose template has
 * DEFAULT_DISK_SLOTS empty slots for the sandbox's layers, or, for an image
 * with more layers than that, one per (layers, cpus, memory, command line)
 * made with its layers; each template under `root`, made on the first launch
 * that needs it. The clone gets its
 * fresh identity here, before the Sandbox makes its own connection to the agent.
 */
export function templateLauncher(opts: TemplateLauncherOptions = {}): VmLauncher & { close(): Promise<void> } {
  const pools = new Map<string, TemplatePool>();
  // Looked up once per launcher: each lookup runs helper programs
  // (hack/guest-kernel --check, file -L on busybox) that cost seconds in the
  // lab, more than the restore itself. Their content is in the template key.
  let guest = opts.guest;
  return {
    name: 'template restore',
    async launch(spec: SandboxSpec, stateDir: string, lopts: LaunchOptions = {}): Promise<LaunchedVm> {
      const signal = lopts.signal;
      // A guest that cannot be found cannot be booted either: no fallback.
      guest ??= { kernel: requireGuestKernel().vmlinux, initrd: agentInitramfs() };
      const tspec: TemplateSpec = {
        kernel: guest.kernel,
        initrd: guest.initrd,
        cpus: spec.cpus,
        memoryMiB: spec.memoryMiB,
        // The same command line coldBoot uses, so a restored sandbox is the booted one.
        cmdline: guestCmdline(`quiet ${spec.cmdline ?? ''}`),
        ...(spec.layers.length <= DEFAULT_DISK_SLOTS ? { diskSlots: DEFAULT_DISK_SLOTS } : { disks: spec.layers }),
      };
      const slotted = tspec.diskSlots !== undefined;
      const id = JSON.stringify(tspec);
      let pool = pools.get(id);
      if (!pool) {
        pool = new TemplatePool({
          spec: tspec,
          root: opts.root,
          stateDir: spec.stateDir,
          agentTimeoutMs: opts.agentTimeoutMs ?? spec.agentTimeoutMs,
          restoreTimeoutMs: opts.restoreTimeoutMs,
        });
        pools.set(id, pool);
      }
      const t0 = process.hrtime.bigint();
      let g: RestoredGuest;
      try {
        g = await pool.acquire({ stateDir, signal, layers: slotted ? spec.layers : [] });
      } catch (e) {
        if (signal?.aborted) throw new SandboxError('ABORTED', 'the sandbox start was interrupted while its template was made or restored');
        // The template's guest died while it booted: a cold boot is the same boot
        // and would die the same way, so the guest's reason (with its serial
        // tail) is the answer. An agent that did not answer in time is not
        // that sure a sign (seen in the lab right after a failed restore, when
        // a cold boot then worked): that one falls back like any other.
        if (e instanceof TemplateError && e.code === 'TEMPLATE_BUILD_FAILED' && e.cause instanceof SandboxError && e.cause.code === 'GUEST_DIED') throw e.cause;
        const reason = templateFailureReason(e);
        if (!opts.fallback || reason === null) throw e;
        templateLog.warn(`cannot start this sandbox from a template, booting it instead: ${reason}`);
        // What the failed restore left (serial log, socket) must not mix with the boot's.
        clearDir(stateDir);
        const launched = await opts.fallback.launch(spec, stateDir, lopts);
        return { ...launched, report: { ...launched.report, fallbackReason: reason } };
      }
      // The Sandbox connects on its own; this connection only carried SET_IDENTITY.
      g.client.destroy();
      const ms = (a: bigint, b: bigint) => Number(b - a) / 1e6;
      const st = g.vm.stats();
      const hostRestoreMs = st.restoredNs !== undefined && st.firstEntryNs !== undefined ? ms(st.restoredNs, st.firstEntryNs) : undefined;
      templateLog.debug(`restored a sandbox in ${ms(t0, process.hrtime.bigint()).toFixed(1)} ms: until restore ${ms(t0, g.timings.restoreNs).toFixed(1)}, restore -> agent ${ms(g.timings.restoreNs, g.timings.agentReadyNs).toFixed(1)}, identity ${ms(g.timings.agentReadyNs, g.timings.identityNs).toFixed(1)}`);
      return {
        vm: g.vm,
        vsockPath: g.vsockPath,
        serialLog: g.serialLog,
        layerDevices: g.layerDevices,
        origin: g.origin,
        report: {
          template: {
            key: g.template.key,
            madeMs: g.madeMs,
            restoreToAgentMs: ms(g.timings.restoreNs, g.timings.agentReadyNs),
            hostRestoreMs,
            identityMs: ms(g.timings.agentReadyNs, g.timings.identityNs),
          },
        },
      };
    },
    async close() {
      for (const p of pools.values()) await p.close();
    },
  };
}
