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

/**
 * A file's current version: every stat field a rewrite changes (ctime too: a
 * rewrite that puts the old mtime back, as `touch -r` or an archive unpack
 * does, still moves it), and when it last changed.
 */
function fileVersion(path: string): { id: string; changedNs: bigint } {
  const st = statSync(path, { bigint: true });
  return {
    id: `${path}\0${st.dev}\0${st.ino}\0${st.size}\0${st.mtimeNs}\0${st.ctimeNs}`,
    changedNs: st.ctimeNs > st.mtimeNs ? st.ctimeNs : st.mtimeNs,
  };
}

/** The on-disk cache entry of a file version. */
function cacheFile(cacheDir: string, id: string): string {
  return join(cacheDir, createHash('sha256').update(id).digest('hex').slice(0, 40));
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
 * SHA-256 of a file's bytes. Memoised per file version (fileVersion) in this
 * process, and, given a cacheDir, on disk across processes: the key needs the
 * kernel (tens of MiB), the addon and every image layer, and every `vmlet run`
 * is a new process; in the lab (TCG) hashing them took longer than the restore
 * itself. A file changed in the last RACY_NS is hashed but remembered in
 * neither place: the shim and the CRI server live for days, and a same-size
 * rewrite inside one timestamp tick would otherwise be served the old digest.
 */
export function sha256File(path: string, cacheDir?: string): string {
  const version = fileVersion(path);
  const known = fileHashes.get(version.id);
  if (known) return known;
  const entry = cacheDir ? cacheFile(cacheDir, version.id) : undefined;
  if (entry) {
    try {
      const cached = JSON.parse(readFileSync(entry, 'utf8')) as { id?: string; sha256?: string };
      if (cached.id === version.id && typeof cached.sha256 === 'string' && /^[0-9a-f]{64}$/.test(cached.sha256)) {
        fileHashes.set(version.id, cached.sha256);
        return cached.sha256;
      }
    } catch {
      // Absent or torn: hash the file.
    }
  }
  const digest = sha256FileBytes(path);
  if (BigInt(Date.now()) * 1_000_000n - version.changedNs <= RACY_NS) return digest;
  fileHashes.set(version.id, digest);
  if (entry) {
    try {
      mkdirSync(cacheDir as string, { recursive: true, mode: 0o700 });
      // Written aside and renamed: a reader never sees half an entry.
      const tmp = `${entry}.${process.pid}.tmp`;
      writeFileSync(tmp, JSON.stringify({ id: version.id, sha256: digest }));
      renameSync(tmp, entry);
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
      stale = cacheFile(cacheDir, fileVersion(path).id) !== file;
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

