// Cross-process coordination inside one image root, built on O_EXCL file creation so that
// it works between unrelated vmlet processes (CLI, CRI server) without a daemon.
//
//  - A *lock file* serialises work on one key (one blob digest, one layer diff-id). It holds
//    the owner's pid; a lock whose pid is dead was left by a crashed process and is broken.
//  - *Leases* and the *GC lock* form a readers/writer pair: every pull/load holds a lease for
//    its whole run; GC takes the GC lock and then waits for live leases to end. A pull takes its
//    lease first and only then checks the GC lock, so whichever of the two comes second sees
//    the other: GC can never delete a blob a pull has just found present.
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ImageError } from './errors';

const POLL_MS = 25;

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function ownerAlive(path: string): Promise<boolean> {
  let text: string;
  try {
    text = await fsp.readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
  // A lock file is created empty and then gets its pid: an empty file is a lock being born.
  if (text.length === 0) return true;
  return pidAlive(Number.parseInt(text, 10));
}

async function tryCreate(path: string): Promise<boolean> {
  try {
    const fh = await fsp.open(path, 'wx');
    try {
      await fh.writeFile(String(process.pid));
    } finally {
      await fh.close();
    }
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

export interface LockOptions {
  /** how long to wait for another holder before giving up */
  timeoutMs?: number;
  what?: string;
}

export class FileLock {
  private constructor(readonly path: string) {}

  static async acquire(path: string, opts: LockOptions = {}): Promise<FileLock> {
    const deadline = Date.now() + (opts.timeoutMs ?? 30 * 60_000);
    let emptySince = 0;
    for (;;) {
      if (await tryCreate(path)) return new FileLock(path);
      const text = await fsp.readFile(path, 'utf8').catch(() => null);
      if (text !== null) {
        const stale = text.length === 0
          ? (emptySince === 0 ? (emptySince = Date.now(), false) : Date.now() - emptySince > 5_000)
          : !pidAlive(Number.parseInt(text, 10));
        if (stale) {
          // Two waiters may both judge the lock stale; unlinking twice is harmless, and the
          // create that follows is still exclusive.
          await fsp.unlink(path).catch(() => undefined);
          continue;
        }
      }
      if (Date.now() > deadline) {
        throw new ImageError('LOCK_TIMEOUT',
          `waited too long for ${opts.what ?? path}, held by another vmlet process (lock file ${path}); ` +
          'if no vmlet is running, delete that file');
      }
      await sleep(POLL_MS);
    }
  }

  async release(): Promise<void> {
    await fsp.unlink(this.path).catch(() => undefined);
  }
}

export async function withFileLock<T>(path: string, opts: LockOptions, fn: () => Promise<T>): Promise<T> {
  const lock = await FileLock.acquire(path, opts);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}

/** A pull or load in progress; GC waits for it to end. */
export class Lease {
  private constructor(readonly path: string) {}

  static async take(root: string): Promise<Lease> {
    const dir = join(root, 'leases');
    await fsp.mkdir(dir, { recursive: true });
    const gcLock = join(root, 'gc.lock');
    for (;;) {
      const path = join(dir, `${process.pid}-${randomBytes(6).toString('hex')}`);
      await fsp.writeFile(path, String(process.pid), { flag: 'wx' });
      if (!(await ownerAlive(gcLock))) return new Lease(path);
      // GC is running: step aside until it is done, then take the lease again.
      await fsp.unlink(path).catch(() => undefined);
      while (await ownerAlive(gcLock)) await sleep(POLL_MS);
    }
  }

  async release(): Promise<void> {
    await fsp.unlink(this.path).catch(() => undefined);
  }
}

/** Holds the GC lock and returns once no live lease remains. Dead leases are removed. */
export async function acquireGcLock(root: string, timeoutMs = 30 * 60_000): Promise<FileLock> {
  const lock = await FileLock.acquire(join(root, 'gc.lock'), { timeoutMs, what: 'the garbage-collection lock' });
  const dir = join(root, 'leases');
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      let live = 0;
      for (const name of await fsp.readdir(dir).catch(() => [] as string[])) {
        const p = join(dir, name);
        if (await ownerAlive(p)) live++;
        else await fsp.unlink(p).catch(() => undefined);
      }
      if (live === 0) return lock;
      if (Date.now() > deadline) {
        throw new ImageError('LOCK_TIMEOUT', `garbage collection waited too long for ${live} pull(s) to finish; retry later`);
      }
      await sleep(POLL_MS);
    }
  } catch (e) {
    await lock.release();
    throw e;
  }
}
