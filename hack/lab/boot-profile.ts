// Where a cold boot of vmlet's guest spends its time, inside the lab only:
//   hack/kvm-lab run -- node dist/hack/lab/boot-profile.js [--runs N] [--cmdline "..."] [--kernel vmlinux] [--initrd cpio] [--top N] [--initcalls]
//
// A sampling profile without anything in the guest: L2's timer interrupts that
// arrive while the guest runs are VM exits of reason `interrupt`, and tracefs'
// kvm_exit event gives each one's guest RIP. Counted by kernel symbol (`nm` of
// the vmlinux; user-space RIPs count as <user>), they say where guest time goes.
// The other exits are listed by reason and symbol too: each is work the VMM or
// KVM does for the guest. Boots run from Vm.create() to the agent's ready line
// on the serial console, with the command line `vmlet run` uses (guestCmdline
// + quiet) plus --cmdline. Findings are in native/guest/kernel/README.md.
//
// --initcalls: the kernel's own view instead. Boots a busybox /init that ranks
// the kernel log's initcalls itself (`initcall_debug` added to the command
// line) and prints the top --top and the kernel clock at key lines; listed by
// mean duration over the boots. The
// sampling above over-weights some code (memset-heavy loops); this does not,
// but initcalls before clocksource_done_booting are timed by jiffies (4 ms steps),
// and async work (the initramfs unpack) lands in whichever initcall waits.
import { execFileSync } from 'node:child_process';
import { constants, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Vm } from '../../native/ts/vmm';
import { agentInitramfs, findGuestKernel, guestCmdline } from '../../shim/sandbox/guest';
import { buildBusyboxInitramfs } from '../../test/helpers/guest-kernel';

const TRACEFS = '/sys/kernel/tracing';
/** The agent's console line once its vsock listener is up (native/guest/agent.cc Listen()). */
const READY = 'vmlet-agent: listening on vsock:1024';
const BOOT_TIMEOUT_MS = 120_000;

type Symbolizer = (rip: bigint) => string;

/** Text symbols of the vmlinux, sorted, for RIP -> symbol. */
function symbolizer(vmlinux: string): Symbolizer {
  const syms: [bigint, string][] = [];
  for (const line of execFileSync('nm', ['-n', vmlinux], { encoding: 'utf8', maxBuffer: 1 << 28 }).split('\n')) {
    const [addr, type, name] = line.split(' ');
    if (name && /^[tTwW]$/.test(type)) syms.push([BigInt(`0x${addr}`), name]);
  }
  return (rip) => {
    if (rip < 0xffff800000000000n) return '<user>';
    if (syms.length === 0 || rip < syms[0][0]) return '<unknown>';
    let lo = 0;
    let hi = syms.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (syms[mid][0] <= rip) lo = mid;
      else hi = mid - 1;
    }
    return syms[lo][1];
  };
}

