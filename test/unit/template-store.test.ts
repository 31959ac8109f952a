// The template cache on real files and real processes: keying, the states a
// template directory can be found in, the lock between makers, and what
// happens when a user finds a template corrupt.
import { strict as assert } from 'node:assert';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MANIFEST, Template, TemplateError, TemplateStore, templateKey, templateLog } from '../../shim/sandbox/template-store';

const worker = join(__dirname, '..', 'helpers', 'template-store-worker.js');

/** A pid that belonged to a process which has exited (and been reaped). */
function deadPid(): number {
  const r = spawnSync('sh', ['-c', 'echo $$']);
  return Number(r.stdout.toString().trim());
}

class CorruptState extends Error {
  override readonly name = 'CorruptState';
}

/** A maker that writes a state file and records its checksum in the manifest, as a snapshot carries its own. */
function stateMaker(content: (n: number) => string) {
  let made = 0;
  const make = async (dir: string) => {
    made++;
    const text = content(made);
    writeFileSync(join(dir, 'state'), text);
    return { sha256: createHash('sha256').update(text).digest('hex') };
  };
  /** Reads the state back, refusing it when it does not match its checksum. */
  const use = async (t: Template) => {
    const text = readFileSync(join(t.dir, 'state'), 'utf8');
    if (createHash('sha256').update(text).digest('hex') !== t.manifest.meta.sha256) throw new CorruptState(`state in ${t.dir} does not match its checksum`);
    return text;
  };
  return { make, use, made: () => made };
}

const isCorrupt = (e: unknown) => e instanceof CorruptState;

describe('template store: keys', () => {
  const inputs = { kernel: 'k'.repeat(64), initrd: 'i'.repeat(64), cpus: 1, memoryMiB: 256, vmm: 'v', cpu: 'c', format: 1 };

  it('is 32 hex digits and does not depend on the order of the inputs', () => {
    const k = templateKey(inputs);
    assert.match(k, /^[0-9a-f]{32}$/);
    const reversed = Object.fromEntries(Object.entries(inputs).reverse());
    assert.equal(templateKey(reversed), k);
  });

  it('changes when any single input changes, including its type', () => {
    const base = templateKey(inputs);
    const keys = new Set<string>([base]);
    for (const [name, v] of Object.entries(inputs)) {
      const changed = { ...inputs, [name]: typeof v === 'number' ? v + 1 : `${v}x` };
      keys.add(templateKey(changed));
    }
    keys.add(templateKey({ ...inputs, cpus: '1' }));
    keys.add(templateKey({ ...inputs, extra: 0 }));
    assert.equal(keys.size, Object.keys(inputs).length + 3);
  });
});

