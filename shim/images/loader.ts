// `vmlet load`: images from an OCI image layout directory or a docker-archive tar (the output
// of `docker save` / `skopeo copy ... docker-archive:`), for machines without a registry.
// Everything read is verified exactly as a pull verifies registry content.
import { createReadStream, promises as fsp } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { ImageError } from './errors';
import { digestOf, isDigest, parseDigest } from './digest';
import { ImageService, ImageSource, PullOptions } from './image-service';
import type { BlobOpener, Descriptor } from './content-store';
import type { FetchedManifest } from './distribution';
import { MAX_MANIFEST_BYTES } from './distribution';
import { parseReference, formatReference, ImageReference } from './reference';
import { ImageRecord } from './image-store';
import { INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP } from './mediatypes';

const REF_NAME = 'org.opencontainers.image.ref.name';

export interface LoadOptions extends PullOptions {
  /** repository (host/repo) or full reference the loaded images are recorded under */
  name?: string;
}

function badArchive(path: string, why: string): ImageError {
  return new ImageError('BAD_ARCHIVE',
    `cannot load ${path}: ${why}; vmlet load takes an OCI image layout directory or a docker-archive tar`);
}

/** Loads every image of an OCI layout dir or docker-archive tar; returns their records. */
export async function loadImages(svc: ImageService, path: string, opts: LoadOptions = {}): Promise<ImageRecord[]> {
  let st;
  try {
    st = await fsp.stat(path);
  } catch (e) {
    throw badArchive(path, (e as Error).message);
  }
  return st.isDirectory() ? loadOciLayout(svc, path, opts) : loadDockerArchive(svc, path, opts);
}

/**
 * Turns a name found in an archive into a full reference. Archives name images loosely: OCI
 * layouts by a bare tag ("v1"), docker-archive by "repo:tag"; what they lack comes from --name
 * (a repository, or a full reference with tag) or else from `localhost/<file name>`.
 */
function nameFor(archiveName: string | undefined, opts: LoadOptions, fallbackRepo: string): string {
  let full: ImageReference | undefined;
  if (archiveName !== undefined) {
    try {
      full = parseReference(archiveName);
    } catch {
      full = undefined;
    }
  }
  let repo: string | undefined;
  let tag = 'latest';
  if (full !== undefined) {
    if (opts.name === undefined) return formatReference(full);
    tag = full.tag ?? 'latest';
  } else if (archiveName !== undefined) {
    const colon = archiveName.lastIndexOf(':');
    if (colon > 0 && !archiveName.slice(colon).includes('/')) {
      repo = archiveName.slice(0, colon);
      tag = archiveName.slice(colon + 1);
    } else if (archiveName.includes('/')) {
      repo = archiveName;
    } else {
      tag = archiveName;
    }
  }
  if (opts.name !== undefined) {
    const path = opts.name.slice(opts.name.indexOf('/') + 1);
    if (path.includes(':') || path.includes('@')) return formatReference(parseReference(opts.name));
    return formatReference(parseReference(`${opts.name}:${tag}`));
  }
  return formatReference(parseReference(`localhost/${repo ?? fallbackRepo}:${tag}`));
}

function sanitizeRepo(s: string): string {
  return s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-+|-+$/g, '') || 'image';
}

async function readCapped(path: string, cap: number, what: string): Promise<Buffer> {
  const fh = await fsp.open(path, 'r');
  try {
    const { size } = await fh.stat();
    if (size > cap) throw new ImageError('MANIFEST_TOO_LARGE', `${what} is ${size} bytes; over the ${cap}-byte cap`);
    return await fh.readFile();
  } finally {
    await fh.close();
  }
}

