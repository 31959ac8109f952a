// The `vmlet` command table (shim/cli/commands/index.ts): every entry loads the
// command it names, and the list of commands costs no command module.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { commands } from '../../shim/cli/commands';

describe('vmlet command table', () => {
  it('every entry loads a command of its own name, with options and help', () => {
    assert.deepEqual(commands.map((c) => c.name), ['run', 'templates', 'pull', 'images', 'rmi', 'load', 'gc', 'check']);
    for (const entry of commands) {
      const cmd = entry.load();
      assert.equal(cmd.name, entry.name);
      assert.ok(entry.summary.length > 10, `${entry.name} has a summary`);
      assert.equal(typeof cmd.run, 'function');
      assert.ok(Array.isArray(cmd.help));
    }
  });

  it('vmlet --help lists the commands without loading their modules (nor winston, nor the addon)', () => {
    const cli = join(__dirname, '..', '..', 'shim', 'cli', 'vmlet.js');
    const script = `const { main } = require(${JSON.stringify(cli)});
const out = []; const sink = { write: (s) => (out.push(String(s)), true) };
main(['--help'], { stdout: sink, stderr: sink }).then((code) => {
  const loaded = Object.keys(require.cache).filter((k) => /shim\\/cli\\/commands\\/(?!index)|node_modules\\/winston\\/|vmlet\\.node$/.test(k));
  process.stdout.write(JSON.stringify({ code, loaded, text: out.join('') }));
});`;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const got = JSON.parse(r.stdout) as { code: number; loaded: string[]; text: string };
    assert.equal(got.code, 0);
    assert.deepEqual(got.loaded, []);
    for (const c of commands) assert.ok(got.text.includes(`  ${c.name}`), `${c.name} is listed`);
  });
});