describe('template store: making and finding templates', function () {
  let root: string;
  let store: TemplateStore;
  const key = 'a'.repeat(32);

  beforeEach(() => {
    root = join(mkdtempSync(join(tmpdir(), 'vmlet-templates-')), 'root');
    store = new TemplateStore({ root, pollMs: 10 });
  });
  afterEach(() => rmSync(join(root, '..'), { recursive: true, force: true }));

  it('makes a template once, in its key directory, with a manifest; later calls find it', async () => {
    const m = stateMaker((n) => `state ${n}\n`);
    const t = await store.ensure(key, { x: 1 }, m.make);
    assert.equal(t.dir, join(root, key));
    assert.equal(readFileSync(join(t.dir, 'state'), 'utf8'), 'state 1\n');
    const manifest = JSON.parse(readFileSync(join(t.dir, MANIFEST), 'utf8'));
    assert.deepEqual({ key: manifest.key, inputs: manifest.inputs, pid: manifest.makerPid }, { key, inputs: { x: 1 }, pid: process.pid });
    const again = await store.ensure(key, { x: 1 }, m.make);
    assert.equal(again.manifest.id, t.manifest.id);
    assert.equal(m.made(), 1);
    assert.deepEqual(readdirSync(root).sort(), [key], 'no lock or building directory is left');
    assert.deepEqual(store.list(), [key]);
  });

  it('a failing maker leaves nothing behind and the next call makes it', async () => {
    await assert.rejects(
      store.ensure(key, {}, async (dir) => {
        writeFileSync(join(dir, 'partial'), 'x');
        throw new Error('the guest did not boot');
      }),
      (e: TemplateError) => e instanceof TemplateError && e.code === 'TEMPLATE_BUILD_FAILED' && /making template a{32} failed: the guest did not boot/.test(e.message),
    );
    assert.deepEqual(readdirSync(root), []);
    const m = stateMaker(() => 'ok');
    await store.ensure(key, {}, m.make);
    assert.equal(m.made(), 1);
  });

  it('two makers in one process: the second waits for the first and makes nothing', async () => {
    const m = stateMaker(() => 'shared');
    const slow = async (dir: string) => {
      await new Promise((r) => setTimeout(r, 150));
      return m.make(dir);
    };
    const [a, b] = await Promise.all([store.ensure(key, {}, slow), store.ensure(key, {}, slow)]);
    assert.equal(a.manifest.id, b.manifest.id);
    assert.equal(m.made(), 1);
  });

  it('four processes racing for one key: exactly one makes it, all get the same template', async function () {
    this.timeout(30_000);
    const makesLog = join(root, '..', 'makes.log');
    writeFileSync(makesLog, '');
    const runs = Array.from({ length: 4 }, () =>
      new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
        const c = spawn(process.execPath, [worker, root, key, makesLog, '300']);
        let out = '';
        let err = '';
        c.stdout.on('data', (d: Buffer) => (out += d.toString()));
        c.stderr.on('data', (d: Buffer) => (err += d.toString()));
        c.on('close', (code) => resolve({ code, out, err }));
      }),
    );
    const results = await Promise.all(runs);
    for (const r of results) assert.equal(r.code, 0, r.err);
    const got = results.map((r) => JSON.parse(r.out) as { dir: string; id: string });
    assert.equal(new Set(got.map((g) => g.id)).size, 1, `different templates: ${JSON.stringify(got)}`);
    assert.equal(readFileSync(makesLog, 'utf8').trim().split('\n').length, 1, 'exactly one maker ran');
    assert.deepEqual(readdirSync(root).sort(), [key]);
  });

  it("a dead maker's lock is broken and its half-made directory removed", async () => {
    mkdirSync(root, { recursive: true });
    const dead = deadPid();
    writeFileSync(join(root, `${key}.lock`), `${dead} feedface\n`);
    const leftover = join(root, `.building-${key}-${dead}-0badcafe`);
    mkdirSync(leftover);
    writeFileSync(join(leftover, 'memory'), 'half');
    const m = stateMaker(() => 'after crash');
    const t = await store.ensure(key, {}, m.make);
    assert.equal(readFileSync(join(t.dir, 'state'), 'utf8'), 'after crash');
    assert.ok(!existsSync(leftover), 'the dead maker\'s directory is gone');
    assert.deepEqual(readdirSync(root).sort(), [key]);
  });

  it('a live maker holding the lock past the wait bound: TEMPLATE_LOCKED naming its pid', async () => {
    mkdirSync(root, { recursive: true });
    const holder = spawn('sleep', ['30']);
    try {
      writeFileSync(join(root, `${key}.lock`), `${holder.pid} 1234\n`);
      const impatient = new TemplateStore({ root, pollMs: 10, lockWaitMs: 200 });
      await assert.rejects(impatient.ensure(key, {}, stateMaker(() => 'x').make), (e: TemplateError) => {
        assert.equal(e.code, 'TEMPLATE_LOCKED');
        assert.match(e.message, new RegExp(`in the making by pid ${holder.pid} for over 0 s; if that process is stuck, kill it`));
        return true;
      });
    } finally {
      holder.kill();
    }
  });

  it('damaged entries are not templates: no manifest, a manifest of another key, a file in place of the directory', async () => {
    mkdirSync(join(root, key), { recursive: true });
    writeFileSync(join(root, key, 'state'), 'no manifest');
    assert.equal(store.lookup(key), null);
    assert.ok(!existsSync(join(root, key)));

    mkdirSync(join(root, key));
    writeFileSync(join(root, key, MANIFEST), JSON.stringify({ key: 'b'.repeat(32), id: 'x' }));
    assert.equal(store.lookup(key), null);

    mkdirSync(join(root, key));
    writeFileSync(join(root, key, MANIFEST), '{ not json');
    assert.equal(store.lookup(key), null);

    writeFileSync(join(root, key), 'a file');
    const t = await store.ensure(key, {}, stateMaker(() => 'fresh').make);
    assert.equal(readFileSync(join(t.dir, 'state'), 'utf8'), 'fresh');
  });

  it('a root that cannot be created: BAD_TEMPLATE_ROOT saying how to choose another', async () => {
    const blocker = join(root, '..', 'blocker');
    writeFileSync(blocker, '');
    const bad = new TemplateStore({ root: join(blocker, 'templates') });
    await assert.rejects(bad.ensure(key, {}, stateMaker(() => 'x').make), (e: TemplateError) => {
      assert.equal(e.code, 'BAD_TEMPLATE_ROOT');
      assert.match(e.message, /cannot create the template directory .*blocker\/templates: .*set VMLET_TEMPLATE_DIR/);
      return true;
    });
  });
});

