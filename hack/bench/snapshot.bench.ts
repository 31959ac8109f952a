// `npm run bench snapshot`: the VMM's host-side cost of a restore beside a
// cold create, with the test guest on this host's /dev/kvm.
//
//   restore: Vm.restore() called -> the first KVM_RUN of the restored VM
//   cold:    Vm.create() called  -> the first KVM_RUN of a booted VM
// Both end at VmStats.firstEntryNs (CLOCK_MONOTONIC, the clock of
// process.hrtime.bigint()) and both include start(); the VM is killed right
// after its first entry. The snapshot is the test guest at its snapshot point
// (tg.pause=after-blk0: vsock live, one disk checked), the same config the
// cold VMs boot. p50/p90 over VMLET_BENCH_RUNS (default 50) of each,
// interleaved so load drifts hit both alike; then the snapshot's size.
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Vm, VmConfig } from '../../native/ts/vmm';
import { requireTestguest, waitForSerialLine } from '../../native/ts/testguest';

const RUNS = Math.max(50, Number(process.env.VMLET_BENCH_RUNS ?? 50));
const MEMORY_MIB = 256;

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

/** Waits until the VM's first vCPU entry is recorded; returns it. */
async function firstEntry(vm: Vm): Promise<bigint> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const t = vm.stats().firstEntryNs;
    if (t !== undefined) return t;
    if (Date.now() > deadline) throw new Error('no vCPU entry within 5 s');
    await new Promise((r) => setImmediate(r));
  }
}

export async function run(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-bench-snap-'));
  try {
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, randomBytes(1 << 20));
    const config = (name: string): VmConfig => ({
      kernel: requireTestguest(),
      cmdline: 'tg.mode=check tg.vsock_port=5000 tg.pause=after-blk0',
      memoryMiB: MEMORY_MIB,
      cpus: 1,
      serialLog: join(dir, `${name}.serial`),
      disks: [{ path: disk }],
      vsock: { cid: 3, udsPath: join(dir, `${name}.sock`) },
    });

    const src = config('source');
    const vm = await Vm.create(src);
    vm.start();
    await waitForSerialLine(src.serialLog, /^TG pause point=after-blk0 .*\n/m, vm.wait(), 60_000);
    await vm.pause();
    const snap = join(dir, 'snap');
    const t0 = process.hrtime.bigint();
    const info = await vm.snapshot(snap);
    const snapshotMs = Number(process.hrtime.bigint() - t0) / 1e6;
    await vm.kill();
    const stateBytes = statSync(join(snap, 'state')).size;

    const restoreMs: number[] = [], restoreInternalMs: number[] = [], coldMs: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      {
        const t = process.hrtime.bigint();
        const r = await Vm.restore({ snapshot: snap, serialLog: join(dir, 'r.serial'), disks: [{ path: disk }], vsock: { cid: 4, udsPath: join(dir, `r${i}.sock`) } });
        r.start();
        const entry = await firstEntry(r);
        await r.kill();
        restoreMs.push(Number(entry - t) / 1e6);
        restoreInternalMs.push(Number(entry - r.stats().restoredNs!) / 1e6);
      }
      {
        const t = process.hrtime.bigint();
        const c = await Vm.create({ ...config('c'), vsock: { cid: 4, udsPath: join(dir, `c${i}.sock`) } });
        c.start();
        const entry = await firstEntry(c);
        await c.kill();
        coldMs.push(Number(entry - t) / 1e6);
      }
    }
    const row = (name: string, xs: number[]) =>
      console.log(`  ${name.padEnd(44)} p50 ${quantile(xs, 0.5).toFixed(2).padStart(7)} ms   p90 ${quantile(xs, 0.9).toFixed(2).padStart(7)} ms`);
    console.log(`test guest, ${MEMORY_MIB} MiB, 1 vCPU, 1 disk + vsock; ${RUNS} runs each, interleaved; load ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
    row('restore call -> first vCPU entry', restoreMs);
    row('  of which in the VMM (restore began -> entry)', restoreInternalMs);
    row('cold create call -> first vCPU entry', coldMs);
    console.log(`  ratio cold / restore: p50 ${(quantile(coldMs, 0.5) / quantile(restoreMs, 0.5)).toFixed(2)}x, p90 ${(quantile(coldMs, 0.9) / quantile(restoreMs, 0.9)).toFixed(2)}x`);
    console.log(`  snapshot (pause -> files written): ${snapshotMs.toFixed(1)} ms; state file ${stateBytes} B; memory file ${info.memoryBytes / 2 ** 20} MiB logical, ` +
      `${(info.memoryFileBytes / 2 ** 10).toFixed(0)} KiB on disk (${(info.memoryDataBytes / 2 ** 10).toFixed(0)} KiB of non-zero pages), ` +
      `${((info.memoryFileBytes + stateBytes) / (info.memoryBytes)).toFixed(4)} of RAM`);
    console.log(`  vCPU state this KVM could not save: ${info.skipped.length ? info.skipped.join('; ') : 'none'}; MSRs refused: ${info.refusedMsrs.length ? info.refusedMsrs.map((m) => '0x' + m.toString(16)).join(' ') : 'none'}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
