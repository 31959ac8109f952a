// shim/log.ts: component loggers that load winston only when a message passes
// their level (a plain `vmlet run` logs nothing and must not pay for it).
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

const logModule = join(__dirname, '..', '..', 'shim', 'log.js');

/** Runs `body` in a fresh node (an empty module cache) with ComponentLog in scope; returns its output. */
function fresh(body: string, env: NodeJS.ProcessEnv = {}): { stdout: string; stderr: string } {
  const script = `const { ComponentLog } = require(${JSON.stringify(logModule)});
const winstonLoaded = () => Object.keys(require.cache).some((k) => k.includes('/node_modules/winston/'));
${body}`;
  const base = { ...process.env };
  delete base.VMLET_LOG_LEVEL;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', env: { ...base, ...env } });
  assert.equal(r.status, 0, r.stderr);
  return { stdout: r.stdout, stderr: r.stderr };
}

describe('component loggers (shim/log.ts)', () => {
  it('messages below the level are dropped without loading winston', () => {
    const r = fresh(`const log = new ComponentLog('templates', 'warn');
log.debug('not shown'); log.info('not shown either');
console.log(JSON.stringify({ loaded: winstonLoaded() }));`);
    assert.deepEqual(JSON.parse(r.stdout), { loaded: false });
    assert.equal(r.stderr, '');
  });

  it('a message at the level loads winston and reaches stderr as "<time> <level> <component>: <message>"', () => {
    const r = fresh(`const log = new ComponentLog('templates', 'warn');
log.warn('template abc is corrupt');
console.log(JSON.stringify({ loaded: winstonLoaded() }));`);
    assert.deepEqual(JSON.parse(r.stdout), { loaded: true });
    assert.match(r.stderr, /^\d{4}-\d\d-\d\dT[\d:.]+Z warn templates: template abc is corrupt\n$/);
  });

  it('the level can be raised before and after winston is loaded, and VMLET_LOG_LEVEL sets the default', () => {
    const r = fresh(`const log = new ComponentLog('images');
log.debug('hidden');
log.level = 'debug';
log.debug('first');
log.level = 'error';
log.warn('hidden again');
log.level = 'debug';
log.debug('second');`);
    assert.deepEqual(r.stderr.trim().split('\n').map((l) => l.replace(/^\S+ /, '')), ['debug images: first', 'debug images: second']);
    const env = fresh(`new ComponentLog('images').info('from the environment');`, { VMLET_LOG_LEVEL: 'info' });
    assert.match(env.stderr, /info images: from the environment/);
    // Set but empty is unset: warn.
    const empty = fresh(`const l = new ComponentLog('images'); l.info('hidden'); console.log(l.level);`, { VMLET_LOG_LEVEL: '' });
    assert.equal(empty.stdout.trim(), 'warn');
    assert.equal(empty.stderr, '');
  });

  it('the winston logger is reachable for listeners and sees what passes the level', () => {
    const r = fresh(`const log = new ComponentLog('templates', 'info');
const seen = [];
log.logger.on('data', (e) => seen.push(e.level + ' ' + e.message));
log.debug('below'); log.info('made'); log.error('broke');
setImmediate(() => console.log(JSON.stringify(seen)));`);
    assert.deepEqual(JSON.parse(r.stdout), ['info made', 'error broke']);
  });
});
