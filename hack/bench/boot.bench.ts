// `npm run bench boot`, inside the lab only:
//   hack/kvm-lab run --timeout 900 -- node dist/hack/bench/run.js boot
// The guest kernel (hack/guest-kernel) booted to a busybox /init by our VMM and
// by QEMU 7.2 `-M microvm` on the same standard /dev/kvm, the same vmlinux (PVH
// entry), initramfs and command line; medians of VMLET_BENCH_RUNS (default 5)
// boots each, interleaved so load drift hits both alike.
//
// Boot -> init: from just before Vm.create() / spawn('qemu-system-x86_64') to the
// arrival of /init's first serial line in this process (ours: the 8250 log is a
// FIFO read here; QEMU: its serial on stdout, a pipe). The kernel's own figure,
// the printk timestamp of "Run /init as init process", is shown beside it.
// The lab's /dev/kvm is nested under QEMU TCG: absolute times are far above real
// hardware; compare the ratio.
import { execFileSync, spawn } from 'node:child_process';
import { constants, mkdtempSync, openSync, rmSync } from 'node:fs';
import { Socket } from 'node:net';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { Vm } from '../../native/ts/vmm';
import { buildBusyboxInitramfs, findGuestKernel, guestCmdline, INIT_MARKER } from '../../test/helpers/guest-kernel';

const RUNS = Number(process.env.VMLET_BENCH_RUNS ?? 5);
const MEMORY_MIB = 256;
const BOOT_TIMEOUT_MS = 120_000;

/** Notes when the init marker reaches this process. */
class MarkerTap {
  text = '';
  at?: bigint;
  readonly closed: Promise<void>;
  constructor(stream: Readable, onMarker: () => void) {
    stream.setEncoding('latin1');
    stream.on('data', (d: string) => {
      const t = process.hrtime.bigint();
      this.text += d;
      if (this.at === undefined && this.text.includes(INIT_MARKER)) {
        this.at = t;
        onMarker();
      }
    });
    this.closed = new Promise((resolve) => {
      stream.on('close', () => resolve());
      stream.on('end', () => resolve());
    });
  }
}

interface Boot {
  toInitMs: number;
  kernelInitMs?: number;
  /** Ours only: stats().createdNs -> firstEntryNs. */
  vmmStartMs?: number;
}

/** The printk timestamp of the kernel handing over to /init. */
function kernelInitMs(serial: string): number | undefined {
  const m = serial.match(/\[\s*(\d+\.\d+)\] Run \/init as init process/);
  return m ? Number(m[1]) * 1000 : undefined;
}

let seq = 0;

async function bootOurs(dir: string, kernel: string, initrd: string, cmdline: string): Promise<Boot> {
  const fifo = join(dir, `serial-${seq++}.fifo`);
  execFileSync('mkfifo', [fifo]);
  // Opened non-blocking first, so the VMM's open for writing does not wait for a reader.
  const fd = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  let vm: Vm | undefined;
  // Only boot -> init is measured: the VM is stopped at the marker, not left to reboot.
  const tap = new MarkerTap(new Socket({ fd, readable: true, writable: false }), () => void vm?.kill());
  const t0 = process.hrtime.bigint();
  vm = await Vm.create({ kernel, initrd, cmdline, memoryMiB: MEMORY_MIB, cpus: 1, serialLog: fifo });
  vm.start();
  const timer = setTimeout(() => void vm.kill(), BOOT_TIMEOUT_MS);
  const exit = await vm.wait().finally(() => clearTimeout(timer));
  await Promise.race([tap.closed, new Promise((r) => setTimeout(r, 2000))]);
  if (tap.at === undefined) {
    throw new Error(`ours: no ${INIT_MARKER} (exit ${JSON.stringify(exit, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}); serial:\n${tap.text}`);
  }
  const st = vm.stats();
  return {
    toInitMs: Number(tap.at - t0) / 1e6,
    kernelInitMs: kernelInitMs(tap.text),
    vmmStartMs: st.firstEntryNs !== undefined && st.createdNs !== undefined ? Number(st.firstEntryNs - st.createdNs) / 1e6 : undefined,
  };
}

