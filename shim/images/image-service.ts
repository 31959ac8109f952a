// The image service: pull (registry) and import (local archives) into one root's stores,
// image listing, removal and garbage collection. CLI and CRI both go through this class.
//
// Root layout (all of it under one directory, `/var/lib/vmlet` by default):
//   blobs/<alg>/<hex>          content store (manifests, configs, layer blobs), verified
//   ingest/                    partial downloads + per-digest locks (resumable)
//   layers/<alg>/<hex>.sqfs    layer store, by diff-id
//   images/<ref>.json          image store
//   leases/, gc.lock           pull-vs-GC coordination (see lock.ts)
import { join } from 'node:path';
import { ContentStore, Descriptor, BlobOpener } from './content-store';
import { ImageStore, ImageRecord, ImageLayer } from './image-store';
import { LayerStore, LayerConverter, LayerConverterOptions } from './layer-store';
import { RegistryClient, RegistryClientOptions, FetchedManifest, isRetryableNetworkError } from './distribution';
import { parseReference, formatReference, manifestSelector, ImageReference } from './reference';
import { Platform, DEFAULT_PLATFORM, formatPlatform, platformMatches, selectPlatform } from './platform';
import { parseIndex, parseManifest, parseConfig, configPlatform } from './manifest';
import { INDEX_TYPES } from './mediatypes';
import { ImageError } from './errors';
import { Lease, acquireGcLock } from './lock';
import { imagesLog } from './log';
import { loadConverter } from './converter';

const MAX_CONFIG_BYTES = 8 * 1024 * 1024;

import { defaultRoot } from './root';
export { DEFAULT_ROOT, defaultRoot } from './root';

export type PullProgress =
  | { kind: 'resolved'; reference: string; manifestDigest: string; layers: Descriptor[] }
  | { kind: 'layer'; index: number; digest: string; phase: 'downloading' | 'converting' | 'done'; bytes: number; total: number };

/** Where an image's manifests and blobs come from: a registry, an OCI layout, a docker archive. */
export interface ImageSource {
  readonly name: string;
  manifest(selector: string, expected?: Descriptor): Promise<FetchedManifest>;
  opener(desc: Descriptor): BlobOpener;
  readonly retries: number;
  retryDelay(attempt: number): number;
}

class RegistrySource implements ImageSource {
  readonly name: string;
  constructor(private readonly client: RegistryClient, private readonly ref: ImageReference) {
    this.name = `${ref.registry}/${ref.repository}`;
  }
  manifest(selector: string, expected?: Descriptor): Promise<FetchedManifest> {
    return this.client.getManifest(this.ref, selector, expected);
  }
  opener(desc: Descriptor): BlobOpener {
    return (offset) => this.client.openBlob(this.ref, desc.digest, offset);
  }
  get retries(): number {
    return this.client.retryCount;
  }
  retryDelay(attempt: number): number {
    return this.client.retryDelay(attempt);
  }
}

export interface ImageServiceOptions {
  root?: string;
  registry?: RegistryClientOptions;
  /** the layer → squashfs converter; defaults to the native addon's convertLayer */
  converter?: LayerConverter;
  layerLimits?: LayerConverterOptions['limits'];
  /** layers downloaded and converted at once */
  parallelLayers?: number;
}

export interface PullOptions {
  platform?: Platform;
  onProgress?: (p: PullProgress) => void;
}

export interface GcResult {
  blobs: string[];
  layers: string[];
}

