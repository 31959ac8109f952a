// `npm run bench vmm`: the same test-guest binary (native/testguest) under our
// VMM and under QEMU 7.2 `-M microvm` on the same /dev/kvm, medians of
// VMLET_BENCH_RUNS (default 10) runs each, ours beside QEMU's.
//
// Timing is taken on the host from the guest's serial output: the guest's
// first instruction writes one byte (VMM start -> first guest instruction),
// and each timed loop sits between the newline ending a "TG <bench> begin"
// line and a bare newline the guest writes right after the loop (README
// "Benchmarks"). Ours: the 8250 log is a FIFO read by this process; QEMU: its
// serial on stdout, a pipe. Both pay one event-loop wake-up per timestamp.
import { execFileSync, spawn } from 'node:child_process';
import { accessSync, constants, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { randomBytes } from 'node:crypto';
import { Vm, VmConfig, VmExit } from '../../native/ts/vmm';
import { parseTg, qemuDebugExitCode, qemuMicrovmArgs, requireTestguest, TgOutput } from '../../native/ts/testguest';

const RUNS = Number(process.env.VMLET_BENCH_RUNS ?? 10);
const MMIO_READS = 50_000;
const BLK_RANDOM_READS = 20_000;
const BLK_SEQ_MIB = 512;
const BLK_QD = 16;
const BLK_DISK_MIB = 64;
const VSOCK_MIB = 128;
const VSOCK_PORT = 7000;
const MEMORY_MIB = 256;

/** Records when each serial newline reached this process. */
class SerialTap {
  text = '';
  first?: bigint;
  newlines: bigint[] = [];
  readonly closed: Promise<void>;
  constructor(stream: Readable) {
    stream.setEncoding('latin1');
    stream.on('data', (d: string) => {
      const t = process.hrtime.bigint();
      if (this.first === undefined && d.length > 0) this.first = t;
      for (let i = 0; i < d.length; i++) if (d.charCodeAt(i) === 10) this.newlines.push(t);
      this.text += d;
    });
    this.closed = new Promise((resolve) => {
      stream.on('close', () => resolve());
      stream.on('end', () => resolve());
    });
  }
  /** Seconds between the newline ending the line that starts with `begin` and the next newline. */
  span(begin: string): number {
    const lines = this.text.split('\n');
    const i = lines.findIndex((l) => l.startsWith(begin));
    if (i < 0 || i + 1 >= this.newlines.length) throw new Error(`no "${begin}" span in the guest output:\n${this.text}`);
    return Number(this.newlines[i + 1] - this.newlines[i]) / 1e9;
  }
}

interface RunResult {
  tap: SerialTap;
  out: TgOutput;
  t0: bigint;
  exitCode?: number;
  exit: string;
  exits?: Record<string, number>;
  internalStartMs?: number;
}

function assertClean(r: RunResult, what: string): void {
  if (r.exitCode !== 0 || r.out.done?.fail !== 0)
    throw new Error(`${what}: guest exit ${r.exit}, DONE ${JSON.stringify(r.out.done)}; output:\n${r.tap.text}`);
}

let seq = 0;

async function runOurs(dir: string, cmdline: string, extra: Partial<VmConfig> = {}): Promise<RunResult> {
  const fifo = join(dir, `serial-${seq++}.fifo`);
  execFileSync('mkfifo', [fifo]);
  // Opened non-blocking first, so the VMM's open for writing does not wait for a reader.
  const fd = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const tap = new SerialTap(new Socket({ fd, readable: true, writable: false }));
  const t0 = process.hrtime.bigint();
  const vm = await Vm.create({ kernel: requireTestguest(), cmdline, memoryMiB: MEMORY_MIB, cpus: 1, serialLog: fifo, ...extra });
  vm.start();
  const timer = setTimeout(() => void vm.kill(), 120_000);
  let exit: VmExit;
  try {
    exit = await vm.wait();
  } finally {
    clearTimeout(timer);
  }
  await Promise.race([tap.closed, new Promise((r) => setTimeout(r, 2000))]);
  const st = vm.stats();
  return {
    tap, out: parseTg(tap.text), t0,
    exitCode: exit.reason === 'guest-exit' ? exit.code : undefined,
    exit: JSON.stringify(exit, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)),
    exits: st.exits,
    internalStartMs: st.firstEntryNs !== undefined && st.createdNs !== undefined ? Number(st.firstEntryNs - st.createdNs) / 1e6 : undefined,
  };
}

