// Client of the OCI distribution (registry HTTP API v2): manifests, blobs, auth.
//
// Hazards handled here rather than left to callers:
//  - a registry that stops answering: every request has an idle timeout that also covers
//    the body, so a stalled blob download ends as TIMEOUT instead of hanging a pull;
//  - 5xx, 429 and connection failures are retried with exponential backoff;
//  - redirects (blob storage behind a CDN) are followed, and credentials are never sent to a
//    host other than the registry's;
//  - manifests are read with a 4 MiB cap before any parsing, so a hostile registry cannot make
//    us buffer an unbounded body.
import http, { IncomingMessage, OutgoingHttpHeaders } from 'node:http';
import https from 'node:https';
import { Readable } from 'node:stream';
import { ImageError, isImageError } from './errors';
import { Credentials, CredentialStore, parseChallenge, basicAuthorization } from './auth';
import { ImageReference, isLoopbackHost, formatReference } from './reference';
import { digestOf, isDigest, parseDigest } from './digest';
import { INDEX_TYPES, MANIFEST_TYPES, MANIFEST_ACCEPT } from './mediatypes';
import { imagesLog } from './log';

export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

export interface RegistryClientOptions {
  /** use http:// for every registry (loopback registries use it regardless) */
  plainHttp?: boolean;
  credentials?: CredentialStore;
  /** idle timeout of one request, body included */
  timeoutMs?: number;
  /** retries after the first attempt for 5xx / 429 / connection failures / timeouts */
  retries?: number;
  retryBaseMs?: number;
}

export interface FetchedManifest {
  mediaType: string;
  digest: string;
  data: Buffer;
}

const RETRYABLE_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH']);

/** Connection-level failures worth another attempt (the content store resumes blobs after them). */
export function isRetryableNetworkError(e: unknown): boolean {
  if (isImageError(e, 'TIMEOUT')) return true;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code !== undefined && RETRYABLE_CODES.has(code)) return true;
  return e instanceof Error && /aborted|socket hang up/i.test(e.message);
}

class HttpStatusError extends Error {
  constructor(readonly status: number, readonly url: string, readonly body: string) {
    super(`HTTP ${status} from ${url}`);
  }
}

interface TokenEntry {
  authorization: string;
  expiresAt: number;
}

