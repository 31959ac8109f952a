// Shared by the test/kvm/vm-*.test.ts suites: a scratch directory per suite
// and a guard so that a guest that never stops fails its test instead of
// hanging the run.
import { mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
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

/** What a VM could leak in this process: fds, threads, guest-RAM memfds, RSS. */
export interface Usage {
  fds: number;
  threads: number;
  vcpuThreads: number;
  memfds: number;
  rssKiB: number;
}

export function usage(): Usage {
  const fds = readdirSync('/proc/self/fd');
  let memfds = 0;
  for (const fd of fds) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith('/memfd:')) memfds++;
    } catch {
      // the fd readdir itself used is gone by now
    }
  }
  let vcpuThreads = 0;
  for (const t of readdirSync('/proc/self/task')) {
    try {
      if (readFileSync(`/proc/self/task/${t}/comm`, 'utf8').startsWith('vmlet-vcpu')) vcpuThreads++;
    } catch {
      // the thread ended while we looked
    }
  }
  const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  return { fds: fds.length, threads: readdirSync('/proc/self/task').length, vcpuThreads, memfds, rssKiB: rss ? Number(rss[1]) : NaN };
}
