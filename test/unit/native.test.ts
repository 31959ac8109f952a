// Runs the C++ test binary (native/tests): one mocha test per native case, so
// a failing device or converter check shows up by name.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { strict as assert } from 'node:assert';

const binary = join(__dirname, '..', '..', '..', 'native', 'build', 'vmlet_native_tests');

describe('native (C++) tests', () => {
  it('the native test binary is built', () => {
    assert.ok(existsSync(binary), `${binary} is missing: run npm run build`);
  });
  if (!existsSync(binary)) return;
  const names = execFileSync(binary, ['--list'], { encoding: 'utf8' }).split('\n').filter(Boolean);
  for (const name of names) {
    it(name, function () {
      this.timeout(300_000);
      let out: string;
      try {
        out = execFileSync(binary, [name], { encoding: 'utf8', maxBuffer: 64 << 20 });
      } catch (e) {
        const err = e as { stdout?: string; stderr?: string; status?: number };
        assert.fail(`${err.stdout ?? ''}${err.stderr ?? ''} (exit ${err.status})`);
      }
      assert.match(out, new RegExp(`^ok ${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));
    });
  }
});