describe('template store: corrupt templates', function () {
  let root: string;
  let store: TemplateStore;
  const key = 'c'.repeat(32);
  let warnings: string[];
  const capture = (info: { level: string; message: unknown }) => {
    if (info.level === 'warn') warnings.push(String(info.message));
  };

  beforeEach(() => {
    root = join(mkdtempSync(join(tmpdir(), 'vmlet-templates-')), 'root');
    store = new TemplateStore({ root, pollMs: 10 });
    warnings = [];
    templateLog.logger.on('data', capture);
  });
  afterEach(() => {
    templateLog.logger.off('data', capture);
    rmSync(join(root, '..'), { recursive: true, force: true });
  });

  it('a flipped byte found by its user: the template is discarded, logged, made again once, and used', async () => {
    const m = stateMaker((n) => `state made ${n}\n`);
    await store.ensure(key, {}, m.make);
    const file = join(root, key, 'state');
    const bytes = readFileSync(file);
    bytes[3] ^= 0x01;
    writeFileSync(file, bytes);
    const text = await store.use(key, {}, m.make, m.use, isCorrupt);
    assert.equal(text, 'state made 2\n');
    assert.equal(m.made(), 2);
    assert.ok(warnings.some((w) => /template c{32} .* is corrupt, making it again: state in .* does not match its checksum/.test(w)), warnings.join('\n'));
    assert.ok(warnings.some((w) => /discarded template c{32}/.test(w)), warnings.join('\n'));
    assert.deepEqual(readdirSync(root).sort(), [key]);
  });

  it('corrupt again after being made anew: TEMPLATE_CORRUPT with both reasons, no loop, nothing kept', async () => {
    let made = 0;
    const make = async (dir: string) => {
      made++;
      writeFileSync(join(dir, 'state'), 'x');
      return { sha256: 'not the checksum of x' };
    };
    await assert.rejects(store.use(key, {}, make, stateMaker(() => '').use, isCorrupt), (e: TemplateError) => {
      assert.equal(e.code, 'TEMPLATE_CORRUPT');
      assert.match(e.message, /was corrupt, and again after it was made anew \(state in .* does not match its checksum\); the first time: state in/);
      return true;
    });
    assert.equal(made, 2);
    assert.deepEqual(readdirSync(root), []);
  });

  it('an error that is not corruption passes through and the template is kept', async () => {
    const m = stateMaker(() => 'fine');
    await assert.rejects(
      store.use(key, {}, m.make, async () => {
        throw new Error('the host ran out of memory');
      }, isCorrupt),
      /the host ran out of memory/,
    );
    assert.equal(m.made(), 1);
    assert.ok(store.lookup(key));
  });

  it('a template another process already replaced is not discarded again', async () => {
    const m = stateMaker((n) => `state ${n}\n`);
    let replacement = '';
    let calls = 0;
    const text = await store.use(key, {}, m.make, async (t) => {
      calls++;
      if (calls === 1) {
        // Meanwhile another process found it corrupt and made it anew.
        store.discard(key, 'replaced by another process');
        replacement = (await store.ensure(key, {}, m.make)).manifest.id;
        throw new CorruptState(`stale view of ${t.manifest.id}`);
      }
      return m.use(t);
    }, isCorrupt);
    assert.equal(text, 'state 2\n');
    assert.equal(m.made(), 2, 'the replacement was used, not made a third time');
    assert.equal(store.lookup(key)?.manifest.id, replacement);
  });
});
