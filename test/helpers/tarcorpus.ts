// The layer converter's test corpus: tars written entry by entry (so a test
// can say exactly which headers a layer carries, hostile ones included), tars
// made by GNU tar from a directory (sparse files, GNU long names, busybox),
// and the readers that look at a squashfs image from outside our code:
// `unsquashfs -lln` (squashfs-tools) for the listing, `unsquashfs -d` for
// file bytes, `rdsquashfs -x` (squashfs-tools-ng) for xattrs.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, lstatSync, openSync, readdirSync, readFileSync, readlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { sha256FileBytes } from '../../shim/sandbox/file-hash';

export type EntryType = 'file' | 'dir' | 'symlink' | 'hardlink' | 'char' | 'block' | 'fifo';

export interface TarEntry {
  /** Written as given: tests put `../`, `/abs` and `./` prefixes here on purpose. */
  path: string;
  type: EntryType;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  data?: Buffer;
  /** Symlink or hardlink target. */
  linkname?: string;
  devmajor?: number;
  devminor?: number;
  xattrs?: Record<string, string>;
  /** Extra raw PAX records (e.g. a huge one). */
  pax?: Record<string, string>;
}

const TYPEFLAG: Record<EntryType, string> = {
  file: '0', hardlink: '1', symlink: '2', char: '3', block: '4', dir: '5', fifo: '6',
};

function octal(n: number, width: number): string {
  return n.toString(8).padStart(width - 1, '0') + '\0';
}

function header(name: string, e: TarEntry, size: number, typeflag: string, linkname: string): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0, 100, 'utf8');
  h.write(octal(e.mode ?? (e.type === 'dir' ? 0o755 : 0o644), 8), 100, 'latin1');
  h.write(octal(e.uid ?? 0, 8), 108, 'latin1');
  h.write(octal(e.gid ?? 0, 8), 116, 'latin1');
  h.write(octal(size, 12), 124, 'latin1');
  h.write(octal(e.mtime ?? 1_700_000_000, 12), 136, 'latin1');
  h.write('        ', 148, 'latin1');
  h.write(typeflag, 156, 'latin1');
  h.write(linkname, 157, 100, 'utf8');
  h.write('ustar\0' + '00', 257, 'latin1');
  h.write(octal(e.devmajor ?? 0, 8), 329, 'latin1');
  h.write(octal(e.devminor ?? 0, 8), 337, 'latin1');
  let sum = 0;
  for (const b of h) sum += b;
  h.write(octal(sum, 7) + ' ', 148, 'latin1');
  return h;
}

function paxRecord(key: string, value: Buffer): Buffer {
  // The length prefix counts itself, so it is found by iterating.
  const body = Buffer.concat([Buffer.from(` ${key}=`), value, Buffer.from('\n')]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len)), body]);
}

function pad(n: number): Buffer {
  return Buffer.alloc((512 - (n % 512)) % 512);
}

/** One entry's bytes: a PAX header when a name, target or xattr does not fit ustar, then the entry. */
export function tarEntryBytes(e: TarEntry): Buffer {
  const parts: Buffer[] = [];
  const records: Buffer[] = [];
  const linkname = e.linkname ?? '';
  if (Buffer.byteLength(e.path) > 100 || /[^\x20-\x7e]/.test(e.path)) records.push(paxRecord('path', Buffer.from(e.path)));
  if (Buffer.byteLength(linkname) > 100 || /[^\x20-\x7e]/.test(linkname)) records.push(paxRecord('linkpath', Buffer.from(linkname)));
  for (const [k, v] of Object.entries(e.xattrs ?? {})) records.push(paxRecord(`SCHILY.xattr.${k}`, Buffer.from(v)));
  for (const [k, v] of Object.entries(e.pax ?? {})) records.push(paxRecord(k, Buffer.from(v)));
  if (records.length > 0) {
    const body = Buffer.concat(records);
    parts.push(header('PaxHeader', { path: '', type: 'file', mode: 0o644 }, body.length, 'x', ''), body, pad(body.length));
  }
  const data = e.type === 'file' ? (e.data ?? Buffer.alloc(0)) : Buffer.alloc(0);
  parts.push(header(e.path.slice(0, 100), e, data.length, TYPEFLAG[e.type], linkname.slice(0, 100)), data, pad(data.length));
  return Buffer.concat(parts);
}

export type Compression = 'gzip' | 'zstd' | 'none';

