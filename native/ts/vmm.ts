// The typed facade of the VMM in the native addon: the only way TypeScript
// starts, pauses and stops microVMs. See the VMM contract (issue 3).
//
// Lifetime: a Vm's resources (vCPU threads, KVM fds, guest RAM) are freed when
// it exits or is killed, never by the garbage collector; a running VM keeps
// the Node process alive like a child process does. Always kill() or wait().
import { addonPath, loadAddon } from './addon';

export type DiskConfig = MediumDisk | EmptyDiskSlot;

/** A disk backed by a file or block device. */
export interface MediumDisk {
  path: string;
  readOnly?: boolean;
  /** VIRTIO_BLK_T_GET_ID answer (at most 20 bytes). */
  id?: string;
  empty?: false;
}

/**
 * A read-only disk with no medium: 0 sectors. A VM booted with such slots and
 * snapshotted can be restored with a file in each slot (any size; the guest
 * sees it through a configuration-change interrupt), so one template serves
 * any image's layers. Restored as `{ empty: true, readOnly: true }` it stays empty.
 */
export interface EmptyDiskSlot {
  empty: true;
  readOnly: true;
  id?: string;
}

export interface VmConfig {
  /** PVH ELF, ELF vmlinux or bzImage. */
  kernel: string;
  initrd?: string;
  /** virtio_mmio.device=... entries are appended by the VMM. */
  cmdline?: string;
  memoryMiB: number;
  cpus: number;
  /** File receiving the 8250 output, byte-exact and in order (created or truncated). */
  serialLog: string;
  disks?: DiskConfig[];
  vsock?: { cid: number; udsPath: string };
  /** 'auto' (default): PVH when the ELF has a PVH note, else the Linux 64-bit protocol. */
  bootProtocol?: 'auto' | 'pvh' | 'linux';
  /** Hide KVM paravirt features (CPUID 0x40000001) from the guest. */
  maskKvmParavirt?: boolean;
  /** KVM device node; default $VMLET_KVM_DEVICE, else /dev/kvm. */
  kvmDevice?: string;
}

export type VmExit =
  | { reason: 'guest-exit'; code: number }
  | { reason: 'reset' }
  | { reason: 'shutdown'; message: string }
  | { reason: 'emulation-failure'; message: string; rip: bigint; instruction: Buffer }
  | { reason: 'killed' }
  | { reason: 'error'; message: string };

export interface VmStats {
  /** VM exits by reason ('io', 'mmio', 'hlt', ..., 'io-unclaimed', 'mmio-unclaimed', 'kicked'). */
  exits: Record<string, number>;
  /** CLOCK_MONOTONIC (the clock of process.hrtime.bigint()) of the first KVM_RUN. */
  firstEntryNs?: bigint;
  /** CLOCK_MONOTONIC when the VMM began creating the VM. */
  createdNs?: bigint;
  /** Booted VMs: nanoseconds spent putting the kernel and initrd into guest RAM (part of createdNs -> firstEntryNs). */
  bootLoadNs?: bigint;
  /** CLOCK_MONOTONIC when Vm.restore began (restored VMs only): restore call → first vCPU entry is firstEntryNs - restoredNs. */
  restoredNs?: bigint;
  /** Restored VMs: whether VIRTIO_VSOCK_EVENT_TRANSPORT_RESET reached the guest (false when its vsock driver was not live). */
  vsockResetSent?: boolean;
  /** Restored VMs: bytes of RAM mapped from RestoreOptions.memoryOverlays. */
  memoryOverlayBytes?: number;
  /** Whether the VM was made on a pre-made KVM VM from the shell reserve (Vm.fillShells), skipping KVM_CREATE_VM. */
  vmShell: boolean;
}

/** What Vm.snapshot wrote. */
export interface SnapshotInfo {
  dir: string;
  /** Format version of the state file. */
  version: number;
  /** Guest RAM size. */
  memoryBytes: number;
  /** Bytes the sparse memory file occupies on disk. */
  memoryFileBytes: number;
  /** Bytes of non-zero guest pages written to it. */
  memoryDataBytes: number;
  cpus: number;
  /** SHA-256 (hex) of the kernel the snapshot's memory was booted from. */
  kernelSha256: string;
  /** MSRs KVM lists but refused to read on this host (left out of the snapshot). */
  refusedMsrs: number[];
  /** vCPU state this KVM cannot save at all (e.g. no XSAVE ioctls), with the reason. */
  skipped: string[];
  durationNs: bigint;
}

