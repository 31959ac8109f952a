// Content digests (`algorithm:hex`), the only names content has in the stores.
import { createHash, Hash } from 'node:crypto';
import { ImageError } from './errors';

export type DigestAlgorithm = 'sha256' | 'sha512';

const HEX_LENGTH: Record<DigestAlgorithm, number> = { sha256: 64, sha512: 128 };

export interface ParsedDigest {
  algorithm: DigestAlgorithm;
  hex: string;
}

/** Parses and validates a digest; the hex part becomes a file name, so it is checked strictly. */
export function parseDigest(digest: string, what = 'digest'): ParsedDigest {
  const m = /^([a-z0-9]+):([a-f0-9]+)$/.exec(digest);
  if (!m || !(m[1] in HEX_LENGTH) || m[2].length !== HEX_LENGTH[m[1] as DigestAlgorithm]) {
    throw new ImageError('BAD_MANIFEST',
      `${what} '${digest}' is not a valid digest: expected sha256:<64 hex> or sha512:<128 hex>`);
  }
  return { algorithm: m[1] as DigestAlgorithm, hex: m[2] };
}

export function isDigest(s: string): boolean {
  try {
    parseDigest(s);
    return true;
  } catch {
    return false;
  }
}

export function newHasher(algorithm: DigestAlgorithm): Hash {
  return createHash(algorithm);
}

export function digestOf(data: Buffer | string, algorithm: DigestAlgorithm = 'sha256'): string {
  return `${algorithm}:${createHash(algorithm).update(data).digest('hex')}`;
}
