// OCI whiteouts across three layers, checked by the kernel itself: each layer
// image is loop-mounted as squashfs, the three are stacked with overlayfs (as
// the guest agent stacks them), and the merged tree must be what the OCI
// layer semantics say. Needs root (mount); skipped loudly otherwise.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { convertLayer } from '../../native/ts/layer';
import { Expect, expectedView, sha256, TarEntry, writeTar } from '../helpers/tarcorpus';

const layers: TarEntry[][] = [
  [
    { path: 'etc/', type: 'dir' },
    { path: 'etc/a', type: 'file', data: Buffer.from('a from layer 1') },
    { path: 'etc/b', type: 'file', data: Buffer.from('b from layer 1') },
    { path: 'usr/lib/', type: 'dir', mode: 0o755 },
    { path: 'usr/lib/x.so', type: 'file', data: Buffer.from('x') },
    { path: 'usr/lib/y.so', type: 'file', data: Buffer.from('y') },
    { path: 'opt/keep/', type: 'dir' },
    { path: 'opt/keep/file', type: 'file', data: Buffer.from('removed with its directory in layer 2') },
    { path: 'opt/other', type: 'symlink', linkname: '/opt/keep/file', mode: 0o777 },
    { path: 'srv/', type: 'dir', mode: 0o750 },
    { path: 'srv/data', type: 'file', data: Buffer.from('survives everything') },
  ],
  [
    { path: 'etc/.wh.a', type: 'file' },
    { path: 'usr/lib/', type: 'dir', mode: 0o700 },
    { path: 'usr/lib/.wh..wh..opq', type: 'file' },
    { path: 'usr/lib/new.so', type: 'file', data: Buffer.from('only this survives the opaque directory') },
    { path: 'opt/.wh.keep', type: 'file' },
    { path: 'var/new', type: 'file', data: Buffer.from('added in layer 2') },
    { path: 'etc/b', type: 'file', data: Buffer.from('b replaced in layer 2'), mode: 0o600 },
  ],
  [
    { path: 'etc/a', type: 'file', data: Buffer.from('a back in layer 3') },
    { path: 'var/.wh.new', type: 'file' },
    // The marker before the directory's own entry: the directory still ends up opaque.
    { path: 'opt/.wh..wh..opq', type: 'file' },
    { path: 'opt/', type: 'dir', mode: 0o711 },
    { path: 'opt/fresh', type: 'file', data: Buffer.from('layer 3') },
  ],
];

/** What overlayfs must show: per layer, whiteouts and opaque directories hide what lies below. */
function merged(): Map<string, Expect> {
  const view = new Map<string, Expect>();
  const dropUnder = (p: string): void => {
    for (const k of [...view.keys()]) if (p === '' || k.startsWith(`${p}/`)) view.delete(k);
  };
  for (const entries of layers) {
    const layer = expectedView(entries);
    for (const [p, x] of layer) {
      if (x.type === 'c' && x.dev?.[0] === 0 && x.dev?.[1] === 0) {
        view.delete(p);
        dropUnder(p);
      } else if (x.type === 'd' && x.xattrs?.['trusted.overlay.opaque'] === 'y') {
        dropUnder(p);
      }
    }
    for (const [p, x] of layer) {
      if (x.type === 'c' && x.dev?.[0] === 0 && x.dev?.[1] === 0) continue;
      if (x.type === 'd' && view.get(p)?.type === 'd' && x.mtime === 0 && x.mode === 0o755 && x.uid === 0) {
        continue; // an implicit parent does not change the directory below it
      }
      view.set(p, x);
    }
  }
  return view;
}

function walk(root: string): Map<string, { type: string; mode: number; sha256?: string; target?: string }> {
  const out = new Map<string, { type: string; mode: number; sha256?: string; target?: string }>();
  const go = (rel: string): void => {
    const abs = rel ? join(root, rel) : root;
    const st = lstatSync(abs);
    const mode = st.mode & 0o7777;
    if (st.isDirectory()) {
      out.set(rel, { type: 'd', mode });
      for (const n of readdirSync(abs)) go(rel ? `${rel}/${n}` : n);
    } else if (st.isSymbolicLink()) out.set(rel, { type: 'l', mode, target: readlinkSync(abs) });
    else if (st.isFile()) out.set(rel, { type: '-', mode, sha256: sha256(readFileSync(abs)) });
    else out.set(rel, { type: '?', mode });
  };
  go('');
  return out;
}

describe('layer -> squashfs: OCI whiteouts through the kernel\'s squashfs + overlayfs', function () {
  this.timeout(120_000);
  let dir: string;
  const mounts: string[] = [];

  before(function () {
    if (process.getuid?.() !== 0) {
      console.log('    SKIPPED: mounting squashfs and overlayfs needs root');
      this.skip();
    }
    dir = mkdtempSync(join(tmpdir(), 'vmlet-layer-overlay-'));
  });
  after(() => {
    for (const m of mounts.reverse()) {
      try {
        execFileSync('umount', [m]);
      } catch {
        // Already gone; the temp dir removal below reports anything stuck.
      }
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('stacks three converted layers into the merged view the OCI whiteout rules define', async () => {
    const lowers: string[] = [];
    for (const [i, entries] of layers.entries()) {
      const blob = join(dir, `layer${i}.tar.gz`);
      writeTar(blob, entries, 'gzip');
      const image = join(dir, `layer${i}.sqfs`);
      await convertLayer(blob, image);
      const m = join(dir, `m${i}`);
      mkdirSync(m);
      execFileSync('mount', ['-t', 'squashfs', '-o', 'loop,ro', image, m]);
      mounts.push(m);
      lowers.unshift(m);
    }
    const mergedDir = join(dir, 'merged');
    mkdirSync(mergedDir);
    execFileSync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lowers.join(':')}`, mergedDir]);
    mounts.push(mergedDir);

    const got = walk(mergedDir);
    const want = merged();
    const diffs: string[] = [];
    for (const [p, x] of want) {
      const g = got.get(p);
      if (!g) diffs.push(`${p}: missing from the merged view`);
      else {
        if (g.type !== x.type) diffs.push(`${p}: type ${g.type}, expected ${x.type}`);
        if (p !== '' && g.mode !== x.mode) diffs.push(`${p}: mode ${g.mode.toString(8)}, expected ${x.mode.toString(8)}`);
        if (x.sha256 && g.sha256 !== x.sha256) diffs.push(`${p}: content differs`);
        if (x.target && g.target !== x.target) diffs.push(`${p}: target ${g.target}, expected ${x.target}`);
      }
    }
    for (const p of got.keys()) if (!want.has(p)) diffs.push(`${p}: visible in the merged view but hidden by the layers`);
    assert.deepEqual(diffs, []);
    // The rules above, spelled out on the paths that exercise them.
    assert.equal(readFileSync(join(mergedDir, 'etc/a'), 'utf8'), 'a back in layer 3');
    assert.deepEqual(readdirSync(join(mergedDir, 'usr/lib')), ['new.so']);
    assert.deepEqual(readdirSync(join(mergedDir, 'opt')), ['fresh']);
    assert.deepEqual(readdirSync(join(mergedDir, 'var')), []);
    assert.equal(readFileSync(join(mergedDir, 'srv/data'), 'utf8'), 'survives everything');
  });
});
