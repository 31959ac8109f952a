// Content store: blobs keyed by digest under <root>/blobs/<alg>/<hex>.
//
// A blob becomes visible only by rename(2) of a fully written, verified and fsynced file, so a
// reader never sees half a blob. Downloads land in <root>/ingest/<alg>-<hex>.partial, guarded by
// a per-digest lock file; an interrupted download leaves the partial file behind and the next
// attempt (this process or a later one) hashes what is there and asks only for the rest.
import { createReadStream, promises as fsp } from 'node:fs';
import { join, dirname } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { ImageError, isImageError } from './errors';
import { parseDigest, newHasher, digestOf } from './digest';
import { withFileLock } from './lock';
import { unlinkIfExists } from './fs';

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os: string; architecture: string; variant?: string };
  annotations?: Record<string, string>;
}

/** A source of blob bytes from some offset. `offset` in the result is where the bytes really
 *  start: a server that ignores Range answers from 0, and the partial file is then discarded. */
export type BlobOpener = (offset: number) => Promise<{ stream: Readable; offset: number }>;

export interface IngestOptions {
  /** called with the bytes held so far (partial file included) */
  onProgress?: (bytes: number) => void;
  /** how many times a connection error / timeout mid-blob is retried from where it stopped */
  retries?: number;
  /** errors worth retrying with a fresh stream; the rest end the ingest at once */
  isRetryable?: (e: unknown) => boolean;
  retryDelayMs?: (attempt: number) => number;
  /** names the blob in error messages ("layer 2 of host/repo:tag") */
  what?: string;
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function fileSize(path: string): Promise<number | null> {
  try {
    return (await fsp.stat(path)).size;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}

export class ContentStore {
  readonly blobsDir: string;
  readonly ingestDir: string;

  constructor(readonly root: string) {
    this.blobsDir = join(root, 'blobs');
    this.ingestDir = join(root, 'ingest');
  }

  path(digest: string): string {
    const d = parseDigest(digest);
    return join(this.blobsDir, d.algorithm, d.hex);
  }

  partialPath(digest: string): string {
    const d = parseDigest(digest);
    return join(this.ingestDir, `${d.algorithm}-${d.hex}.partial`);
  }

  async has(digest: string): Promise<boolean> {
    return (await fileSize(this.path(digest))) !== null;
  }

  async size(digest: string): Promise<number | null> {
    return fileSize(this.path(digest));
  }

  async read(digest: string): Promise<Buffer> {
    try {
      return await fsp.readFile(this.path(digest));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new ImageError('NOT_FOUND', `blob ${digest} is not in the content store ${this.blobsDir}; pull the image again`);
      }
      throw e;
    }
  }

  /** Stores bytes already in memory after checking them against `desc`. */
  async putBuffer(desc: Descriptor, data: Buffer): Promise<void> {
    verifyBuffer(desc, data, 'blob');
    const final = this.path(desc.digest);
    if (await this.has(desc.digest)) return;
    await fsp.mkdir(dirname(final), { recursive: true });
    await fsp.mkdir(this.ingestDir, { recursive: true });
    const tmp = join(this.ingestDir, `buf-${randomBytes(8).toString('hex')}.tmp`);
    try {
      const fh = await fsp.open(tmp, 'wx');
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, final);
      await fsyncDir(dirname(final));
    } catch (e) {
      await fsp.unlink(tmp).catch(() => undefined);
      throw e;
    }
  }

  /**
   * Streams a blob into the store, verifying size and digest; resumes from a partial file.
   * On a verification failure the partial file is deleted (its bytes are wrong, resuming from
   * them would fail again); on a retryable stream failure it is kept for the next attempt.
   */
  async ingest(desc: Descriptor, open: BlobOpener, opts: IngestOptions = {}): Promise<void> {
    const d = parseDigest(desc.digest);
    if (!Number.isSafeInteger(desc.size) || desc.size < 0) {
      throw new ImageError('BAD_MANIFEST', `descriptor of ${desc.digest} declares an invalid size ${String(desc.size)}`);
    }
    if (await this.has(desc.digest)) {
      opts.onProgress?.(desc.size);
      return;
    }
    await fsp.mkdir(this.ingestDir, { recursive: true });
    await withFileLock(join(this.ingestDir, `${d.algorithm}-${d.hex}.lock`),
      { what: `the download of ${desc.digest}` }, async () => {
        // Someone else may have finished it while we waited for the lock.
        if (await this.has(desc.digest)) {
          opts.onProgress?.(desc.size);
          return;
        }
        await this.ingestLocked(desc, open, opts);
      });
  }

