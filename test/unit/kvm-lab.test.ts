// Acceptance checks of hack/kvm-lab itself (issue 4). The first group needs no
// VM. The second boots the L2 lab under QEMU TCG (no /dev/kvm needed, ~10 s of
// both cores each): it is kept to a handful of boots, and SKIPPED loudly where
// the lab is not prepared (sudo hack/setup prepares it).
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, writeFileSync, rmSync, existsSync, realpathSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { strict as assert } from 'node:assert';
import { parseArgs, jobScript, LabUsageError, EXIT_TIMEOUT, EXIT_LAB_FAILED, EXIT_USAGE, RunReport } from '../../hack/lab/kvm-lab';

const repo = join(__dirname, '..', '..', '..');
const kvmLab = join(repo, 'hack', 'kvm-lab');

interface Ran { code: number | null; stdout: string; stderr: string }

function lab(args: string[], env: NodeJS.ProcessEnv = process.env, cwd = repo): Ran {
  const r = spawnSync(kvmLab, args, { cwd, env, encoding: 'utf8', timeout: 300_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Processes whose command line names the run directory (QEMU, setpriv) or whose cwd is inside it. */
function processesUsing(dir: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
      if (cmd.includes(dir)) found.push(`${pid}: ${cmd}`);
    } catch {
      // the process ended while we looked
    }
  }
  return found;
}

function readReport(file: string): RunReport {
  return JSON.parse(readFileSync(file, 'utf8')) as RunReport;
}

describe('hack/kvm-lab: command line (no VM)', () => {
  it('rejects a run without a command, with how to give one', () => {
    assert.throws(() => parseArgs(['run'], {}, '/'), (e: Error) => e instanceof LabUsageError && /run needs a command after --/.test(e.message));
    const r = lab(['run']);
    assert.equal(r.code, EXIT_USAGE);
    assert.match(r.stderr, /run needs a command after --/);
  });

  it('rejects bad numbers, unknown options and subcommands by name', () => {
    assert.throws(() => parseArgs(['run', '--mem', 'lots', '--', 'true'], {}, '/'), /--mem lots: expected a whole number from 256 to 65536/);
    assert.throws(() => parseArgs(['run', '--cpus', '0', '--', 'true'], {}, '/'), /--cpus 0: expected a whole number from 1 to 64/);
    assert.throws(() => parseArgs(['run', '--timeout'], {}, '/'), /--timeout needs a value/);
    assert.throws(() => parseArgs(['run', '--frobnicate', '--', 'true'], {}, '/'), /unknown option --frobnicate/);
    assert.throws(() => parseArgs(['run', 'true'], {}, '/'), /put the command after --/);
    assert.throws(() => parseArgs(['shell', '--', 'ls'], {}, '/'), /shell takes no command/);
    assert.throws(() => parseArgs(['run', '--hang', '5', '--', 'true'], {}, '/'), /--hang 5: expected a whole number from 10 to 86400/);
    assert.throws(() => parseArgs(['run', '--tcg-threads', 'many', '--', 'true'], {}, '/'), /--tcg-threads many: expected single or multi/);
    const r = lab(['boot']);
    assert.equal(r.code, EXIT_USAGE);
    assert.match(r.stderr, /unknown subcommand 'boot': use run or shell/);
  });

  it('runs L2 with one vCPU on single-threaded TCG unless asked otherwise', () => {
    assert.equal(parseArgs(['run', '--', 'true'], {}, '/').tcgThreads, 'single');
    assert.equal(parseArgs(['run', '--', 'true'], {}, '/').cpus, 1);
    assert.equal(parseArgs(['run', '--tcg-threads', 'multi', '--', 'true'], {}, '/').tcgThreads, 'multi');
  });

  it('rejects a scratch directory that does not exist or cannot travel on the kernel command line', () => {
    assert.throws(() => parseArgs(['run', '--scratch', '/nonexistent/vmlet-lab', '--', 'true'], {}, '/'), /is not an existing directory: create it first/);
    const spaced = mkdtempSync(join(tmpdir(), 'kvm lab '));
    try {
      assert.throws(() => parseArgs(['run', '--scratch', spaced, '--', 'true'], {}, '/'), /must be absolute and use only letters/);
    } finally {
      rmSync(spaced, { recursive: true });
    }
  });

  it('passes PATH, HOME and VMLET_* through, adds -e variables, and always marks VMLET_LAB=inside', () => {
    const o = parseArgs(['run', '-e', 'EXTRA=1 2', '-e', 'FROM_HOST', '--', 'env'],
      { PATH: '/usr/bin', HOME: '/root', VMLET_CACHE: '/c', SECRET_TOKEN: 'x', FROM_HOST: 'h', VMLET_LAB: 'outside' }, '/w');
    assert.deepEqual(o.env, { PATH: '/usr/bin', HOME: '/root', VMLET_CACHE: '/c', VMLET_LAB: 'inside', EXTRA: '1 2', FROM_HOST: 'h' });
    assert.throws(() => parseArgs(['run', '-e', 'NOT_SET_ANYWHERE', '--', 'env'], {}, '/'), /NOT_SET_ANYWHERE is not set here; use -e NOT_SET_ANYWHERE=VALUE/);
    assert.throws(() => parseArgs(['run', '-e', '1BAD=x', '--', 'env'], {}, '/'), /'1BAD' is not a valid variable name/);
  });

  it('writes a job script that keeps every argument, the cwd and the environment exact under /bin/sh', () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), 'kvm-lab-job-')));
    try {
      const args = ['a b', "it's", '$HOME', '`id`', '"q"', 'back\\slash', '', 'new\nline'];
      const script = jobScript({
        mode: 'run', cwd: dir, env: { ODD: "x'y $z", PATH: process.env.PATH ?? '/usr/bin:/bin' },
        command: [process.execPath, '-e', 'console.log(JSON.stringify([process.cwd(), process.env.ODD, process.argv.slice(1)]))', ...args],
      });
      writeFileSync(join(dir, 'job'), script);
      // The same way hack/lab/init runs it: /bin/sh with an empty environment.
      const out = execFileSync('/usr/bin/env', ['-i', '/bin/sh', join(dir, 'job')], { encoding: 'utf8', cwd: '/' });
      assert.deepEqual(JSON.parse(out), [dir, "x'y $z", args]);
    } finally {
      rmSync(dir, { recursive: true });
    }
  });

  it('says the lab is unavailable (exit 125, what to run) when nothing is prepared', () => {
    const empty = mkdtempSync(join(tmpdir(), 'kvm-lab-cache-'));
    try {
      const env = { ...process.env, VMLET_CACHE: empty };
      const r = lab(['run', '--', 'true'], env);
      assert.equal(r.code, EXIT_LAB_FAILED);
      assert.match(r.stderr, /the lab is unavailable: .*no kernel package cached.*hack\/setup/s);
      const c = lab(['check'], env);
      assert.equal(c.code, EXIT_LAB_FAILED);
      assert.match(c.stderr, /the lab is unavailable/);
    } finally {
      rmSync(empty, { recursive: true });
    }
  });
});