function bootQemu(kernel: string, initrd: string, cmdline: string): Promise<Boot> {
  return new Promise((resolve, reject) => {
    const args = [
      // acpi=off: the kernel has no ACPI; microvm then names its virtio-mmio devices
      // on the command line, as our VMM does. No devices are added: none are used.
      '-M', 'microvm,isa-serial=on,acpi=off',
      '-accel', 'kvm', '-cpu', 'host',
      '-m', String(MEMORY_MIB), '-smp', '1',
      '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
      '-serial', 'stdio',
      '-kernel', kernel, '-initrd', initrd, '-append', cmdline,
    ];
    const t0 = process.hrtime.bigint();
    const p = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    // Killed at the marker: the way down is not measured, and microvm has no i8042, so
    // reboot=k would first spin on ~650k port reads (each an exit) before the triple fault.
    const tap = new MarkerTap(p.stdout, () => p.kill('SIGKILL'));
    let stderr = '';
    p.stderr.setEncoding('latin1').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), BOOT_TIMEOUT_MS);
    p.on('error', reject);
    p.on('close', (status, signal) => {
      clearTimeout(timer);
      if (tap.at === undefined) {
        reject(new Error(`QEMU: no ${INIT_MARKER} (status ${status} signal ${signal} ${stderr.trim()}); serial:\n${tap.text}`));
        return;
      }
      resolve({ toInitMs: Number(tap.at - t0) / 1e6, kernelInitMs: kernelInitMs(tap.text) });
    });
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export async function run(): Promise<void> {
  if (process.env.VMLET_LAB !== 'inside') {
    // Not an error of the run: `npm run bench` on a host runs every benchmark, and this
    // one cannot measure anything there (no standard Linux guest boots on this /dev/kvm).
    console.log('!!! SKIPPED: the boot benchmark needs a standard /dev/kvm (the dev hosts\' emulates guest kernel mode);');
    console.log('!!! run it in the lab: hack/kvm-lab run --timeout 900 -- node dist/hack/bench/run.js boot');
    return;
  }
  const kernel = findGuestKernel();
  if ('missing' in kernel) throw new Error(`the guest kernel is not built: ${kernel.missing}`);
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-boot-bench-'));
  try {
    const initrd = buildBusyboxInitramfs(dir, '');
    const qemuVersion = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0];
    console.log(`kernel ${kernel.vmlinux} (PVH entry) for both; initramfs: busybox /init printing ${INIT_MARKER}, then reboot -f`);
    console.log(`${MEMORY_MIB} MiB, 1 vCPU; peer: ${qemuVersion}, -M microvm,acpi=off -accel kvm -cpu host`);
    const loadBefore = loadavg()[0];
    // Every console byte is a VM exit, and the lab's exits are slow: the boot with the
    // whole kernel log and the one with `quiet` are told apart.
    const cmdlines = [guestCmdline(), guestCmdline('quiet')];
    const ours: Boot[][] = cmdlines.map(() => []);
    const qemu: Boot[][] = cmdlines.map(() => []);
    for (let i = 0; i < RUNS; i++) {
      for (let c = 0; c < cmdlines.length; c++) {
        ours[c].push(await bootOurs(dir, kernel.vmlinux, initrd, cmdlines[c]));
        qemu[c].push(await bootQemu(kernel.vmlinux, initrd, cmdlines[c]));
        console.log(`run ${i + 1} "${cmdlines[c]}": ours ${ours[c][i].toInitMs.toFixed(1)} ms, QEMU ${qemu[c][i].toInitMs.toFixed(1)} ms`);
      }
    }
    console.log(`\n${'metric'.padEnd(58)}  ${'ours (median)'.padStart(14)}  ${'QEMU (median)'.padStart(14)}  ${'QEMU/ours'.padStart(10)}  runs`);
    cmdlines.forEach((cmdline, c) => {
      const rows: [string, number[], number[]][] = [
        [`start -> /init marker on the host (ms)`, ours[c].map((b) => b.toInitMs), qemu[c].map((b) => b.toInitMs)],
        [`kernel printk "Run /init" (ms)`, ours[c].flatMap((b) => (b.kernelInitMs === undefined ? [] : [b.kernelInitMs])), qemu[c].flatMap((b) => (b.kernelInitMs === undefined ? [] : [b.kernelInitMs]))],
      ];
      console.log(`cmdline "${cmdline}"`);
      for (const [name, o, q] of rows) {
        if (o.length === 0 && q.length === 0) continue;
        const mo = o.length ? median(o) : NaN, mq = q.length ? median(q) : NaN;
        console.log(`  ${name.padEnd(56)}  ${mo.toFixed(1).padStart(14)}  ${mq.toFixed(1).padStart(14)}  ${(mq / mo).toFixed(2).padStart(10)}  ${o.length}/${q.length}`);
      }
    });
    const vmmStart = ours.flat().flatMap((b) => (b.vmmStartMs === undefined ? [] : [b.vmmStartMs]));
    if (vmmStart.length) console.log(`ours, inside the VMM: create -> first KVM_RUN median ${median(vmmStart).toFixed(3)} ms`);
    console.log(`load average (1 min): ${loadBefore.toFixed(2)} before, ${loadavg()[0].toFixed(2)} after`);
    console.log('"QEMU/ours" > 1: ours boots faster. The lab nests KVM under TCG: compare the ratio, not the absolute times.');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
