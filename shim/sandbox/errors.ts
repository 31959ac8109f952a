// The typed failures of a sandbox (a microVM running vmlet-agent). Front ends
// (vmlet run, the shim, the CRI server) map `code` to their own status and show
// `serialTail` when the guest itself is the reason.
import type { VmExit } from '../../native/ts/vmm';

export type SandboxErrorCode =
  /** hack/guest-kernel has not built the kernel for this checkout. */
  | 'NO_GUEST_KERNEL'
  /** native/guest was not built, or busybox-static is missing. */
  | 'NO_GUEST_AGENT'
  /** A layer path is missing or not a squashfs image. */
  | 'BAD_LAYER'
  /** The spec itself is wrong (cpus, memory, too many layers). */
  | 'BAD_SPEC'
  /** The guest stopped (panic, reset, triple fault) while it was needed. */
  | 'GUEST_DIED'
  /** The agent never answered within the bound. */
  | 'AGENT_TIMEOUT'
  /** The agent's connection broke while the VM kept running. */
  | 'AGENT_LOST'
  /** The agent refused to stack the layers. */
  | 'ROOTFS_FAILED'
  /** The caller aborted the start (e.g. Ctrl-C during boot). */
  | 'ABORTED';

export class SandboxError extends Error {
  override readonly name = 'SandboxError';
  constructor(
    readonly code: SandboxErrorCode,
    message: string,
    readonly detail: { serialTail?: string; exit?: VmExit } = {},
  ) {
    super(message);
  }
  get serialTail(): string | undefined {
    return this.detail.serialTail;
  }
}
