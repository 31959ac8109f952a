// Image references: `host[:port]/path[:tag][@digest]`.
//
// vmlet has no implicit default registry: a reference must name its registry host,
// so nothing is ever fetched from a place the user did not write down.
import { ImageError } from './errors';
import { parseDigest } from './digest';

export interface ImageReference {
  /** registry host with optional port, as written (`127.0.0.1:5000`, `registry.example:443`) */
  registry: string;
  /** repository path inside the registry (`library/busybox`) */
  repository: string;
  tag?: string;
  digest?: string;
}

const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const HOST = /^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$/;

function bad(ref: string, why: string): ImageError {
  return new ImageError('BAD_REFERENCE',
    `image reference '${ref}' is invalid: ${why}; write it as host[:port]/repository[:tag][@sha256:<hex>]`);
}

export function parseReference(ref: string): ImageReference {
  if (ref.length === 0 || ref.length > 4096) throw bad(ref, 'empty or longer than 4096 characters');
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    try {
      parseDigest(digest);
    } catch {
      throw bad(ref, `'${digest}' is not a sha256/sha512 digest`);
    }
  }
  const slash = rest.indexOf('/');
  if (slash < 0) throw bad(ref, 'it names no registry host (vmlet has no default registry)');
  const registry = rest.slice(0, slash);
  let path = rest.slice(slash + 1);
  const looksLikeHost = registry.includes('.') || registry.includes(':') || registry === 'localhost';
  if (!looksLikeHost) {
    throw bad(ref, `it names no registry host ('${registry}' has no '.', no ':port' and is not 'localhost'; vmlet has no default registry)`);
  }
  if (!HOST.test(registry)) throw bad(ref, `'${registry}' is not a valid host[:port]`);
  let tag: string | undefined;
  const colon = path.lastIndexOf(':');
  if (colon >= 0) {
    tag = path.slice(colon + 1);
    path = path.slice(0, colon);
    if (!TAG.test(tag)) throw bad(ref, `tag '${tag}' has characters outside [A-Za-z0-9_.-] or is too long`);
  }
  if (path.length === 0) throw bad(ref, 'the repository path is empty');
  for (const c of path.split('/')) {
    if (!PATH_COMPONENT.test(c)) {
      throw bad(ref, `repository component '${c}' must be lowercase letters, digits and single separators`);
    }
  }
  if (tag === undefined && digest === undefined) tag = 'latest';
  return { registry, repository: path, tag, digest };
}

export function formatReference(r: ImageReference): string {
  let s = `${r.registry}/${r.repository}`;
  if (r.tag !== undefined) s += `:${r.tag}`;
  if (r.digest !== undefined) s += `@${r.digest}`;
  return s;
}

/** The tag or digest a manifest request asks for; a digest wins because it pins content. */
export function manifestSelector(r: ImageReference): string {
  return r.digest ?? r.tag ?? 'latest';
}

export function isLoopbackHost(registry: string): boolean {
  const host = registry.startsWith('[') ? registry.slice(1, registry.indexOf(']')) : registry.split(':')[0];
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}