function runQemu(cmdline: string, disks: { path: string }[] = [], vsockCid?: number): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const args = qemuMicrovmArgs({ accel: 'kvm', cmdline, memoryMiB: MEMORY_MIB, disks, vsockCid });
    const t0 = process.hrtime.bigint();
    const p = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const tap = new SerialTap(p.stdout);
    let stderr = '';
    p.stderr.setEncoding('latin1').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), 120_000);
    p.on('error', reject);
    p.on('close', (status, signal) => {
      clearTimeout(timer);
      const code = qemuDebugExitCode(status);
      resolve({ tap, out: parseTg(tap.text), t0, exitCode: code, exit: `status ${status} signal ${signal} ${stderr.trim()}` });
    });
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

interface Row {
  metric: string;
  unit: string;
  higherIsBetter: boolean;
  ours: number[];
  qemu: number[];
  note?: string;
}

function fmt(x: number): string {
  if (!Number.isFinite(x)) return 'n/a';
  return x >= 1000 ? Math.round(x).toLocaleString('en-US') : x >= 10 ? x.toFixed(1) : x.toFixed(3);
}

function printTable(rows: Row[]): void {
  const header = ['metric', 'unit', 'ours (median)', 'QEMU (median)', 'ours vs QEMU', 'runs'];
  const body = rows.map((r) => {
    const o = r.ours.length ? median(r.ours) : NaN, q = r.qemu.length ? median(r.qemu) : NaN;
    const speed = r.higherIsBetter ? o / q : q / o;
    return [r.metric, r.unit, fmt(o), r.qemu.length ? fmt(q) : `n/a${r.note ? ` (${r.note})` : ''}`,
      Number.isFinite(speed) ? `${speed.toFixed(2)}x ${speed >= 1 ? 'better' : 'worse'}` : 'n/a', `${r.ours.length}/${r.qemu.length}`];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i])).join('  ');
  console.log(line(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const b of body) console.log(line(b));
}

// The host end of both VMMs' bench-vsock streams is one small python3 process
// (the same code, so only the transport differs): QEMU's vsock is vhost-vsock,
// whose guest streams end in an AF_VSOCK socket of this kernel, which Node
// cannot open (libuv knows only TCP and Unix sockets); ours ends in the
// hybrid model's Unix socket. It measures first to last byte received, the
// byte count and the CRC-32, reading up to 1 MiB per recv.
const PY_STREAM_SINK = `
import socket, sys, time, zlib
if sys.argv[1] == "vsock":
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, int(sys.argv[2])))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[2])
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
s.close()
buf = bytearray(1 << 20); view = memoryview(buf)
n = crc = 0; first = last = None
while True:
    k = c.recv_into(buf)
    if k == 0:
        break
    last = time.monotonic_ns()
    if first is None:
        first = last
    n += k
    crc = zlib.crc32(view[:k], crc)
print(n, (last - first) / 1e9 if n else 0, "%08x" % crc, flush=True)
`;

/** What a sink received: byte count, first to last byte, CRC-32 as 8 hex digits. */
interface StreamResult {
  bytes: number;
  seconds: number;
  crc: string;
}

interface StreamSink {
  done: Promise<StreamResult>;
  stop(): void;
}

