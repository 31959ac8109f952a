// Template housekeeping without KVM: the store's listing and removal on
// template directories its own maker callback wrote, with real processes
// holding locks, and `vmlet templates list | prune` through the real entry
// point. Also how `vmlet run`'s launcher gives way to a cold boot when a
// template cannot be used. Restoring real templates: test/lab/vmlet-run-restore.
import { strict as assert } from 'node:assert';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { main } from '../../shim/cli/vmlet';
import { parsePruneArgs } from '../../shim/cli/commands/templates';
import { UsageError } from '../../shim/cli/command';
import { Template, TemplateError, TemplateStore, templateLog } from '../../shim/sandbox/template-store';
import { isTemplateUnusable, pruneFileHashes, sha256File, templateFailureReason, templateLauncher } from '../../shim/sandbox/template-pool';
import { createHash } from 'node:crypto';
import { LaunchedVm, SandboxError, SandboxSpec, VmLauncher } from '../../shim/sandbox/sandbox';
import { AgentError } from '../../shim/agent/client';
import { KvmError, SnapshotError } from '../../native/ts/vmm';
import { sink } from '../helpers/sink';

const MiB = 1 << 20;
const DAY_MS = 24 * 3600 * 1000;


async function cli(args: string[], env: Record<string, string | undefined> = {}): Promise<{ code: number; out: string; err: string }> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  for (const [k, v] of Object.entries(env)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
  try {
    const stdout = sink();
    const stderr = sink();
    const code = await main(args, { stdout, stderr });
    return { code, out: stdout.text(), err: stderr.text() };
  } finally {
    for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
  }
}

/** A pid that belonged to a process which has exited (and been reaped). */
function deadPid(): number {
  return Number(spawnSync('sh', ['-c', 'echo $$']).stdout.toString().trim());
}

/**
 * The shape of a real template, written by the store's own maker: a sparse
 * 64 MiB memory file holding `dataMiB` MiB of data, and the meta a pool records.
 */
function templateMaker(dataMiB: number, layers: string[] = ['/images/busybox.sqfs']) {
  return async (dir: string): Promise<Record<string, unknown>> => {
    mkdirSync(join(dir, 'snapshot'));
    const fd = openSync(join(dir, 'snapshot', 'memory'), 'w');
    try {
      writeSync(fd, Buffer.alloc(dataMiB * MiB, 0xab), 0, dataMiB * MiB, 0);
      writeSync(fd, Buffer.from('end'), 0, 3, 64 * MiB - 3);
    } finally {
      closeSync(fd);
    }
    writeFileSync(join(dir, 'snapshot', 'state'), 'state');
    return { layers, cpus: 1, memoryMiB: 64 };
  };
}

const key = (c: string): string => c.repeat(32);

async function makeTemplate(store: TemplateStore, k: string, opts: { cpus?: number; dataMiB?: number; usedDaysAgo?: number; layers?: string[] } = {}): Promise<Template> {
  const t = await store.ensure(k, { cpus: opts.cpus ?? 1, memoryMiB: 64 }, templateMaker(opts.dataMiB ?? 1, opts.layers));
  if (opts.usedDaysAgo !== undefined) {
    const when = new Date(Date.now() - opts.usedDaysAgo * DAY_MS);
    utimesSync(t.dir, when, when);
  }
  return t;
}