  private async ingestLocked(desc: Descriptor, open: BlobOpener, opts: IngestOptions): Promise<void> {
    const what = opts.what ?? `blob ${desc.digest}`;
    const partial = this.partialPath(desc.digest);
    const algorithm = parseDigest(desc.digest).algorithm;
    const retries = opts.retries ?? 4;
    let have = (await fileSize(partial)) ?? 0;
    if (have > desc.size) {
      await fsp.truncate(partial, 0);
      have = 0;
    }
    let hasher = newHasher(algorithm);
    if (have > 0) {
      for await (const chunk of createReadStream(partial, { end: have - 1 })) hasher.update(chunk as Buffer);
    }
    opts.onProgress?.(have);
    const fh = await fsp.open(partial, 'a');
    let closed = false;
    const discard = async (): Promise<void> => {
      if (!closed) {
        closed = true;
        await fh.close();
      }
      await fsp.unlink(partial).catch(() => undefined);
    };
    try {
      let truncation: ImageError | undefined;
      for (let attempt = 0; ; attempt++) {
        if (have === desc.size) break;
        // The opener (registry client) retries its own requests; retrying its final failure
        // here too would multiply the attempts. Only a stream that breaks after opening is ours.
        const { stream, offset } = await open(have);
        try {
          if (offset !== have) {
            if (offset !== 0) {
              stream.destroy();
              throw new ImageError('REGISTRY', `${what}: asked for bytes from ${have}, the server sent from ${offset}`);
            }
            // The server ignored Range: start again from zero.
            await fh.truncate(0);
            have = 0;
            hasher = newHasher(algorithm);
          }
          await this.appendStream(fh, stream, desc, what, (n, chunk) => {
            have += n;
            hasher.update(chunk);
            opts.onProgress?.(have);
          }, () => have);
          if (have < desc.size) {
            truncation = new ImageError('SIZE_MISMATCH',
              `${what} is truncated: the server ended it after ${have} of ${desc.size} bytes`);
            throw truncation;
          }
        } catch (e) {
          // A short clean end may be a proxy cutting the stream: retry it from where it stopped.
          // If it persists, the outer handler discards the partial file (its server is at fault).
          const shortEnd = e === truncation;
          const retryable = shortEnd || isImageError(e, 'TIMEOUT')
            || (!(e instanceof ImageError) && (opts.isRetryable?.(e) ?? false));
          if (!retryable || attempt >= retries) throw e;
          await new Promise((r) => setTimeout(r, opts.retryDelayMs?.(attempt) ?? 100 * 2 ** attempt));
        }
      }
      const got = `${algorithm}:${hasher.digest('hex')}`;
      if (got !== desc.digest) {
        throw new ImageError('DIGEST_MISMATCH',
          `${what}: the ${desc.size} bytes received hash to ${got}, not ${desc.digest}; nothing was stored ` +
          '(the registry or something between us and it served wrong content)');
      }
      await fh.sync();
      closed = true;
      await fh.close();
      const final = this.path(desc.digest);
      await fsp.mkdir(dirname(final), { recursive: true });
      await fsp.rename(partial, final);
      await fsyncDir(dirname(final));
    } catch (e) {
      if (e instanceof ImageError && (e.code === 'DIGEST_MISMATCH' || e.code === 'SIZE_MISMATCH')) await discard();
      else if (!closed) {
        closed = true;
        await fh.close();
      }
      throw e;
    }
  }

  private async appendStream(fh: fsp.FileHandle, stream: Readable, desc: Descriptor, what: string,
    took: (n: number, chunk: Buffer) => void, have: () => number): Promise<void> {
    try {
      for await (const c of stream) {
        const chunk = c as Buffer;
        if (have() + chunk.length > desc.size) {
          throw new ImageError('SIZE_MISMATCH',
            `${what} is longer than the ${desc.size} bytes its descriptor declares; nothing was stored`);
        }
        await fh.write(chunk);
        took(chunk.length, chunk);
      }
    } finally {
      stream.destroy();
    }
  }

  async list(): Promise<string[]> {
    const out: string[] = [];
    for (const alg of await fsp.readdir(this.blobsDir).catch(() => [] as string[])) {
      for (const hex of await fsp.readdir(join(this.blobsDir, alg))) out.push(`${alg}:${hex}`);
    }
    return out.sort();
  }

  async delete(digest: string): Promise<boolean> {
    return unlinkIfExists(this.path(digest));
  }

  /** Removes partial downloads; only safe while no pull runs (GC holds the GC lock). */
  async clearIngest(): Promise<number> {
    let n = 0;
    for (const name of await fsp.readdir(this.ingestDir).catch(() => [] as string[])) {
      if (name.endsWith('.lock')) continue;
      await fsp.unlink(join(this.ingestDir, name)).catch(() => undefined);
      n++;
    }
    return n;
  }
}

export function verifyBuffer(desc: Descriptor, data: Buffer, what: string): void {
  if (data.length !== desc.size) {
    throw new ImageError('SIZE_MISMATCH',
      `${what} ${desc.digest} is ${data.length} bytes, its descriptor declares ${desc.size}; nothing was stored`);
  }
  const got = digestOf(data, parseDigest(desc.digest).algorithm);
  if (got !== desc.digest) {
    throw new ImageError('DIGEST_MISMATCH',
      `${what} hashes to ${got}, not ${desc.digest} as its descriptor says; nothing was stored`);
  }
}
