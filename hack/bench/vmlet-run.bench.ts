// `npm run bench vmlet-run` (on the host, as root): `vmlet run <rootfs> -- true`
// end to end, the real CLI as a user types it (node start-up included), on
// one busybox rootfs, beside its peer `ctr run --rm --rootfs <dir> id /bin/true`
// with runc (Debian's containerd + runc, hack/packages.d/run-bench.txt, on a
// private containerd the benchmark starts itself):
//
// - INSIDE hack/kvm-lab (Linux guests need a standard /dev/kvm, which this
//   host's paravirtual one is not): vmlet run restored from its template (the
//   default; the template is made by a first run, timed apart), vmlet run
//   --cold (boots the guest kernel), and runc on the same machine, so the
//   ratio vmlet / runc compares like with like (both in L2 under TCG);
// - ON THE HOST: runc again, to show how much slower the lab itself is.
// - ON A HOST WITH vmx/svm (hardware virtualization): every row runs right
//   there, no lab; that is where issue 7's "no slower than runc on standard
//   KVM" is measured.
//
// Print, never assert. Inside the lab alone (VMLET_LAB=inside) the lab rows run:
//   hack/kvm-lab run --timeout 1500 -- node dist/hack/bench/run.js vmlet-run
// VMLET_BENCH_RUNS (restores and runc runs, default 50), VMLET_BENCH_COLD_RUNS
// (default 5).
import { ChildProcess, spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../native/ts/repo-root';
import { busyboxStatic } from '../../shim/sandbox/guest';
import { hostVirtualization } from '../../shim/sandbox/host';

const RUNS = Number(process.env.VMLET_BENCH_RUNS ?? 50);
const COLD_RUNS = Number(process.env.VMLET_BENCH_COLD_RUNS ?? 5);
const JSON_TAG = 'VMLET_RUN_BENCH_JSON ';

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

interface Side {
  name: string;
  where: string;
  ms: number[];
}

function row(s: Side): string {
  return `  ${s.name.padEnd(44)} ${s.where.padEnd(10)} ${percentile(s.ms, 50).toFixed(1).padStart(9)} ${percentile(s.ms, 90).toFixed(1).padStart(9)} ${String(s.ms.length).padStart(5)}`;
}
const HEADER = `  ${'end to end, ms'.padEnd(44)} ${'where'.padEnd(10)} ${'p50'.padStart(9)} ${'p90'.padStart(9)} ${'runs'.padStart(5)}`;

/** Bound on one run: a run that hangs (seen in an overloaded lab) is reported as left out, not waited for. */
const RUN_TIMEOUT_MS = Number(process.env.VMLET_BENCH_RUN_TIMEOUT_MS ?? 180_000);

/** Runs a command to its end (killed past RUN_TIMEOUT_MS); wall time in ms. Its output is kept only to explain a failure. */
function timed(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env, killSignal: NodeJS.Signals = 'SIGTERM'): { ms: number; code: number | null; out: string; err: string } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { env, encoding: 'utf8', maxBuffer: 16 << 20, timeout: RUN_TIMEOUT_MS, killSignal });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.error && (r.error as NodeJS.ErrnoException).code !== 'ETIMEDOUT') throw r.error;
  const err = r.error ? `${r.stderr}\nvmlet run: killed after ${RUN_TIMEOUT_MS} ms (hung)` : r.stderr;
  return { ms, code: r.status, out: r.stdout, err };
}

