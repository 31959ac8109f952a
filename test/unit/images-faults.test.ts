// Bad input and bad registries, each a clear typed error with nothing half-written left in the
// stores. The misbehaviour comes from a small 127.0.0.1 proxy in front of the real registry.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import type { IncomingHttpHeaders } from 'node:http';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { ImageService } from '../../shim/images/image-service';
import { StaticCredentials } from '../../shim/images/auth';
import { ImageErrorCode, isImageError } from '../../shim/images/errors';
import { OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP } from '../../shim/images/mediatypes';
import {
  startRegistry, Registry, pushBusyboxImages, TestImages, tempDir, startProxy, Proxy, ProxyContext, listFiles,
  pushBlob, pushManifest, sha256, getManifest, getBlob,
} from '../helpers/registry';

// Generous timeouts where the registry is meant to answer (CI machines are shared and busy);
// short ones only where the test is about a registry that does not.
const FAST = { retryBaseMs: 5, timeoutMs: 10_000, retries: 2 };
const IMPATIENT = { ...FAST, timeoutMs: 1000 };

function expectError(code: ImageErrorCode, text: RegExp): (e: unknown) => boolean {
  return (e) => {
    assert.ok(isImageError(e, code), `expected ImageError ${code}, got ${String(e)}`);
    assert.match((e as Error).message, text);
    return true;
  };
}

