// Structural checks of manifests, indexes and image configs: whatever a registry sends is
// validated here before a single field of it is trusted.
import { ImageError } from './errors';
import { parseDigest } from './digest';
import { INDEX_TYPES, MANIFEST_TYPES, CONFIG_TYPES } from './mediatypes';
import type { Descriptor } from './content-store';
import type { Platform } from './platform';
import type { RuntimeConfig } from './image-store';

export interface ImageManifest {
  mediaType: string;
  config: Descriptor;
  layers: Descriptor[];
}

export interface ImageIndex {
  mediaType: string;
  manifests: Descriptor[];
}

export interface ImageConfig {
  os?: string;
  architecture?: string;
  variant?: string;
  created?: string;
  diffIds: string[];
  runtime: RuntimeConfig;
}

function parseJson(data: Buffer, what: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(data.toString('utf8'));
  } catch (e) {
    throw new ImageError('BAD_MANIFEST', `${what} is not valid JSON (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ImageError('BAD_MANIFEST', `${what} is not a JSON object`);
  return v as Record<string, unknown>;
}

function descriptor(v: unknown, what: string): Descriptor {
  const o = (typeof v === 'object' && v !== null ? v : {}) as Record<string, unknown>;
  if (typeof o.mediaType !== 'string' || typeof o.digest !== 'string' || typeof o.size !== 'number'
    || !Number.isSafeInteger(o.size) || o.size < 0) {
    throw new ImageError('BAD_MANIFEST', `${what} is not a descriptor with mediaType, digest and a non-negative integer size`);
  }
  parseDigest(o.digest, `${what} digest`);
  const d: Descriptor = { mediaType: o.mediaType, digest: o.digest, size: o.size };
  const p = o.platform as Record<string, unknown> | undefined;
  if (p && typeof p.os === 'string' && typeof p.architecture === 'string') {
    d.platform = { os: p.os, architecture: p.architecture, ...(typeof p.variant === 'string' ? { variant: p.variant } : {}) };
  }
  if (typeof o.annotations === 'object' && o.annotations !== null) d.annotations = o.annotations as Record<string, string>;
  return d;
}

export function parseIndex(data: Buffer, mediaType: string, what: string): ImageIndex {
  if (!INDEX_TYPES.includes(mediaType)) throw new ImageError('UNSUPPORTED_MEDIA_TYPE', `${what} has media type ${mediaType}, not an index`);
  const o = parseJson(data, what);
  if (!Array.isArray(o.manifests)) throw new ImageError('BAD_MANIFEST', `${what} has no "manifests" array`);
  return { mediaType, manifests: o.manifests.map((m, i) => descriptor(m, `${what} manifests[${i}]`)) };
}

export function parseManifest(data: Buffer, mediaType: string, what: string): ImageManifest {
  if (!MANIFEST_TYPES.includes(mediaType)) {
    throw new ImageError('UNSUPPORTED_MEDIA_TYPE', `${what} has media type ${mediaType}, not an image manifest`);
  }
  const o = parseJson(data, what);
  if (o.schemaVersion !== 2) throw new ImageError('BAD_MANIFEST', `${what} has schemaVersion ${String(o.schemaVersion)}, expected 2`);
  const config = descriptor(o.config, `${what} config`);
  if (!CONFIG_TYPES.includes(config.mediaType)) {
    throw new ImageError('UNSUPPORTED_MEDIA_TYPE',
      `${what}: config media type ${config.mediaType} is not an image config (${CONFIG_TYPES.join(', ')}); it is not a container image`);
  }
  if (!Array.isArray(o.layers)) throw new ImageError('BAD_MANIFEST', `${what} has no "layers" array`);
  return { mediaType, config, layers: o.layers.map((l, i) => descriptor(l, `${what} layers[${i}]`)) };
}

function strings(v: unknown, what: string): string[] | undefined {
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || v.some((s) => typeof s !== 'string')) throw new ImageError('BAD_CONFIG', `${what} must be a list of strings`);
  return v as string[];
}

export function parseConfig(data: Buffer, what: string): ImageConfig {
  let o: Record<string, unknown>;
  try {
    o = parseJson(data, what);
  } catch (e) {
    throw new ImageError('BAD_CONFIG', (e as Error).message);
  }
  const rootfs = o.rootfs as { type?: unknown; diff_ids?: unknown } | undefined;
  if (!rootfs || rootfs.type !== 'layers') throw new ImageError('BAD_CONFIG', `${what} has no rootfs of type "layers"`);
  const diffIds = strings(rootfs.diff_ids, `${what} rootfs.diff_ids`) ?? [];
  for (const d of diffIds) parseDigest(d, `${what} diff-id`);
  const c = (o.config ?? {}) as Record<string, unknown>;
  const str = (v: unknown): string | undefined => (typeof v === 'string' && v.length > 0 ? v : undefined);
  return {
    os: str(o.os),
    architecture: str(o.architecture),
    variant: str(o.variant),
    created: str(o.created),
    diffIds,
    runtime: {
      entrypoint: strings(c.Entrypoint, `${what} config.Entrypoint`),
      cmd: strings(c.Cmd, `${what} config.Cmd`),
      env: strings(c.Env, `${what} config.Env`) ?? [],
      workingDir: str(c.WorkingDir),
      user: str(c.User),
    },
  };
}

export function configPlatform(c: ImageConfig): Platform | undefined {
  if (!c.os || !c.architecture) return undefined;
  return c.variant ? { os: c.os, architecture: c.architecture, variant: c.variant } : { os: c.os, architecture: c.architecture };
}