async function forEachLimited<T>(items: T[], limit: number, fn: (item: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: unknown;
  const worker = async (): Promise<void> => {
    while (failed === undefined && next < items.length) {
      const i = next++;
      try {
        await fn(items[i], i);
      } catch (e) {
        failed ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failed !== undefined) throw failed;
}

export class ImageService {
  readonly root: string;
  readonly content: ContentStore;
  readonly images: ImageStore;
  readonly layers: LayerStore;
  private readonly parallel: number;

  constructor(private readonly opts: ImageServiceOptions = {}) {
    this.root = opts.root ?? defaultRoot();
    this.content = new ContentStore(this.root);
    this.images = new ImageStore(this.root);
    this.layers = new LayerStore(this.root, opts.converter ?? loadConverter(), opts.layerLimits);
    this.parallel = opts.parallelLayers ?? 3;
  }

  /** Pulls `reference` (host/repo[:tag][@digest]) from its registry. */
  async pull(reference: string, opts: PullOptions = {}): Promise<ImageRecord> {
    const ref = parseReference(reference);
    const client = new RegistryClient(this.opts.registry);
    try {
      return await this.importImage(new RegistrySource(client, ref), manifestSelector(ref), formatReference(ref), opts);
    } finally {
      client.close();
    }
  }

  /**
   * Fetches `selector` from `source`, resolves an index to one platform, stores config and
   * layers (verified), converts layers and records the image as `name`. The record is written
   * last: until then nothing refers to the new content and GC may reclaim it.
   */
  async importImage(source: ImageSource, selector: string, name: string, opts: PullOptions = {}): Promise<ImageRecord> {
    const wanted = opts.platform ?? DEFAULT_PLATFORM;
    const lease = await Lease.take(this.root);
    try {
      const top = await source.manifest(selector);
      const toStore: FetchedManifest[] = [top];
      let manifestFetched = top;
      let indexDigest: string | undefined;
      if (INDEX_TYPES.includes(top.mediaType)) {
        const index = parseIndex(top.data, top.mediaType, `index ${selector} of ${source.name}`);
        const chosen = selectPlatform(wanted, index.manifests.map((d) => ({ platform: d.platform, item: d })),
          `index ${selector} of ${source.name}`);
        indexDigest = top.digest;
        manifestFetched = await source.manifest(chosen.digest, chosen);
        if (INDEX_TYPES.includes(manifestFetched.mediaType)) {
          throw new ImageError('BAD_MANIFEST', `index ${selector} of ${source.name} points at another index for ${formatPlatform(wanted)}; nested indexes are not supported`);
        }
        toStore.push(manifestFetched);
      }
      const what = `image ${name}`;
      const manifest = parseManifest(manifestFetched.data, manifestFetched.mediaType, `manifest ${manifestFetched.digest} of ${source.name}`);
      opts.onProgress?.({ kind: 'resolved', reference: name, manifestDigest: manifestFetched.digest, layers: manifest.layers });

      if (manifest.config.size > MAX_CONFIG_BYTES) {
        throw new ImageError('BAD_CONFIG', `${what}: config blob declares ${manifest.config.size} bytes; configs over 8 MiB are refused`);
      }
      await this.content.ingest(manifest.config, source.opener(manifest.config), this.ingestOptions(source, `config of ${what}`));
      const config = parseConfig(await this.content.read(manifest.config.digest), `config ${manifest.config.digest} of ${what}`);
      const platform = configPlatform(config) ?? wanted;
      if (!platformMatches(wanted, platform)) {
        throw new ImageError('PLATFORM_NOT_FOUND',
          `${what} is for ${formatPlatform(platform)}, not ${formatPlatform(wanted)}; pass --platform ${formatPlatform(platform)} to pull it anyway`);
      }
      if (config.diffIds.length !== manifest.layers.length) {
        throw new ImageError('BAD_CONFIG',
          `${what}: the manifest lists ${manifest.layers.length} layers but the config's rootfs.diff_ids has ${config.diffIds.length}; the image is inconsistent`);
      }

      const layers: ImageLayer[] = manifest.layers.map((l, i) => ({ digest: l.digest, mediaType: l.mediaType, size: l.size, diffId: config.diffIds[i] }));
      await forEachLimited(manifest.layers, this.parallel, async (desc, i) => {
        const layerWhat = `layer ${i + 1}/${manifest.layers.length} of ${what}`;
        const progress = (phase: 'downloading' | 'converting' | 'done', bytes: number): void =>
          opts.onProgress?.({ kind: 'layer', index: i, digest: desc.digest, phase, bytes, total: desc.size });
        if (await this.layers.has(config.diffIds[i])) {
          progress('done', desc.size);
          return;
        }
        await this.content.ingest(desc, source.opener(desc),
          { ...this.ingestOptions(source, layerWhat), onProgress: (b) => progress('downloading', b) });
        progress('converting', desc.size);
        const result = await this.layers.ensure(this.content.path(desc.digest), desc, config.diffIds[i], layerWhat);
        if (result) imagesLog.debug(`${layerWhat}: ${result.entries} entries, ${result.tarBytes} tar bytes → ${result.squashfsBytes} squashfs bytes`);
        progress('done', desc.size);
      });

      for (const m of toStore) {
        await this.content.putBuffer({ mediaType: m.mediaType, digest: m.digest, size: m.data.length }, m.data);
      }
      const record: ImageRecord = {
        reference: name,
        manifestDigest: manifestFetched.digest,
        manifestMediaType: manifestFetched.mediaType,
        ...(indexDigest ? { indexDigest } : {}),
        platform,
        configDigest: manifest.config.digest,
        layers,
        config: config.runtime,
        ...(config.created ? { created: config.created } : {}),
        storedAt: new Date().toISOString(),
      };
      await this.images.put(record);
      return record;
    } finally {
      await lease.release();
    }
  }

  private ingestOptions(source: ImageSource, what: string): { what: string; retries: number; isRetryable: (e: unknown) => boolean; retryDelayMs: (a: number) => number } {
    return { what, retries: source.retries, isRetryable: isRetryableNetworkError, retryDelayMs: (a) => source.retryDelay(a) };
  }

  async list(): Promise<ImageRecord[]> {
    return this.images.list();
  }

  /** Looks an image up by reference or manifest digest (prefix); errors if absent or ambiguous. */
  async get(nameOrDigest: string): Promise<ImageRecord> {
    const found = await this.images.resolve(nameOrDigest);
    if (found.length === 0) {
      throw new ImageError('NOT_FOUND', `no image '${nameOrDigest}' in ${this.root}; see vmlet images, or pull it first`);
    }
    if (found.length > 1) {
      throw new ImageError('NOT_FOUND',
        `'${nameOrDigest}' names ${found.length} images (${found.map((r) => r.reference).join(', ')}); use the full reference`);
    }
    return found[0];
  }

  /** Removes image records; their content stays until gc() (shared layers stay regardless). */
  async remove(nameOrDigest: string): Promise<ImageRecord[]> {
    const found = await this.images.resolve(nameOrDigest);
    if (found.length === 0) {
      throw new ImageError('NOT_FOUND', `no image '${nameOrDigest}' in ${this.root}; see vmlet images`);
    }
    for (const r of found) await this.images.remove(r.reference);
    return found;
  }

  /** Deletes every blob and layer no image record refers to, and leftovers of dead pulls. */
  async gc(): Promise<GcResult> {
    const lock = await acquireGcLock(this.root);
    try {
      const blobs = new Set<string>();
      const diffIds = new Set<string>();
      for (const r of await this.images.list()) {
        if (r.indexDigest) blobs.add(r.indexDigest);
        blobs.add(r.manifestDigest);
        blobs.add(r.configDigest);
        for (const l of r.layers) {
          blobs.add(l.digest);
          diffIds.add(l.diffId);
        }
      }
      const result: GcResult = { blobs: [], layers: [] };
      for (const d of await this.content.list()) {
        if (!blobs.has(d) && (await this.content.delete(d))) result.blobs.push(d);
      }
      for (const d of await this.layers.list()) {
        if (!diffIds.has(d) && (await this.layers.delete(d))) result.layers.push(d);
      }
      await this.content.clearIngest();
      await this.layers.clearStaging();
      return result;
    } finally {
      await lock.release();
    }
  }

  /**
   * What a VM needs to run an image: its squashfs layers bottom to top (for overlayfs lowerdirs,
   * topmost last) and the runtime config. Fails if a layer went missing from the store.
   */
  async rootfs(nameOrDigest: string): Promise<{ image: ImageRecord; layers: string[] }> {
    const image = await this.get(nameOrDigest);
    const layers: string[] = [];
    for (const l of image.layers) {
      if (!(await this.layers.has(l.diffId))) {
        throw new ImageError('NOT_FOUND', `layer ${l.diffId} of ${image.reference} is missing from ${this.layers.dir}; pull the image again`);
      }
      layers.push(this.layers.path(l.diffId));
    }
    return { image, layers };
  }

  layerPath(diffId: string): string {
    return this.layers.path(diffId);
  }

  blobPath(digest: string): string {
    return this.content.path(digest);
  }

  get leasesDir(): string {
    return join(this.root, 'leases');
  }
}