describe('images: bad registries and bad content', function () {
  let registry: Registry;
  let images: TestImages;
  let work: string;
  let root: string;
  let proxy: Proxy | undefined;
  let baseLayer: { digest: string; size: number };

  before(async function () {
    work = tempDir('vmlet-faults-');
    registry = await startRegistry();
    images = await pushBusyboxImages(registry, ['alpha'], work);
    const m = JSON.parse((await getManifest(registry, 'test/alpha', 'v1')).data.toString()) as { layers: { digest: string; size: number }[] };
    baseLayer = m.layers[0];
  });
  after(async function () {
    await registry?.stop();
    rmSync(work, { recursive: true, force: true });
  });
  beforeEach(function () {
    root = tempDir('vmlet-root-');
  });
  afterEach(async function () {
    await proxy?.stop();
    proxy = undefined;
    rmSync(root, { recursive: true, force: true });
  });

  const manifestOf = async (repo: string): Promise<{ config: { digest: string } }> =>
    JSON.parse((await getManifest(registry, repo, 'v1')).data.toString()) as { config: { digest: string } };

  const via = async (handle: (ctx: ProxyContext) => Promise<boolean> | boolean): Promise<string> => {
    proxy = await startProxy(registry, handle);
    return `${proxy.host}/test/alpha:v1`;
  };
  const isBlob = (ctx: ProxyContext, digest?: string): boolean =>
    ctx.req.method === 'GET' && ctx.path.includes('/blobs/') && (digest === undefined || ctx.path.endsWith(digest));
  const isManifest = (ctx: ProxyContext): boolean => ctx.path.includes('/manifests/');

  /** Nothing visible in any store: no blobs, no layers, no records, no staging or partial files. */
  const assertNothingStored = (svc: ImageService): void => {
    assert.deepEqual(listFiles(join(root, 'blobs')), [], 'no blobs');
    assert.deepEqual(listFiles(join(root, 'layers')).filter((f) => !f.startsWith('locks/')), [], 'no layers or staging files');
    assert.deepEqual(listFiles(join(root, 'images')), [], 'no image records');
    assert.deepEqual(listFiles(join(root, 'ingest')).filter((f) => !f.endsWith('.lock')), [], 'no partial downloads');
    assert.deepEqual(listFiles(svc.leasesDir), [], 'no leases');
  };

  it('retries a registry that answers 500 twice, then succeeds', async function () {
    const failures = new Map<string, number>();
    const ref = await via((ctx) => {
      const key = `${ctx.req.method} ${ctx.path}`;
      const n = failures.get(key) ?? 0;
      if ((isManifest(ctx) || isBlob(ctx)) && n < 2) {
        failures.set(key, n + 1);
        ctx.res.writeHead(500, { 'content-type': 'text/plain' });
        ctx.res.end('injected failure');
        return true;
      }
      return false;
    });
    const rec = await new ImageService({ root, registry: { ...FAST, retries: 3 } }).pull(ref);
    assert.equal(rec.layers.length, 2);
    const manifestGets = proxy!.seen.filter((s) => s.path.endsWith('/manifests/v1')).length;
    assert.equal(manifestGets, 3, 'two 500s then the answer');
  });

  it('gives up on a registry that keeps answering 500 with a REGISTRY error naming the status', async function () {
    const ref = await via((ctx) => {
      ctx.res.writeHead(503);
      ctx.res.end('down for maintenance');
      return true;
    });
    const svc = new ImageService({ root, registry: FAST });
    await assert.rejects(svc.pull(ref), expectError('REGISTRY', /HTTP 503 after 3 attempt\(s\).*down for maintenance/));
    assertNothingStored(svc);
  });

  it('times out a registry that accepts the request and never answers', async function () {
    const ref = await via(() => true); // neither answers nor closes
    const svc = new ImageService({ root, registry: IMPATIENT });
    const t0 = Date.now();
    await assert.rejects(svc.pull(ref), expectError('TIMEOUT', /not answering/));
    assert.ok(Date.now() - t0 < 10_000);
    assertNothingStored(svc);
  });

  it('a blob request that never gets an answer is tried retries+1 times in all, then TIMEOUT', async function () {
    const ref = await via((ctx) => isBlob(ctx, baseLayer.digest)); // swallow those requests
    const svc = new ImageService({ root, registry: { ...IMPATIENT, retries: 1 } });
    await assert.rejects(svc.pull(ref), expectError('TIMEOUT', new RegExp(`blob ${baseLayer.digest}.*after 2 attempt`)));
    assert.equal(proxy!.seen.filter((s) => s.path.endsWith(baseLayer.digest)).length, 2);
    assert.equal(await svc.content.has(baseLayer.digest), false);
    assert.deepEqual(await svc.list(), []);
  });

  it('a blob that stalls mid-body times out; the partial download is kept and the next pull resumes it with Range', async function () {
    const half = Math.floor(baseLayer.size / 2);
    const stalling = await via(async (ctx) => {
      if (!isBlob(ctx, baseLayer.digest)) return false;
      const u = await ctx.upstream();
      ctx.res.writeHead(200, { 'content-length': String(u.body.length), 'content-type': 'application/octet-stream' });
      ctx.res.write(u.body.subarray(0, half)); // and then nothing more
      return true;
    });
    const svc = new ImageService({ root, registry: { ...IMPATIENT, retries: 0 } });
    await assert.rejects(svc.pull(stalling), expectError('TIMEOUT', /blob|layer/));
    assert.equal(await svc.content.has(baseLayer.digest), false, 'a half blob is never visible');
    assert.deepEqual(await svc.list(), []);
    await proxy!.stop();

    proxy = await startProxy(registry, () => false);
    const rec = await new ImageService({ root, registry: FAST }).pull(`${proxy.host}/test/alpha:v1`);
    const ranges = proxy.seen.filter((s) => s.path.endsWith(baseLayer.digest)).map((s) => s.range);
    assert.deepEqual(ranges, [`bytes=${half}-`], 'only the missing bytes were fetched');
    assert.ok(await svc.content.has(rec.layers[0].digest));
    assert.deepEqual(listFiles(join(root, 'ingest')).filter((f) => !f.endsWith('.lock')), []);
  });

  it('a connection cut mid-blob is resumed with Range within the same pull', async function () {
    let cut = false;
    const ref = await via(async (ctx) => {
      if (!isBlob(ctx, baseLayer.digest) || cut) return false;
      cut = true;
      const u = await ctx.upstream();
      ctx.res.writeHead(200, { 'content-length': String(u.body.length) });
      ctx.res.write(u.body.subarray(0, 100_000), () => ctx.res.destroy());
      return true;
    });
    const rec = await new ImageService({ root, registry: FAST }).pull(ref);
    const ranges = proxy!.seen.filter((s) => s.path.endsWith(baseLayer.digest)).map((s) => s.range);
    assert.equal(ranges.length, 2);
    assert.equal(ranges[0], undefined);
    assert.match(ranges[1] ?? '', /^bytes=\d+-$/);
    assert.ok(Number(/\d+/.exec(ranges[1]!)![0]) > 0);
    assert.equal(rec.layers[0].digest, baseLayer.digest);
  });

  it('answers a Basic challenge with the credentials it has for the registry', async function () {
    const expected = `Basic ${Buffer.from('carol:s3cret').toString('base64')}`;
    const ref = await via((ctx) => {
      if (ctx.req.headers.authorization === expected) return false;
      ctx.res.writeHead(401, { 'www-authenticate': 'Basic realm="vmlet-test"' });
      ctx.res.end('{"errors":[{"code":"UNAUTHORIZED"}]}');
      return true;
    });
    const host = proxy!.host;
    const svc = new ImageService({ root, registry: { ...FAST, credentials: new StaticCredentials({ [host]: { username: 'carol', password: 's3cret' } }) } });
    assert.equal((await svc.pull(ref)).layers.length, 2);
    const without = new ImageService({ root: tempDir('vmlet-root-'), registry: FAST });
    await assert.rejects(without.pull(ref), expectError('UNAUTHORIZED', /HTTP 401.*credentials/));
    rmSync(without.root, { recursive: true, force: true });
  });

  it('follows a redirect of blob downloads to another host, without sending it our credentials', async function () {
    // The redirect target is a second proxy (another host:port) that records what it is sent.
    const authSeen: (string | undefined)[] = [];
    const storage = await startProxy(registry, (ctx) => {
      authSeen.push(ctx.req.headers.authorization);
      return false;
    });
    try {
      const expected = `Basic ${Buffer.from('dave:pw').toString('base64')}`;
      const ref = await via((ctx) => {
        if (ctx.req.headers.authorization !== expected) {
          ctx.res.writeHead(401, { 'www-authenticate': 'Basic realm="vmlet-test"' });
          ctx.res.end();
          return true;
        }
        if (!isBlob(ctx)) return false;
        ctx.res.writeHead(307, { location: `http://${storage.host}${ctx.req.url ?? ''}` });
        ctx.res.end();
        return true;
      });
      const creds = new StaticCredentials({ [proxy!.host]: { username: 'dave', password: 'pw' } });
      const rec = await new ImageService({ root, registry: { ...FAST, credentials: creds } }).pull(ref);
      assert.equal(rec.layers.length, 2);
      assert.equal(storage.seen.filter((s) => s.path.includes('/blobs/')).length, 3, 'config + 2 layers fetched from the redirect target');
      assert.deepEqual(authSeen.filter((a) => a !== undefined), [], 'no Authorization header crossed to the other host');
    } finally {
      await storage.stop();
    }
  });

  it('a blob whose bytes do not match its digest is DIGEST_MISMATCH and nothing is stored', async function () {
    const ref = await via(async (ctx) => {
      if (!isBlob(ctx, baseLayer.digest)) return false;
      const u = await ctx.upstream();
      u.body[u.body.length >> 1] ^= 0xff;
      ctx.reply(u);
      return true;
    });
    const svc = new ImageService({ root, registry: FAST });
    await assert.rejects(svc.pull(ref), expectError('DIGEST_MISMATCH', new RegExp(`not ${baseLayer.digest}`)));
    assert.equal(await svc.content.has(baseLayer.digest), false);
    assert.deepEqual(await svc.list(), []);
    assert.deepEqual(listFiles(join(root, 'ingest')).filter((f) => !f.endsWith('.lock')), [], 'the wrong bytes are not kept for resuming');
    // The other layer, downloaded in parallel, is valid and may stay until GC; the base may not.
    const config = JSON.parse((await getBlob(registry, 'test/alpha', (await manifestOf('test/alpha')).config.digest)).toString()) as { rootfs: { diff_ids: string[] } };
    assert.equal(await svc.layers.has(config.rootfs.diff_ids[0]), false);
    await svc.gc();
    assertNothingStored(svc);
  });

  it('a truncated blob (short body, clean end) is SIZE_MISMATCH after retries and nothing is stored', async function () {
    const ref = await via(async (ctx) => {
      if (!isBlob(ctx, baseLayer.digest)) return false;
      const u = await ctx.upstream();
      ctx.reply({ ...u, body: u.body.subarray(0, u.body.length - 1000) });
      return true;
    });
    const svc = new ImageService({ root, registry: FAST });
    await assert.rejects(svc.pull(ref), expectError('SIZE_MISMATCH', /truncated/));
    assert.equal(await svc.content.has(baseLayer.digest), false);
    assert.deepEqual(await svc.list(), []);
    assert.deepEqual(listFiles(join(root, 'ingest')).filter((f) => !f.endsWith('.lock')), []);
  });

  it('a manifest over 4 MiB is refused, with and without Content-Length', async function () {
    const big = Buffer.alloc(5 * 1024 * 1024, 0x20);
    for (const chunked of [false, true]) {
      const ref = await via((ctx) => {
        if (!isManifest(ctx)) return false;
        if (chunked) {
          ctx.res.writeHead(200, { 'content-type': OCI_MANIFEST });
          ctx.res.write(big.subarray(0, 3 * 1024 * 1024));
          ctx.res.end(big.subarray(3 * 1024 * 1024));
        } else {
          ctx.res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': String(big.length) });
          ctx.res.end(big);
        }
        return true;
      });
      const svc = new ImageService({ root, registry: FAST });
      await assert.rejects(svc.pull(ref), expectError('MANIFEST_TOO_LARGE', /4 MiB/));
      assertNothingStored(svc);
      await proxy!.stop();
      proxy = undefined;
    }
  });

  it('a manifest of an unknown media type is UNSUPPORTED_MEDIA_TYPE and nothing is stored', async function () {
    const ref = await via(async (ctx) => {
      if (!isManifest(ctx)) return false;
      const u = await ctx.upstream();
      const doc = JSON.parse(u.body.toString()) as Record<string, unknown>;
      doc.mediaType = 'application/vnd.example.not-an-image+json';
      const headers: IncomingHttpHeaders = { ...u.headers, 'content-type': 'application/vnd.example.not-an-image+json' };
      delete headers['docker-content-digest'];
      ctx.reply({ status: 200, headers, body: Buffer.from(JSON.stringify(doc)) });
      return true;
    });
    const svc = new ImageService({ root, registry: FAST });
    await assert.rejects(svc.pull(ref), expectError('UNSUPPORTED_MEDIA_TYPE', /application\/vnd\.example\.not-an-image\+json/));
    assertNothingStored(svc);
  });

  it('a manifest that does not match the registry\'s Docker-Content-Digest is DIGEST_MISMATCH', async function () {
    const ref = await via(async (ctx) => {
      if (!isManifest(ctx)) return false;
      const u = await ctx.upstream();
      ctx.reply({ ...u, body: Buffer.from(`${u.body.toString()} `) });
      return true;
    });
    const svc = new ImageService({ root, registry: FAST });
    await assert.rejects(svc.pull(ref), expectError('DIGEST_MISMATCH', /says its digest is/));
    assertNothingStored(svc);
  });

  describe('hand-made images with bad layers', function () {
    const push = async (repo: string, layer: Buffer, diffId: string): Promise<string> => {
      const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [diffId] } }));
      await pushBlob(registry, repo, layer);
      await pushBlob(registry, repo, config);
      const manifest = Buffer.from(JSON.stringify({
        schemaVersion: 2, mediaType: OCI_MANIFEST,
        config: { mediaType: OCI_CONFIG, digest: sha256(config), size: config.length },
        layers: [{ mediaType: OCI_LAYER_GZIP, digest: sha256(layer), size: layer.length }],
      }));
      await pushManifest(registry, repo, 'v1', OCI_MANIFEST, manifest);
      return `${registry.host}/${repo}:v1`;
    };
    const smallTar = (): Buffer => {
      const d = join(work, 'small');
      mkdirSync(d, { recursive: true });
      writeFileSync(join(d, 'hello'), 'hello\n');
      return execFileSync('tar', ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '-C', d, '-cf', '-', '.']);
    };

    it('a corrupt gzip layer is refused by the converter: LAYER_CONVERSION, no layer, no record', async function () {
      const good = gzipSync(smallTar());
      const corrupt = Buffer.concat([good.subarray(0, 20), Buffer.alloc(200, 0xa5), good.subarray(220)]);
      const ref = await push('test/corrupt', corrupt, sha256(smallTar()));
      const svc = new ImageService({ root, registry: FAST });
      await assert.rejects(svc.pull(ref), expectError('LAYER_CONVERSION', /layer 1\/1 of image .*test\/corrupt:v1/));
      assert.deepEqual(await svc.layers.list(), []);
      assert.deepEqual(listFiles(join(root, 'layers', 'staging')), []);
      assert.deepEqual(await svc.list(), []);
      // The blob itself was what the registry named; unreferenced, GC takes it.
      await svc.gc();
      assert.deepEqual(listFiles(join(root, 'blobs')), []);
    });

    it('a layer whose tar does not match the config diff-id is DIFF_ID_MISMATCH and not stored', async function () {
      const tar = smallTar();
      const wrong = sha256(Buffer.concat([tar, Buffer.from('x')]));
      const ref = await push('test/wrongdiff', gzipSync(tar), wrong);
      const svc = new ImageService({ root, registry: FAST });
      await assert.rejects(svc.pull(ref), expectError('DIFF_ID_MISMATCH', new RegExp(`config says ${wrong}`)));
      assert.deepEqual(await svc.layers.list(), []);
      assert.deepEqual(listFiles(join(root, 'layers', 'staging')), []);
      assert.deepEqual(await svc.list(), []);
    });
  });
});
