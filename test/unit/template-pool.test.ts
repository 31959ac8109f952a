// What a VM template is keyed by (shim/sandbox/template-pool.ts), on real
// files and this host's /proc/cpuinfo. Making and restoring templates needs
// KVM and a Linux guest: test/lab/template-pool.test.ts.
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hostCpuFingerprint, isSnapshotCorrupt, sha256File, TemplatePool, templateInputs } from '../../shim/sandbox/template-pool';
import { templateKey } from '../../shim/sandbox/template-store';
import { addonPath } from '../../native/ts/addon';
import { KvmError, SnapshotError } from '../../native/ts/vmm';

const cpuinfo = (flags: string, mhz: string, model = '49') =>
  [
    'processor\t: 0',
    'vendor_id\t: AuthenticAMD',
    'cpu family\t: 23',
    `model\t\t: ${model}`,
    'stepping\t: 0',
    `cpu MHz\t\t: ${mhz}`,
    `flags\t\t: ${flags}`,
    '',
    'processor\t: 1',
    'vendor_id\t: AuthenticAMD',
    `cpu MHz\t\t: 1000.000`,
    'flags\t\t: something else entirely',
    '',
  ].join('\n');

describe('template pool: keys', function () {
  let work: string;
  before(() => (work = mkdtempSync(join(tmpdir(), 'vmlet-template-keys-'))));
  after(() => rmSync(work, { recursive: true, force: true }));

  it('the CPU fingerprint follows vendor, family, model, stepping and flags of the first processor, not its clock speed', () => {
    const a = hostCpuFingerprint(cpuinfo('fpu sse2 avx2', '2994.374'));
    assert.match(a, /^[0-9a-f]{32}$/);
    assert.equal(hostCpuFingerprint(cpuinfo('fpu sse2 avx2', '3400.000')), a, 'cpu MHz changes from read to read');
    assert.notEqual(hostCpuFingerprint(cpuinfo('fpu sse2 avx2 avx512f', '2994.374')), a);
    assert.notEqual(hostCpuFingerprint(cpuinfo('fpu sse2 avx2', '2994.374', '113')), a);
    // This host's own, twice: stable.
    assert.equal(hostCpuFingerprint(), hostCpuFingerprint());
  });

  it('file hashes are of the content, and follow a rewrite', () => {
    const f = join(work, 'kernel');
    writeFileSync(f, 'kernel one');
    assert.equal(sha256File(f), createHash('sha256').update('kernel one').digest('hex'));
    writeFileSync(f, 'kernel two, longer');
    assert.equal(sha256File(f), createHash('sha256').update('kernel two, longer').digest('hex'));
    // Same size, same mtime, other bytes: only the memo key would miss it.
    writeFileSync(f, 'kernel six, longer');
    const t = new Date(Date.now() + 5000);
    utimesSync(f, t, t);
    assert.equal(sha256File(f), createHash('sha256').update('kernel six, longer').digest('hex'));
  });

  it('a same-size rewrite that puts the old mtime back is hashed anew, in one process and across processes', () => {
    const cache = join(work, 'hash-cache');
    for (const dir of [undefined, cache]) {
      const f = join(work, `layer-${dir ? 'cached' : 'memo'}`);
      writeFileSync(f, 'layer one');
      // Settled (older than the racy window): this hash is remembered.
      const old = new Date(Math.floor(Date.now() / 1000) * 1000 - 60_000);
      utimesSync(f, old, old);
      assert.equal(sha256File(f, dir), createHash('sha256').update('layer one').digest('hex'));
      // Same inode, size and mtime: only the ctime moved.
      writeFileSync(f, 'layer two');
      utimesSync(f, old, old);
      assert.equal(statSync(f).mtimeMs, old.getTime());
      assert.equal(sha256File(f, dir), createHash('sha256').update('layer two').digest('hex'));
    }
  });

  it('a template key changes with the kernel, the initrd, cpus, memory, the command line, the number of disk slots', function () {
    if (!existsSync(addonPath)) {
      console.log(`      !!! SKIPPED: the addon is not built (${addonPath}): npm run build:native`);
      this.skip();
    }
    const kernel = join(work, 'vmlinux');
    const initrd = join(work, 'initrd');
    writeFileSync(kernel, 'k1');
    writeFileSync(initrd, 'i1');
    const spec = { kernel, initrd, cpus: 1, memoryMiB: 256, cmdline: 'console=ttyS0 quiet' };
    const base = templateKey(templateInputs(spec));
    const inputs = templateInputs(spec);
    assert.equal(inputs.vmm, sha256File(addonPath), 'the VMM build is an input');
    assert.equal(inputs.cpu, hostCpuFingerprint());
    const keys = new Set([base]);
    keys.add(templateKey(templateInputs({ ...spec, cpus: 2 })));
    keys.add(templateKey(templateInputs({ ...spec, memoryMiB: 512 })));
    keys.add(templateKey(templateInputs({ ...spec, cmdline: 'console=ttyS0' })));
    keys.add(templateKey(templateInputs({ ...spec, diskSlots: 16 })));
    writeFileSync(kernel, 'k2');
    keys.add(templateKey(templateInputs(spec)));
    writeFileSync(initrd, 'i2');
    keys.add(templateKey(templateInputs(spec)));
    assert.equal(keys.size, 7);
    assert.equal(new TemplatePool({ spec, root: join(work, 'templates') }).key(), templateKey(templateInputs(spec)));
    assert.equal(readFileSync(kernel, 'utf8'), 'k2');
  });

  it('only the facade\'s SnapshotError counts as a corrupt template', () => {
    assert.equal(isSnapshotCorrupt(new SnapshotError('crc mismatch in section vcpu0')), true);
    assert.equal(isSnapshotCorrupt(new KvmError('KVM_RUN failed')), false);
    const lookalike = new Error('x');
    lookalike.name = 'SnapshotError';
    assert.equal(isSnapshotCorrupt(lookalike), false);
  });

  it('warm outside 0..64 and shells outside 0..16 are refused before anything starts; acquire after close is POOL_CLOSED', async () => {
    const spec = { kernel: '/nonexistent', initrd: '/nonexistent', cpus: 1, memoryMiB: 256, cmdline: '' };
    for (const warm of [-1, 65, 1.5])
      assert.throws(() => new TemplatePool({ spec, root: join(work, 't'), warm }), /BAD_POOL_OPTIONS: warm is .*: keep 0 to 64 clones warm/);
    for (const shells of [-1, 17, 0.5])
      assert.throws(() => new TemplatePool({ spec, root: join(work, 't'), shells }), /BAD_POOL_OPTIONS: shells is .*: keep 0 to 16 VM shells made ahead/);
    const pool = new TemplatePool({ spec, root: join(work, 't') });
    await pool.close();
    await assert.rejects(pool.acquire(), /POOL_CLOSED: acquire\(\) after close\(\)/);
  });

  it('disk slots: at most 18 disks in all, and never more layers than slots (refused before anything starts)', async () => {
    const spec = { kernel: '/nonexistent', initrd: '/nonexistent', cpus: 1, memoryMiB: 256, cmdline: '' };
    for (const diskSlots of [-1, 19, 2.5])
      assert.throws(() => new TemplatePool({ spec: { ...spec, diskSlots }, root: join(work, 't') }), /BAD_POOL_OPTIONS: diskSlots is .* at most 18 disks in all/);
    assert.throws(() => new TemplatePool({ spec: { ...spec, disks: ['/a', '/b', '/c'], diskSlots: 16 }, root: join(work, 't') }), /beside 3 disk\(s\)/);
    const pool = new TemplatePool({ spec: { ...spec, diskSlots: 2 }, root: join(work, 't') });
    await assert.rejects(pool.acquire({ layers: ['/l1', '/l2', '/l3'] }), /TOO_MANY_LAYERS: 3 layer\(s\) for a template with 2 disk slot\(s\)/);
    const plain = new TemplatePool({ spec, root: join(work, 't') });
    await assert.rejects(plain.acquire({ layers: ['/l1'] }), /TOO_MANY_LAYERS: 1 layer\(s\) for a template with 0 disk slot\(s\)/);
  });
});
