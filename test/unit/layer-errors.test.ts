// Bad layers: each is refused with an ImageError that names the entry (or
// the stream) and what is wrong, and leaves nothing behind: no image, no
// temporary file.
import { strict as assert } from 'node:assert';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { convertLayer, ConvertLayerOptions, ImageError } from '../../native/ts/layer';
import { gzipBuffer, TarEntry, writeTar } from '../helpers/tarcorpus';

describe('layer -> squashfs: bad input', function () {
  this.timeout(120_000);
  let dir: string;
  let n = 0;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vmlet-layer-errors-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const good: TarEntry[] = [
    { path: 'etc/', type: 'dir' },
    { path: 'etc/hostname', type: 'file', data: Buffer.from('vmlet\n') },
    { path: 'big', type: 'file', data: Buffer.alloc(300_000, 7) },
  ];

  /** Converts `layer` and expects an ImageError matching `pattern`, with nothing left in `out`'s directory. */
  async function refused(layer: string, pattern: RegExp, opts?: ConvertLayerOptions): Promise<ImageError> {
    const outDir = join(dir, `out-${n++}`);
    mkdirSync(outDir);
    const out = join(outDir, 'layer.sqfs');
    const err = await convertLayer(layer, out, opts).then(
      () => assert.fail(`${layer} was converted; expected ${pattern}`),
      (e: unknown) => e,
    );
    assert.ok(err instanceof ImageError, `not an ImageError: ${String(err)}`);
    assert.match(err.message, pattern);
    assert.deepEqual(readdirSync(outDir), [], 'something was left behind');
    return err;
  }

  function layerOf(entries: TarEntry[], compression: 'none' | 'gzip' = 'none'): string {
    const p = join(dir, `layer-${n++}.${compression === 'gzip' ? 'tar.gz' : 'tar'}`);
    writeTar(p, entries, compression);
    return p;
  }

  it('refuses a truncated gzip blob', async () => {
    const p = layerOf(good, 'gzip');
    truncateSync(p, Math.floor(readFileSync(p).length / 2));
    await refused(p, /truncated gzip stream/);
  });

  it('refuses a truncated uncompressed tar, naming the entry cut short', async () => {
    const p = layerOf(good);
    truncateSync(p, 2048 + 100_000);
    await refused(p, /entry 'big'.*[Tt]runcated/);
  });

  it('refuses corrupt gzip data', async () => {
    const p = layerOf(good, 'gzip');
    const b = readFileSync(p);
    for (let i = 20; i < 60; i++) b[i] ^= 0x5a;
    writeFileSync(p, b);
    await refused(p, /corrupt gzip data/);
  });

  it('refuses a blob whose compression differs from the one asked for', async () => {
    await refused(layerOf(good, 'gzip'), /gzip-compressed but compression 'none' was asked/, { compression: 'none' });
  });

  it('refuses a blob that is not a tar', async () => {
    const p = join(dir, 'not-a-tar');
    writeFileSync(p, 'this is not an archive at all, just some text that is long enough'.repeat(20));
    await refused(p, /not a tar archive|bad tar header/);
  });

  it('refuses a path that climbs out of the root with ../', async () => {
    const p = layerOf([...good, { path: '../../etc/cron.d/evil', type: 'file', data: Buffer.from('* * * * * root sh') }]);
    await refused(p, /entry '\.\.\/\.\.\/etc\/cron\.d\/evil'.*climbs out of the layer's root/);
  });

  it('refuses ../ hidden inside a path, and a hardlink target that climbs out', async () => {
    await refused(layerOf([{ path: 'a/b/../../../x', type: 'file', data: Buffer.from('x') }]), /climbs out/);
    await refused(layerOf([...good, { path: 'h', type: 'hardlink', linkname: '../etc/shadow' }]), /hardlink target.*climbs out/);
  });

  it('refuses a hardlink to a missing target', async () => {
    const p = layerOf([...good, { path: 'usr/bin/passwd', type: 'hardlink', linkname: 'usr/bin/su' }]);
    await refused(p, /entry 'usr\/bin\/passwd'.*hardlink to 'usr\/bin\/su', which is not an earlier entry/);
  });

  it('refuses a hardlink to a directory', async () => {
    await refused(layerOf([...good, { path: 'l', type: 'hardlink', linkname: 'etc' }]), /hardlink to the directory 'etc'/);
  });

  it('refuses a hardlink to an entry that only comes later', async () => {
    const p = layerOf([{ path: 'early', type: 'hardlink', linkname: 'late' }, { path: 'late', type: 'file', data: Buffer.from('x') }]);
    await refused(p, /hardlink to 'late', which is not an earlier entry/);
  });

  it('refuses a tar bomb beyond maxEntries', async () => {
    const entries: TarEntry[] = [];
    for (let i = 0; i < 101; i++) entries.push({ path: `f${i}`, type: 'file', data: Buffer.from('x') });
    await refused(layerOf(entries), /tar bomb: more than 100 entries \(maxEntries\)/, { limits: { maxEntries: 100 } });
  });

  it('refuses a tar bomb beyond maxBytes of uncompressed stream', async () => {
    // Megabytes of zeros after the end-of-archive mark: no file grows, yet the
    // stream (which the diff-id covers) must still be bounded.
    const tar = join(dir, 'padded.tar');
    writeTar(tar, good);
    writeFileSync(tar, Buffer.concat([readFileSync(tar), Buffer.alloc(8 << 20)]));
    const p = join(dir, 'padded.tar.gz');
    writeFileSync(p, gzipBuffer(readFileSync(tar)));
    assert.ok(readFileSync(p).length < 64 << 10, 'the bomb should be small compressed');
    await refused(p, /tar bomb: the uncompressed layer exceeds the limit of 4194304 bytes \(maxBytes\)/, { limits: { maxBytes: 4 << 20 } });
  });

  it('refuses files expanding beyond maxBytes (sparse sizes count in full)', async () => {
    // A GNU sparse header costs a few hundred bytes and claims a huge file.
    const entries: TarEntry[] = [
      {
        path: 'huge',
        type: 'file',
        data: Buffer.from('x'),
        pax: { 'GNU.sparse.major': '1', 'GNU.sparse.minor': '0', 'GNU.sparse.name': 'huge', 'GNU.sparse.realsize': String(2 ** 40) },
      },
    ];
    // GNU sparse 1.0 puts the map at the start of the data: 1 region of 1 byte at the end.
    const map = Buffer.alloc(512);
    map.write(`1\n${2 ** 40 - 1}\n1\n`);
    entries[0].data = Buffer.concat([map, Buffer.from('x')]);
    await refused(layerOf(entries), /entry 'huge'.*tar bomb: the layer's files expand to more than 1073741824 bytes/, {
      limits: { maxBytes: 1 << 30 },
    });
  });

  it('refuses a path longer than maxPathLength', async () => {
    const p = layerOf([{ path: `${'d/'.repeat(60)}f`, type: 'file', data: Buffer.from('x') }]);
    await refused(p, /path is 121 bytes, over the limit of 100 \(maxPathLength\)/, { limits: { maxPathLength: 100 } });
  });

  it('refuses a name component over 255 bytes', async () => {
    await refused(layerOf([{ path: `dir/${'n'.repeat(256)}`, type: 'file' }]), /component of 256 bytes; names are limited to 255/);
  });

  it('refuses a huge PAX header', async () => {
    const p = layerOf([{ path: 'f', type: 'file', data: Buffer.from('x'), pax: { comment: 'c'.repeat(16 << 20) } }]);
    await refused(p, /bad tar header: Special header too large/);
  });

  it('refuses an xattr squashfs cannot store', async () => {
    const p = layerOf([{ path: 'f', type: 'file', data: Buffer.from('x'), xattrs: { 'system.posix_acl_access': 'acl' } }]);
    await refused(p, /entry 'f'.*xattr 'system\.posix_acl_access' is outside the user\., trusted\. and security\. namespaces/);
  });

  it('refuses an entry below a non-directory', async () => {
    const p = layerOf([{ path: 'file', type: 'file', data: Buffer.from('x') }, { path: 'file/child', type: 'file' }]);
    await refused(p, /entry 'file\/child'.*its parent 'file' is not a directory/);
  });

  it('refuses a missing blob, a bad block size and an unknown compression', async () => {
    const err = await refused(join(dir, 'no-such-blob'), /open layer .*no-such-blob.*No such file/);
    assert.equal(err.code, 'ENOENT');
    await refused(layerOf(good), /block size 1000 must be a power of two/, { blockSize: 1000 });
    await refused(layerOf(good), /zstd level 30 must be from 1 to 22/, { level: 30 });
    await assert.rejects(convertLayer(layerOf(good), join(dir, 'x.sqfs'), { compression: 'lz4' as 'gzip' }), /compression must be one of/);
    await assert.rejects(convertLayer(layerOf(good), join(dir, 'x.sqfs'), { limits: { maxEntries: -1 } }), /maxEntries must be a non-negative integer/);
  });

  it('leaves an existing image untouched when a replacement fails', async () => {
    const out = join(dir, 'existing.sqfs');
    await convertLayer(layerOf(good), out);
    const before = readFileSync(out);
    const bad = layerOf([...good, { path: 'x', type: 'hardlink', linkname: 'missing' }]);
    await assert.rejects(convertLayer(bad, out), ImageError);
    assert.ok(readFileSync(out).equals(before), 'the old image was changed');
    assert.deepEqual(readdirSync(dir).filter((f) => f.includes('.tmp-')), []);
    assert.ok(existsSync(out));
  });
});
