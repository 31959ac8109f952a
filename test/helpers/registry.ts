// A real distribution server for the image tests: Debian's `docker-registry` on
// 127.0.0.1:<free port> with a temp storage dir, optionally trusting a small token server
// (JWT RS256 signed by a certificate generated with openssl, sent as an x5c chain). Test images
// are built locally (busybox-static → umoci OCI layout → skopeo copy); nothing is downloaded.
import { spawn, execFile, ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, writeFileSync, readFileSync, rmSync, mkdirSync, copyFileSync, symlinkSync, readdirSync, statSync } from 'node:fs';
import { createServer, AddressInfo, Server } from 'node:net';
import http, { IncomingMessage, ServerResponse } from 'node:http';
import { createSign, createHash, randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const run = promisify(execFile);

export async function sh(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<string> {
  try {
    const { stdout } = await run(cmd, args, { cwd: opts.cwd, maxBuffer: 64 * 1024 * 1024 });
    return stdout;
  } catch (e) {
    const err = e as Error & { stderr?: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${err.message}\n${err.stderr ?? ''}`);
  }
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s: Server = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface TokenServer {
  url: string;
  username: string;
  password: string;
  /** token requests seen, with the scopes asked for (tests assert the Bearer flow ran) */
  requests: { scope: string[]; user?: string }[];
  certPath: string;
  stop(): Promise<void>;
}

function b64url(data: Buffer | string): string {
  return Buffer.from(data).toString('base64url');
}

/** Token server of the Docker token spec: GET /token?service=&scope= with basic auth. */
export async function startTokenServer(dir: string, service: string, issuer: string): Promise<TokenServer> {
  const keyPath = join(dir, 'token.key');
  const certPath = join(dir, 'token.crt');
  await sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyPath, '-out', certPath,
    '-days', '2', '-subj', '/CN=vmlet-test-token-issuer']);
  const key = readFileSync(keyPath, 'utf8');
  const der = readFileSync(certPath, 'utf8').replace(/-----[^-]+-----/g, '').replace(/\s+/g, '');
  const username = 'vmlet-user';
  const password = randomBytes(8).toString('hex');
  const requests: TokenServer['requests'] = [];
  const server = http.createServer((req: IncomingMessage, res: ServerResponse) => {
    const u = new URL(req.url ?? '/', 'http://127.0.0.1');
    const auth = req.headers.authorization ?? '';
    const decoded = auth.startsWith('Basic ') ? Buffer.from(auth.slice(6), 'base64').toString('utf8') : '';
    const scopes = u.searchParams.getAll('scope');
    requests.push({ scope: scopes, user: decoded.split(':')[0] || undefined });
    if (u.pathname !== '/token' || decoded !== `${username}:${password}`) {
      res.writeHead(401, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ details: 'bad credentials' }));
      return;
    }
    const now = Math.floor(Date.now() / 1000);
    const access = scopes.flatMap((s) => s.split(' ')).map((s) => {
      const parts = s.split(':');
      return { type: parts[0], name: parts.slice(1, -1).join(':'), actions: parts[parts.length - 1].split(',') };
    });
    const header = { typ: 'JWT', alg: 'RS256', x5c: [der] };
    const claims = { iss: issuer, sub: username, aud: service, exp: now + 300, nbf: now - 10, iat: now,
      jti: randomBytes(8).toString('hex'), access };
    const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    const sig = createSign('RSA-SHA256').update(signingInput).sign(key);
    const token = `${signingInput}.${b64url(sig)}`;
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ token, access_token: token, expires_in: 300 }));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/token`, username, password, requests, certPath,
    stop: () => new Promise((r) => server.close(() => r())),
  };
}

export interface Registry {
  /** host:port, as it appears in image references */
  host: string;
  dir: string;
  token?: TokenServer;
  stop(): Promise<void>;
}

async function waitReady(host: string, proc: ChildProcess, log: () => string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`docker-registry exited (${proc.exitCode}): ${log()}`);
    const status = await new Promise<number>((resolve) => {
      const req = http.get(`http://${host}/v2/`, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', () => resolve(0));
    });
    if (status === 200 || status === 401) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`docker-registry on ${host} did not become ready: ${log()}`);
}

/** Starts docker-registry; with `token: true` it trusts a token server started beside it. */
export async function startRegistry(opts: { token?: boolean } = {}): Promise<Registry> {
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-registry-'));
  const port = await freePort();
  const host = `127.0.0.1:${port}`;
  const service = 'vmlet-test-registry';
  const issuer = 'vmlet-test-issuer';
  const token = opts.token ? await startTokenServer(dir, service, issuer) : undefined;
  const auth = token
    ? `auth:\n  token:\n    realm: ${token.url}\n    service: ${service}\n    issuer: ${issuer}\n    rootcertbundle: ${token.certPath}\n`
    : '';
  writeFileSync(join(dir, 'config.yml'),
    `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${join(dir, 'data')}\n` +
    `  delete:\n    enabled: true\nhttp:\n  addr: ${host}\n${auth}`);
  const proc = spawn('docker-registry', ['serve', join(dir, 'config.yml')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr?.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  await waitReady(host, proc, () => stderr);
  return {
    host, dir, token,
    stop: async () => {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        await exited;
      }
      await token?.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// ---- building test images locally ----

export interface RuntimeSettings {
  entrypoint?: string[];
  cmd?: string[];
  env?: string[];
  workingDir?: string;
  user?: string;
}

/** An OCI image layout on disk, grown one layer at a time with umoci. */
export class OciLayout {
  private constructor(readonly dir: string) {}

  static async create(dir: string): Promise<OciLayout> {
    await sh('umoci', ['init', '--layout', dir]);
    return new OciLayout(dir);
  }

  async newImage(tag: string): Promise<void> {
    await sh('umoci', ['new', '--image', `${this.dir}:${tag}`]);
  }

  /** Unpacks `from`, lets `populate` change the rootfs, repacks the result as `to` (one new layer). */
  async addLayer(from: string, to: string, populate: (rootfs: string) => void): Promise<void> {
    const bundle = mkdtempSync(join(tmpdir(), 'vmlet-bundle-'));
    rmSync(bundle, { recursive: true });
    try {
      await sh('umoci', ['unpack', '--image', `${this.dir}:${from}`, bundle]);
      populate(join(bundle, 'rootfs'));
      await sh('umoci', ['repack', '--image', `${this.dir}:${to}`, bundle]);
    } finally {
      rmSync(bundle, { recursive: true, force: true });
    }
  }

  async configure(tag: string, s: RuntimeSettings): Promise<void> {
    const args = ['config', '--image', `${this.dir}:${tag}`];
    if (s.entrypoint) args.push('--clear=config.entrypoint', ...s.entrypoint.flatMap((e) => ['--config.entrypoint', e]));
    if (s.cmd) args.push('--clear=config.cmd', ...s.cmd.flatMap((c) => ['--config.cmd', c]));
    for (const e of s.env ?? []) args.push('--config.env', e);
    if (s.workingDir) args.push('--config.workingdir', s.workingDir);
    if (s.user) args.push('--config.user', s.user);
    await sh('umoci', args);
  }

  /** Pushes `tag` to `registry/repoTag`, keeping the OCI manifest and its digests unless a format is asked for. */
  async push(tag: string, registry: Registry, repoTag: string, format?: 'v2s2'): Promise<void> {
    // v2s2 rewrites the manifest into Docker schema 2, so digests cannot be preserved then.
    const args = ['copy', '-q', '--dest-tls-verify=false', ...(format ? ['--format', format] : ['--preserve-digests'])];
    if (registry.token) args.push('--dest-creds', `${registry.token.username}:${registry.token.password}`);
    args.push(`oci:${this.dir}:${tag}`, `docker://${registry.host}/${repoTag}`);
    await sh('skopeo', args);
  }
}

/** A busybox-static rootfs: the binary plus the applet links a shell session needs. */
export function populateBusybox(rootfs: string): void {
  mkdirSync(join(rootfs, 'bin'), { recursive: true });
  copyFileSync('/bin/busybox', join(rootfs, 'bin', 'busybox'));
  for (const applet of ['sh', 'ls', 'cat', 'echo', 'true', 'false']) symlinkSync('busybox', join(rootfs, 'bin', applet));
  mkdirSync(join(rootfs, 'etc'), { recursive: true });
  writeFileSync(join(rootfs, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
}

/** Files with deterministic pseudo-random content (incompressible, so blobs have real size). */
export function populateFiles(rootfs: string, dirName: string, count: number, bytes: number, seed: string): void {
  const d = join(rootfs, dirName);
  mkdirSync(d, { recursive: true });
  for (let i = 0; i < count; i++) {
    const chunks: Buffer[] = [];
    let block = createHash('sha256').update(`${seed}/${i}`).digest();
    for (let n = 0; n < bytes; n += block.length) {
      chunks.push(block);
      block = createHash('sha256').update(block).digest();
    }
    writeFileSync(join(d, `f${i}`), Buffer.concat(chunks).subarray(0, bytes));
  }
}

// ---- raw registry API, for content skopeo will not produce (multi-platform indexes) ----

function request(method: string, url: string, headers: http.OutgoingHttpHeaders, body?: Buffer): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

export function sha256(data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

export async function pushBlob(registry: Registry, repo: string, data: Buffer): Promise<string> {
  const digest = sha256(data);
  const start = await request('POST', `http://${registry.host}/v2/${repo}/blobs/uploads/`, {});
  if (start.status !== 202) throw new Error(`blob upload start: HTTP ${start.status} ${start.body.toString()}`);
  const loc = new URL(String(start.headers.location), `http://${registry.host}`);
  loc.searchParams.set('digest', digest);
  const put = await request('PUT', loc.toString(), { 'content-type': 'application/octet-stream', 'content-length': String(data.length) }, data);
  if (put.status !== 201) throw new Error(`blob upload: HTTP ${put.status} ${put.body.toString()}`);
  return digest;
}

export async function pushManifest(registry: Registry, repo: string, reference: string, mediaType: string, data: Buffer): Promise<string> {
  const put = await request('PUT', `http://${registry.host}/v2/${repo}/manifests/${reference}`, { 'content-type': mediaType }, data);
  if (put.status !== 201) throw new Error(`manifest put: HTTP ${put.status} ${put.body.toString()}`);
  return sha256(data);
}

export async function getManifest(registry: Registry, repo: string, reference: string): Promise<{ mediaType: string; data: Buffer; digest: string }> {
  const accept = ['application/vnd.oci.image.manifest.v1+json', 'application/vnd.oci.image.index.v1+json',
    'application/vnd.docker.distribution.manifest.v2+json', 'application/vnd.docker.distribution.manifest.list.v2+json'].join(', ');
  const r = await request('GET', `http://${registry.host}/v2/${repo}/manifests/${reference}`, { accept });
  if (r.status !== 200) throw new Error(`manifest get: HTTP ${r.status}`);
  return { mediaType: String(r.headers['content-type']), data: r.body, digest: sha256(r.body) };
}

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

// ---- a misbehaving registry: a 127.0.0.1 proxy in front of the real one ----

export interface Upstream {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

export interface ProxyContext {
  req: IncomingMessage;
  res: ServerResponse;
  path: string;
  /** forwards the request as it is to the real registry and returns its whole answer */
  upstream(): Promise<Upstream>;
  /** sends an upstream answer (possibly edited) back to the client */
  reply(u: Upstream): void;
}

export interface Proxy {
  host: string;
  /** every request seen: method, path and Range header */
  seen: { method: string; path: string; range?: string }[];
  stop(): Promise<void>;
}

/** `handle` returns true when it answered the request itself; otherwise it is passed through. */
export async function startProxy(target: Registry, handle: (ctx: ProxyContext) => Promise<boolean> | boolean): Promise<Proxy> {
  const seen: Proxy['seen'] = [];
  const sockets = new Set<import('node:net').Socket>();
  const upstreamOf = (req: IncomingMessage): Promise<Upstream> => {
    const headers = { ...req.headers, host: target.host };
    return request(req.method ?? 'GET', `http://${target.host}${req.url ?? '/'}`, headers);
  };
  const reply = (res: ServerResponse, u: Upstream): void => {
    const headers = { ...u.headers };
    delete headers['transfer-encoding'];
    delete headers.connection;
    headers['content-length'] = String(u.body.length);
    res.writeHead(u.status, headers);
    res.end(u.body);
  };
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    seen.push({ method: req.method ?? 'GET', path, range: req.headers.range });
    const ctx: ProxyContext = { req, res, path, upstream: () => upstreamOf(req), reply: (u) => reply(res, u) };
    void (async () => {
      try {
        if (await handle(ctx)) return;
        reply(res, await upstreamOf(req));
      } catch (e) {
        res.destroy(e as Error);
      }
    })();
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    host: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    seen,
    stop: () => new Promise((r) => {
      for (const s of sockets) s.destroy();
      server.close(() => r());
    }),
  };
}

// ---- fixtures shared by the image tests ----

export interface TestImages {
  layout: OciLayout;
  /** busybox base + a layer of its own, per repository name */
  refs: Record<string, string>;
}

/**
 * Builds a busybox base image and, for each name, an image = base + one layer of generated
 * files, and pushes each as `<registry>/test/<name>:v1`. All images share the base layer blob.
 */
export async function pushBusyboxImages(registry: Registry, names: string[], workDir: string,
  opts: { filesPerLayer?: number; fileBytes?: number } = {}): Promise<TestImages> {
  const layout = await OciLayout.create(join(workDir, 'layout'));
  await layout.newImage('empty');
  await layout.addLayer('empty', 'base', populateBusybox);
  await layout.configure('base', { entrypoint: ['/bin/sh', '-c'], cmd: ['echo hello'], env: ['GREETING=hello'], workingDir: '/srv', user: '1000:1000' });
  const refs: Record<string, string> = {};
  for (const name of names) {
    await layout.addLayer('base', name, (rootfs) => populateFiles(rootfs, name, opts.filesPerLayer ?? 4, opts.fileBytes ?? 4096, name));
    await layout.push(name, registry, `test/${name}:v1`);
    refs[name] = `${registry.host}/test/${name}:v1`;
  }
  return { layout, refs };
}

export interface RegistryFixture {
  registry: Registry;
  images: TestImages;
  /** temp directory of the suite (the OCI layout lives here), removed after it */
  work: string;
}

/**
 * Mocha hooks for a describe block: one registry with `names` pushed by pushBusyboxImages
 * for the whole block, since starting docker-registry and building images costs seconds.
 * `use` receives them once they are up; a failed start-up still stops what did start.
 */
export function registryPerSuite(workPrefix: string, names: string[], use: (f: RegistryFixture) => void,
  opts: { token?: boolean } = {}): void {
  let registry: Registry | undefined;
  let work: string;
  before(async function () {
    work = tempDir(workPrefix);
    registry = await startRegistry(opts);
    use({ registry, images: await pushBusyboxImages(registry, names, work), work });
  });
  after(async function () {
    await registry?.stop();
    rmSync(work, { recursive: true, force: true });
  });
}

/** Mocha hooks: every test gets an empty image root of its own, so no test sees another's pulls. */
export function rootPerTest(use: (root: string) => void): void {
  let root: string;
  beforeEach(function () {
    root = tempDir('vmlet-root-');
    use(root);
  });
  afterEach(function () {
    rmSync(root, { recursive: true, force: true });
  });
}

/** Every file under `root` (relative paths), for "nothing was left behind" assertions. */
export function listFiles(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string, rel: string): void => {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return;
    }
    for (const n of names) {
      const p = join(dir, n);
      const r = rel ? `${rel}/${n}` : n;
      if (statSync(p).isDirectory()) walk(p, r);
      else out.push(r);
    }
  };
  walk(root, '');
  return out.sort();
}

export async function getBlob(registry: Registry, repo: string, digest: string): Promise<Buffer> {
  const r = await request('GET', `http://${registry.host}/v2/${repo}/blobs/${digest}`, {});
  if (r.status !== 200) throw new Error(`blob get: HTTP ${r.status}`);
  return r.body;
}
