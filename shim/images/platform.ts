// Platform selection from an image index (OCI index / Docker manifest list).
import { ImageError } from './errors';

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

export const DEFAULT_PLATFORM: Platform = { os: 'linux', architecture: 'amd64' };

export function parsePlatform(s: string): Platform {
  const parts = s.split('/');
  if (parts.length < 2 || parts.length > 3 || parts.some((p) => !/^[a-z0-9_.-]+$/.test(p))) {
    throw new ImageError('BAD_PLATFORM',
      `platform '${s}' is invalid: write it as os/architecture[/variant], e.g. linux/amd64 or linux/arm64/v8`);
  }
  return parts.length === 3
    ? { os: parts[0], architecture: parts[1], variant: parts[2] }
    : { os: parts[0], architecture: parts[1] };
}

export function formatPlatform(p: Platform): string {
  return p.variant ? `${p.os}/${p.architecture}/${p.variant}` : `${p.os}/${p.architecture}`;
}

/** arm64 images often omit the variant that means the same as v8. */
function normalVariant(p: Platform): string | undefined {
  if (p.architecture === 'arm64' && (p.variant === undefined || p.variant === 'v8')) return 'v8';
  return p.variant;
}

/** A wanted platform without a variant matches any variant of that os/architecture. */
export function platformMatches(wanted: Platform, have: Platform): boolean {
  if (wanted.os !== have.os || wanted.architecture !== have.architecture) return false;
  if (wanted.variant === undefined) return true;
  return normalVariant(wanted) === normalVariant(have);
}

export interface PlatformCandidate<T> {
  platform?: Platform;
  item: T;
}

export function selectPlatform<T>(wanted: Platform, candidates: PlatformCandidate<T>[], what: string): T {
  for (const c of candidates) if (c.platform && platformMatches(wanted, c.platform)) return c.item;
  const have = candidates.map((c) => (c.platform ? formatPlatform(c.platform) : '(no platform)')).join(', ');
  throw new ImageError('PLATFORM_NOT_FOUND',
    `${what} has no manifest for platform ${formatPlatform(wanted)} (it has: ${have || 'nothing'}); ` +
    'pick one of those with --platform');
}
