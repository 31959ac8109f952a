// Layer tar -> squashfs fidelity: for each corpus layer, the image as
// squashfs-tools and squashfs-tools-ng see it must hold exactly the tar's
// entries (names, types, modes, owners, mtimes, link targets, devices,
// xattrs, bytes). Expected views come from the entries written or from the
// directory GNU tar read, never from our converter.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { chownSync, closeSync, copyFileSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, lutimesSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { convertLayer } from '../../native/ts/layer';
import {
  compareImage,
  expectedFromDir,
  expectedView,
  extractImage,
  gnuTar,
  hashFile,
  sha256,
  TarEntry,
  writeTar,
} from '../helpers/tarcorpus';

function bytes(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** Every entry type and header feature the converter must carry over. */
function mixedEntries(): TarEntry[] {
  const longTarget = `/opt/${'t'.repeat(250)}/${'u'.repeat(250)}/${'v'.repeat(250)}/end`;
  return [
    { path: './', type: 'dir', mode: 0o755, mtime: 1_600_000_000 },
    { path: './etc/', type: 'dir', mode: 0o755, uid: 0, gid: 0 },
    { path: './etc/passwd', type: 'file', data: Buffer.from('root:x:0:0:root:/root:/bin/sh\n'), mode: 0o644 },
    { path: './etc/shadow', type: 'file', data: Buffer.from('root:*:1::::::\n'), mode: 0o640, uid: 0, gid: 42 },
    { path: './usr/bin/su', type: 'file', data: bytes(200_000, 7), mode: 0o4755 },
    { path: './tmp/', type: 'dir', mode: 0o1777 },
    { path: './srv/setgid/', type: 'dir', mode: 0o2775, uid: 100000, gid: 65534, mtime: 1_234_567_890 },
    { path: './empty', type: 'file', data: Buffer.alloc(0) },
    { path: './block-exact', type: 'file', data: bytes(131072, 3) },
    { path: './several-blocks', type: 'file', data: bytes(3 * 131072 + 17, 5) },
    { path: './bin/sh', type: 'symlink', linkname: '/bin/busybox', mode: 0o777, xattrs: { 'security.selinux': 'system_u:object_r:bin_t:s0' } },
    { path: './lib64', type: 'symlink', linkname: 'usr/lib64', mode: 0o777 },
    { path: './long-link', type: 'symlink', linkname: longTarget, mode: 0o777 },
    { path: './usr/bin/passwd', type: 'hardlink', linkname: './usr/bin/su' },
    { path: './etc/passwd-', type: 'hardlink', linkname: 'etc/passwd' },
    { path: './dev/null', type: 'char', devmajor: 1, devminor: 3, mode: 0o666, xattrs: { 'trusted.dev': 'null' } },
    { path: './dev/sda1', type: 'block', devmajor: 8, devminor: 1, mode: 0o660, gid: 6 },
    { path: './run/initctl', type: 'fifo', mode: 0o600, xattrs: { 'user.fifo': 'yes' } },
    {
      path: './usr/bin/ping',
      type: 'file',
      data: Buffer.from('#!/bin/sh\necho ping\n'),
      mode: 0o755,
      xattrs: { 'security.capability': '\x01\x00\x00\x02\x00\x20\x00\x00', 'user.mime_type': 'text/x-shellscript' },
    },
    { path: './var/lib/state/', type: 'dir', xattrs: { 'trusted.note': 'kept' } },
    { path: './home/ünïcødé/日本語.txt', type: 'file', data: Buffer.from('こんにちは\n') },
    { path: './home/emoji-😀/x', type: 'file', data: Buffer.from('x') },
    { path: `./names/${'n'.repeat(255)}`, type: 'file', data: Buffer.from('255-byte name') },
    { path: `./names/${'é'.repeat(127)}x`, type: 'file', data: Buffer.from('255 bytes of UTF-8') },
    { path: '/abs/path/inside', type: 'file', data: Buffer.from('leading slash stripped') },
    { path: 'a/./b/../c', type: 'file', data: Buffer.from('normalised lexically') },
  ];
}

describe('layer -> squashfs: fidelity (unsquashfs/rdsquashfs vs the tar)', function () {
  this.timeout(600_000);
  let dir: string;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'vmlet-layer-fidelity-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  async function convertAndCompare(name: string, layer: string, expected: ReturnType<typeof expectedView>): Promise<void> {
    const image = join(dir, `${name}.sqfs`);
    const r = await convertLayer(layer, image);
    assert.ok(r.squashfsBytes > 0 && r.squashfsBytes % 4096 === 0, `image size ${r.squashfsBytes}`);
    const extracted = join(dir, `${name}.extracted`);
    extractImage(image, extracted);
    const diffs = compareImage(image, expected, extracted);
    assert.deepEqual(diffs.slice(0, 20), [], `${diffs.length} differences`);
    rmSync(extracted, { recursive: true, force: true });
  }

  it('carries every entry type, mode bit, owner, xattr, unicode/255-byte name and long target over', async () => {
    const entries = mixedEntries();
    const layer = join(dir, 'mixed.tar');
    writeTar(layer, entries);
    await convertAndCompare('mixed', layer, expectedView(entries));
  });

  it('gives the same image from the gzip, zstd and uncompressed blob, and the diff-id of the uncompressed tar', async () => {
    const entries = mixedEntries();
    const images: Buffer[] = [];
    let tarDigest = '';
    for (const c of ['none', 'gzip', 'zstd'] as const) {
      const layer = join(dir, `mixed-${c}.blob`);
      writeTar(layer, entries, c);
      if (c === 'none') tarDigest = `sha256:${hashFile(layer)}`;
      const image = join(dir, `mixed-${c}.sqfs`);
      const r = await convertLayer(layer, image, { compression: c === 'none' ? 'auto' : c });
      assert.equal(r.diffId, tarDigest, `${c}: diff-id`);
      assert.equal(r.entries, entries.length, `${c}: entries`);
      assert.equal(r.tarBytes, readFileSync(join(dir, 'mixed-none.blob')).length, `${c}: tarBytes`);
      images.push(readFileSync(image));
    }
    assert.ok(images[1].equals(images[0]) && images[2].equals(images[0]), 'images differ between compressions');
  });

  it('converts 10,000 small files in 100 directories', async () => {
    const entries: TarEntry[] = [];
    for (let d = 0; d < 100; d++) {
      entries.push({ path: `data/d${d}/`, type: 'dir', mode: 0o750, uid: d, gid: d * 2, mtime: 1_500_000_000 + d * 60 });
      for (let f = 0; f < 100; f++) {
        entries.push({ path: `data/d${d}/f${f}.txt`, type: 'file', data: Buffer.from(`file ${d}/${f}\n`.repeat(f + 1)), mtime: 1_500_000_000 + f * 60 });
      }
    }
    const layer = join(dir, 'many.tar.gz');
    writeTar(layer, entries, 'gzip');
    await convertAndCompare('many', layer, expectedView(entries));
  });

  it('converts 100 levels of nesting', async () => {
    const entries: TarEntry[] = [];
    let p = '';
    for (let i = 0; i < 100; i++) {
      p += `level-${String(i).padStart(3, '0')}/`;
      entries.push({ path: p, type: 'dir', mode: 0o700 + (i % 8) * 0o10 });
    }
    entries.push({ path: `${p}leaf`, type: 'file', data: Buffer.from('deep') });
    entries.push({ path: `${p}up`, type: 'symlink', linkname: '../'.repeat(100), mode: 0o777 });
    const layer = join(dir, 'deep.tar');
    writeTar(layer, entries);
    await convertAndCompare('deep', layer, expectedView(entries));
  });

  it('applies last-entry-wins, keeps a repeated directory\'s contents and creates implicit parents', async () => {
    const entries: TarEntry[] = [
      { path: 'implicit/parents/file', type: 'file', data: Buffer.from('parents made 0755 root') },
      { path: 'f', type: 'file', data: Buffer.from('first') },
      { path: 'f', type: 'file', data: Buffer.from('second wins'), mode: 0o600 },
      { path: 'was-dir/', type: 'dir' },
      { path: 'was-dir/child', type: 'file', data: Buffer.from('dropped with its directory') },
      { path: 'was-dir', type: 'symlink', linkname: 'elsewhere', mode: 0o777 },
      { path: 'was-file', type: 'file', data: Buffer.from('replaced') },
      { path: 'was-file/', type: 'dir', mode: 0o711 },
      { path: 'kept/', type: 'dir', mode: 0o755 },
      { path: 'kept/child', type: 'file', data: Buffer.from('survives the repeated directory') },
      { path: 'kept/', type: 'dir', mode: 0o700, uid: 5, gid: 6, mtime: 1_650_000_000 },
      { path: 'linked', type: 'file', data: Buffer.from('old body') },
      { path: 'hard', type: 'hardlink', linkname: 'linked' },
    ];
    const layer = join(dir, 'lastwins.tar');
    writeTar(layer, entries);
    await convertAndCompare('lastwins', layer, expectedView(entries));
  });

  it('converts a busybox rootfs made by GNU tar (symlink farm, setuid binary)', async function () {
    const bb = '/bin/busybox';
    const root = join(dir, 'busybox-root');
    mkdirSync(join(root, 'bin'), { recursive: true });
    copyFileSync(bb, join(root, 'bin', 'busybox'));
    execFileSync('chmod', ['4755', join(root, 'bin', 'busybox')]);
    const applets = execFileSync(bb, ['--list']).toString().split('\n').filter((a) => a && a !== 'busybox');
    for (const a of applets) symlinkSync('busybox', join(root, 'bin', a));
    mkdirSync(join(root, 'etc'));
    writeFileSync(join(root, 'etc', 'motd'), 'built locally\n');
    chownSync(join(root, 'etc', 'motd'), 1000, 1000);
    const layer = join(dir, 'busybox.tar');
    gnuTar(root, layer);
    await convertAndCompare('busybox', layer, expectedFromDir(root));
    assert.ok(applets.length > 100, `busybox has ${applets.length} applets`);
  });

  it('reads GNU long names and link targets (././@LongLink)', async () => {
    const root = join(dir, 'gnu-root');
    const longDir = join(root, 'd'.repeat(120), 'e'.repeat(120));
    mkdirSync(longDir, { recursive: true });
    writeFileSync(join(longDir, 'f'.repeat(200)), 'long name');
    symlinkSync(`/${'x'.repeat(180)}/${'y'.repeat(180)}`, join(root, 'long-target'));
    lutimesSync(join(root, 'long-target'), 1_400_000_000, 1_400_000_000);
    const layer = join(dir, 'gnu.tar');
    gnuTar(root, layer, { format: 'gnu' });
    await convertAndCompare('gnu', layer, expectedFromDir(root));
  });

  it('converts sparse and empty files, including a 1 GiB file sparse on the host', async () => {
    const root = join(dir, 'sparse-root');
    mkdirSync(root);
    writeFileSync(join(root, 'empty'), '');
    const islands = (path: string, size: number, at: number[]): void => {
      const fd = openSync(path, 'w');
      for (const off of at) writeSync(fd, bytes(5000, off + 1), 0, 5000, off);
      closeSync(fd);
      execFileSync('truncate', ['-s', String(size), path]);
    };
    islands(join(root, 'small-sparse'), 10 << 20, [0, 3 << 20, (10 << 20) - 5000]);
    islands(join(root, 'gigabyte'), 1 << 30, [1 << 20, 512 << 20, (1 << 30) - 123_456]);
    islands(join(root, 'trailing-hole'), 4 << 20, [100]);
    const layer = join(dir, 'sparse.tar');
    gnuTar(root, layer, { sparse: true });
    assert.ok(readFileSync(layer).length < 1 << 20, 'GNU tar did not store the holes as holes');
    await convertAndCompare('sparse', layer, expectedFromDir(root));
    const image = readFileSync(join(dir, 'sparse.sqfs'));
    assert.ok(image.length < 1 << 20, `the 1 GiB of holes took ${image.length} bytes in the image`);
  });

  it('is deterministic: same layer, same bytes, whatever the worker count', async () => {
    const layer = join(dir, 'mixed.tar');
    const a = join(dir, 'det-a.sqfs');
    const b = join(dir, 'det-b.sqfs');
    const c = join(dir, 'det-c.sqfs');
    await convertLayer(layer, a);
    await convertLayer(layer, b, { workers: 1 });
    await convertLayer(layer, c, { workers: 3 });
    const ha = sha256(readFileSync(a));
    assert.equal(sha256(readFileSync(b)), ha);
    assert.equal(sha256(readFileSync(c)), ha);
  });
});