export interface RestoreOptions {
  /** A directory written by Vm.snapshot. */
  snapshot: string;
  /** File receiving the restored VM's serial output (created or truncated). */
  serialLog: string;
  /**
   * The snapshot's disks re-opened: same count, order, readOnly and size, else
   * SnapshotError; a slot that was empty in the snapshot takes a file of any size.
   */
  disks?: DiskConfig[];
  /** Required when the snapshot has vsock; the guest gets a transport-reset event and re-reads the CID. */
  vsock?: { cid: number; udsPath: string };
  kvmDevice?: string;
  /** Re-read the whole memory file and check its checksum first (slow; off by default). */
  verifyMemory?: boolean;
  /** Refuse (SnapshotError) a snapshot booted from another kernel/initrd: SHA-256 hex of the expected files. */
  expect?: { kernelSha256?: string; initrdSha256?: string };
  /**
   * RAM ranges read from other files instead of the memory file, each mapped
   * copy-on-write over [gpa, gpa + its size): for a file on a huge-page tmpfs
   * holding the same bytes, so the host and KVM map the range with 2 MiB
   * pages (shim/sandbox/huge-text.ts). gpa and size in whole 2 MiB, inside
   * RAM, not overlapping (GuestMemoryError otherwise). The file must hold the
   * memory file's bytes for the range: the guest sees what it holds.
   */
  memoryOverlays?: { gpa: number; path: string }[];
}

/** A snapshot directory's recorded inputs (Vm.inspectSnapshot), checked but not restored. */
export interface SnapshotDescription
  extends Pick<SnapshotInfo, 'dir' | 'version' | 'memoryBytes' | 'memoryFileBytes' | 'memoryDataBytes' | 'cpus' | 'kernelSha256'> {
  kernel: string;
  initrd?: string;
  initrdSha256?: string;
  /** The command line given at creation (without the VMM's virtio_mmio entries). */
  cmdline: string;
  disks: { readOnly: boolean; id: string }[];
  vsock: boolean;
}

/** Every error the VMM raises; `op` names the failing operation, `code` the errno name when there is one. */
export class VmmError extends Error {
  op?: string;
  code?: string;
  errno?: number;
  constructor(message: string, init?: { op?: string; code?: string; errno?: number }) {
    super(message);
    this.name = new.target.name;
    if (init) Object.assign(this, init);
  }
}
/** /dev/kvm missing or not permitted, or an ioctl refused. */
export class KvmError extends VmmError {}
/** Kernel/initrd missing or not bootable. */
export class BootError extends VmmError {}
/** A device's backing file, socket or log could not be set up. */
export class DeviceError extends VmmError {}
/** Guest RAM could not be created or mapped. */
export class GuestMemoryError extends VmmError {}
/** The config or call is wrong: what was asked and how to fix it is in the message. */
export class InvalidArgumentError extends VmmError {}
/** A snapshot is corrupt, truncated, of an unknown version, from another CPU/KVM, or does not fit the devices given. */
export class SnapshotError extends VmmError {}

const errorClasses: Record<string, new (m: string, i?: { op?: string; code?: string; errno?: number }) => VmmError> = {
  KvmError,
  BootError,
  DeviceError,
  GuestMemoryError,
  InvalidArgumentError,
  SnapshotError,
};

function typed(e: unknown): unknown {
  if (!(e instanceof Error) || e instanceof VmmError) return e;
  const raw = e as Error & { op?: string; code?: string; errno?: number };
  const cls = errorClasses[raw.name];
  if (!cls) return e;
  return new cls(raw.message, { op: raw.op, code: raw.code, errno: raw.errno });
}

