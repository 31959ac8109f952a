// The on-disk cache of VM templates: one directory per key (the hash of
// everything a template depends on) under a root, default
// /var/lib/vmlet/templates. It knows nothing of VMs: a maker fills a directory,
// a user reads it. What it guarantees, also with several processes at once:
//
// - A template directory is either absent or complete. Makers build in a
//   private `.building-*` directory and rename it into place; rename is atomic,
//   and the loser of a race discards its own copy and uses the winner's.
// - One maker per key at a time, by a lock file (`<key>.lock`, O_EXCL, holding
//   the maker's pid). The lock only saves duplicate work; correctness comes from
//   the rename, so a stale-lock race that lets two makers run is harmless.
//   A lock whose pid is gone is broken; leftovers of dead makers are removed.
// - A template its user finds corrupt is discarded (renamed away, then
//   removed: a VM that still maps its memory file keeps its pages) and made
//   again, once; a second corrupt copy is an error, not a loop.
// - Housekeeping (`vmlet templates prune`) removes a template only while it
//   holds the key's lock, so never one being made; a template in use is safe
//   for the same reason as a corrupt one (rename, then remove), and a restore
//   racing the removal finds it gone and makes it anew. A template's last use
//   is its directory's mtime, set by use().
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, unlinkSync, utimesSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ComponentLog } from '../log';

export const DEFAULT_TEMPLATE_ROOT = '/var/lib/vmlet/templates';

/** $VMLET_TEMPLATE_DIR, else /var/lib/vmlet/templates. */
export function defaultTemplateRoot(): string {
  return process.env.VMLET_TEMPLATE_DIR || DEFAULT_TEMPLATE_ROOT;
}

export const templateLog = new ComponentLog('templates');

export type TemplateErrorCode =
  /** The root cannot be created or written. */
  | 'BAD_TEMPLATE_ROOT'
  /** The maker failed; nothing was left behind. */
  | 'TEMPLATE_BUILD_FAILED'
  /** Another live process holds the key's lock for longer than the wait bound. */
  | 'TEMPLATE_LOCKED'
  /** The template was corrupt again after it was made anew. */
  | 'TEMPLATE_CORRUPT'
  /** TemplatePool options out of range. */
  | 'BAD_POOL_OPTIONS'
  /** acquire() on a closed TemplatePool. */
  | 'POOL_CLOSED'
  /** acquire() with more layers than the template has empty disk slots. */
  | 'TOO_MANY_LAYERS';

export class TemplateError extends Error {
  override readonly name = 'TemplateError';
  constructor(
    readonly code: TemplateErrorCode,
    message: string,
    override readonly cause?: unknown,
  ) {
    super(`${code}: ${message}`);
  }
}

/** Every input a template depends on; a change in any value is another key. */
export type TemplateInputs = Record<string, string | number>;

/** Hex SHA-256 of the inputs in a canonical form (keys sorted), shortened to 32 digits. */
export function templateKey(inputs: TemplateInputs): string {
  const canonical = JSON.stringify(Object.keys(inputs).sort().map((k) => [k, inputs[k]]));
  return createHash('sha256').update(canonical).digest('hex').slice(0, 32);
}

/** What template.json records; written last, so its presence marks a complete template. */
export interface TemplateManifest {
  key: string;
  inputs: TemplateInputs;
  /** Unique per making: tells a rebuilt template from the one a user found corrupt. */
  id: string;
  createdAt: string;
  makerPid: number;
  /** Whatever the maker returned (e.g. the snapshot's info). */
  meta: Record<string, unknown>;
}

export interface Template {
  key: string;
  dir: string;
  manifest: TemplateManifest;
}

/** A template as `vmlet templates list` shows it. */
export interface TemplateEntry extends Template {
  /** Bytes its files occupy on disk (the memory file is sparse: blocks, not length). */
  diskBytes: number;
  /** The last use() that succeeded, else when it was made (ms since the epoch). */
  lastUsedMs: number;
}

/** What remove() did: a template being made right now is left alone. */
export type RemoveOutcome = 'removed' | 'being-made' | 'absent';

export const MANIFEST = 'template.json';
const BUILDING_PREFIX = '.building-';
const DISCARDED_PREFIX = '.discarded-';

