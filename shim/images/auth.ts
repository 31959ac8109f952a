// Registry credentials and the challenge formats of the distribution spec.
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ImageError } from './errors';

export interface Credentials {
  username: string;
  password: string;
}

/** Looks up credentials for a registry host (`host[:port]`). */
export interface CredentialStore {
  get(registry: string): Credentials | undefined;
}

export class StaticCredentials implements CredentialStore {
  constructor(private readonly byRegistry: Record<string, Credentials>) {}
  get(registry: string): Credentials | undefined {
    return this.byRegistry[registry];
  }
}

/** Keys in a Docker config are written as hosts, `host:port`, or URLs (`https://host/v1/`). */
function registryKey(key: string): string {
  return key.replace(/^[a-z]+:\/\//, '').replace(/\/.*$/, '');
}

/**
 * Credentials from a Docker `config.json` (`auths.<host>.auth` = base64 "user:password", or
 * separate username/password fields). Credential helpers (`credsStore`) are not run: vmlet does
 * not execute programs named in a user's config.
 */
export class DockerConfigCredentials implements CredentialStore {
  private readonly byRegistry = new Map<string, Credentials>();

  constructor(readonly path: string, text: string) {
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch (e) {
      throw new ImageError('BAD_CONFIG', `Docker config ${path} is not valid JSON (${(e as Error).message}); fix or remove it`);
    }
    const auths = (doc as { auths?: unknown }).auths;
    if (auths === undefined) return;
    if (typeof auths !== 'object' || auths === null) {
      throw new ImageError('BAD_CONFIG', `Docker config ${path}: "auths" must be an object`);
    }
    for (const [key, v] of Object.entries(auths as Record<string, unknown>)) {
      const entry = (v ?? {}) as { auth?: unknown; username?: unknown; password?: unknown };
      if (typeof entry.auth === 'string' && entry.auth.length > 0) {
        const decoded = Buffer.from(entry.auth, 'base64').toString('utf8');
        const colon = decoded.indexOf(':');
        if (colon < 0) {
          throw new ImageError('BAD_CONFIG',
            `Docker config ${path}: auths["${key}"].auth does not decode to "user:password"; re-run docker login`);
        }
        this.byRegistry.set(registryKey(key), { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) });
      } else if (typeof entry.username === 'string' && typeof entry.password === 'string') {
        this.byRegistry.set(registryKey(key), { username: entry.username, password: entry.password });
      }
    }
  }

  static load(path?: string): DockerConfigCredentials | undefined {
    const file = path ?? join(process.env.DOCKER_CONFIG ?? join(homedir(), '.docker'), 'config.json');
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' && path === undefined) return undefined;
      throw new ImageError('BAD_CONFIG', `cannot read Docker config ${file}: ${(e as Error).message}`);
    }
    return new DockerConfigCredentials(file, text);
  }

  get(registry: string): Credentials | undefined {
    return this.byRegistry.get(registry);
  }
}

export interface Challenge {
  scheme: string; // lower-case: 'bearer', 'basic'
  params: Record<string, string>;
}

/** Parses a `WWW-Authenticate` header: `Bearer realm="...",service="...",scope="..."`. */
export function parseChallenge(header: string): Challenge {
  const m = /^\s*([A-Za-z]+)\s*(.*)$/s.exec(header);
  if (!m) throw new ImageError('REGISTRY', `cannot parse WWW-Authenticate header '${header}'`);
  const params: Record<string, string> = {};
  const re = /\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)/gy;
  const rest = m[2];
  let p: RegExpExecArray | null;
  while (re.lastIndex < rest.length && (p = re.exec(rest)) !== null) {
    params[p[1].toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3];
  }
  return { scheme: m[1].toLowerCase(), params };
}

export function basicAuthorization(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`;
}