async function readCapped(res: Readable, cap: number, onOver: () => Error): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of res) {
    const chunk = c as Buffer;
    n += chunk.length;
    if (n > cap) {
      res.destroy();
      throw onOver();
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function mediaTypeOf(header: string | undefined): string | undefined {
  return header?.split(';')[0].trim() || undefined;
}

export class RegistryClient {
  private readonly httpAgent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  private readonly httpsAgent = new https.Agent({ keepAlive: true, maxSockets: 8 });
  private readonly authByScope = new Map<string, TokenEntry>();
  private readonly timeoutMs: number;
  private readonly retries: number;
  private readonly retryBaseMs: number;

  constructor(private readonly opts: RegistryClientOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.retries = opts.retries ?? 4;
    this.retryBaseMs = opts.retryBaseMs ?? 200;
  }

  close(): void {
    this.httpAgent.destroy();
    this.httpsAgent.destroy();
  }

  get retryCount(): number {
    return this.retries;
  }

  retryDelay(attempt: number): number {
    return this.retryBaseMs * 2 ** attempt;
  }

  /** Base URL of a registry's API: HTTPS unless asked otherwise or the registry is on loopback. */
  base(registry: string): string {
    const plain = this.opts.plainHttp === true || isLoopbackHost(registry);
    return `${plain ? 'http' : 'https'}://${registry}/v2/`;
  }

  /** Fetches a manifest or index by tag or digest and verifies it. `expected` pins size/digest
   *  when the manifest was named by a descriptor (an index entry). */
  async getManifest(ref: ImageReference, selector: string, expected?: { digest: string; size: number }): Promise<FetchedManifest> {
    const what = `manifest ${selector} of ${ref.registry}/${ref.repository}`;
    if (expected !== undefined && expected.size > MAX_MANIFEST_BYTES) {
      throw new ImageError('MANIFEST_TOO_LARGE',
        `${what} is declared as ${expected.size} bytes; manifests over ${MAX_MANIFEST_BYTES} bytes (4 MiB) are refused`);
    }
    const url = `${this.base(ref.registry)}${ref.repository}/manifests/${selector}`;
    const res = await this.send('GET', url, { accept: MANIFEST_ACCEPT }, ref, what);
    const declared = Number(res.headers['content-length'] ?? NaN);
    const tooLarge = (): ImageError => new ImageError('MANIFEST_TOO_LARGE',
      `${what} is larger than ${MAX_MANIFEST_BYTES} bytes (4 MiB) and was refused; a manifest that big is not an image manifest`);
    if (declared > MAX_MANIFEST_BYTES) {
      res.destroy();
      throw tooLarge();
    }
    const data = await readCapped(res, MAX_MANIFEST_BYTES, tooLarge);
    const headerDigest = res.headers['docker-content-digest'] as string | undefined;
    const pinned = expected?.digest ?? (isDigest(selector) ? selector : undefined);
    const algorithm = pinned ? parseDigest(pinned).algorithm
      : headerDigest && isDigest(headerDigest) ? parseDigest(headerDigest).algorithm : 'sha256';
    const digest = digestOf(data, algorithm);
    if (pinned !== undefined && digest !== pinned) {
      throw new ImageError('DIGEST_MISMATCH', `${what}: the registry sent content hashing to ${digest}, not ${pinned}; nothing was stored`);
    }
    if (pinned === undefined && headerDigest !== undefined && headerDigest !== digest) {
      throw new ImageError('DIGEST_MISMATCH',
        `${what}: the registry says its digest is ${headerDigest} but the bytes hash to ${digest}; nothing was stored`);
    }
    if (expected !== undefined && data.length !== expected.size) {
      throw new ImageError('SIZE_MISMATCH', `${what} is ${data.length} bytes, its descriptor declares ${expected.size}`);
    }
    let bodyType: unknown;
    try {
      bodyType = (JSON.parse(data.toString('utf8')) as { mediaType?: unknown }).mediaType;
    } catch (e) {
      throw new ImageError('BAD_MANIFEST', `${what} is not valid JSON (${(e as Error).message})`);
    }
    const mediaType = typeof bodyType === 'string' ? bodyType : mediaTypeOf(res.headers['content-type']);
    if (mediaType === undefined || (!INDEX_TYPES.includes(mediaType) && !MANIFEST_TYPES.includes(mediaType))) {
      throw new ImageError('UNSUPPORTED_MEDIA_TYPE',
        `${what} has media type '${mediaType ?? '(none)'}', which vmlet does not pull; supported: ` +
        `${[...INDEX_TYPES, ...MANIFEST_TYPES].join(', ')} (Docker schema 1 images must be converted first)`);
    }
    return { mediaType, digest, data };
  }

  /** Opens a blob from `offset` (HTTP Range). The returned offset is where the body really starts. */
  async openBlob(ref: ImageReference, digest: string, offset: number): Promise<{ stream: Readable; offset: number }> {
    const url = `${this.base(ref.registry)}${ref.repository}/blobs/${digest}`;
    const headers: OutgoingHttpHeaders = offset > 0 ? { range: `bytes=${offset}-` } : {};
    const res = await this.send('GET', url, headers, ref, `blob ${digest} of ${formatReference(ref)}`);
    if (res.statusCode === 206) {
      const m = /^bytes (\d+)-/.exec(String(res.headers['content-range'] ?? ''));
      return { stream: res, offset: m ? Number(m[1]) : -1 };
    }
    return { stream: res, offset: 0 };
  }

  /** One request with auth, redirects and retries; resolves to a 2xx response. */
  private async send(method: string, url: string, headers: OutgoingHttpHeaders, ref: ImageReference, what: string): Promise<IncomingMessage> {
    const scope = `repository:${ref.repository}:pull`;
    for (let attempt = 0; ; attempt++) {
      try {
        const res = await this.authenticated(method, url, headers, ref.registry, scope, what);
        const status = res.statusCode ?? 0;
        if (status >= 200 && status < 300) return res;
        const body = (await readCapped(res, 64 * 1024, () => new Error('error body too large')).catch(() => Buffer.alloc(0))).toString('utf8');
        throw new HttpStatusError(status, url, body);
      } catch (e) {
        const status = e instanceof HttpStatusError ? e.status : 0;
        const retryable = status >= 500 || status === 429 || (status === 0 && isRetryableNetworkError(e));
        if (retryable && attempt < this.retries) {
          const delay = this.retryDelay(attempt);
          imagesLog.debug(`${what}: ${(e as Error).message}; retry ${attempt + 1}/${this.retries} in ${delay} ms`);
          await new Promise((r) => setTimeout(r, delay));
          continue;
        }
        throw this.describe(e, what, ref, attempt);
      }
    }
  }

  private describe(e: unknown, what: string, ref: ImageReference, attempt: number): Error {
    const tries = attempt + 1;
    if (e instanceof HttpStatusError) {
      const detail = e.body.trim().slice(0, 300);
      if (e.status === 404) {
        return new ImageError('NOT_FOUND', `${what}: not found at ${ref.registry} (HTTP 404 ${detail}); check the repository, tag or digest`);
      }
      if (e.status === 401 || e.status === 403) {
        return new ImageError('UNAUTHORIZED',
          `${what}: access denied by ${ref.registry} (HTTP ${e.status} ${detail}); put credentials for ${ref.registry} ` +
          'in the Docker config.json (auths) or check that your account may pull this repository');
      }
      return new ImageError('REGISTRY', `${what}: ${ref.registry} answered HTTP ${e.status} after ${tries} attempt(s) (${detail})`);
    }
    if (isImageError(e, 'TIMEOUT')) {
      return new ImageError('TIMEOUT', `${what}: ${e.message} (after ${tries} attempt(s)); the registry is not answering`, { cause: e });
    }
    if (e instanceof ImageError) return e;
    return new ImageError('REGISTRY',
      `${what}: cannot talk to ${ref.registry}: ${(e as Error).message} (after ${tries} attempt(s)); ` +
      'check that the registry is up and reachable (use --plain-http for a registry without TLS)', { cause: e });
  }

  private async authenticated(method: string, url: string, headers: OutgoingHttpHeaders, registry: string,
    scope: string, what: string): Promise<IncomingMessage> {
    const key = `${registry}|${scope}`;
    const cached = this.authByScope.get(key);
    const withAuth = (): OutgoingHttpHeaders => {
      const a = this.authByScope.get(key);
      return a && a.expiresAt > Date.now() ? { ...headers, authorization: a.authorization } : headers;
    };
    const res = await this.follow(method, url, withAuth());
    if (res.statusCode !== 401) return res;
    const header = res.headers['www-authenticate'];
    res.resume();
    const creds = this.opts.credentials?.get(registry);
    if (typeof header !== 'string') return this.follow(method, url, withAuth());
    const challenge = parseChallenge(header);
    if (challenge.scheme === 'bearer') {
      // A 401 despite a cached token means it expired or lacks the scope: get a fresh one once.
      const token = await this.fetchToken(challenge.params, scope, creds, what);
      this.authByScope.set(key, token);
    } else if (challenge.scheme === 'basic') {
      if (creds === undefined || cached !== undefined) {
        return this.follow(method, url, withAuth()); // yields 401 → UNAUTHORIZED with the registry's words
      }
      this.authByScope.set(key, { authorization: basicAuthorization(creds), expiresAt: Number.MAX_SAFE_INTEGER });
    } else {
      throw new ImageError('UNAUTHORIZED', `${what}: ${registry} asks for '${challenge.scheme}' authentication, which vmlet does not speak`);
    }
    return this.follow(method, url, withAuth());
  }

  /** The Bearer token flow: GET realm?service=&scope= with basic credentials if we have them. */
  private async fetchToken(params: Record<string, string>, scope: string, creds: Credentials | undefined, what: string): Promise<TokenEntry> {
    const realm = params.realm;
    if (!realm) throw new ImageError('UNAUTHORIZED', `${what}: the registry's Bearer challenge names no realm`);
    let u: URL;
    try {
      u = new URL(realm);
    } catch {
      throw new ImageError('UNAUTHORIZED', `${what}: the registry's token realm '${realm}' is not a URL`);
    }
    if (params.service) u.searchParams.set('service', params.service);
    u.searchParams.set('scope', params.scope ?? scope);
    const headers: OutgoingHttpHeaders = creds ? { authorization: basicAuthorization(creds) } : {};
    let res: IncomingMessage | undefined;
    for (let attempt = 0; ; attempt++) {
      try {
        res = await this.follow('GET', u.toString(), headers);
        if ((res.statusCode ?? 0) < 500 || attempt >= this.retries) break;
        res.resume();
      } catch (e) {
        if (!isRetryableNetworkError(e) || attempt >= this.retries) {
          throw new ImageError(isImageError(e, 'TIMEOUT') ? 'TIMEOUT' : 'UNAUTHORIZED',
            `${what}: token server ${u.origin} failed: ${(e as Error).message}`, { cause: e });
        }
      }
      await new Promise((r) => setTimeout(r, this.retryDelay(attempt)));
    }
    const body = await readCapped(res, 1024 * 1024, () => new ImageError('UNAUTHORIZED', `${what}: token response over 1 MiB`));
    if (res.statusCode !== 200) {
      throw new ImageError('UNAUTHORIZED',
        `${what}: token server ${u.origin} refused (HTTP ${res.statusCode} ${body.toString('utf8').slice(0, 200)}); ` +
        'check the credentials for this registry in the Docker config.json');
    }
    let doc: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      doc = JSON.parse(body.toString('utf8')) as typeof doc;
    } catch {
      throw new ImageError('UNAUTHORIZED', `${what}: token server ${u.origin} sent a response that is not JSON`);
    }
    const token = typeof doc.token === 'string' ? doc.token : typeof doc.access_token === 'string' ? doc.access_token : undefined;
    if (!token) throw new ImageError('UNAUTHORIZED', `${what}: token server ${u.origin} sent no token`);
    const lifetime = typeof doc.expires_in === 'number' && doc.expires_in > 0 ? doc.expires_in : 60;
    // Renew a little early so a token never expires between check and use.
    return { authorization: `Bearer ${token}`, expiresAt: Date.now() + Math.max(1, lifetime - 10) * 1000 };
  }

  /** Follows up to 5 redirects; Authorization goes only to the host it was meant for. */
  private async follow(method: string, url: string, headers: OutgoingHttpHeaders): Promise<IncomingMessage> {
    const origin = new URL(url).host;
    let current = url;
    let h = headers;
    for (let hop = 0; hop <= 5; hop++) {
      const res = await this.raw(method, current, h);
      const status = res.statusCode ?? 0;
      const location = res.headers.location;
      if (![301, 302, 303, 307, 308].includes(status) || !location) return res;
      res.resume();
      const next = new URL(location, current);
      if (next.host !== origin && h.authorization !== undefined) {
        h = { ...h };
        delete h.authorization;
      }
      current = next.toString();
    }
    throw new ImageError('REGISTRY', `${url}: more than 5 redirects`);
  }

  private raw(method: string, url: string, headers: OutgoingHttpHeaders): Promise<IncomingMessage> {
    const u = new URL(url);
    const mod = u.protocol === 'https:' ? https : http;
    const agent = u.protocol === 'https:' ? this.httpsAgent : this.httpAgent;
    return new Promise((resolve, reject) => {
      let response: IncomingMessage | undefined;
      const req = mod.request(u, { method, headers: { 'user-agent': 'vmlet', ...headers }, agent }, (res) => {
        response = res;
        resolve(res);
      });
      req.setTimeout(this.timeoutMs, () => {
        const err = new ImageError('TIMEOUT', `${method} ${url} got no data for ${this.timeoutMs} ms`);
        if (response) response.destroy(err);
        req.destroy(err);
      });
      req.on('error', reject);
      req.end();
    });
  }
}
