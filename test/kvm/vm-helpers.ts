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

/** What a VM could leak in this process: fds, threads, guest-RAM memfds and mappings, RSS. */
export interface Usage {
  fds: number;
  threads: number;
  vcpuThreads: number;
  memfds: number;
  /** Mappings of guest RAM: of its memfd, or anonymous ones GuestMemory marked MADV_DONTFORK + MADV_HUGEPAGE. */
  guestRamMappings: number;
  rssKiB: number;
}

/**
 * Guest RAM mappings in /proc/self/smaps. Anonymous RAM has no name there (this
 * kernel may lack PR_SET_VMA_ANON_NAME); the pair of VmFlags dc (MADV_DONTFORK)
 * and hg (MADV_HUGEPAGE) is what core/guest_memory.cc gives it and nothing else
 * in a Node process asks for both. Needs VMLET_GUEST_RAM_THP unset.
 */
function guestRamMappings(): number {
  let n = 0;
  let memfd = false;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) memfd = line.includes('/memfd:vmlet-guest-ram');
    else if (line.startsWith('VmFlags:')) {
      const flags = line.split(/\s+/);
      if (memfd || (flags.includes('dc') && flags.includes('hg'))) n++;
    }
  }
  return n;
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
  return {
    fds: fds.length,
    threads: readdirSync('/proc/self/task').length,
    vcpuThreads,
    memfds,
    guestRamMappings: guestRamMappings(),
    rssKiB: rss ? Number(rss[1]) : NaN,
  };
}
