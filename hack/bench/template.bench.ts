// `npm run bench template`, inside the lab only:
//   hack/kvm-lab run --timeout 900 -- node dist/hack/bench/run.js template
// The template pool (shim/sandbox/template-pool.ts) against a cold boot, same
// guest kernel, agent initramfs, command line, 256 MiB, 1 vCPU, same /dev/kvm,
// and the same one image layer (a busybox squashfs): the cold boot gets it as
// its disk, each restore puts it in the first of the template's 16 empty disk
// slots, as `vmlet run` does:
//
// - cold boot -> agent ready: Vm.create() called -> the agent answered HELLO
//   over vsock (VMLET_BENCH_COLD_RUNS, default 10: a cold boot is seconds here);
// - restore -> agent ready: Vm.restore() called -> HELLO answered, and
//   host-side restore: Vm.restore() called -> first vCPU entry (the VMM's own
//   part), and SET_IDENTITY's round trip (VMLET_BENCH_RUNS, default 50);
// - restores map the kernel text from a huge-page tmpfs unless VMLET_HUGE_TEXT=0
//   (shim/sandbox/huge-text.ts; the header says which);
// - each of these again on a VM shell (Vm.fillShells just before, outside the
//   timing), as a long-running pool with `shells` gets them;
// - unique host memory per idle VM: VMLET_BENCH_HELD (default 10) VMs of each
//   kind held at once, this process's Private_* and Pss (smaps_rollup) before
//   and after, divided by the count.
// p50/p90 each, interleaved cold/restore so load drift hits both alike. The
// lab nests KVM under TCG: compare the ratios, not the absolute times.
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm } from '../../native/ts/vmm';
import { agentInitramfs, busyboxStatic, findGuestKernel, guestCmdline } from '../../shim/sandbox/guest';
import { waitForAgent } from '../../shim/sandbox/sandbox';
import { DEFAULT_DISK_SLOTS, RestoredGuest, TemplatePool, TemplateSpec } from '../../shim/sandbox/template-pool';
import { linuxGuestRefusal } from '../../shim/sandbox/host';

const RUNS = Number(process.env.VMLET_BENCH_RUNS ?? 50);
const COLD_RUNS = Number(process.env.VMLET_BENCH_COLD_RUNS ?? 10);
const HELD = Number(process.env.VMLET_BENCH_HELD ?? 10);
const AGENT_TIMEOUT_MS = 120_000;

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

const ms = (a: bigint, b: bigint) => Number(b - a) / 1e6;

interface ColdVm {
  vm: Vm;
  close(): Promise<void>;
}

/** A one-layer busybox image, as `vmlet run` would attach it. */
function busyboxLayer(work: string): string {
  const root = join(work, 'layer-root');
  mkdirSync(join(root, 'bin'), { recursive: true });
  copyFileSync(busyboxStatic(), join(root, 'bin', 'busybox'));
  chmodSync(join(root, 'bin', 'busybox'), 0o755);
  const layer = join(work, 'layer.sqfs');
  execFileSync('mksquashfs', [root, layer, '-comp', 'zstd', '-noappend', '-quiet', '-all-root']);
  return layer;
}

async function coldBoot(spec: TemplateSpec, parent: string, layer: string): Promise<{ agentMs: number; held: ColdVm }> {
  const dir = mkdtempSync(join(parent, 'cold-'));
  const vsockPath = join(dir, 'vsock.sock');
  const serialLog = join(dir, 'serial.log');
  const t0 = process.hrtime.bigint();
  const vm = await Vm.create({ kernel: spec.kernel, initrd: spec.initrd, cmdline: spec.cmdline, memoryMiB: spec.memoryMiB, cpus: spec.cpus, serialLog, bootProtocol: 'linux', disks: [{ path: layer, readOnly: true }], vsock: { cid: 3, udsPath: vsockPath } });
  vm.start();
  const client = await waitForAgent({ vm, vsockPath, serialLog, layerDevices: [], origin: 'cold boot' }, AGENT_TIMEOUT_MS);
  const agentMs = ms(t0, process.hrtime.bigint());
  return {
    agentMs,
    held: {
      vm,
      close: async () => {
        client.destroy();
        await vm.kill();
        rmSync(dir, { recursive: true, force: true });
      },
    },
  };
}