interface NativeVmHandle {
  start(): void;
  pause(): Promise<void>;
  resume(): void;
  kill(): Promise<VmExit>;
  wait(): Promise<VmExit>;
  stats(): VmStats;
  cmdline(): string;
  attachDisk(index: number, path: string): void;
  snapshot(dir: string): Promise<SnapshotInfo>;
  kvmStats(): Record<string, bigint>;
}
interface NativeAddon {
  createVm(config: VmConfig): Promise<NativeVmHandle>;
  restoreVm(options: RestoreOptions): Promise<NativeVmHandle>;
  inspectSnapshot(dir: string): Promise<SnapshotDescription>;
  defaultKvmDevice(): string;
  fillVmShells(count: number, kvmDevice?: string): Promise<number>;
  drainVmShells(): number;
  heldVmShells(): number;
}

export { addonPath };

/** The most VM shells one process may hold (kvm/vm_shell.h kMaxHeld). */
export const MAX_VM_SHELLS = 16;

function native(): NativeAddon {
  return loadAddon<NativeAddon>((message) => new VmmError(message));
}

function validate(config: VmConfig): void {
  const bad = (what: string): never => {
    throw new InvalidArgumentError(`invalid VM config: ${what}`, { op: 'create VM' });
  };
  if (typeof config !== 'object' || config === null) bad('the config must be an object');
  if (typeof config.kernel !== 'string' || config.kernel === '') bad('kernel must be the path of a PVH ELF, ELF vmlinux or bzImage');
  if (!Number.isInteger(config.memoryMiB) || config.memoryMiB < 2) bad(`memoryMiB is ${config.memoryMiB}: use a whole number >= 2`);
  // 254: 8-bit APIC ids, 0xff is broadcast, one id goes to the IOAPIC.
  if (!Number.isInteger(config.cpus) || config.cpus < 1 || config.cpus > 254) bad(`cpus is ${config.cpus}: use 1..254`);
  if (typeof config.serialLog !== 'string' || config.serialLog === '') bad('serialLog must be the path of a file to receive serial output');
  if (config.vsock && (!Number.isInteger(config.vsock.cid) || config.vsock.cid < 3))
    bad(`vsock.cid is ${config.vsock.cid}: guest CIDs start at 3 (0-2 are reserved)`);
}

export class Vm {
  private exited = false;
  private readonly done: Promise<VmExit>;

  private constructor(private readonly handle: NativeVmHandle) {
    this.done = handle.wait().then(
      (exit) => {
        this.exited = true;
        return exit;
      },
      (e: unknown) => {
        this.exited = true;
        throw typed(e);
      },
    );
    // A VM nobody waits on must not turn its exit into an unhandled rejection.
    this.done.catch(() => undefined);
  }

  /** Allocates RAM, creates the KVM VM and vCPUs and loads the kernel; nothing runs until start(). */
  static async create(config: VmConfig): Promise<Vm> {
    validate(config);
    try {
      return new Vm(await native().createVm(config));
    } catch (e) {
      throw typed(e);
    }
  }

  /**
   * A new VM from a snapshot, paused-equivalent: nothing runs until start().
   * RAM is the snapshot's memory file mapped copy-on-write (never copied);
   * the disks are re-opened from `disks`, serial goes to `serialLog`, vsock
   * gets the new cid/udsPath and the guest a transport-reset event.
   */
  static async restore(options: RestoreOptions): Promise<Vm> {
    const bad = (what: string): never => {
      throw new InvalidArgumentError(`invalid restore options: ${what}`, { op: 'restore VM' });
    };
    if (typeof options !== 'object' || options === null) bad('the options must be an object');
    if (typeof options.snapshot !== 'string' || options.snapshot === '') bad('snapshot must be the directory Vm.snapshot wrote');
    if (typeof options.serialLog !== 'string' || options.serialLog === '') bad('serialLog must be the path of a file to receive serial output');
    if (options.vsock && (!Number.isInteger(options.vsock.cid) || options.vsock.cid < 3))
      bad(`vsock.cid is ${options.vsock.cid}: guest CIDs start at 3 (0-2 are reserved)`);
    try {
      return new Vm(await native().restoreVm(options));
    } catch (e) {
      throw typed(e);
    }
  }

  /** Reads and checks a snapshot directory's state file (SnapshotError if damaged) without restoring it. */
  static async inspectSnapshot(dir: string): Promise<SnapshotDescription> {
    try {
      return await native().inspectSnapshot(dir);
    } catch (e) {
      throw typed(e);
    }
  }