function manifestMediaType(data: Buffer, fallback: string | undefined, what: string): string {
  let doc: { mediaType?: unknown; manifests?: unknown };
  try {
    doc = JSON.parse(data.toString('utf8')) as typeof doc;
  } catch (e) {
    throw new ImageError('BAD_MANIFEST', `${what} is not valid JSON (${(e as Error).message})`);
  }
  const t = typeof doc.mediaType === 'string' ? doc.mediaType : fallback ?? (Array.isArray(doc.manifests) ? OCI_INDEX : OCI_MANIFEST);
  if (!INDEX_TYPES.includes(t) && !MANIFEST_TYPES.includes(t)) {
    throw new ImageError('UNSUPPORTED_MEDIA_TYPE', `${what} has media type '${t}', which vmlet does not load`);
  }
  return t;
}

class OciLayoutSource implements ImageSource {
  readonly retries = 0;
  constructor(readonly name: string, private readonly dir: string) {}

  blobPath(digest: string): string {
    const d = parseDigest(digest);
    return join(this.dir, 'blobs', d.algorithm, d.hex);
  }

  async manifest(selector: string, expected?: Descriptor): Promise<FetchedManifest> {
    if (!isDigest(selector)) throw badArchive(this.dir, `'${selector}' is not a digest`);
    const what = `manifest ${selector} in ${this.dir}`;
    const data = await readCapped(this.blobPath(selector), MAX_MANIFEST_BYTES, what).catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') throw badArchive(this.dir, `blob ${selector} is missing`);
      throw e;
    });
    const digest = digestOf(data, parseDigest(selector).algorithm);
    if (digest !== selector) throw new ImageError('DIGEST_MISMATCH', `${what} hashes to ${digest}; the layout is corrupt`);
    if (expected !== undefined && expected.size !== data.length) {
      throw new ImageError('SIZE_MISMATCH', `${what} is ${data.length} bytes, its descriptor declares ${expected.size}`);
    }
    return { mediaType: manifestMediaType(data, expected?.mediaType, what), digest, data };
  }

  opener(desc: Descriptor): BlobOpener {
    return async (offset) => {
      const p = this.blobPath(desc.digest);
      await fsp.access(p).catch(() => {
        throw badArchive(this.dir, `blob ${desc.digest} is missing`);
      });
      return { stream: createReadStream(p, { start: offset }), offset };
    };
  }

  retryDelay(): number {
    return 0;
  }
}

export async function loadOciLayout(svc: ImageService, dir: string, opts: LoadOptions = {}): Promise<ImageRecord[]> {
  let layout: { imageLayoutVersion?: unknown };
  try {
    layout = JSON.parse(await fsp.readFile(join(dir, 'oci-layout'), 'utf8')) as typeof layout;
  } catch (e) {
    throw badArchive(dir, `no readable oci-layout file (${(e as Error).message})`);
  }
  if (typeof layout.imageLayoutVersion !== 'string') throw badArchive(dir, 'oci-layout has no imageLayoutVersion');
  const indexData = await readCapped(join(dir, 'index.json'), MAX_MANIFEST_BYTES, `${dir}/index.json`)
    .catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') throw badArchive(dir, 'index.json is missing');
      throw e;
    });
  let index: { manifests?: unknown };
  try {
    index = JSON.parse(indexData.toString('utf8')) as typeof index;
  } catch (e) {
    throw badArchive(dir, `index.json is not JSON (${(e as Error).message})`);
  }
  if (!Array.isArray(index.manifests) || index.manifests.length === 0) throw badArchive(dir, 'index.json lists no images');
  const entries = index.manifests as Descriptor[];
  const source = new OciLayoutSource(`OCI layout ${dir}`, dir);
  const fallback = sanitizeRepo(basename(resolve(dir)));
  const unnamed = entries.filter((e) => e.annotations?.[REF_NAME] === undefined);
  if (unnamed.length > 0 && entries.length > 1) {
    throw badArchive(dir, `${unnamed.length} of its ${entries.length} index entries have no ${REF_NAME} annotation, so they cannot be told apart`);
  }
  const out: ImageRecord[] = [];
  for (const e of entries) {
    if (typeof e.digest !== 'string' || !isDigest(e.digest)) throw badArchive(dir, 'an index.json entry has no valid digest');
    const name = nameFor(e.annotations?.[REF_NAME], opts, fallback);
    out.push(await svc.importImage(source, e.digest, name, opts));
  }
  return out;
}