/** Writes a layer blob: the entries, the end-of-archive mark, then the compression asked for. */
export function writeTar(path: string, entries: Iterable<TarEntry>, compression: Compression = 'none'): void {
  const tarPath = compression === 'none' ? path : `${path}.tar`;
  const fd = openSync(tarPath, 'w');
  try {
    for (const e of entries) writeSync(fd, tarEntryBytes(e));
    writeSync(fd, Buffer.alloc(1024));
  } finally {
    closeSync(fd);
  }
  compress(tarPath, path, compression);
}

/** Compresses `tarPath` into `path` (removing the tar) with the system's gzip/zstd. */
export function compress(tarPath: string, path: string, compression: Compression): void {
  if (compression === 'none') return;
  if (compression === 'gzip') {
    execFileSync('sh', ['-c', 'gzip -c -n -- "$1" > "$2" && rm -f -- "$1"', 'sh', tarPath, path]);
  } else {
    execFileSync('zstd', ['-q', '-f', '--rm', '-o', path, tarPath]);
  }
}

export function gzipBuffer(b: Buffer): Buffer {
  return gzipSync(b);
}

/** GNU tar of a directory's contents, numeric owners, sorted, xattrs kept; `sparse` detects holes. */
export function gnuTar(dir: string, out: string, opts: { sparse?: boolean; format?: 'gnu' | 'pax' } = {}): void {
  const args = ['--numeric-owner', '--sort=name', `--format=${opts.format ?? 'pax'}`, '--xattrs', '--xattrs-include=*'];
  if (opts.sparse) args.push('--sparse');
  execFileSync('tar', [...args, '-C', dir, '-cf', out, '.']);
}

/** What the image should hold at one path. */
export interface Expect {
  type: '-' | 'd' | 'l' | 'c' | 'b' | 'p';
  mode: number;
  uid: number;
  gid: number;
  mtime?: number;
  size?: number;
  target?: string;
  dev?: [number, number];
  sha256?: string;
  xattrs?: Record<string, string>;
}

const SHORT: Record<Exclude<EntryType, 'hardlink'>, Expect['type']> = {
  file: '-', dir: 'd', symlink: 'l', char: 'c', block: 'b', fifo: 'p',
};

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Normalises a tar path the way the converter must (leading '/', './', '.' dropped; '..' popped). */
export function normalise(p: string): string {
  const out: string[] = [];
  for (const c of p.split('/')) {
    if (c === '' || c === '.') continue;
    if (c === '..') {
      if (out.length === 0) throw new Error(`${p} escapes the root`);
      out.pop();
    } else out.push(c);
  }
  return out.join('/');
}

/**
 * The view a layer's entries define (the behaviour the converter promises, written
 * out independently): implicit parents 0755 root mtime 0, last entry wins,
 * a repeated directory keeps its contents, hardlinks share the target's
 * inode, `.wh.NAME` becomes a 0:0 char device, `.wh..wh..opq` marks its
 * directory opaque. Keys are paths relative to the root ('' is the root).
 */
export function expectedView(entries: Iterable<TarEntry>): Map<string, Expect> {
  const view = new Map<string, Expect>();
  view.set('', { type: 'd', mode: 0o755, uid: 0, gid: 0 });
  const ensureParents = (p: string): void => {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) {
      const d = parts.slice(0, i).join('/');
      if (!view.has(d)) view.set(d, { type: 'd', mode: 0o755, uid: 0, gid: 0, mtime: 0 });
    }
  };
  const removeUnder = (p: string): void => {
    for (const k of [...view.keys()]) if (k.startsWith(`${p}/`)) view.delete(k);
  };
  for (const e of entries) {
    const p = normalise(e.path);
    const base = p.split('/').pop() ?? '';
    const parent = p.includes('/') ? p.slice(0, p.lastIndexOf('/')) : '';
    if (base === '.wh..wh..opq') {
      ensureParents(p);
      const d = view.get(parent)!;
      d.xattrs = { ...d.xattrs, 'trusted.overlay.opaque': 'y' };
      continue;
    }
    if (base.startsWith('.wh.')) {
      const hidden = (parent ? `${parent}/` : '') + base.slice(4);
      ensureParents(hidden);
      removeUnder(hidden);
      view.set(hidden, { type: 'c', mode: 0, uid: e.uid ?? 0, gid: e.gid ?? 0, mtime: e.mtime ?? 1_700_000_000, dev: [0, 0] });
      continue;
    }
    ensureParents(p);
    if (e.type === 'hardlink') {
      const t = view.get(normalise(e.linkname ?? ''));
      if (!t) throw new Error(`hardlink ${p} to a missing target`);
      view.set(p, t);
      continue;
    }
    const x: Expect = {
      type: SHORT[e.type],
      mode: e.mode ?? (e.type === 'dir' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: e.mtime ?? 1_700_000_000,
    };
    if (e.xattrs && Object.keys(e.xattrs).length > 0) x.xattrs = { ...e.xattrs };
    if (e.type === 'file') {
      x.size = e.data?.length ?? 0;
      x.sha256 = sha256(e.data ?? Buffer.alloc(0));
    }
    if (e.type === 'symlink') {
      x.target = e.linkname;
      x.size = Buffer.byteLength(e.linkname ?? '');
    }
    if (e.type === 'char' || e.type === 'block') x.dev = [e.devmajor ?? 0, e.devminor ?? 0];
    const old = view.get(p);
    if (old && old.type === 'd' && x.type === 'd') {
      const opaque = old.xattrs?.['trusted.overlay.opaque'];
      if (opaque !== undefined) x.xattrs = { ...x.xattrs, 'trusted.overlay.opaque': opaque };
      view.set(p, x);
      continue;
    }
    removeUnder(p);
    view.set(p, x);
  }
  return view;
}

