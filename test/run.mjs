// The `npm test` entry point. Runs the compiled mocha suites and ends with the
// plain closing line CI reads ("N passed, N failed, N skipped").
//
// Where VM tests run is said out loud, because a green run that silently ran
// no VM is worse than a red one:
//   test/unit  no KVM at all (device tests on hand-built rings, stores, parsers)
//   test/kvm   the raw /dev/kvm of this host (test guest); skipped loudly without it
//   test/lab   real Linux guests inside hack/kvm-lab (standard KVM); skipped loudly without it
import Mocha from 'mocha';
import { readdirSync, statSync, existsSync, accessSync, constants } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

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
const kvm = kvmStatus();
const banner = [`vmlet tests: suites ${suites.join(', ')}`];
banner.push(kvm === 'present'
  ? '  test/kvm: runs on this host\'s raw /dev/kvm (the test guest)'
  : `  !!! /dev/kvm is ${kvm}: every test/kvm test is SKIPPED, not passed !!!`);
banner.push(process.env.VMLET_LAB === 'inside'
  ? '  test/lab: running inside the KVM lab (standard KVM)'
  : '  test/lab: run inside hack/kvm-lab (standard KVM); skipped loudly where the lab cannot start');
console.log(banner.join('\n'));

const mocha = new Mocha({ reporter: 'spec', timeout: 120_000, slow: 5_000 });
for (const s of suites) for (const f of files(join(root, 'dist', 'test', s))) mocha.addFile(f);

let passed = 0, failed = 0, skipped = 0;
await mocha.loadFilesAsync();
const runner = mocha.run(() => {
  console.log(`\n${passed} passed, ${failed} failed, ${skipped} skipped`);
  if (skipped > 0) console.log(`(${skipped} skipped: see the SKIPPED lines above for why)`);
  process.exitCode = failed > 0 || passed === 0 ? 1 : 0;
});
runner.on('pass', () => passed++);
runner.on("fail", () => failed++);
runner.on('pending', () => skipped++);