/** Boots once with kvm_exit tracing on; resolves with the trace lines and the time to the ready line. */
async function tracedBoot(kernel: string, initrd: string, cmdline: string): Promise<{ readyMs: number; trace: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-boot-profile-'));
  try {
    // A FIFO read in this process: polling a file would take the lab's only L2 CPU from the guest.
    const fifo = join(dir, 'serial.fifo');
    execFileSync('mkfifo', [fifo]);
    const serial = new Socket({ fd: openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK), readable: true, writable: false });
    serial.setEncoding('latin1');
    let text = '';
    let readyAt: bigint | undefined;
    const ready = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ready line within ${BOOT_TIMEOUT_MS} ms; serial:\n${text}`)), BOOT_TIMEOUT_MS);
      serial.on('data', (d: string) => {
        text += d;
        if (readyAt === undefined && text.includes(READY)) {
          readyAt = process.hrtime.bigint();
          clearTimeout(timer);
          resolve();
        }
      });
    });
    writeFileSync(join(TRACEFS, 'trace'), '');
    writeFileSync(join(TRACEFS, 'events/kvm/kvm_exit/enable'), '1');
    const t0 = process.hrtime.bigint();
    const vm = await Vm.create({ kernel, initrd, cmdline, memoryMiB: 256, cpus: 1, serialLog: fifo, bootProtocol: 'linux', vsock: { cid: 3, udsPath: join(dir, 'vsock.sock') } });
    try {
      vm.start();
      await ready;
    } finally {
      writeFileSync(join(TRACEFS, 'events/kvm/kvm_exit/enable'), '0');
      await vm.kill();
      serial.destroy();
    }
    const trace = readFileSync(join(TRACEFS, 'trace'), 'utf8').split('\n').filter((l) => l.includes('kvm_exit:'));
    return { readyMs: Number(readyAt! - t0) / 1e6, trace };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Kernel log lines whose timestamps mark the phases of a boot. */
const MILESTONES = ['kvm-clock: using sched offset', 'Memory:', 'printk: console', 'APIC: Switch to symmetric', 'devtmpfs: initialized', 'clocksource: Switched to clocksource kvm-clock', 'Freeing unused kernel image (initmem)', 'Run /init'];

/** One boot of a busybox /init that reports on the kernel log; resolves with its serial output. */
async function dmesgBoot(kernel: string, initrd: string, cmdline: string, dir: string, i: number): Promise<string> {
  const serialLog = join(dir, `serial-${i}.log`);
  const vm = await Vm.create({ kernel, initrd, cmdline, memoryMiB: 256, cpus: 1, serialLog, bootProtocol: 'linux' });
  vm.start();
  const timer = setTimeout(() => void vm.kill(), BOOT_TIMEOUT_MS);
  try {
    const exit = await vm.wait();
    if (exit.reason !== 'reset') throw new Error(`boot ${i + 1} ended with ${JSON.stringify(exit, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}, not the reboot its /init asks for; serial:\n${readFileSync(serialLog, 'latin1').slice(-2000)}`);
  } finally {
    clearTimeout(timer);
  }
  return readFileSync(serialLog, 'latin1');
}

async function initcalls(kernel: string, cmdline: string, runs: number, n: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-boot-initcalls-'));
  try {
    // The guest sums and ranks its own initcalls: the whole log over the 8250 is
    // ~50 KB, one VM exit a byte, and L2 froze under the second such boot twice.
    const milestones = MILESTONES.map((m) => m.replace(/[()]/g, '.')).join('|');
    const initrd = buildBusyboxInitramfs(
      dir,
      [
        'mount -t proc proc /proc',
        'dmesg > /tmp/log',
        `grep -E '${milestones}' /tmp/log`,
        `grep ' returned .* after ' /tmp/log | awk '{ t += $(NF-1); print "IC", $(NF-1), $0 } END { print "IC-TOTAL", t }' | sort -k2 -rn | head -${n + 1}`,
      ].join('\n'),
    );
    const full = `${cmdline} initcall_debug`;
    const durations = new Map<string, number[]>();
    const marks = new Map<string, number[]>();
    const totals: number[] = [];
    for (let i = 0; i < runs; i++) {
      const log = await dmesgBoot(kernel, initrd, full, dir, i);
      for (const m of log.matchAll(/^IC \d+ .*initcall (\S+)\+0x[0-9a-f]+\/0x[0-9a-f]+ returned -?\d+ after (\d+) usecs/gm)) {
        durations.set(m[1], [...(durations.get(m[1]) ?? []), Number(m[2]) / 1000]);
      }
      const total = /^IC-TOTAL (\d+)/m.exec(log);
      if (total) totals.push(Number(total[1]) / 1000);
      for (const key of MILESTONES) {
        const m = new RegExp(`\\[\\s*(\\d+\\.\\d+)\\] [^\\n]*${key.replace(/[()]/g, '\\$&')}`).exec(log);
        if (m) marks.set(key, [...(marks.get(key) ?? []), Number(m[1]) * 1000]);
      }
    }
    const mean = (v: number[]): number => v.reduce((a, b) => a + b, 0) / v.length;
    console.log(`kernel ${kernel}\ncmdline "${full}"\nbusybox /init ranking dmesg, ${runs} boot(s); kernel clock (ms, mean) at:`);
    for (const key of MILESTONES) if (marks.has(key)) console.log(`${mean(marks.get(key)!).toFixed(1).padStart(8)}  ${key}`);
    console.log(`\ninitcalls: ${totals.length ? mean(totals).toFixed(1) : '?'} ms in all per boot (mean); the longest, mean over the boots where each ranked in the top ${n}:`);
    const rows = [...durations.entries()].map(([k, v]) => [k, mean(v), v.length] as const).sort((a, b) => b[1] - a[1]);
    for (const [k, v, c] of rows.slice(0, n)) console.log(`${v.toFixed(2).padStart(8)}  ${k}${c < runs ? ` (${c} of ${runs})` : ''}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function top(counts: Map<string, number>, n: number, total: number, per: number): string[] {
  return [...counts.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([k, v]) => `${(v / per).toFixed(1).padStart(8)} ${((100 * v) / total).toFixed(1).padStart(5)}%  ${k}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '4' },
      cmdline: { type: 'string', default: '' },
      kernel: { type: 'string' },
      initrd: { type: 'string' },
      top: { type: 'string', default: '30' },
      initcalls: { type: 'boolean', default: false },
    },
  });
  const runs = Number(values.runs);
  const n = Number(values.top);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs ${values.runs}: give a whole number >= 1`);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--top ${values.top}: give a whole number >= 1`);
  if (process.env.VMLET_LAB !== 'inside') throw new Error('run it inside the lab: hack/kvm-lab run -- node dist/hack/lab/boot-profile.js');
  if (!existsSync(join(TRACEFS, 'trace'))) execFileSync('mount', ['-t', 'tracefs', 'nodev', TRACEFS]);
  writeFileSync(join(TRACEFS, 'buffer_size_kb'), '65536');
  const found = findGuestKernel();
  if ('missing' in found) throw new Error(`the guest kernel is not built: ${found.missing}`);
  const kernel = values.kernel ?? found.vmlinux;
  if (values.initcalls) return initcalls(kernel, guestCmdline(`quiet ${values.cmdline}`), runs, n);
  const initrd = values.initrd ?? agentInitramfs();
  const cmdline = guestCmdline(`quiet ${values.cmdline}`);
  const sym = symbolizer(kernel);
  const samples = new Map<string, number>();
  const exits = new Map<string, number>();
  const reasons = new Map<string, number>();
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const { readyMs, trace } = await tracedBoot(kernel, initrd, cmdline);
    times.push(readyMs);
    for (const line of trace) {
      const m = /reason (\S+) rip (0x[0-9a-f]+)/.exec(line);
      if (!m) continue;
      const where = sym(BigInt(m[2]));
      reasons.set(m[1], (reasons.get(m[1]) ?? 0) + 1);
      if (m[1] === 'interrupt') samples.set(where, (samples.get(where) ?? 0) + 1);
      else exits.set(`${m[1]} ${where}`, (exits.get(`${m[1]} ${where}`) ?? 0) + 1);
    }
  }
  const sampleTotal = [...samples.values()].reduce((a, b) => a + b, 0);
  const exitTotal = [...exits.values()].reduce((a, b) => a + b, 0);
  console.log(`kernel ${kernel}\ninitrd ${initrd}\ncmdline "${cmdline}"`);
  console.log(`start -> agent ready, traced (tracing slows the host side): ${times.map((t) => t.toFixed(0)).join(' ')} ms`);
  console.log(`exits per boot by reason: ${[...reasons.entries()].sort((a, b) => b[1] - a[1]).map(([r, c]) => `${r} ${(c / runs).toFixed(0)}`).join(', ')}`);
  console.log(`\nguest time: ${(sampleTotal / runs).toFixed(0)} samples per boot (L2 timer exits), per boot and share:`);
  for (const l of top(samples, n, sampleTotal, runs)) console.log(l);
  console.log(`\nother exits: ${(exitTotal / runs).toFixed(0)} per boot, by reason and guest symbol, per boot and share:`);
  for (const l of top(exits, n, exitTotal, runs)) console.log(l);
}

main().catch((e: unknown) => {
  console.error(`boot-profile: ${(e as Error).message}`);
  process.exit(1);
});