describe('template store: housekeeping', function () {
  let work: string;
  let root: string;
  let store: TemplateStore;

  beforeEach(() => {
    work = mkdtempSync(join(tmpdir(), 'vmlet-template-gc-'));
    root = join(work, 'templates');
    store = new TemplateStore({ root, pollMs: 10 });
  });
  afterEach(() => rmSync(work, { recursive: true, force: true }));

  it('entries(): complete templates only, with their space on disk (sparse files by blocks) and last use, least recently used first', async () => {
    const a = await makeTemplate(store, key('a'), { dataMiB: 2, usedDaysAgo: 1 });
    await makeTemplate(store, key('b'), { dataMiB: 1, usedDaysAgo: 3 });
    mkdirSync(join(root, `.building-${key('c')}-${process.pid}-00000000`));
    const entries = store.entries();
    assert.deepEqual(entries.map((e) => e.key), [key('b'), key('a')]);
    const ea = entries[1];
    // 64 MiB long, 2 MiB (+ one page) of it data: a sparse file counts what it holds.
    assert.ok(ea.diskBytes >= 2 * MiB && ea.diskBytes < 4 * MiB, `on disk ${ea.diskBytes}`);
    assert.ok(Math.abs(ea.lastUsedMs - (Date.now() - DAY_MS)) < 5000);
    assert.equal(ea.dir, a.dir);
  });

  it('use() records the last use; a failed use does not', async () => {
    await makeTemplate(store, key('a'), { usedDaysAgo: 10 });
    const before = store.entries()[0].lastUsedMs;
    await assert.rejects(store.use(key('a'), {}, templateMaker(1), async () => {
      throw new Error('KVM refused');
    }, () => false), /KVM refused/);
    assert.equal(store.entries()[0].lastUsedMs, before);
    await store.use(key('a'), {}, templateMaker(1), async () => 'restored', () => false);
    assert.ok(Date.now() - store.entries()[0].lastUsedMs < 5000, 'last use is now');
  });

  it('remove(): removes a template, says absent for none, and leaves one whose lock a live process holds', async () => {
    await makeTemplate(store, key('a'));
    await makeTemplate(store, key('b'));
    assert.equal(store.remove(key('a'), 'test'), 'removed');
    assert.equal(store.lookup(key('a')), null);
    assert.equal(store.remove(key('a'), 'test'), 'absent');
    const holder = spawn('sleep', ['30']);
    try {
      writeFileSync(join(root, `${key('b')}.lock`), `${holder.pid} 1234\n`);
      assert.equal(store.remove(key('b'), 'test'), 'being-made');
      assert.ok(store.lookup(key('b')), 'kept while its lock is held');
    } finally {
      holder.kill();
    }
    await new Promise((r) => holder.once('exit', r));
    // Its holder is gone now: the lock is stale and broken.
    assert.equal(store.remove(key('b'), 'test'), 'removed');
    assert.deepEqual(readdirSync(root), [], 'no lock, no discarded copy left');
  });

  it('a removed template stays readable to whoever has its memory file open (a running VM maps it)', async () => {
    const t = await makeTemplate(store, key('a'), { dataMiB: 1 });
    const fd = openSync(join(t.dir, 'snapshot', 'memory'), 'r');
    try {
      assert.equal(store.remove(key('a'), 'test'), 'removed');
      assert.ok(!existsSync(t.dir));
      const buf = Buffer.alloc(4);
      readSync(fd, buf, 0, 4, 0);
      assert.deepEqual([...buf], [0xab, 0xab, 0xab, 0xab]);
    } finally {
      closeSync(fd);
    }
  });

  it('listing removes the lock files of makers that died', async () => {
    await makeTemplate(store, key('a'));
    writeFileSync(join(root, `${key('d')}.lock`), `${deadPid()} 1234\n`);
    assert.deepEqual(store.list(), [key('a')]);
    assert.deepEqual(readdirSync(root), [key('a')]);
  });
});

