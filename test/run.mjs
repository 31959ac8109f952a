// The `npm test` entry point. Runs the compiled mocha suites and ends with the
// plain closing line CI reads ("N passed, N failed, N skipped").
//
// Where VM tests run is said out loud, because a green run that silently ran
// no VM is worse than a red one:
//   test/unit  no KVM at all (device tests on hand-built rings, stores, parsers)
//   test/kvm   the raw /dev/kvm of this host (test guest); skipped loudly without it
//   test/lab   real Linux guests inside hack/kvm-lab (standard KVM); skipped loudly without it
//
// The lab stage (hack/kvm-lab): on the host, after the host suites, test/kvm and
// test/lab run again inside the lab (`hack/kvm-lab run -- node test/run.mjs kvm lab`,
// VMLET_LAB=inside), under their own time budget (VMLET_LAB_BUDGET seconds per
// run, default 1500; a run that hangs L2 is redone up to twice), and their counts are folded into the closing line. A lab that
// cannot start here counts those suites as skipped, a lab that breaks as failed.
// `node test/run.mjs lab` runs only the lab stage (npm run test:lab);
// VMLET_LAB=skip skips it (loudly, counted as skipped).
import Mocha from 'mocha';
import { readdirSync, statSync, existsSync, accessSync, constants } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawn, spawnSync } from 'node:child_process';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

function files(dir) {
  if (!existsSync(dir)) return [];
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...files(p));
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

function kvmStatus() {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return 'present';
  } catch (e) {
    return e.code === 'ENOENT' ? 'absent' : `not permitted (${e.code})`;
  }
}

const only = process.argv.slice(2); // e.g. `node test/run.mjs unit kvm`
const suites = ['unit', 'kvm', 'lab'].filter((s) => only.length === 0 || only.includes(s));
const inside = process.env.VMLET_LAB === 'inside';
// On the host, test/lab runs only in the lab stage; inside the lab it runs here.
const hostSuites = inside ? suites : suites.filter((s) => s !== 'lab');
const labSuites = ['kvm', 'lab'];
const kvmLab = join(root, 'hack', 'kvm-lab');
let labCheck = null;
if (!inside && suites.includes('lab') && process.env.VMLET_LAB === 'skip') {
  labCheck = 'VMLET_LAB=skip is set in the environment';
} else if (!inside && suites.includes('lab')) {
  const c = spawnSync(kvmLab, ['check'], { cwd: root, encoding: 'utf8' });
  labCheck = c.status === 0 ? null : (`${c.stderr ?? ''}`.trim() || `hack/kvm-lab check exited ${c.status ?? c.signal}`);
}
const kvm = kvmStatus();
const banner = [`vmlet tests: suites ${suites.join(', ')}`];
banner.push(inside
  ? (kvm === 'present'
    ? '  test/kvm: runs on the KVM lab\'s standard KVM (nested kvm_amd in L2)'
    : `  !!! /dev/kvm is ${kvm} inside the KVM lab: every test/kvm test is SKIPPED, not passed !!!`)
  : !hostSuites.includes('kvm') ? '  test/kvm: not run on this host in this invocation'
  : kvm === 'present'
    ? '  test/kvm: runs on this host\'s raw /dev/kvm (the test guest)'
    : `  !!! /dev/kvm is ${kvm}: every test/kvm test is SKIPPED, not passed !!!`);
banner.push(inside
  ? '  test/lab: running inside the KVM lab (standard KVM)'
  : !suites.includes('lab') ? '  test/lab: not requested'
  : labCheck === null
    ? '  test/kvm + test/lab: run again inside hack/kvm-lab (standard KVM) after the host suites'
    : `  !!! test/kvm + test/lab do not run in the KVM lab: SKIPPED, not passed !!!\n      ${labCheck.replace(/\n/g, '\n      ')}`);
console.log(banner.join('\n'));

let passed = 0, failed = 0, skipped = 0;
const where = []; // one line per place VM tests ran, repeated after the closing line

async function countTests(suiteNames) {
  const m = new Mocha();
  const list = suiteNames.flatMap((s) => files(join(root, 'dist', 'test', s)));
  for (const f of list) m.addFile(f);
  try {
    await m.loadFilesAsync();
  } catch (e) {
    // Unloadable suites still must not vanish from the count.
    console.log(`  (counting the lab suites failed: ${e.message}; counting one per file)`);
    m.unloadFiles();
    return list.length;
  }
  const n = m.suite.total();
  m.unloadFiles();
  return n;
}

// Counted before the host run loads the same files (the module cache would hide them).
const labSkipCount = labCheck !== null ? await countTests(labSuites) : 0;

if (hostSuites.length > 0) {
  const mocha = new Mocha({ reporter: 'spec', timeout: 120_000, slow: 5_000 });
  for (const s of hostSuites) for (const f of files(join(root, 'dist', 'test', s))) mocha.addFile(f);
  await mocha.loadFilesAsync();
  const before = { passed, failed, skipped };
  await new Promise((done) => {
    const runner = mocha.run(done);
    runner.on('pass', () => passed++);
    runner.on("fail", () => failed++);
    runner.on('pending', () => skipped++);
  });
  if (hostSuites.includes('kvm') || hostSuites.includes('lab')) {
    const place = inside ? 'inside the KVM lab (standard KVM)'
      : `on this host (raw /dev/kvm${kvm === 'present' ? '' : `: ${kvm}, test/kvm SKIPPED`})`;
    where.push(`${hostSuites.map((s) => `test/${s}`).join(' + ')} ${place}: `
      + `${passed - before.passed} passed, ${failed - before.failed} failed, ${skipped - before.skipped} skipped`);
  }
}

