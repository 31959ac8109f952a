// Shared by the test/kvm/vm-*.test.ts suites: a scratch directory per suite
// and a guard so that a guest that never stops fails its test instead of
// hanging the run.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm, VmExit } from '../../native/ts/vmm';

export class Scratch {
  readonly dir = mkdtempSync(join(tmpdir(), 'vmlet-vm-test-'));
  path(name: string): string {
    return join(this.dir, name);
  }
  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Waits for the VM's exit; kills it and fails after `ms`. */
export async function exitWithin(vm: Vm, ms: number): Promise<VmExit> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      void vm.kill();
      reject(new Error(`the guest did not stop within ${ms} ms (killed)`));
    }, ms);
  });
  try {
    return await Promise.race([vm.wait(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