/** kB of this process's memory: unique (Private_Clean + Private_Dirty) and proportional (Pss). */
function memoryKb(): { uss: number; pss: number } {
  const text = readFileSync('/proc/self/smaps_rollup', 'utf8');
  const field = (name: string) => Number(text.match(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm'))?.[1] ?? NaN);
  return { uss: field('Private_Clean') + field('Private_Dirty'), pss: field('Pss') };
}

/** Holds `n` idle VMs made by `make` at once; their agents answered, nothing else runs. */
async function heldMemory(n: number, make: () => Promise<{ close(): Promise<void> }>): Promise<{ uss: number; pss: number }> {
  const before = memoryKb();
  const vms: { close(): Promise<void> }[] = [];
  try {
    for (let i = 0; i < n; i++) vms.push(await make());
    // Let the guests settle into idle before reading.
    await new Promise((r) => setTimeout(r, 2000));
    const after = memoryKb();
    return { uss: (after.uss - before.uss) / n / 1024, pss: (after.pss - before.pss) / n / 1024 };
  } finally {
    for (const v of vms) await v.close();
  }
}

/**
 * KVM_CREATE_VM starts a kvm-nx-lpage-recovery kthread per VM and waits for it,
 * unless the host set kvm.nx_huge_pages=never: ~9 ms of a ~24 ms host-side
 * restore in the lab. The figures depend on it, so the header says which.
 */
function nxHugePagesNote(): string {
  const read = (path: string): string => {
    try {
      return readFileSync(path, 'utf8').trim();
    } catch {
      return 'unknown';
    }
  };
  const nx = read('/sys/module/kvm/parameters/nx_huge_pages');
  const multihit = read('/sys/devices/system/cpu/vulnerabilities/itlb_multihit');
  const never = nx === 'never';
  return `kvm.nx_huge_pages=${nx} (${never ? 'no' : 'a'} recovery thread per VM); itlb_multihit: ${multihit}`;
}

export async function run(): Promise<void> {
  // Inside the lab, or on a host with hardware virtualization (where the
  // standard-KVM targets are measured); not on a paravirtual /dev/kvm.
  if (linuxGuestRefusal() !== null) {
    console.log('!!! SKIPPED: the template benchmark boots the Linux guest, which needs a standard /dev/kvm;');
    console.log('!!! run it in the lab: hack/kvm-lab run --timeout 900 -- node dist/hack/bench/run.js template');
    return;
  }
  const kernel = findGuestKernel();
  if ('missing' in kernel) throw new Error(`the guest kernel is not built: ${kernel.missing}`);
  const work = mkdtempSync(join(tmpdir(), 'vmlet-template-bench-'));
  const spec: TemplateSpec = { kernel: kernel.vmlinux, initrd: agentInitramfs(), cpus: 1, memoryMiB: 256, cmdline: guestCmdline('quiet'), diskSlots: DEFAULT_DISK_SLOTS };
  const layer = busyboxLayer(work);
  const layers = [layer];
  const pool = new TemplatePool({ spec, root: join(work, 'templates'), stateDir: work, agentTimeoutMs: AGENT_TIMEOUT_MS });
  try {
    const loadBefore = loadavg()[0];
    const t0 = Date.now();
    const template = await pool.template();
    const snap = template.manifest.meta.snapshot as { memoryFileBytes: number; memoryBytes: number };
    console.log(`template made in ${Date.now() - t0} ms; memory file ${(snap.memoryFileBytes / 2 ** 20).toFixed(1)} MiB on disk of ${(snap.memoryBytes / 2 ** 20).toFixed(0)} MiB RAM`);
    console.log(`host KVM: ${nxHugePagesNote()}`);
    // Each measurement twice: as is, and on a VM shell made just before it
    // (Vm.fillShells, awaited outside the timing: KVM_CREATE_VM done ahead, as
    // a long-running pool does it). Cold boots get the same, so the ratios
    // compare like with like.
    const series = () => ({ cold: [] as number[], restoreAgent: [] as number[], hostRestore: [] as number[], identity: [] as number[] });
    const plain = series();
    const shell = series();
    const everyCold = Math.max(1, Math.floor(RUNS / Math.max(1, COLD_RUNS)));
    let overlayMiB = 0;
    const onShell = async (use: boolean): Promise<void> => {
      Vm.drainShells();
      if (use) await Vm.fillShells(1);
    };
    for (let i = 0; i < RUNS; i++) {
      for (const [use, s] of [[false, plain], [true, shell]] as const) {
        await onShell(use);
        const g: RestoredGuest = await pool.acquire({ layers });
        const st = g.vm.stats();
        overlayMiB = (st.memoryOverlayBytes ?? 0) / 2 ** 20;
        if (st.vmShell !== use) throw new Error(`restore ${i}: made ${st.vmShell ? 'on' : 'without'} a VM shell, expected ${use ? 'on' : 'without'}`);
        s.restoreAgent.push(ms(g.timings.restoreNs, g.timings.agentReadyNs));
        s.identity.push(ms(g.timings.agentReadyNs, g.timings.identityNs));
        if (st.restoredNs !== undefined && st.firstEntryNs !== undefined) s.hostRestore.push(ms(st.restoredNs, st.firstEntryNs));
        await g.close();
        if (s.cold.length < COLD_RUNS && i % everyCold === 0) {
          await onShell(use);
          const c = await coldBoot(spec, work, layer);
          if (c.held.vm.stats().vmShell !== use) throw new Error(`cold boot ${i}: the VM shell was ${use ? 'not ' : ''}taken`);
          s.cold.push(c.agentMs);
          await c.held.close();
        }
      }
    }
    Vm.drainShells();
    console.log(`kernel text: ${overlayMiB === 0 ? 'from the memory file in 4 KiB pages (VMLET_HUGE_TEXT=0, or no huge tmpfs here)' : `${overlayMiB} MiB mapped from a huge-page tmpfs (shim/sandbox/huge-text.ts)`}`);
    const row = (name: string, xs: number[]) =>
      console.log(`  ${name.padEnd(46)} ${percentile(xs, 50).toFixed(1).padStart(10)} ${percentile(xs, 90).toFixed(1).padStart(10)} ${String(xs.length).padStart(6)}`);
    console.log(`\n  ${'metric (ms)'.padEnd(46)} ${'p50'.padStart(10)} ${'p90'.padStart(10)} ${'runs'.padStart(6)}`);
    row('cold boot -> agent ready (peer)', plain.cold);
    row('restore -> agent ready (ours)', plain.restoreAgent);
    row('host-side restore: call -> first vCPU entry', plain.hostRestore);
    row('SET_IDENTITY round trip', plain.identity);
    row('on a VM shell: cold boot -> agent ready', shell.cold);
    row('on a VM shell: restore -> agent ready', shell.restoreAgent);
    row('on a VM shell: host-side restore', shell.hostRestore);
    row('on a VM shell: SET_IDENTITY round trip', shell.identity);
    const ratio = (s: ReturnType<typeof series>) =>
      `p50 ${(percentile(s.cold, 50) / percentile(s.restoreAgent, 50)).toFixed(1)}x, p90 ${(percentile(s.cold, 90) / percentile(s.restoreAgent, 90)).toFixed(1)}x`;
    console.log(`  cold boot / restore, agent ready: ${ratio(plain)}; both on VM shells: ${ratio(shell)}`);

    const heldRestored = await heldMemory(HELD, () => pool.acquire({ layers }));
    const heldCold = await heldMemory(HELD, async () => (await coldBoot(spec, work, layer)).held);
    console.log(`\nunique host memory per idle VM, ${HELD} held at once (MiB): restored USS ${heldRestored.uss.toFixed(1)} PSS ${heldRestored.pss.toFixed(1)}; cold-booted USS ${heldCold.uss.toFixed(1)} PSS ${heldCold.pss.toFixed(1)}; ratio USS cold/restored ${(heldCold.uss / heldRestored.uss).toFixed(1)}x`);
    console.log(`load average (1 min): ${loadBefore.toFixed(2)} before, ${loadavg()[0].toFixed(2)} after`);
    console.log('The lab nests KVM under TCG: compare the ratios, not the absolute times.');
  } finally {
    await pool.close();
    rmSync(work, { recursive: true, force: true });
  }
}