describe('hack/kvm-lab: in the L2 lab (boots QEMU TCG)', function () {
  this.timeout(300_000);
  let scratch = '';

  before(function () {
    const c = lab(['check']);
    if (c.code !== 0) {
      console.log(`      !!! SKIPPED (needs the KVM lab): ${c.stderr.trim()}`);
      this.skip();
    }
    scratch = realpathSync(mkdtempSync(join(tmpdir(), 'kvm-lab-test-')));
  });
  after(() => {
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  it('has an ordinary /dev/kvm and an SVM CPU inside (the acceptance command), exit 0', () => {
    const r = lab(['run', '--', 'sh', '-c', 'ls -l /dev/kvm && grep -c svm /proc/cpuinfo']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^c\S+ .* 10, 232 .*\/dev\/kvm$/m, 'a character device 10,232');
    const count = Number(r.stdout.trim().split('\n').pop());
    assert.ok(count > 0, `grep -c svm printed ${count}`);
    assert.match(r.stderr, /L2 ready in [\d.]+ s on attempt \d/);
  });

  it('runs in the caller\'s cwd with its environment, keeps stdout and stderr apart, brings scratch files back and exits with the command\'s code', () => {
    const report = join(scratch, 'report.json');
    const r = lab(['run', '--scratch', scratch, '--report', report, '-e', "VMLET_PROBE=a b'c", '--',
      'sh', '-c', 'pwd; echo "probe=$VMLET_PROBE lab=$VMLET_LAB"; cat /sys/module/kvm_amd/parameters/nested /sys/module/kvm_amd/parameters/npt; echo artefact > "$0/from-l2"; echo to-stderr >&2; exit 5', scratch],
    { ...process.env }, join(repo, 'test'));
    assert.equal(r.code, 5, r.stderr);
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines[0], join(repo, 'test'));
    assert.equal(lines[1], "probe=a b'c lab=inside");
    assert.deepEqual(lines.slice(2).map((l) => l.replace('Y', '1')), ['1', '1'], 'kvm_amd loaded with nested=1 npt=1');
    assert.doesNotMatch(r.stdout, /to-stderr/);
    assert.match(r.stderr, /^to-stderr$/m);
    assert.equal(readFileSync(join(scratch, 'from-l2'), 'utf8'), 'artefact\n');
    const rep = readReport(report);
    assert.equal(rep.exitCode, 5);
    assert.equal(rep.attempts[rep.attempts.length - 1].outcome, 'exited');
    assert.deepEqual(processesUsing(rep.runDir), []);
  });

  it('kills a command that runs past its timeout and reports it (exit 124), leaving no QEMU behind', () => {
    const report = join(scratch, 'timeout.json');
    const r = lab(['run', '--timeout', '3', '--report', report, '--', 'sh', '-c', 'echo started; sleep 600']);
    assert.equal(r.code, EXIT_TIMEOUT, r.stderr);
    assert.match(r.stdout, /^started$/m);
    assert.match(r.stderr, /command timed out after 3 s: killed with L2 \(exit 124\); console log: \S+console\.log/);
    const rep = readReport(report);
    assert.ok(existsSync(rep.attempts[0].consoleLog), 'the console log is kept for the failure');
    assert.match(readFileSync(rep.attempts[0].consoleLog, 'utf8'), /vmlet-lab: ready/);
    assert.deepEqual(processesUsing(rep.runDir), []);
    rmSync(rep.runDir, { recursive: true, force: true });
  });

  it('tells a hung L2 from a quiet command by its heartbeat, and reruns the command from a fresh boot when asked', () => {
    // Suspend-to-idle with no wake-up source: L2 stops for good, console silent,
    // the way the lab's rare real hangs look. The second run finds the marker and exits 3.
    const report = join(scratch, 'hang.json');
    const marker = join(scratch, 'hung-once');
    const r = lab(['run', '--hang', '10', '--rerun-on-hang', '1', '--scratch', scratch, '--report', report, '--',
      'sh', '-c', 'if [ -e "$0" ]; then echo second run; exit 3; fi; touch "$0"; echo first run; echo freeze > /sys/power/state; echo not reached', marker]);
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stderr, /attempt 1: L2 hung under the command: no heartbeat for 10 s; killed/);
    // The hung L2's vCPU registers are kept beside its console log, from QEMU's monitor.
    const regs = /L2 registers: (\S+)/.exec(r.stderr);
    assert.ok(regs, r.stderr);
    assert.match(readFileSync(regs[1], 'utf8'), /RIP=[0-9a-f]{16}/);
    assert.match(r.stderr, /running the command again from a fresh boot/);
    assert.match(r.stdout, /^first run$/m);
    assert.match(r.stdout, /^second run$/m);
    assert.doesNotMatch(r.stdout, /not reached/);
    const rep = readReport(report);
    assert.deepEqual(rep.attempts.map((a) => a.outcome), ['hung', 'exited']);
    assert.deepEqual(processesUsing(rep.runDir), []);
    rmSync(rep.runDir, { recursive: true, force: true });
  });

  it('reruns the command from a fresh boot when L2\'s kernel panics under it', () => {
    // sysrq-c panics L2 on purpose: the lab breaking, not the command failing.
    const report = join(scratch, 'panic.json');
    const marker = join(scratch, 'panicked-once');
    const r = lab(['run', '--rerun-on-hang', '1', '--scratch', scratch, '--report', report, '--',
      'sh', '-c', 'if [ -e "$0" ]; then echo second run; exit 3; fi; touch "$0"; sync; echo first run; echo c > /proc/sysrq-trigger; sleep 60; echo not reached', marker]);
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stderr, /attempt 1: L2's kernel panicked under the command \(Kernel panic/);
    assert.match(r.stderr, /running the command again from a fresh boot/);
    assert.match(r.stdout, /^second run$/m);
    assert.doesNotMatch(r.stdout, /not reached/);
    const rep = readReport(report);
    assert.deepEqual(rep.attempts.map((a) => a.outcome), ['hung', 'exited']);
    assert.deepEqual(processesUsing(rep.runDir), []);
    rmSync(rep.runDir, { recursive: true, force: true });
  });

  it('retries a boot that is not ready in time, then gives up with the console tail (exit 125)', () => {
    // One second is far below any L2 boot under TCG, so every attempt is a wedge.
    const report = join(scratch, 'wedged.json');
    const r = lab(['run', '--boot-timeout', '1', '--retries', '1', '--report', report, '--', 'true']);
    assert.equal(r.code, EXIT_LAB_FAILED, r.stderr);
    assert.match(r.stderr, /attempt 1: L2 boot wedged \(not ready within 1 s\)/);
    assert.match(r.stderr, /L2 never became ready in 2 attempts: giving up/);
    const rep = readReport(report);
    assert.deepEqual(rep.attempts.map((a) => a.outcome), ['wedged', 'wedged']);
    assert.equal(rep.retries, 1);
    assert.deepEqual(processesUsing(rep.runDir), []);
    rmSync(rep.runDir, { recursive: true, force: true });
  });

  it('kills QEMU when kvm-lab itself gets SIGTERM (exit 143)', async () => {
    const report = join(scratch, 'sigterm.json');
    const child = spawn(process.execPath, [join(repo, 'dist', 'hack', 'lab', 'kvm-lab.js'), 'run', '--report', report, '--', 'sleep', '600'],
      { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => { stderr += b.toString(); });
    await new Promise((r) => setTimeout(r, 3000));
    child.kill('SIGTERM');
    const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    assert.equal(code, 143, stderr);
    assert.match(stderr, /interrupted by SIGTERM: QEMU killed/);
    const rep = readReport(report);
    assert.deepEqual(processesUsing(rep.runDir), []);
    rmSync(rep.runDir, { recursive: true, force: true });
  });
});