if (!inside && suites.includes('lab')) {
  if (labCheck !== null) {
    skipped += labSkipCount;
    where.push(`test/kvm + test/lab in the KVM lab: SKIPPED (${labSkipCount} tests): ${labCheck.split('\n').pop()}`);
  } else {
    await labStage();
  }
}

async function labStage() {
  const budget = Number(process.env.VMLET_LAB_BUDGET ?? 1500);
  console.log(`\n=== lab stage: test/kvm + test/lab inside hack/kvm-lab (standard KVM), budget ${budget} s ===`);
  const started = Date.now();
  // The inner runner's lines are prefixed so that its own closing line is not
  // mistaken for this run's.
  // --rerun-on-hang: an L2 that hangs under the suites (seen as an RCU stall
  // with a vCPU that never answers, mostly when the host is loaded by other
  // QEMU TCG runs) is killed and the suites run again from a fresh boot. Two
  // reruns: one hang in each of two attempts was seen once under load; a hang
  // is noticed within 120 s, so three attempts still fit CI's time.
  // Three reruns since 2026-11-27: L2 under QEMU 7.2 TCG still freezes now and
  // then with its vCPU halted and IF=1 (a lost timer wake-up in the emulator,
  // read from the registers kvm-lab keeps), at random points of the suites.
  const child = spawn(kvmLab, ['run', '--timeout', String(budget), '--rerun-on-hang', '3', '--', process.execPath, 'test/run.mjs', ...labSuites],
    { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  let inner = null;
  let labSummary = '';
  const relay = (stream, out) => {
    let buf = '';
    stream.on('data', (b) => {
      buf += b.toString('utf8');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const m = /^(\d+) passed, (\d+) failed, (\d+) skipped$/.exec(line);
        if (m && out === process.stdout) inner = { passed: +m[1], failed: +m[2], skipped: +m[3] };
        if (/^kvm-lab: L2 (ready|not ready)/.test(line)) labSummary = line.slice('kvm-lab: '.length);
        if (line.startsWith('kvm-lab: running the command again')) inner = null;
        out.write(`lab| ${line}\n`);
      }
    });
    stream.on('end', () => { if (buf) out.write(`lab| ${buf}\n`); });
  };
  relay(child.stdout, process.stdout);
  relay(child.stderr, process.stderr);
  const code = await new Promise((res) => child.on('close', (c, sig) => res(c ?? 128)));
  const secs = ((Date.now() - started) / 1000).toFixed(0);
  if (inner) {
    passed += inner.passed; failed += inner.failed; skipped += inner.skipped;
    where.push(`test/kvm + test/lab in the KVM lab (standard KVM): ${inner.passed} passed, ${inner.failed} failed, ${inner.skipped} skipped in ${secs} s [${labSummary}]`);
  }
  if (code === 124) {
    failed++;
    console.log(`!!! the lab stage ran past its budget of ${budget} s and was killed: counted as 1 failure (raise VMLET_LAB_BUDGET or find the hang) !!!`);
    where.push(`test/kvm + test/lab in the KVM lab: TIMED OUT after ${budget} s (counted as 1 failure)`);
  } else if (!inner && code === 125 && /L2 hung under the command|L2's kernel panicked|L2 reset itself/.test(labSummary)) {
    // Every attempt ended with the emulator itself frozen (no heartbeat from L2's
    // own init), not with a test failing: like a host without /dev/kvm, the lab
    // suites did not run. Said loudly and counted as skipped, never as passed.
    skipped++;
    console.log(`!!! SKIPPED: the KVM lab's L2 (QEMU TCG) froze in every attempt (${labSummary}); test/kvm and test/lab did NOT run inside the lab this time. The console logs and L2 registers are kept (paths above). !!!`);
    where.push(`test/kvm + test/lab in the KVM lab: NOT RUN, the emulator froze in every attempt (counted as 1 skipped)`);
  } else if (!inner) {
    failed++;
    console.log(`!!! the lab stage ended (exit ${code}) without a closing line: counted as 1 failure; see the lab| lines above !!!`);
    where.push(`test/kvm + test/lab in the KVM lab: BROKEN (exit ${code}, no results; counted as 1 failure)`);
  } else if (code !== 0 && inner.failed === 0 && inner.passed > 0) {
    failed++;
    console.log(`!!! the lab stage exited ${code} although no test failed: counted as 1 failure !!!`);
  }
}

if (where.length > 0) console.log(`\nWhere VM tests ran:\n${where.map((w) => `  ${w}`).join('\n')}`);
console.log(`\n${passed} passed, ${failed} failed, ${skipped} skipped`);
if (skipped > 0) console.log(`(${skipped} skipped: see the SKIPPED lines above for why)`);
process.exitCode = failed > 0 || passed === 0 ? 1 : 0;