// ---- docker-archive ----

interface TarEntry {
  offset: number;
  size: number;
}

function octal(b: Buffer, start: number, len: number): number {
  const s = b.subarray(start, start + len).toString('latin1').replace(/\0.*$/s, '').trim();
  if (s.length === 0) return 0;
  if (!/^[0-7]+$/.test(s)) throw new Error(`bad octal field '${s}'`);
  return Number.parseInt(s, 8);
}

function cstring(b: Buffer, start: number, len: number): string {
  const s = b.subarray(start, start + len);
  const nul = s.indexOf(0);
  return s.subarray(0, nul < 0 ? s.length : nul).toString('utf8');
}

/** Index of a tar's regular files: name → where its bytes are. Only headers are read. */
async function indexTar(path: string): Promise<Map<string, TarEntry>> {
  const fh = await fsp.open(path, 'r');
  const entries = new Map<string, TarEntry>();
  try {
    const { size: total } = await fh.stat();
    const header = Buffer.alloc(512);
    let pos = 0;
    let longName: string | undefined;
    while (pos + 512 <= total) {
      const { bytesRead } = await fh.read(header, 0, 512, pos);
      if (bytesRead < 512) break;
      if (header.every((x) => x === 0)) break;
      const size = octal(header, 124, 12);
      const type = String.fromCharCode(header[156] || 0x30);
      const data = pos + 512;
      let name = cstring(header, 0, 100);
      const prefix = header.subarray(257, 262).toString('latin1') === 'ustar' ? cstring(header, 345, 155) : '';
      if (prefix) name = `${prefix}/${name}`;
      if (data + size > total) throw new Error(`entry '${name}' runs past the end of the file`);
      if (type === 'x' || type === 'L') {
        if (size > 1024 * 1024) throw new Error(`extended header of ${size} bytes`);
        const body = Buffer.alloc(size);
        await fh.read(body, 0, size, data);
        if (type === 'L') longName = body.toString('utf8').replace(/\0.*$/s, '');
        else {
          const m = /(?:^|\n)\d+ path=([^\n]*)\n/.exec(body.toString('utf8'));
          if (m) longName = m[1];
        }
      } else {
        if (longName !== undefined) name = longName;
        longName = undefined;
        if (type === '0' || type === '\0' || type === '7') entries.set(name.replace(/^\.\//, ''), { offset: data, size });
      }
      pos = data + Math.ceil(size / 512) * 512;
    }
  } finally {
    await fh.close();
  }
  return entries;
}

async function readRange(path: string, e: TarEntry): Promise<Buffer> {
  const fh = await fsp.open(path, 'r');
  try {
    const b = Buffer.alloc(e.size);
    await fh.read(b, 0, e.size, e.offset);
    return b;
  } finally {
    await fh.close();
  }
}

async function hashRange(path: string, e: TarEntry): Promise<{ digest: string; magic: Buffer }> {
  const h = createHash('sha256');
  let magic: Buffer | undefined;
  if (e.size > 0) {
    for await (const c of createReadStream(path, { start: e.offset, end: e.offset + e.size - 1 })) {
      const chunk = c as Buffer;
      magic ??= chunk.subarray(0, 4);
      h.update(chunk);
    }
  }
  return { digest: `sha256:${h.digest('hex')}`, magic: magic ?? Buffer.alloc(0) };
}

class DockerArchiveSource implements ImageSource {
  readonly retries = 0;
  readonly manifests = new Map<string, Buffer>();
  readonly blobs = new Map<string, TarEntry>();
  constructor(readonly name: string, private readonly path: string) {}

  async manifest(selector: string): Promise<FetchedManifest> {
    const data = this.manifests.get(selector);
    if (!data) throw badArchive(this.path, `no manifest ${selector}`);
    return { mediaType: OCI_MANIFEST, digest: selector, data };
  }

  opener(desc: Descriptor): BlobOpener {
    return async (offset) => {
      const e = this.blobs.get(desc.digest);
      if (!e) throw badArchive(this.path, `no blob ${desc.digest}`);
      // An empty range cannot be expressed with start/end (end is inclusive).
      const stream = e.size - offset > 0
        ? createReadStream(this.path, { start: e.offset + offset, end: e.offset + e.size - 1 })
        : Readable.from([]);
      return { stream, offset };
    };
  }

  retryDelay(): number {
    return 0;
  }
}

export async function loadDockerArchive(svc: ImageService, path: string, opts: LoadOptions = {}): Promise<ImageRecord[]> {
  let files: Map<string, TarEntry>;
  try {
    files = await indexTar(path);
  } catch (e) {
    throw badArchive(path, `not a readable tar (${(e as Error).message})`);
  }
  const manifestEntry = files.get('manifest.json');
  if (!manifestEntry) throw badArchive(path, 'it has no manifest.json (an OCI layout must be a directory, not a tar)');
  if (manifestEntry.size > MAX_MANIFEST_BYTES) throw badArchive(path, 'manifest.json is over 4 MiB');
  let doc: unknown;
  try {
    doc = JSON.parse((await readRange(path, manifestEntry)).toString('utf8'));
  } catch (e) {
    throw badArchive(path, `manifest.json is not JSON (${(e as Error).message})`);
  }
  if (!Array.isArray(doc) || doc.length === 0) throw badArchive(path, 'manifest.json lists no images');
  const source = new DockerArchiveSource(`docker-archive ${path}`, path);
  const fallback = sanitizeRepo(basename(path).replace(/\.tar$/, ''));
  const out: ImageRecord[] = [];
  for (const [i, item] of (doc as { Config?: unknown; RepoTags?: unknown; Layers?: unknown }[]).entries()) {
    if (typeof item.Config !== 'string' || !Array.isArray(item.Layers) || item.Layers.some((l) => typeof l !== 'string')) {
      throw badArchive(path, `manifest.json entry ${i} lacks Config or Layers`);
    }
    const find = (name: string): TarEntry => {
      const e = files.get(name);
      if (!e) throw badArchive(path, `manifest.json names '${name}', which the tar does not contain`);
      return e;
    };
    const configEntry = find(item.Config);
    const config = await readRange(path, configEntry);
    const configDigest = digestOf(config);
    source.blobs.set(configDigest, configEntry);
    const layers: Descriptor[] = [];
    for (const l of item.Layers as string[]) {
      const e = find(l);
      const { digest, magic } = await hashRange(path, e);
      source.blobs.set(digest, e);
      const mediaType = magic[0] === 0x1f && magic[1] === 0x8b ? DOCKER_LAYER_GZIP
        : magic.readUInt32LE(0) === 0xfd2fb528 ? OCI_LAYER_ZSTD : OCI_LAYER_TAR;
      layers.push({ mediaType, digest, size: e.size });
    }
    // docker-archive has no manifest of its own: one is made so the image is stored like a pulled one.
    const manifest = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: OCI_MANIFEST,
      config: { mediaType: OCI_CONFIG, digest: configDigest, size: config.length }, layers,
    }));
    const manifestDigest = digestOf(manifest);
    source.manifests.set(manifestDigest, manifest);
    const tags = Array.isArray(item.RepoTags) ? (item.RepoTags as unknown[]).filter((t): t is string => typeof t === 'string') : [];
    const names = tags.length > 0 ? tags : [undefined];
    for (const t of names) out.push(await svc.importImage(source, manifestDigest, nameFor(t, opts, fallback), opts));
  }
  return out;
}
