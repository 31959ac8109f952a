// What every test in test/lab may rely on inside hack/kvm-lab: a standard KVM
// (nested kvm_amd with nested paging, not this host's paravirtual one), the
// checkout at the same path, and a writable file system. If one of these breaks,
// the lab's own failure shows here first instead of as a puzzling VMM failure.
import { readFileSync, statSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';

describe('the KVM lab environment (inside hack/kvm-lab)', () => {
  before(function () {
    if (process.env.VMLET_LAB !== 'inside') {
      console.log('      !!! SKIPPED (runs only inside hack/kvm-lab; test/run.mjs puts it there)');
      this.skip();
    }
  });

  it('has /dev/kvm from kvm_amd with nested=1 and npt=1, not the host\'s kvm_pvm', () => {
    const st = statSync('/dev/kvm');
    assert.ok(st.isCharacterDevice(), '/dev/kvm is a character device');
    const modules = readFileSync('/proc/modules', 'utf8');
    assert.match(modules, /^kvm_amd /m);
    assert.doesNotMatch(modules, /^kvm_pvm /m);
    const param = (p: string): string => readFileSync(`/sys/module/kvm_amd/parameters/${p}`, 'utf8').trim();
    assert.match(param('nested'), /^(1|Y)$/);
    assert.match(param('npt'), /^(1|Y)$/);
    assert.match(readFileSync('/proc/cpuinfo', 'utf8'), /^flags\s*:.* svm( |$)/m);
  });

  it('has the /dev links udev would make (bash process substitution, /dev/stdout)', () => {
    const out = execFileSync('bash', ['-c', 'cat <(echo via-dev-fd) && echo via-dev-stdout > /dev/stdout'], { encoding: 'utf8' });
    assert.equal(out, 'via-dev-fd\nvia-dev-stdout\n');
  });

  it('sees the checkout at the same path, built, and can write beside it', () => {
    const repo = join(__dirname, '..', '..', '..');
    assert.ok(existsSync(join(repo, 'package.json')));
    assert.ok(existsSync(join(repo, 'dist', 'test', 'lab', 'lab-environment.test.js')));
    // The host root is read-only; writes land in L2's tmpfs overlay and vanish with it.
    const probe = join(repo, 'dist', `.lab-write-probe-${process.pid}`);
    writeFileSync(probe, 'x');
    assert.equal(readFileSync(probe, 'utf8'), 'x');
    rmSync(probe);
  });
});
