// The `npm test` entry point. Runs the compiled mocha suites and ends with the
// plain closing line CI reads ("N passed, N failed, N skipped").
//
// Where VM tests run is said out loud, because a green run that silently ran
// no VM is worse than a red one:
//   test/unit  no KVM at all (device tests on hand-built rings, stores, parsers)
//   test/kvm   the raw /dev/kvm of this host (test guest); skipped loudly without it
//   test/lab   real Linux guests inside hack/kvm-lab (standard KVM); skipped loudly without it
//
// The lab stage (hack/kvm-lab): on the host, after the host suites, each file
// of test/kvm and test/lab runs again inside the lab, one L2 boot per file
// (`hack/kvm-lab run -- node test/run.mjs kvm lab <file>`, VMLET_LAB=inside),
// each under its own time budget (VMLET_LAB_BUDGET seconds, default 900), and
// their counts are folded into the closing line. One boot per file because L2
// (QEMU 7.2 TCG) freezes now and then at random points: a freeze then costs a
// rerun of one file (up to three), not of the whole stage. A lab that cannot
// start here counts those suites as skipped; a lab that breaks, or freezes in
// every attempt of a file, as failed.
// `node test/run.mjs lab` runs only the lab stage (npm run test:lab), and
// `node test/run.mjs lab dist/test/lab/x.test.js ...` only those files of it;
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

// e.g. `node test/run.mjs unit kvm`, or `node test/run.mjs kvm lab dist/test/kvm/vm-boot.test.js`
const args = process.argv.slice(2);
const only = args.filter((a) => !a.endsWith('.test.js'));
// Files named on the command line narrow their suites to those files.
const onlyFiles = args.filter((a) => a.endsWith('.test.js')).map((f) => join(process.cwd(), f));
for (const f of onlyFiles) if (!existsSync(f)) throw new Error(`test/run.mjs: no such test file ${f} (run npm run build first)`);
const suites = ['unit', 'kvm', 'lab'].filter((s) => only.length === 0 || only.includes(s));
const suiteFiles = (suite) => files(join(root, 'dist', 'test', suite)).filter((f) => onlyFiles.length === 0 || onlyFiles.includes(f));
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
  const list = suiteNames.flatMap(suiteFiles);
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
  for (const s of hostSuites) for (const f of suiteFiles(s)) mocha.addFile(f);
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
  const budget = Number(process.env.VMLET_LAB_BUDGET ?? 900);
  const chunks = labSuites.flatMap(suiteFiles).map((f) => f.slice(root.length + 1));
  console.log(`\n=== lab stage: test/kvm + test/lab inside hack/kvm-lab (standard KVM), one L2 boot per file (${chunks.length}), budget ${budget} s each ===`);
  const started = Date.now();
  const total = { passed: 0, failed: 0, skipped: 0, reruns: 0 };
  const trouble = [];
  for (const file of chunks) {
    const r = await labChunk(file, budget);
    total.passed += r.passed; total.failed += r.failed; total.skipped += r.skipped; total.reruns += r.reruns;
    if (r.trouble) trouble.push(`${file}: ${r.trouble}`);
  }
  passed += total.passed; failed += total.failed; skipped += total.skipped;
  const secs = ((Date.now() - started) / 1000).toFixed(0);
  where.push(`test/kvm + test/lab in the KVM lab (standard KVM): ${total.passed} passed, ${total.failed} failed, ${total.skipped} skipped in ${secs} s`
    + ` over ${chunks.length} files, ${total.reruns} rerun(s) after L2 froze`);
  for (const t of trouble) where.push(`  !!! ${t}`);
}

/** Runs one test file in a fresh L2; returns its counts (a broken or frozen lab counts as one failure). */
async function labChunk(file, budget) {
  const started = Date.now();
  console.log(`\n--- lab: ${file} ---`);
  // --rerun-on-hang: an L2 that hangs (QEMU 7.2 TCG loses L2's timer wake-up
  // now and then: its vCPU halted with IF=1 or runs L3 at CPL3 forever, read
  // from the registers kvm-lab keeps) is killed within 120 s and the file runs
  // again from a fresh boot. A per-file attempt takes a minute or two, so three
  // reruns make a file that freezes in every attempt rare enough to be a finding.
  const child = spawn(kvmLab, ['run', '--timeout', String(budget), '--rerun-on-hang', '3', '--', process.execPath, 'test/run.mjs', ...labSuites, file],
    { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  let inner = null;
  let labSummary = '';
  let reruns = 0;
  const relay = (stream, out) => {
    let buf = '';
    stream.on('data', (b) => {
      buf += b.toString('utf8');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        // The inner runner's lines are prefixed so that its own closing line is not mistaken for this run's.
        const m = /^(\d+) passed, (\d+) failed, (\d+) skipped$/.exec(line);
        if (m && out === process.stdout) inner = { passed: +m[1], failed: +m[2], skipped: +m[3] };
        if (/^kvm-lab: L2 (ready|not ready)/.test(line)) labSummary = line.slice('kvm-lab: '.length);
        if (line.startsWith('kvm-lab: running the command again')) { inner = null; reruns++; }
        out.write(`lab| ${line}\n`);
      }
    });
    stream.on('end', () => { if (buf) out.write(`lab| ${buf}\n`); });
  };
  relay(child.stdout, process.stdout);
  relay(child.stderr, process.stderr);
  const code = await new Promise((res) => child.on('close', (c) => res(c ?? 128)));
  const secs = ((Date.now() - started) / 1000).toFixed(0);
  const result = (counts, trouble) => {
    console.log(`--- lab: ${file}: ${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped in ${secs} s [${labSummary}] ---`);
    return { ...counts, reruns, trouble };
  };
  if (code === 124) {
    console.log(`!!! lab: ${file} ran past its budget of ${budget} s and was killed: counted as 1 failure (raise VMLET_LAB_BUDGET or find the hang) !!!`);
    return result({ passed: 0, failed: 1, skipped: 0 }, `TIMED OUT after ${budget} s (counted as 1 failure)`);
  }
  if (!inner && code === 125 && /L2 hung under the command|L2's kernel panicked|L2 reset itself/.test(labSummary)) {
    // A file that freezes the emulator in every one of its attempts is no longer
    // bad luck: it may be what the file does to L2, so it fails the run.
    console.log(`!!! lab: L2 (QEMU TCG) froze in every attempt of ${file} (${labSummary}): counted as 1 failure; the console logs and L2 registers are kept (paths above) !!!`);
    return result({ passed: 0, failed: 1, skipped: 0 }, `L2 froze in every attempt (counted as 1 failure)`);
  }
  if (!inner) {
    console.log(`!!! lab: ${file} ended (exit ${code}) without a closing line: counted as 1 failure; see the lab| lines above !!!`);
    return result({ passed: 0, failed: 1, skipped: 0 }, `BROKEN (exit ${code}, no results; counted as 1 failure)`);
  }
  if (code !== 0 && inner.failed === 0) {
    console.log(`!!! lab: ${file} exited ${code} although no test failed: counted as 1 failure !!!`);
    return result({ ...inner, failed: 1 }, `exited ${code} with no failing test (counted as 1 failure)`);
  }
  return result(inner, inner.failed ? `${inner.failed} failed` : undefined);
}

if (where.length > 0) console.log(`\nWhere VM tests ran:\n${where.map((w) => `  ${w}`).join('\n')}`);
console.log(`\n${passed} passed, ${failed} failed, ${skipped} skipped`);
if (skipped > 0) console.log(`(${skipped} skipped: see the SKIPPED lines above for why)`);
process.exitCode = failed > 0 || passed === 0 ? 1 : 0;