describe('vmlet templates', function () {
  let work: string;
  let root: string;
  let store: TemplateStore;

  beforeEach(() => {
    work = mkdtempSync(join(tmpdir(), 'vmlet-templates-cli-'));
    root = join(work, 'templates');
    store = new TemplateStore({ root, pollMs: 10 });
  });
  afterEach(() => rmSync(work, { recursive: true, force: true }));

  it('list: one line per template with vCPUs, memory, space on disk, last use and its rootfs', async () => {
    await makeTemplate(store, key('a'), { cpus: 1, dataMiB: 2, usedDaysAgo: 3 });
    await makeTemplate(store, key('b'), { cpus: 2, layers: ['/l/base.sqfs', '/l/app.sqfs'] });
    const r = await cli(['templates', 'list'], { VMLET_TEMPLATE_DIR: root });
    assert.equal(r.code, 0, r.err);
    const lines = r.out.trimEnd().split('\n');
    assert.match(lines[0], /^KEY\s+VCPUS\s+MEMORY\s+ON DISK\s+LAST USED\s+MADE\s+ROOTFS/);
    assert.equal(lines.length, 3);
    assert.match(lines[1], new RegExp(`^${key('a')}\\s+1\\s+64 MiB\\s+2\\.\\d MB\\s+3 days ago\\s+\\d+ s ago\\s+/images/busybox\\.sqfs$`));
    assert.match(lines[2], new RegExp(`^${key('b')}\\s+2\\s+64 MiB\\s+.*/l/app\\.sqfs \\(\\+1 below\\)$`));
  });

  it('list without VMLET_TEMPLATE_DIR reads <root>/templates; an empty or missing root lists nothing', async () => {
    const stateRoot = join(work, 'state');
    const r0 = await cli(['--root', stateRoot, 'templates', 'list'], { VMLET_TEMPLATE_DIR: undefined });
    assert.equal(r0.code, 0, r0.err);
    assert.equal(r0.out.trimEnd().split('\n').length, 1, 'the header only');
    await makeTemplate(new TemplateStore({ root: join(stateRoot, 'templates') }), key('e'));
    const r = await cli(['--root', stateRoot, 'templates', 'list'], { VMLET_TEMPLATE_DIR: undefined });
    assert.match(r.out, new RegExp(`^${key('e')} `, 'm'));
  });

  it('prune --older-than DAYS removes only templates not used for that long', async () => {
    await makeTemplate(store, key('a'), { usedDaysAgo: 10 });
    await makeTemplate(store, key('b'), { usedDaysAgo: 1 });
    await makeTemplate(store, key('c'), { usedDaysAgo: 2.5 });
    const r = await cli(['templates', 'prune', '--older-than', '2'], { VMLET_TEMPLATE_DIR: root });
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, new RegExp(`^removed ${key('a')} \\(.* last used 10 days ago\\)$`, 'm'));
    assert.match(r.out, new RegExp(`^removed ${key('c')} `, 'm'));
    assert.match(r.out, /^removed 2 template\(s\), .* freed$/m);
    assert.deepEqual(store.list(), [key('b')]);
  });

  it('prune removes the kernel-text copies of the templates it removes from the huge-page tmpfs, and only those', async () => {
    await makeTemplate(store, key('a'), { usedDaysAgo: 10 });
    await makeTemplate(store, key('b'), { usedDaysAgo: 1 });
    const text = join(work, 'huge-text');
    mkdirSync(text);
    // Named as ensureTextFile() names them: key, memory-file inode and mtime, range.
    const old = join(text, `${key('a')}-11-22-1000000-800000.text`);
    const older = join(text, `${key('a')}-10-21-1000000-800000.text`);
    const writing = join(text, `${key('a')}-12-23-1000000-800000.text.4242.tmp`);
    const kept = join(text, `${key('b')}-33-44-1000000-800000.text`);
    for (const f of [old, older, writing, kept]) writeFileSync(f, Buffer.alloc(4096, 1));
    const r = await cli(['templates', 'prune', '--older-than', '2'], { VMLET_TEMPLATE_DIR: root, VMLET_HUGE_TEXT: text });
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, new RegExp(`^removed ${key('a')} \\(.*, 8\\.\\d KB of kernel text from the huge-page tmpfs, last used 10 days ago\\)$`, 'm'));
    assert.ok(!existsSync(old) && !existsSync(older), 'both copies of the removed template are gone');
    assert.ok(existsSync(writing), 'a copy still being written belongs to its writer');
    assert.ok(existsSync(kept), 'the kept template keeps its copy');
    // VMLET_HUGE_TEXT=0: vmlet never used the tmpfs, so prune does not look there.
    await makeTemplate(store, key('c'), { usedDaysAgo: 10 });
    const c = join(text, `${key('c')}-1-2-1000000-800000.text`);
    writeFileSync(c, Buffer.alloc(4096, 1));
    const r0 = await cli(['templates', 'prune', '--older-than', '2'], { VMLET_TEMPLATE_DIR: root, VMLET_HUGE_TEXT: '0' });
    assert.match(r0.out, new RegExp(`^removed ${key('c')} \\([^,]*, last used`, 'm'));
    assert.ok(existsSync(c));
  });

  it('prune --all removes every template, but not one being made at that moment, which completes', async () => {
    await makeTemplate(store, key('a'));
    let release!: () => void;
    let started!: () => void;
    const inMaking = new Promise<void>((r) => (started = r));
    const making = store.ensure(key('b'), { cpus: 1 }, async (dir) => {
      started();
      await new Promise<void>((r) => (release = r));
      return templateMaker(1)(dir);
    });
    await inMaking;
    const r = await cli(['templates', 'prune', '--all'], { VMLET_TEMPLATE_DIR: root });
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /^removed 1 template\(s\)/m);
    assert.ok(readdirSync(root).some((n) => n.startsWith(`.building-${key('b')}`)), 'the maker\'s directory is untouched');
    release();
    const t = await making;
    assert.ok(existsSync(join(t.dir, 'snapshot', 'memory')));
    assert.deepEqual(store.list(), [key('b')]);
    const again = await cli(['templates', 'prune', '--all'], { VMLET_TEMPLATE_DIR: root });
    assert.match(again.out, new RegExp(`^removed ${key('b')} `, 'm'));
    assert.deepEqual(readdirSync(root), []);
  });

  for (const [args, why] of [
    [['templates'], /templates needs list or prune/],
    [['templates', 'frob'], /unknown templates command 'frob': use list or prune/],
    [['templates', 'list', 'x'], /templates list takes no arguments \(got x\)/],
    [['templates', 'list', '--all'], /--all and --older-than go with prune, not list/],
    [['templates', 'prune'], /prune needs --all \(every template\) or --older-than DAYS/],
    [['templates', 'prune', '--all', '--older-than', '3'], /prune takes --all or --older-than DAYS, not both/],
    [['templates', 'prune', '--older-than', 'a week'], /--older-than 'a week' is not a number of days/],
    [['templates', 'prune', '--older-than=-1'], /--older-than '-1' is not a number of days/],
  ] as const) {
    it(`refuses 'vmlet ${args.join(' ')}' with usage exit 2 and says why`, async () => {
      await makeTemplate(store, key('a'));
      const r = await cli([...args], { VMLET_TEMPLATE_DIR: root });
      assert.equal(r.code, 2, r.err);
      assert.match(r.err, why);
      assert.match(r.err, /usage: vmlet .*templates list \| prune/);
      assert.deepEqual(store.list(), [key('a')], 'nothing removed');
    });
  }

  it('parsePruneArgs: --older-than takes fractions of days', () => {
    const now = 1_000_000_000_000;
    assert.equal(parsePruneArgs({ 'older-than': '0.5' }, now).unusedSinceMs, now - DAY_MS / 2);
    assert.deepEqual(parsePruneArgs({ all: true }, now), { all: true, unusedSinceMs: now });
    assert.throws(() => parsePruneArgs({}, now), UsageError);
  });
});

