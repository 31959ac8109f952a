// Layer blob -> squashfs: the typed face of the addon's converter
// (native/src/image). Callers (the image store, `vmlet pull`/`load`) hand it
// a blob path and get the diff-id computed on the way, so a layer is read once.
import { loadAddon } from './addon';

export type LayerCompression = 'gzip' | 'zstd' | 'none' | 'auto'; // auto: sniff magic bytes

export interface LayerLimits {
  /** Uncompressed tar bytes, and separately the bytes the files expand to (sparse files at full size). */
  maxBytes: number;
  maxEntries: number;
  maxPathLength?: number;
}

export interface LayerConversion {
  diffId: string; // 'sha256:<hex>' of the uncompressed tar stream, computed while converting
  entries: number; // tar entries consumed
  tarBytes: number; // uncompressed bytes
  squashfsBytes: number; // size of the output image
}

export interface ConvertLayerOptions {
  compression?: LayerCompression;
  limits?: Partial<LayerLimits>;
  /** squashfs data block size: a power of two from 4 KiB to 1 MiB; default 128 KiB. */
  blockSize?: number;
  /** zstd compression threads; default one per CPU. The output does not depend on it. */
  workers?: number;
  /** zstd level 1-22; default libsquashfs' 15 (as tar2sqfs and mksquashfs). Lower is much faster, a few % larger. */
  level?: number;
}

export const DEFAULT_LAYER_LIMITS: Readonly<Required<LayerLimits>> = Object.freeze({
  maxBytes: 64 * 2 ** 30,
  maxEntries: 2_000_000,
  maxPathLength: 4096,
});

/** A layer that could not be converted; `message` names the entry and what is wrong with it. */
export class ImageError extends Error {
  override name = 'ImageError';
  constructor(
    message: string,
    readonly op?: string,
    readonly code?: string,
  ) {
    super(message);
  }
}

interface NativeLayerBinding {
  convertLayer(
    input: string,
    output: string,
    options: {
      compression?: string;
      maxBytes?: number;
      maxEntries?: number;
      maxPathLength?: number;
      blockSize?: number;
      workers?: number;
      level?: number;
    },
  ): Promise<LayerConversion>;
}

interface NativeError {
  name?: string;
  message?: string;
  op?: string;
  code?: string;
}

function addon(): NativeLayerBinding {
  return loadAddon<NativeLayerBinding>((message) => new ImageError(message));
}

const COMPRESSIONS: readonly LayerCompression[] = ['gzip', 'zstd', 'none', 'auto'];

function checkCount(name: string, v: number | undefined): void {
  if (v === undefined) return;
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new ImageError(`convertLayer: ${name} must be a non-negative integer, got ${String(v)}`);
  }
}

/** Streams a (compressed) layer tar straight into a squashfs image at `output` (written to a temp
 *  file beside it and renamed only on success; nothing is left behind on failure). Runs off the event
 *  loop. Throws ImageError with a message naming the entry and what is wrong. */
export async function convertLayer(input: string, output: string, opts: ConvertLayerOptions = {}): Promise<LayerConversion> {
  const compression = opts.compression ?? 'auto';
  if (!COMPRESSIONS.includes(compression)) {
    throw new ImageError(`convertLayer: compression must be one of ${COMPRESSIONS.join(', ')}, got ${String(compression)}`);
  }
  const limits = { ...DEFAULT_LAYER_LIMITS, ...opts.limits };
  checkCount('limits.maxBytes', limits.maxBytes);
  checkCount('limits.maxEntries', limits.maxEntries);
  checkCount('limits.maxPathLength', limits.maxPathLength);
  checkCount('blockSize', opts.blockSize);
  checkCount('workers', opts.workers);
  checkCount('level', opts.level);
  try {
    return await addon().convertLayer(input, output, {
      compression,
      maxBytes: limits.maxBytes,
      maxEntries: limits.maxEntries,
      maxPathLength: limits.maxPathLength,
      blockSize: opts.blockSize,
      workers: opts.workers,
      level: opts.level,
    });
  } catch (e) {
    const n = e as NativeError;
    if (typeof n?.message === 'string') throw new ImageError(n.message, n.op, n.code);
    throw e;
  }
}