/** The view a directory on the host defines (what GNU tar read from it). */
export function expectedFromDir(dir: string): Map<string, Expect> {
  const view = new Map<string, Expect>();
  const walk = (rel: string): void => {
    const abs = rel ? join(dir, rel) : dir;
    const st = lstatSync(abs, { bigint: false });
    const mode = st.mode & 0o7777;
    const base = { mode, uid: st.uid, gid: st.gid, mtime: Math.floor(st.mtimeMs / 1000) };
    if (st.isDirectory()) {
      view.set(rel, { type: 'd', ...base, ...(rel === '' ? { mtime: undefined } : {}) });
      for (const n of readdirSync(abs)) walk(rel ? `${rel}/${n}` : n);
    } else if (st.isSymbolicLink()) {
      const t = readlinkSync(abs);
      view.set(rel, { type: 'l', ...base, target: t, size: Buffer.byteLength(t) });
    } else if (st.isFile()) {
      view.set(rel, { type: '-', ...base, size: st.size, sha256: hashFile(abs) });
    }
  };
  walk('');
  return view;
}

/**
 * SHA-256 of a file as it is now. Not sha256File: that one memoises per
 * (path, inode, size, mtime), and the corpora rewrite their files in place.
 */
export const hashFile = sha256FileBytes;

/** One line of `unsquashfs -lln`, decoded. */
export interface Listed {
  type: Expect['type'];
  mode: number;
  uid: number;
  gid: number;
  size?: number;
  dev?: [number, number];
  target?: string;
  minute: string;
}

function permsToMode(s: string): number {
  let m = 0;
  const bit = (i: number, v: number): void => {
    if (s[i] !== '-' && s[i] !== 'S' && s[i] !== 'T') m |= v;
  };
  bit(0, 0o400); bit(1, 0o200); bit(2, 0o100);
  bit(3, 0o40); bit(4, 0o20); bit(5, 0o10);
  bit(6, 0o4); bit(7, 0o2); bit(8, 0o1);
  if (s[2] === 's' || s[2] === 'S') m |= 0o4000;
  if (s[5] === 's' || s[5] === 'S') m |= 0o2000;
  if (s[8] === 't' || s[8] === 'T') m |= 0o1000;
  return m;
}

const LINE = /^([-dlcbps])([-rwxsStT]{9}) (\d+)\/(\d+) +(\d+|\d+, *\d+) (\d{4}-\d\d-\d\d \d\d:\d\d) squashfs-root(?:\/(.*))?$/;

/** `unsquashfs -lln` of an image, keyed like expectedView (squashfs-tools, not our code). */
export function listSquashfs(image: string): Map<string, Listed> {
  const out = execFileSync('unsquashfs', ['-lln', image], { env: { ...process.env, TZ: 'UTC' }, maxBuffer: 1 << 30 });
  const view = new Map<string, Listed>();
  for (const line of out.toString('utf8').split('\n')) {
    if (!line) continue;
    const m = LINE.exec(line);
    if (!m) throw new Error(`unparsed unsquashfs line: ${line}`);
    const [, t, perms, uid, gid, size, minute, rest] = m;
    let path = rest ?? '';
    const l: Listed = { type: t as Expect['type'], mode: permsToMode(perms), uid: Number(uid), gid: Number(gid), minute };
    if (t === 'l') {
      const i = path.indexOf(' -> ');
      l.target = path.slice(i + 4);
      path = path.slice(0, i);
    }
    if (size.includes(',')) {
      const [a, b] = size.split(',').map((s) => Number(s.trim()));
      l.dev = [a, b];
    } else l.size = Number(size);
    view.set(path, l);
  }
  return view;
}