describe('template keys: file hashes cached on disk across processes', function () {
  this.timeout(20_000);
  let work: string;
  before(() => (work = mkdtempSync(join(tmpdir(), 'vmlet-hash-cache-'))));
  after(() => rmSync(work, { recursive: true, force: true }));

  /** sha256File in a fresh process: no in-process memo, only the disk cache. */
  const inChild = (file: string, cache: string): string =>
    spawnSync(process.execPath, ['-e', `process.stdout.write(require(${JSON.stringify(join(__dirname, '..', '..', 'shim', 'sandbox', 'template-pool.js'))}).sha256File(${JSON.stringify(file)}, ${JSON.stringify(cache)}))`], { encoding: 'utf8' }).stdout;
  const sha = (text: string) => createHash('sha256').update(text).digest('hex');

  it('a settled file\'s hash is read back by the next process; a rewrite (same size) is hashed anew; prune drops the stale entry', async () => {
    const file = join(work, 'layer.sqfs');
    const cache = join(work, 'cache');
    writeFileSync(file, 'layer one');
    // Files changed in the last 2 s are never cached (a same-size rewrite in one timestamp tick would go unseen).
    assert.equal(sha256File(file, cache), sha('layer one'));
    assert.ok(!existsSync(cache), 'a file changed just now is not cached');
    await new Promise((r) => setTimeout(r, 2100));
    assert.equal(inChild(file, cache), sha('layer one'));
    const [entry] = readdirSync(cache);
    assert.ok(entry, 'cached once settled');
    // Proof that a new process reads the cache rather than the file: a planted value comes back.
    const path = join(cache, entry);
    const planted = JSON.parse(readFileSync(path, 'utf8')) as { id: string; sha256: string };
    writeFileSync(path, JSON.stringify({ ...planted, sha256: 'f'.repeat(64) }));
    assert.equal(inChild(file, cache), 'f'.repeat(64));
    writeFileSync(file, 'layer two');
    assert.equal(inChild(file, cache), sha('layer two'), 'the rewrite changes ctime: the old entry does not match');
    assert.equal(pruneFileHashes(cache), 1);
    assert.deepEqual(readdirSync(cache), []);
  });
});