/** A static busybox with the applets the runs use: the same tree for both sides. */
function busyboxRootfs(dir: string): void {
  mkdirSync(join(dir, 'bin'), { recursive: true });
  copyFileSync(busyboxStatic(), join(dir, 'bin', 'busybox'));
  for (const a of ['sh', 'true', 'echo', 'cat']) symlinkSync('busybox', join(dir, 'bin', a));
  for (const d of ['etc', 'tmp', 'proc', 'dev', 'sys']) mkdirSync(join(dir, d), { recursive: true });
  writeFileSync(join(dir, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
}

function makeSquashfs(dir: string, out: string): void {
  const r = spawnSync('mksquashfs', [dir, out, '-comp', 'zstd', '-noappend', '-quiet', '-all-root'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mksquashfs failed: ${r.stderr}`);
}

/** The vmlet side, inside the lab: restores and cold boots of the real CLI, interleaved. */
async function vmletSide(sqfs: string): Promise<{ sides: Side[]; firstRunMs: number; cliStartMs: number; failures: string[] }> {
  const vmlet = join(repoRoot(), 'dist', 'shim', 'cli', 'vmlet.js');
  const templates = mkdtempSync(join(tmpdir(), 'vmlet-run-bench-templates-'));
  const env = { ...process.env, VMLET_TEMPLATE_DIR: templates };
  const failures: string[] = [];
  const run = (extra: string[], expect: RegExp): number | null => {
    const r = timed(process.execPath, [vmlet, 'run', '--stats', ...extra, sqfs, '--', 'true'], env);
    // A run that did not do what its row says (failed, or booted instead of
    // restoring) would make the table lie: it is left out and reported.
    if (r.code !== 0 || !expect.test(r.err)) {
      failures.push(`vmlet run ${extra.join(' ')}: exit ${r.code}, ${r.err.split('\n').filter((l) => /warn|vmlet run:/.test(l)).slice(0, 3).join(' | ')}`);
      return null;
    }
    return r.ms;
  };
  try {
    const cliStart = [0, 1, 2].map(() => timed(process.execPath, [vmlet, '--help']).ms);
    const firstRunMs = run([], /template [0-9a-f]{32} made by this run/) ?? NaN;
    const restored: number[] = [];
    const cold: number[] = [];
    const everyCold = Math.max(1, Math.floor(RUNS / Math.max(1, COLD_RUNS)));
    for (let i = 0; i < RUNS; i++) {
      const r = run([], /template [0-9a-f]{32} reused/);
      if (r !== null) restored.push(r);
      if (i % everyCold === 0 && i / everyCold < COLD_RUNS) {
        const c = run(['--cold'], /^vmlet run: cold boot: /m);
        if (c !== null) cold.push(c);
      }
    }
    return {
      sides: [
        { name: 'vmlet run -- true, restored (default)', where: HERE, ms: restored },
        { name: 'vmlet run --cold -- true (boots)', where: HERE, ms: cold },
      ],
      firstRunMs,
      cliStartMs: percentile(cliStart, 50),
      failures,
    };
  } finally {
    rmSync(templates, { recursive: true, force: true });
  }
}

function which(name: string): string | null {
  const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** The peer, on the host: a private containerd, then `ctr run --rm` with runc on the rootfs directory. */
async function runcSide(rootfs: string, work: string, failures: string[]): Promise<Side | string> {
  const missing = ['containerd', 'ctr', 'runc'].filter((b) => which(b) === null);
  if (missing.length) return `${missing.join(', ')} not installed (hack/packages.d/run-bench.txt; run hack/setup)`;
  if (process.getuid?.() !== 0) return 'containerd needs root';
  const dir = join(work, 'containerd');
  mkdirSync(dir);
  const address = join(dir, 'containerd.sock');
  const config = join(dir, 'config.toml');
  // Private root, state and socket: never the host's containerd, nothing left behind.
  writeFileSync(config, [
    'version = 2',
    `root = "${join(dir, 'root')}"`,
    `state = "${join(dir, 'state')}"`,
    '[grpc]',
    `  address = "${address}"`,
    '[plugins."io.containerd.grpc.v1.cri"]',
    '  disable_tcp_service = true',
    '',
  ].join('\n'));
  // Its log goes to a file: a pipe would not be read while spawnSync blocks
  // this event loop, and containerd, blocked writing its log, hung every ctr
  // run from about the 25th on.
  const logPath = join(dir, 'containerd.log');
  const logFd = openSync(logPath, 'w');
  const daemon: ChildProcess = spawn('containerd', ['--config', config], { stdio: ['ignore', 'ignore', logFd] });
  closeSync(logFd);
  const log = (): string => readFileSync(logPath, 'utf8').slice(-4000);
  try {
    for (let i = 0; ; i++) {
      if (spawnSync('ctr', ['--address', address, 'version'], { stdio: 'ignore' }).status === 0) break;
      if (i > 100 || daemon.exitCode !== null) return `containerd did not come up: ${log()}`;
      await new Promise((r) => setTimeout(r, 100));
    }
    const ms: number[] = [];
    // The first run loads the runc shim binary and creates the namespace: not timed.
    for (let i = 0, failed = 0; ms.length < RUNS; i++) {
      // SIGKILL: ctr run passes SIGTERM on to its task.
      const r = timed('ctr', ['--address', address, 'run', '--rm', '--rootfs', rootfs, `vmlet-bench-${i}`, '/bin/true'], process.env, 'SIGKILL');
      if (r.code !== 0) {
        failures.push(`ctr run vmlet-bench-${i} (${HERE}): exit ${r.code}: ${r.err.trim().split('\n').slice(-2).join(' | ')}`);
        failures.push(`containerd log: ${log().split('\n').slice(-3).join(' | ')}`);
        spawnSync('ctr', ['--address', address, 'containers', 'rm', `vmlet-bench-${i}`], { stdio: 'ignore' });
        if (++failed >= 5) return `ctr run failed 5 times, last: exit ${r.code}: ${r.err}`;
        continue;
      }
      if (i > 0) ms.push(r.ms);
    }
    return { name: 'ctr run --rm --rootfs DIR id /bin/true (runc)', where: HERE, ms };
  } finally {
    daemon.kill('SIGTERM');
    await new Promise((r) => (daemon.exitCode !== null ? r(null) : daemon.once('exit', r)));
  }
}

/** Where the vmlet rows run: the lab's L2, or this host when it can run Linux guests itself. */
const HERE = process.env.VMLET_LAB === 'inside' ? 'lab (L2)' : 'host';

export async function run(): Promise<void> {
  // Inside the lab, or on a host with vmx/svm: every row runs here, side by side.
  if (process.env.VMLET_LAB === 'inside' || hostVirtualization() !== '') {
    // The lab's own scratch: containerd's root and state go here (L2's / is a tmpfs overlay).
    const work = mkdtempSync(join(tmpdir(), 'vmlet-run-bench-'));
    const rootfs = join(work, 'rootfs');
    busyboxRootfs(rootfs);
    const sqfs = join(work, 'rootfs.sqfs');
    makeSquashfs(rootfs, sqfs);
    try {
      const load = loadavg()[0];
      const v = await vmletSide(sqfs);
      const runc = await runcSide(rootfs, work, v.failures);
      if (typeof runc === 'string') v.failures.push(`runc (${HERE}): ${runc}`);
      else v.sides.push(runc);
      if (process.env.VMLET_BENCH_JSON === '1') console.log(JSON_TAG + JSON.stringify({ ...v, load: [load, loadavg()[0]] }));
      printLab(v);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
    return;
  }

  const work = mkdtempSync(join(tmpdir(), 'vmlet-run-bench-'));
  try {
    const rootfs = join(work, 'rootfs');
    busyboxRootfs(rootfs);
    const loadBefore = loadavg()[0];
    const hostFailures: string[] = [];
    const hostRunc = await runcSide(rootfs, work, hostFailures);
    if (typeof hostRunc === 'string') console.log(`!!! runc on the host SKIPPED: ${hostRunc}`);
    for (const f of hostFailures) console.log(`  !!! left out: ${f}`);

    const lab = join(repoRoot(), 'hack', 'kvm-lab');
    console.log('vmlet run and runc inside hack/kvm-lab (takes several minutes) ...');
    const child = spawnSync(lab, ['run', '--timeout', '2400', '--', process.execPath, join(__dirname, 'run.js'), 'vmlet-run'], {
      env: { ...process.env, VMLET_BENCH_JSON: '1' },
      encoding: 'utf8',
      maxBuffer: 64 << 20,
    });
    const line = (child.stdout ?? '').split('\n').find((l) => l.startsWith(JSON_TAG));
    if (!line) throw new Error(`the lab run gave no result (exit ${child.status}):\n${child.stdout}\n${child.stderr}`);
    const v = JSON.parse(line.slice(JSON_TAG.length)) as LabResult & { load: number[] };
    printLab(v);
    if (typeof hostRunc !== 'string') {
      console.log(row(hostRunc));
      const labRunc = v.sides.find((x) => x.where === 'lab (L2)' && x.name.includes('runc'));
      if (labRunc) console.log(`  runc in the lab / runc on the host, p50: ${(percentile(labRunc.ms, 50) / percentile(hostRunc.ms, 50)).toFixed(1)}x (what the lab's TCG costs a container start)`);
    }
    console.log(`load average (1 min): host ${loadBefore.toFixed(2)} before, ${loadavg()[0].toFixed(2)} after; in the lab ${v.load.map((x) => x.toFixed(2)).join(' → ')}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
    if (existsSync(work)) console.log(`!!! could not remove ${work}`);
  }
}

interface LabResult {
  sides: Side[];
  firstRunMs: number;
  cliStartMs: number;
  failures: string[];
}

/** The lab's rows: restored, cold and (when containerd ran there) runc, with the ratios between them. */
function printLab(v: LabResult): void {
  console.log(`first vmlet run (makes the template: boot + snapshot, then restores): ${v.firstRunMs.toFixed(0)} ms; vmlet CLI start-up alone (--help): ${v.cliStartMs.toFixed(0)} ms`);
  console.log(HEADER);
  for (const s of v.sides) console.log(row(s));
  for (const f of v.failures) console.log(`  !!! left out: ${f}`);
  const [restored, cold, runc] = v.sides;
  const ratio = (a: Side, b: Side, p: number) => (percentile(a.ms, p) / percentile(b.ms, p)).toFixed(2);
  console.log(`  vmlet cold / vmlet restored: p50 ${ratio(cold, restored, 50)}x, p90 ${ratio(cold, restored, 90)}x`);
  if (runc) console.log(`  vmlet restored / runc, both on the same machine: p50 ${ratio(restored, runc, 50)}x, p90 ${ratio(restored, runc, 90)}x (below 1: vmlet is faster)`);
}
