// Layer store: one squashfs per layer diff-id under <root>/layers/<alg>/<hex>.sqfs, shared by
// every image that uses the layer.
//
// A layer is converted into <root>/layers/staging and moved to its diff-id name only after the
// diff-id the converter computed equals the one the image config declares; a layer whose tar
// does not match its config never gets a name another image could pick up.
import { promises as fsp } from 'node:fs';
import { join, dirname } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ImageError, errorMessage } from './errors';
import { parseDigest } from './digest';
import { withFileLock } from './lock';
import { layerCompression } from './mediatypes';
import type { Descriptor } from './content-store';
import { unlinkIfExists } from './fs';

export interface LayerConversionResult {
  diffId: string;
  entries: number;
  tarBytes: number;
  squashfsBytes: number;
}

export interface LayerConverterOptions {
  compression?: 'gzip' | 'zstd' | 'none' | 'auto';
  limits?: { maxBytes?: number; maxEntries?: number; maxPathLength?: number };
  blockSize?: number;
}

/** The shape of `convertLayer` in native/ts/layer.ts. */
export type LayerConverter = (input: string, output: string, opts?: LayerConverterOptions) => Promise<LayerConversionResult>;

export class LayerStore {
  readonly dir: string;

  constructor(readonly root: string, private readonly converter: LayerConverter,
    private readonly limits?: LayerConverterOptions['limits']) {
    this.dir = join(root, 'layers');
  }

  path(diffId: string): string {
    const d = parseDigest(diffId, 'layer diff-id');
    return join(this.dir, d.algorithm, `${d.hex}.sqfs`);
  }

  async has(diffId: string): Promise<boolean> {
    try {
      await fsp.access(this.path(diffId));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Makes sure the squashfs of `diffId` exists, converting `blobPath` if needed.
   * Returns the conversion figures, or null when the layer was already there.
   */
  async ensure(blobPath: string, desc: Descriptor, diffId: string, what: string): Promise<LayerConversionResult | null> {
    const final = this.path(diffId);
    if (await this.has(diffId)) return null;
    const locks = join(this.dir, 'locks');
    const staging = join(this.dir, 'staging');
    await fsp.mkdir(locks, { recursive: true });
    await fsp.mkdir(staging, { recursive: true });
    return withFileLock(join(locks, `${parseDigest(diffId).hex}.lock`), { what: `the conversion of layer ${diffId}` }, async () => {
      if (await this.has(diffId)) return null;
      const out = join(staging, `${randomBytes(8).toString('hex')}.sqfs`);
      let result: LayerConversionResult;
      try {
        result = await this.converter(blobPath, out, { compression: layerCompression(desc.mediaType), limits: this.limits });
      } catch (e) {
        await fsp.unlink(out).catch(() => undefined);
        if (e instanceof ImageError && e.code === 'UNIMPLEMENTED') throw e;
        throw new ImageError('LAYER_CONVERSION',
          `${what} (blob ${desc.digest}, ${desc.mediaType}) cannot be turned into a squashfs: ${errorMessage(e)}; nothing was stored`,
          { cause: e });
      }
      if (result.diffId !== diffId) {
        await fsp.unlink(out).catch(() => undefined);
        throw new ImageError('DIFF_ID_MISMATCH',
          `${what} (blob ${desc.digest}) unpacks to a tar with diff-id ${result.diffId}, but the image config says ${diffId}; ` +
          'the image is inconsistent and was not stored');
      }
      await fsp.mkdir(dirname(final), { recursive: true });
      await fsp.rename(out, final);
      return result;
    });
  }

  async list(): Promise<string[]> {
    const out: string[] = [];
    for (const alg of await fsp.readdir(this.dir).catch(() => [] as string[])) {
      if (alg === 'locks' || alg === 'staging') continue;
      for (const name of await fsp.readdir(join(this.dir, alg))) {
        if (name.endsWith('.sqfs')) out.push(`${alg}:${name.slice(0, -'.sqfs'.length)}`);
      }
    }
    return out.sort();
  }

  async delete(diffId: string): Promise<boolean> {
    return unlinkIfExists(this.path(diffId));
  }

  /** Leftovers of conversions that died with their process; only safe under the GC lock. */
  async clearStaging(): Promise<number> {
    const dir = join(this.dir, 'staging');
    let n = 0;
    for (const name of await fsp.readdir(dir).catch(() => [] as string[])) {
      await fsp.unlink(join(dir, name)).catch(() => undefined);
      n++;
    }
    return n;
  }
}