  /**
   * Fills this process's reserve of VM shells until `count` (0..16) are held
   * for `kvmDevice` (default the one VMs use), making them on libuv's pool;
   * resolves with the number held. A shell is a KVM VM made ahead of need
   * (KVM_CREATE_VM and its TSS and identity-map pages, no RAM, irqchip or
   * vCPUs): the next Vm.create or Vm.restore on that device takes one and
   * skips KVM_CREATE_VM, ~12 ms in the KVM lab on a host that leaves
   * kvm.nx_huge_pages on (KVM starts and waits for a recovery thread per VM).
   * A create or restore that finds none held while a fill is making one waits
   * for it. Each held shell is an fd and a kernel thread: drain the reserve
   * when no VM is coming. KvmError when one cannot be made (those made before
   * it stay held).
   */
  static async fillShells(count: number, kvmDevice?: string): Promise<number> {
    if (!Number.isInteger(count) || count < 0 || count > MAX_VM_SHELLS)
      throw new InvalidArgumentError(`invalid shell count ${String(count)}: hold 0 to ${MAX_VM_SHELLS} VM shells`, { op: 'fill VM shells' });
    try {
      return await native().fillVmShells(count, kvmDevice);
    } catch (e) {
      throw typed(e);
    }
  }

  /** Closes every held VM shell; returns how many. Shells a fill is still making land after it. */
  static drainShells(): number {
    return native().drainVmShells();
  }

  /** VM shells held now, for every device. */
  static heldShells(): number {
    return native().heldVmShells();
  }

  /** The KVM device used when VmConfig.kvmDevice is not given. */
  static defaultKvmDevice(): string {
    return native().defaultKvmDevice();
  }

  start(): void {
    try {
      this.handle.start();
    } catch (e) {
      throw typed(e);
    }
  }

  /** Resolves once every vCPU is parked outside the guest. */
  async pause(): Promise<void> {
    try {
      await this.handle.pause();
    } catch (e) {
      throw typed(e);
    }
  }

  resume(): void {
    this.handle.resume();
  }

  /** Stops the VM if it still runs; idempotent. Resolves with the exit once every resource is freed. */
  kill(): Promise<VmExit> {
    if (!this.exited) this.handle.kill().catch(() => undefined);
    return this.done;
  }

  /** Resolves once, when the VM has stopped and been torn down. */
  wait(): Promise<VmExit> {
    return this.done;
  }

  /**
   * Writes the paused VM to `dir` (created; must not exist or be empty): a
   * state file (versioned header, per-section checksums, vCPU/VM/device state,
   * the config that matters, host CPU fingerprint, kernel/initrd hashes) and a
   * sparse memory file. InvalidArgumentError unless the VM is paused.
   */
  async snapshot(dir: string): Promise<SnapshotInfo> {
    try {
      return await this.handle.snapshot(dir);
    } catch (e) {
      throw typed(e);
    }
  }

  stats(): VmStats {
    return this.handle.stats();
  }

  /**
   * KVM's own counters (KVM_GET_STATS_FD): vCPU statistics summed over the vCPUs
   * under their KVM names ('exits', 'io_exits', 'mmio_exits', 'halt_exits',
   * 'irq_exits', ...), the VM's own as 'vm.<name>'. Unlike stats().exits these
   * include the exits KVM handles without us (in-kernel HLT, ioeventfd, NPT/EPT
   * faults, MSRs). Live while the VM runs, the final values once it stopped.
   * Throws KvmError on a host KVM without binary statistics (Linux < 5.14).
   */
  kvmStats(): Record<string, bigint> {
    try {
      return this.handle.kvmStats();
    } catch (e) {
      throw typed(e);
    }
  }

  /** The kernel command line the guest received (with the virtio_mmio.device= entries). */
  cmdline(): string {
    return this.handle.cmdline();
  }

  /**
   * Puts a read-only medium into empty disk slot `index` (its index in
   * `disks`), running or not: the guest sees the disk's new size through a
   * configuration-change interrupt. Throws VmmError when the slot is not
   * empty (a medium is never swapped), the file cannot be opened or is under
   * one sector, or the VM has stopped.
   */
  attachDisk(index: number, disk: { path: string }): void {
    try {
      this.handle.attachDisk(index, disk.path);
    } catch (e) {
      throw typed(e);
    }
  }
}
