// Image store: reference → manifest digest → config, one JSON record per reference under
// <root>/images, named by the SHA-256 of the reference (a reference may be far longer than a
// file name may be, and may hold characters a file name should not). Records are written with temp + fsync + rename, so a reader sees the old
// record or the new one, never a mix; two pulls of the same reference simply race to the
// same content.
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { randomBytes, createHash } from 'node:crypto';
import { ImageError } from './errors';
import { Platform } from './platform';
import { unlinkIfExists } from './fs';

export interface ImageLayer {
  /** digest of the (compressed) blob in the content store */
  digest: string;
  mediaType: string;
  size: number;
  /** digest of the uncompressed tar: names the squashfs in the layer store */
  diffId: string;
}

/** What `vmlet run` needs from the image config. */
export interface RuntimeConfig {
  entrypoint?: string[];
  cmd?: string[];
  env: string[];
  workingDir?: string;
  user?: string;
}

export interface ImageRecord {
  reference: string;
  manifestDigest: string;
  manifestMediaType: string;
  /** the index the manifest was selected from, when the reference named an index */
  indexDigest?: string;
  platform: Platform;
  configDigest: string;
  layers: ImageLayer[];
  config: RuntimeConfig;
  /** config's `created`, if any */
  created?: string;
  storedAt: string;
}

export class ImageStore {
  readonly dir: string;

  constructor(readonly root: string) {
    this.dir = join(root, 'images');
  }

  private file(reference: string): string {
    return join(this.dir, `${createHash('sha256').update(reference).digest('hex')}.json`);
  }

  async put(record: ImageRecord): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true });
    const tmp = join(this.dir, `.${randomBytes(8).toString('hex')}.tmp`);
    try {
      const fh = await fsp.open(tmp, 'wx');
      try {
        await fh.writeFile(`${JSON.stringify(record, null, 2)}\n`);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, this.file(record.reference));
    } catch (e) {
      await fsp.unlink(tmp).catch(() => undefined);
      throw e;
    }
  }

  private async readRecord(path: string): Promise<ImageRecord | undefined> {
    try {
      return JSON.parse(await fsp.readFile(path, 'utf8')) as ImageRecord;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new ImageError('BAD_CONFIG', `image record ${path} is unreadable (${(e as Error).message}); delete that file`);
    }
  }

  async get(reference: string): Promise<ImageRecord | undefined> {
    return this.readRecord(this.file(reference));
  }

  async list(): Promise<ImageRecord[]> {
    const out: ImageRecord[] = [];
    for (const name of await fsp.readdir(this.dir).catch(() => [] as string[])) {
      if (!name.endsWith('.json') || name.startsWith('.')) continue;
      const rec = await this.readRecord(join(this.dir, name));
      if (rec) out.push(rec);
    }
    return out.sort((a, b) => a.reference.localeCompare(b.reference));
  }

  async remove(reference: string): Promise<boolean> {
    return unlinkIfExists(this.file(reference));
  }

  /** A reference, or a manifest digest (or a unique prefix of its hex of ≥ 12 characters). */
  async resolve(nameOrDigest: string): Promise<ImageRecord[]> {
    const exact = await this.get(nameOrDigest);
    if (exact) return [exact];
    const all = await this.list();
    const hex = nameOrDigest.replace(/^sha256:/, '');
    if (/^[a-f0-9]{12,64}$/.test(hex)) {
      return all.filter((r) => r.manifestDigest.slice('sha256:'.length).startsWith(hex));
    }
    return [];
  }
}