export function minuteOf(mtime: number): string {
  return new Date(mtime * 1000).toISOString().slice(0, 16).replace('T', ' ');
}

/** Extended attributes of one path in the image, via squashfs-tools-ng's rdsquashfs. */
export function xattrsOf(image: string, path: string): Record<string, string> {
  const out = execFileSync('rdsquashfs', ['-x', `/${path}`, image]).toString('utf8');
  const x: Record<string, string> = {};
  for (const line of out.split('\n')) {
    if (!line) continue;
    const i = line.indexOf('=');
    x[line.slice(0, i)] = line.slice(i + 1);
  }
  return x;
}

/**
 * Every difference between what the image holds and what was expected:
 * names, types, modes, owners, mtimes (to the minute, the listing's
 * resolution), sizes, link targets, devices, file bytes (by SHA-256 of the
 * files `unsquashfs -d` extracted into `extracted`) and xattrs. Empty when
 * faithful.
 */
export function compareImage(image: string, expected: Map<string, Expect>, extracted: string): string[] {
  const listed = listSquashfs(image);
  const diffs: string[] = [];
  for (const [p, x] of expected) {
    const l = listed.get(p);
    if (!l) {
      diffs.push(`${p || '/'}: missing from the image`);
      continue;
    }
    const where = p || '/';
    if (l.type !== x.type) diffs.push(`${where}: type ${l.type}, expected ${x.type}`);
    if (l.mode !== x.mode) diffs.push(`${where}: mode ${l.mode.toString(8)}, expected ${x.mode.toString(8)}`);
    if (l.uid !== x.uid || l.gid !== x.gid) diffs.push(`${where}: owner ${l.uid}/${l.gid}, expected ${x.uid}/${x.gid}`);
    if (x.mtime !== undefined && l.minute !== minuteOf(x.mtime)) diffs.push(`${where}: mtime ${l.minute}, expected ${minuteOf(x.mtime)}`);
    if (x.size !== undefined && l.size !== x.size) diffs.push(`${where}: size ${l.size}, expected ${x.size}`);
    if (x.target !== undefined && l.target !== x.target) diffs.push(`${where}: target ${l.target}, expected ${x.target}`);
    if (x.dev && (!l.dev || l.dev[0] !== x.dev[0] || l.dev[1] !== x.dev[1])) diffs.push(`${where}: device ${l.dev}, expected ${x.dev}`);
    if (x.sha256 !== undefined) {
      const got = hashFile(join(extracted, p));
      if (got !== x.sha256) diffs.push(`${where}: content sha256 ${got}, expected ${x.sha256}`);
    }
    if (x.xattrs) {
      const got = xattrsOf(image, p);
      const want = Object.fromEntries(Object.entries(x.xattrs).map(([k, v]) => [k, xattrShown(Buffer.from(v))]));
      if (JSON.stringify(sortKeys(got)) !== JSON.stringify(sortKeys(want))) {
        diffs.push(`${where}: xattrs ${JSON.stringify(got)}, expected ${JSON.stringify(x.xattrs)}`);
      }
    }
  }
  for (const p of listed.keys()) if (!expected.has(p)) diffs.push(`${p}: in the image but not in the layer`);
  return diffs;
}

// rdsquashfs prints a value as text when every byte is printable, else as 0x-hex.
function xattrShown(v: Buffer): string {
  return [...v].every((b) => b >= 0x20 && b < 0x7f) ? v.toString('latin1') : `0x${v.toString('hex')}`;
}

function sortKeys(o: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : 1)));
}

/** Extracts the image's files with squashfs-tools (file bytes only; metadata comes from the listing). */
export function extractImage(image: string, dest: string): void {
  execFileSync('unsquashfs', ['-q', '-no-xattrs', '-n', '-f', '-d', dest, image], { stdio: ['ignore', 'ignore', 'pipe'] });
}

export function readBytes(path: string): Buffer {
  return readFileSync(path);
}