describe('vmlet run: when a template cannot be used', function () {
  let work: string;
  let guest: { kernel: string; initrd: string };
  let warnings: string[];
  const capture = (info: { level: string; message: unknown }) => {
    if (info.level === 'warn') warnings.push(String(info.message));
  };

  /** Records what it was asked to launch; a real launch needs KVM (test/lab). */
  class RecordingLauncher implements VmLauncher {
    readonly name = 'recording';
    calls: { spec: SandboxSpec; stateDir: string; entries: string[] }[] = [];
    async launch(spec: SandboxSpec, stateDir: string): Promise<LaunchedVm> {
      this.calls.push({ spec, stateDir, entries: readdirSync(stateDir) });
      throw new Error('fallback reached');
    }
  }

  beforeEach(() => {
    work = mkdtempSync(join(tmpdir(), 'vmlet-template-fallback-'));
    guest = { kernel: join(work, 'vmlinux'), initrd: join(work, 'initrd') };
    writeFileSync(guest.kernel, 'kernel');
    writeFileSync(guest.initrd, 'initrd');
    warnings = [];
    templateLog.logger.on('data', capture);
  });
  afterEach(() => {
    templateLog.logger.off('data', capture);
    rmSync(work, { recursive: true, force: true });
  });

  const spec = (): SandboxSpec => ({ cpus: 1, memoryMiB: 256, layers: [guest.initrd] });

  it('a template root that cannot be created: the fallback boots, in an empty state dir, and the reason is logged', async () => {
    writeFileSync(join(work, 'blocker'), '');
    const fallback = new RecordingLauncher();
    const launcher = templateLauncher({ root: join(work, 'blocker', 'templates'), guest, fallback });
    const stateDir = join(work, 'state');
    mkdirSync(stateDir);
    await assert.rejects(launcher.launch(spec(), stateDir), /fallback reached/);
    assert.equal(fallback.calls.length, 1);
    assert.deepEqual(fallback.calls[0].entries, []);
    assert.equal(fallback.calls[0].spec.cpus, 1);
    assert.ok(warnings.some((w) => /cannot start this sandbox from a template, booting it instead: BAD_TEMPLATE_ROOT: cannot create the template directory .*blocker\/templates/.test(w)), warnings.join('\n'));
  });

  it('without a fallback the template\'s error reaches the caller; an aborted start is ABORTED, never a fallback', async () => {
    writeFileSync(join(work, 'blocker'), '');
    const stateDir = join(work, 'state');
    mkdirSync(stateDir);
    await assert.rejects(templateLauncher({ root: join(work, 'blocker', 'templates'), guest }).launch(spec(), stateDir),
      (e: TemplateError) => e instanceof TemplateError && e.code === 'BAD_TEMPLATE_ROOT');
    const fallback = new RecordingLauncher();
    const abort = new AbortController();
    abort.abort();
    await assert.rejects(templateLauncher({ root: join(work, 'blocker', 'templates'), guest, fallback }).launch(spec(), stateDir, { signal: abort.signal }),
      (e: SandboxError) => e instanceof SandboxError && e.code === 'ABORTED');
    assert.equal(fallback.calls.length, 0);
  });

  it('which failures are the template\'s (fall back) and which are not (reach the caller)', () => {
    assert.match(templateFailureReason(new TemplateError('TEMPLATE_CORRUPT', 'template x was corrupt')) ?? '', /TEMPLATE_CORRUPT: template x was corrupt/);
    assert.match(templateFailureReason(new SnapshotError('memory file has another size')) ?? '', /^SnapshotError: memory file/);
    assert.match(templateFailureReason(new KvmError('KVM_SET_MSRS refused')) ?? '', /^KvmError: /);
    assert.match(templateFailureReason(new SandboxError('AGENT_TIMEOUT', 'no answer in 20000 ms')) ?? '', /^the restored guest failed: no answer/);
    assert.match(templateFailureReason(new SandboxError('GUEST_DIED', 'triple fault')) ?? '', /^the restored guest failed: triple fault/);
    assert.match(templateFailureReason(new AgentError('IDENTITY_FAILED', 'clock_settime')) ?? '', /refused its new identity: IDENTITY_FAILED/);
    assert.equal(templateFailureReason(new SandboxError('ABORTED', 'interrupted')), null);
    assert.equal(templateFailureReason(new SandboxError('NO_GUEST_KERNEL', 'not built')), null);
    assert.equal(templateFailureReason(new TypeError('a bug')), null);
  });

  it('which failures of a restore make the template anew first: a refused snapshot, a clone that dies or never answers', () => {
    assert.equal(isTemplateUnusable(new SnapshotError('bad CRC')), true);
    assert.equal(isTemplateUnusable(new SandboxError('GUEST_DIED', 'triple fault')), true);
    assert.equal(isTemplateUnusable(new SandboxError('AGENT_TIMEOUT', 'no answer')), true);
    assert.equal(isTemplateUnusable(new SandboxError('ABORTED', 'interrupted')), false);
    assert.equal(isTemplateUnusable(new KvmError('KVM_CREATE_VM: ENOMEM')), false, 'the host, not the template');
  });
});