export interface TemplateStoreOptions {
  root?: string;
  /** How long to wait for another live maker of the same key; default 15 min (a cold boot in the lab is ~30 s). */
  lockWaitMs?: number;
  /** Poll interval while waiting for another maker. */
  pollMs?: number;
}

/** (dir) => metadata: fills `dir` (which exists and is empty) with the template. */
export type TemplateMaker = (dir: string) => Promise<Record<string, unknown>>;

function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: it exists, it is just not ours to signal.
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException).code;
}

export class TemplateStore {
  readonly root: string;
  private readonly lockWaitMs: number;
  private readonly pollMs: number;

  constructor(opts: TemplateStoreOptions = {}) {
    this.root = opts.root ?? defaultTemplateRoot();
    this.lockWaitMs = opts.lockWaitMs ?? 15 * 60_000;
    this.pollMs = opts.pollMs ?? 50;
  }

  dirOf(key: string): string {
    return join(this.root, key);
  }

  /**
   * The complete template for key, or null. A directory without a readable
   * manifest for this key is not a template (a foreign or damaged entry): it is
   * discarded so the next maker can rename into its place.
   */
  lookup(key: string): Template | null {
    const dir = this.dirOf(key);
    let text: string;
    try {
      text = readFileSync(join(dir, MANIFEST), 'utf8');
    } catch (e) {
      if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') {
        if (this.exists(dir)) this.discard(key, `${dir} has no ${MANIFEST}`);
        return null;
      }
      throw new TemplateError('BAD_TEMPLATE_ROOT', `cannot read ${join(dir, MANIFEST)}: ${(e as Error).message}`, e);
    }
    let manifest: TemplateManifest;
    try {
      manifest = JSON.parse(text) as TemplateManifest;
    } catch (e) {
      this.discard(key, `${MANIFEST} is not JSON (${(e as Error).message})`);
      return null;
    }
    if (manifest.key !== key || typeof manifest.id !== 'string') {
      this.discard(key, `${MANIFEST} names key ${String(manifest.key)}, not ${key}`);
      return null;
    }
    return { key, dir, manifest };
  }

  /** The template for key, made by `make` first when there is none (one maker per key across processes). */
  async ensure(key: string, inputs: TemplateInputs, make: TemplateMaker): Promise<Template> {
    const found = this.lookup(key);
    if (found) return found;
    this.makeRoot();
    const lock = join(this.root, `${key}.lock`);
    const waitStart = Date.now();
    for (;;) {
      const token = this.tryLock(lock);
      if (token) {
        try {
          // Another maker may have finished between our lookup and the lock.
          return this.lookup(key) ?? (await this.build(key, inputs, make));
        } finally {
          this.unlock(lock, token);
        }
      }
      const done = this.lookup(key);
      if (done) return done;
      const holder = this.lockHolder(lock);
      if (holder !== null && !pidAlive(holder)) {
        templateLog.warn(`breaking the lock of template ${key}: its maker (pid ${holder}) is gone`);
        this.removeIfSame(lock, holder);
        continue;
      }
      if (Date.now() - waitStart > this.lockWaitMs) {
        throw new TemplateError(
          'TEMPLATE_LOCKED',
          `template ${key} has been in the making by pid ${holder ?? '?'} for over ${Math.round(this.lockWaitMs / 1000)} s; if that process is stuck, kill it (its lock ${lock} is then broken automatically)`,
        );
      }
      await new Promise((r) => setTimeout(r, this.pollMs));
    }
  }

  /**
   * Runs `use` on the template for key. When it throws an error `isCorrupt`
   * recognises, the template is discarded and made anew, and `use` runs once
   * more; a second corrupt copy is TEMPLATE_CORRUPT.
   */
  async use<T>(key: string, inputs: TemplateInputs, make: TemplateMaker, use: (t: Template) => Promise<T>, isCorrupt: (e: unknown) => boolean): Promise<T> {
    const first = await this.ensure(key, inputs, make);
    try {
      const r = await use(first);
      this.touch(first);
      return r;
    } catch (e) {
      if (!isCorrupt(e)) throw e;
      templateLog.warn(`template ${key} (${first.dir}, made ${first.manifest.createdAt}) is corrupt, making it again: ${(e as Error).message}`);
      this.discardIfSame(key, first.manifest.id, (e as Error).message);
      const second = await this.ensure(key, inputs, make);
      try {
        const r = await use(second);
        this.touch(second);
        return r;
      } catch (e2) {
        if (!isCorrupt(e2)) throw e2;
        this.discardIfSame(key, second.manifest.id, (e2 as Error).message);
        throw new TemplateError(
          'TEMPLATE_CORRUPT',
          `template ${key} was corrupt, and again after it was made anew (${(e2 as Error).message}); the first time: ${(e as Error).message}`,
          e2,
        );
      }
    }
  }

  /** Removes the template for key (renamed away first: readers never see half of one). */
  discard(key: string, reason: string): void {
    const dir = this.dirOf(key);
    const aside = join(this.root, `${DISCARDED_PREFIX}${key}-${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      renameSync(dir, aside);
    } catch (e) {
      if (errno(e) === 'ENOENT') return;
      throw new TemplateError('BAD_TEMPLATE_ROOT', `cannot move ${dir} aside to discard it: ${(e as Error).message}`, e);
    }
    templateLog.warn(`discarded template ${key}: ${reason}`);
    rmSync(aside, { recursive: true, force: true });
  }

  /** Every key with a complete template, and the leftovers of dead makers removed on the way. */
  list(): string[] {
    let names: string[];
    try {
      names = readdirSync(this.root);
    } catch (e) {
      if (errno(e) === 'ENOENT') return [];
      throw e;
    }
    this.removeLeftovers(names);
    return names.filter((n) => /^[0-9a-f]{32}$/.test(n) && this.lookup(n) !== null);
  }

  /** Every complete template with its size on disk and last use, oldest use first. */
  entries(): TemplateEntry[] {
    const out: TemplateEntry[] = [];
    for (const key of this.list()) {
      const t = this.lookup(key);
      if (!t) continue;
      let lastUsedMs: number;
      try {
        lastUsedMs = statSync(t.dir).mtimeMs;
      } catch {
        // Removed since list(): not a template any more.
        continue;
      }
      out.push({ ...t, diskBytes: diskUsage(t.dir), lastUsedMs });
    }
    return out.sort((a, b) => a.lastUsedMs - b.lastUsedMs);
  }

  /**
   * Removes the template for key unless another process is making it now
   * (its lock is held by a live pid). Holding the lock while removing keeps a
   * maker from renaming a new template into place half-way through.
   */
  remove(key: string, reason: string): RemoveOutcome {
    const lock = join(this.root, `${key}.lock`);
    let token = this.tryLock(lock);
    if (!token) {
      const holder = this.lockHolder(lock);
      if (holder === null || pidAlive(holder)) return 'being-made';
      this.removeIfSame(lock, holder);
      token = this.tryLock(lock);
      if (!token) return 'being-made';
    }
    try {
      if (!this.exists(this.dirOf(key))) return 'absent';
      this.discard(key, reason);
      return 'removed';
    } finally {
      this.unlock(lock, token);
    }
  }

  /** Marks a use (the directory's mtime): prune --older-than keeps what is in use. */
  private touch(t: Template): void {
    const now = new Date();
    try {
      utimesSync(t.dir, now, now);
    } catch (e) {
      // Removed meanwhile by prune, or a read-only store: the use itself succeeded.
      templateLog.debug(`cannot record the use of template ${t.key}: ${(e as Error).message}`);
    }
  }

  private discardIfSame(key: string, id: string, reason: string): void {
    // Another process may already have replaced it with a good one: keep that.
    if (this.lookup(key)?.manifest.id === id) this.discard(key, reason);
  }

  private async build(key: string, inputs: TemplateInputs, make: TemplateMaker): Promise<Template> {
    this.removeLeftovers(readdirSync(this.root));
    const tmp = join(this.root, `${BUILDING_PREFIX}${key}-${process.pid}-${randomBytes(4).toString('hex')}`);
    mkdirSync(tmp);
    let manifest: TemplateManifest;
    try {
      const meta = await make(tmp);
      manifest = { key, inputs, id: randomBytes(8).toString('hex'), createdAt: new Date().toISOString(), makerPid: process.pid, meta };
      const fd = openSync(join(tmp, MANIFEST), 'w');
      try {
        writeSync(fd, JSON.stringify(manifest, null, 2) + '\n');
        // The manifest marks the template complete: it must not reach the disk before the data.
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      if (e instanceof TemplateError) throw e;
      throw new TemplateError('TEMPLATE_BUILD_FAILED', `making template ${key} failed: ${(e as Error).message}`, e);
    }
    const dir = this.dirOf(key);
    try {
      renameSync(tmp, dir);
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      // Someone else's complete template got there first: theirs is as good.
      if (errno(e) === 'ENOTEMPTY' || errno(e) === 'EEXIST') {
        const theirs = this.lookup(key);
        if (theirs) return theirs;
      }
      throw new TemplateError('BAD_TEMPLATE_ROOT', `cannot move the new template into ${dir}: ${(e as Error).message}`, e);
    }
    this.fsyncDir(this.root);
    templateLog.info(`made template ${key} in ${dir}`);
    return { key, dir, manifest };
  }

  private makeRoot(): void {
    try {
      mkdirSync(this.root, { recursive: true, mode: 0o700 });
    } catch (e) {
      throw new TemplateError('BAD_TEMPLATE_ROOT', `cannot create the template directory ${this.root}: ${(e as Error).message} (set VMLET_TEMPLATE_DIR to a writable place)`, e);
    }
  }

  private exists(p: string): boolean {
    try {
      statSync(p);
      return true;
    } catch {
      return false;
    }
  }

  private fsyncDir(dir: string): void {
    const fd = openSync(dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  /** The lock's token on success, null when someone holds it. */
  private tryLock(lock: string): string | null {
    const token = `${process.pid} ${randomBytes(8).toString('hex')}\n`;
    let fd: number;
    try {
      fd = openSync(lock, 'wx', 0o600);
    } catch (e) {
      if (errno(e) === 'EEXIST') return null;
      throw new TemplateError('BAD_TEMPLATE_ROOT', `cannot create the lock ${lock}: ${(e as Error).message}`, e);
    }
    try {
      writeSync(fd, token);
    } finally {
      closeSync(fd);
    }
    return token;
  }

  private lockHolder(lock: string): number | null {
    try {
      const pid = Number.parseInt(readFileSync(lock, 'utf8').split(' ')[0], 10);
      // A lock caught between its creation and its write reads empty: not stale.
      return Number.isInteger(pid) ? pid : null;
    } catch {
      return null;
    }
  }

  private unlock(lock: string, token: string): void {
    try {
      if (readFileSync(lock, 'utf8') === token) unlinkSync(lock);
    } catch {
      // Broken by another process that thought us dead: nothing left to release.
    }
  }

  private removeIfSame(lock: string, pid: number): void {
    if (this.lockHolder(lock) !== pid) return;
    try {
      unlinkSync(lock);
    } catch {
      // Another waiter broke it first.
    }
  }

  /** Removes `.building-*` of dead makers, `.discarded-*` left by a crash mid-removal, and locks of dead makers. */
  private removeLeftovers(names: string[]): void {
    for (const n of names) {
      if (/^[0-9a-f]{32}\.lock$/.test(n)) {
        const lock = join(this.root, n);
        const holder = this.lockHolder(lock);
        if (holder !== null && !pidAlive(holder)) {
          templateLog.info(`removing ${n}: its maker (pid ${holder}) is gone`);
          this.removeIfSame(lock, holder);
        }
        continue;
      }
      let pid: number | null = null;
      if (n.startsWith(BUILDING_PREFIX)) pid = Number.parseInt(n.slice(BUILDING_PREFIX.length).split('-')[1] ?? '', 10);
      else if (n.startsWith(DISCARDED_PREFIX)) pid = Number.parseInt(n.slice(DISCARDED_PREFIX.length).split('-')[1] ?? '', 10);
      else continue;
      if (pid !== null && pid !== process.pid && !pidAlive(pid)) {
        templateLog.info(`removing ${n}: left by pid ${pid}, which is gone`);
        rmSync(join(this.root, n), { recursive: true, force: true });
      }
    }
  }
}

/** Bytes a directory tree occupies on disk (allocated blocks, so a sparse file counts what it holds). */
export function diskUsage(path: string): number {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return 0;
  }
  if (!st.isDirectory()) return st.blocks * 512;
  let total = st.blocks * 512;
  let names: string[] = [];
  try {
    names = readdirSync(path);
  } catch {
    // Removed while we walked it.
  }
  for (const n of names) total += diskUsage(join(path, n));
  return total;
}
