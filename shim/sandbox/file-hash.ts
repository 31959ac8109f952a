// SHA-256 of files, cached: the inputs of cache keys (the guest kernel, the
// addon, the agent, every image layer) are megabytes each, and every `vmlet
// run` is a new process; in the lab (TCG) hashing them took longer than the
// restore they key. Shared by the template pool and the agent initramfs cache.
import { createHash } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { templateLog } from './template-store';

const fileHashes = new Map<string, string>();

/** Name of the on-disk hash cache inside a template root or cache directory (TemplateStore ignores dot entries it does not own). */
export const FILE_HASH_CACHE = '.file-hashes';

/**
 * A file changed less than this long ago is not cached on disk: a rewrite of
 * the same size within one timestamp tick would keep its (mtime, ctime), so
 * the cache could name bytes the file no longer holds (git's "racy" entries).
 */
const RACY_NS = 2_000_000_000n;

/** The on-disk cache entry of a file's current version: every stat field a rewrite changes. */
function hashCacheEntry(cacheDir: string, path: string): { file: string; id: string; changedNs: bigint } {
  const st = statSync(path, { bigint: true });
  const id = `${path}\0${st.dev}\0${st.ino}\0${st.size}\0${st.mtimeNs}\0${st.ctimeNs}`;
  return { file: join(cacheDir, createHash('sha256').update(id).digest('hex').slice(0, 40)), id, changedNs: st.ctimeNs > st.mtimeNs ? st.ctimeNs : st.mtimeNs };
}

/**
 * SHA-256 of a file's bytes as they are now, read in 1 MiB chunks: no memo and
 * no cache, for files that may be rewritten in place (test corpora).
 */
export function sha256FileBytes(path: string): string {
  const h = createHash('sha256');
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}

/**
 * SHA-256 of a file's bytes. Memoised per (path, device, inode, size, mtime)
 * in this process, and, given a cacheDir, on disk across processes: the key
 * needs the kernel (tens of MiB), the addon and every image layer, and every
 * `vmlet run` is a new process; in the lab (TCG) hashing them took longer than
 * the restore itself.
 */
export function sha256File(path: string, cacheDir?: string): string {
  const st = statSync(path);
  const memo = `${path}\0${st.dev}\0${st.ino}\0${st.size}\0${st.mtimeMs}`;
  const known = fileHashes.get(memo);
  if (known) return known;
  const entry = cacheDir ? hashCacheEntry(cacheDir, path) : undefined;
  if (entry) {
    try {
      const cached = JSON.parse(readFileSync(entry.file, 'utf8')) as { id?: string; sha256?: string };
      if (cached.id === entry.id && typeof cached.sha256 === 'string' && /^[0-9a-f]{64}$/.test(cached.sha256)) {
        fileHashes.set(memo, cached.sha256);
        return cached.sha256;
      }
    } catch {
      // Absent or torn: hash the file.
    }
  }
  const digest = sha256FileBytes(path);
  fileHashes.set(memo, digest);
  if (entry && BigInt(Date.now()) * 1_000_000n - entry.changedNs > RACY_NS) {
    try {
      mkdirSync(cacheDir as string, { recursive: true, mode: 0o700 });
      // Written aside and renamed: a reader never sees half an entry.
      const tmp = `${entry.file}.${process.pid}.tmp`;
      writeFileSync(tmp, JSON.stringify({ id: entry.id, sha256: digest }));
      renameSync(tmp, entry.file);
    } catch (e) {
      templateLog.debug(`cannot cache the hash of ${path} in ${cacheDir}: ${(e as Error).message}`);
    }
  }
  return digest;
}

/**
 * Drops the on-disk hash entries of files that changed or are gone (a
 * directory rootfs is converted to a new temporary image on every run).
 * Returns how many were removed.
 */
export function pruneFileHashes(cacheDir: string): number {
  let names: string[];
  try {
    names = readdirSync(cacheDir);
  } catch {
    return 0;
  }
  let removed = 0;
  for (const n of names) {
    const file = join(cacheDir, n);
    let stale = true;
    try {
      const { id } = JSON.parse(readFileSync(file, 'utf8')) as { id: string };
      const path = id.split('\0')[0];
      stale = hashCacheEntry(cacheDir, path).file !== file;
    } catch {
      // Unreadable, or its file is gone: stale.
    }
    if (stale) {
      rmSync(file, { force: true });
      removed++;
    }
  }
  return removed;
}