/** A stream sink listening on AF_VSOCK `port` or on the Unix socket `path`; resolves once it listens. */
async function streamSink(where: { vsockPort: number } | { path: string }): Promise<StreamSink> {
  const args = 'path' in where ? ['unix', where.path] : ['vsock', String(where.vsockPort)];
  const p = spawn('python3', ['-c', PY_STREAM_SINK, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  p.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  const closed = new Promise<number | null>((resolve) => p.on('close', resolve));
  const failed = (code: number | null): Error => new Error(`python3 stream sink (${args.join(' ')}) exited ${code}: ${err.trim() || out.trim()}`);
  await Promise.race([
    new Promise<void>((resolve) => p.stdout.on('data', () => out.includes('listening') && resolve())),
    closed.then((code) => Promise.reject(failed(code))),
  ]);
  const done = closed.then((code) => {
    const m = /^(\d+) ([\d.e+-]+) ([0-9a-f]{8})$/m.exec(out);
    if (code !== 0 || !m) throw failed(code);
    return { bytes: Number(m[1]), seconds: Number(m[2]), crc: m[3] };
  });
  done.catch(() => undefined); // awaited only when the guest ran; a failed boot must not leave it unhandled
  return { done, stop: () => p.kill('SIGKILL') };
}

export async function run(): Promise<void> {
  requireTestguest();
  accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-bench-vmm-'));
  const disk = join(dir, 'disk.img');
  writeFileSync(disk, randomBytes(BLK_DISK_MIB << 20));
  readFileSync(disk); // into the page cache, for both VMMs
  // Load the addon before anything is timed: dlopen is a one-off per process, not per VM.
  Vm.defaultKvmDevice();
  const qemuVersion = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0];
  let vhostVsock = true;
  try {
    accessSync('/dev/vhost-vsock');
  } catch {
    vhostVsock = false;
  }
  console.log(`test guest ${requireTestguest()}; peer: ${qemuVersion}, -M microvm -accel kvm -cpu host,-arch-capabilities`);
  console.log(`${RUNS} runs per figure; guest RAM ${MEMORY_MIB} MiB; disk ${BLK_DISK_MIB} MiB in page cache; medians`);
  // Shared machines: other work skews times, which is why the two VMMs alternate within each run.
  const loadBefore = loadavg()[0];

  const rows: Row[] = [
    { metric: 'VMM start -> first guest instruction', unit: 'ms', higherIsBetter: false, ours: [], qemu: [] },
    { metric: 'MMIO round trips (virtio reg read, CPL3)', unit: 'exits/s', higherIsBetter: true, ours: [], qemu: [] },
    { metric: 'virtio-blk 4 KiB random read, QD1', unit: 'IOPS', higherIsBetter: true, ours: [], qemu: [] },
    { metric: `virtio-blk 4 KiB random read, QD${BLK_QD}`, unit: 'IOPS', higherIsBetter: true, ours: [], qemu: [] },
    { metric: 'virtio-blk 1 MiB sequential read', unit: 'MB/s', higherIsBetter: true, ours: [], qemu: [] },
    { metric: 'virtio-vsock guest -> host stream', unit: 'MB/s', higherIsBetter: true, ours: [], qemu: [],
      note: vhostVsock ? undefined : 'no /dev/vhost-vsock on this host: QEMU has no vsock peer; run it in hack/kvm-lab' },
  ];
  // vhost-vsock CIDs are host-wide: one derived from our pid keeps parallel runs apart.
  const qemuCid = 1000 + (process.pid % 1_000_000);
  const internalStart: number[] = [];
  // How often the guest ran out of the host's credit and asked for more: the
  // stream is paced by how much the host end takes per wake-up.
  const creditWaits = { ours: [] as number[], qemu: [] as number[] };
  const vsockExits: Record<string, number>[] = [];
  const mmioExitsPerRead: number[] = [];
  const blkExitsPerRequest: number[] = [];
  try {
    for (let i = 0; i < RUNS; i++) {
      // Alternate who goes first so drift in the machine's load hits both.
      const order: ('ours' | 'qemu')[] = i % 2 ? ['qemu', 'ours'] : ['ours', 'qemu'];
      for (const who of order) {
        const dst = (r: Row): number[] => (who === 'ours' ? r.ours : r.qemu);
        const boot = (cmd: string, disks: { path: string; readOnly?: boolean }[] = []): Promise<RunResult> =>
          who === 'ours' ? runOurs(dir, cmd, { disks }) : runQemu(cmd, disks);

        const hello = await boot('tg.mode=hello');
        assertClean({ ...hello, out: { ...hello.out, done: { pass: 1, fail: 0 } } }, `${who} hello`);
        if (hello.tap.first === undefined) throw new Error(`${who}: no serial byte`);
        dst(rows[0]).push(Number(hello.tap.first - hello.t0) / 1e6);
        if (who === 'ours' && hello.internalStartMs !== undefined) internalStart.push(hello.internalStartMs);

        const mmio = await boot(`tg.mode=bench-mmio tg.n=${MMIO_READS}`, [{ path: disk, readOnly: true }]);
        assertClean(mmio, `${who} bench-mmio`);
        dst(rows[1]).push(MMIO_READS / mmio.tap.span('TG bench-mmio begin'));
        if (who === 'ours' && mmio.exits) mmioExitsPerRead.push((mmio.exits.mmio ?? 0) / MMIO_READS);

        const blk = await boot(`tg.mode=bench-blk tg.n=${BLK_RANDOM_READS} tg.qd=${BLK_QD} tg.mib=${BLK_SEQ_MIB}`, [{ path: disk, readOnly: true }]);
        assertClean(blk, `${who} bench-blk`);
        dst(rows[2]).push(BLK_RANDOM_READS / blk.tap.span('TG bench-blk-rand begin'));
        dst(rows[3]).push(BLK_RANDOM_READS / blk.tap.span('TG bench-blk-randqd begin'));
        dst(rows[4]).push((BLK_SEQ_MIB << 20) / 1e6 / blk.tap.span('TG bench-blk-seq begin'));
        if (who === 'ours' && blk.exits) {
          const total = Object.values(blk.exits).reduce((a, b) => a + b, 0);
          blkExitsPerRequest.push(total / (2 * BLK_RANDOM_READS + BLK_SEQ_MIB));
        }

        const checkStream = (got: StreamResult, out: TgOutput): void => {
          const line = out.lines.find((l) => l.check === 'vsock-bench');
          if (got.bytes !== VSOCK_MIB << 20 || line?.fields.sent_crc32 !== got.crc)
            throw new Error(`${who} bench-vsock: host got ${got.bytes} bytes crc ${got.crc}, guest sent ${line?.fields.sent} crc ${line?.fields.sent_crc32}`);
          dst(rows[5]).push(got.bytes / 1e6 / got.seconds);
          const stats = out.lines.find((l) => l.check === 'vsock-stats');
          if (stats) (who === 'ours' ? creditWaits.ours : creditWaits.qemu).push(Number(stats.fields.credit_requests));
        };
        const vsockCmd = `tg.mode=bench-vsock tg.vsock_port=${VSOCK_PORT} tg.mib=${VSOCK_MIB}`;
        if (who === 'ours') {
          const uds = join(dir, `vsock-${i}.sock`);
          const sink = await streamSink({ path: `${uds}_${VSOCK_PORT}` });
          try {
            const vs = await runOurs(dir, vsockCmd, { vsock: { cid: 3, udsPath: uds } });
            assertClean(vs, 'ours bench-vsock');
            checkStream(await sink.done, vs.out);
            if (vs.exits) vsockExits.push(vs.exits);
          } finally {
            sink.stop();
          }
        } else if (vhostVsock) {
          const sink = await streamSink({ vsockPort: VSOCK_PORT });
          try {
            const vs = await runQemu(vsockCmd, [], qemuCid);
            assertClean(vs, 'QEMU bench-vsock');
            checkStream(await sink.done, vs.out);
          } finally {
            sink.stop();
          }
        }
      }
      process.stdout.write(`  run ${i + 1}/${RUNS} done\n`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  console.log(`\nhost load average (1 min): ${loadBefore.toFixed(2)} before, ${loadavg()[0].toFixed(2)} after`);
  printTable(rows);
  console.log('');
  if (internalStart.length) console.log(`ours, inside the VMM: create -> first KVM_RUN median ${median(internalStart).toFixed(3)} ms (stats().createdNs -> firstEntryNs)`);
  if (mmioExitsPerRead.length) console.log(`ours: ${median(mmioExitsPerRead).toFixed(3)} MMIO exits per guest register read (exit counts carry over to other hosts; times do not)`);
  if (blkExitsPerRequest.length) console.log(`ours: ${median(blkExitsPerRequest).toFixed(3)} VM exits per virtio-blk request (whole bench-blk run incl. boot and serial, / requests)`);
  if (vsockExits.length) {
    const reasons = [...new Set(vsockExits.flatMap((e) => Object.keys(e)))].sort();
    console.log(`ours: VM exits per bench-vsock run (${VSOCK_MIB} MiB, incl. boot and serial), medians: ${reasons.map((r) => `${r} ${median(vsockExits.map((e) => e[r] ?? 0))}`).join(', ')}`);
  }
  if (creditWaits.ours.length) console.log(`vsock: the guest waited for host credit ${median(creditWaits.ours)} times per ${VSOCK_MIB} MiB under ours, ${creditWaits.qemu.length ? median(creditWaits.qemu) : 'n/a'} under QEMU (medians)`);
  console.log('"ours vs QEMU": how many times better ours is (latency: QEMU/ours; rates: ours/QEMU).');
  console.log('Host: the PVM /dev/kvm of the dev machines (guest CPL0 emulated, CPL3 native): compare ratios, not absolute numbers.');
}
