// Parsers of user and registry input: references, platforms, auth challenges, Docker configs.
import assert from 'node:assert/strict';
import { writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseReference, formatReference, isLoopbackHost } from '../../shim/images/reference';
import { parsePlatform, selectPlatform, platformMatches } from '../../shim/images/platform';
import { parseChallenge, DockerConfigCredentials } from '../../shim/images/auth';
import { parseDigest } from '../../shim/images/digest';
import { RegistryClient } from '../../shim/images/distribution';
import { parseManifest, parseConfig } from '../../shim/images/manifest';
import { isImageError } from '../../shim/images/errors';
import { OCI_MANIFEST, OCI_CONFIG } from '../../shim/images/mediatypes';
import { tempDir } from '../helpers/registry';

const HEX = 'a'.repeat(64);

describe('images: parsing references, platforms, challenges and credentials', function () {
  it('parses references with host, port, nested path, tag and digest', function () {
    assert.deepEqual(parseReference('127.0.0.1:5000/lib/busybox:1.36'),
      { registry: '127.0.0.1:5000', repository: 'lib/busybox', tag: '1.36', digest: undefined });
    assert.deepEqual(parseReference('localhost/app'), { registry: 'localhost', repository: 'app', tag: 'latest', digest: undefined });
    const pinned = parseReference(`registry.example:443/a/b/c@sha256:${HEX}`);
    assert.equal(pinned.tag, undefined);
    assert.equal(pinned.digest, `sha256:${HEX}`);
    assert.equal(formatReference(parseReference(`reg.example/x:v1@sha256:${HEX}`)), `reg.example/x:v1@sha256:${HEX}`);
  });

  it('refuses references without a host, with uppercase paths, bad tags or bad digests', function () {
    const bad = (ref: string, why: RegExp): void => {
      assert.throws(() => parseReference(ref), (e) => isImageError(e, 'BAD_REFERENCE') && why.test((e as Error).message), ref);
    };
    bad('busybox', /no registry host/);
    bad('library/busybox:latest', /no registry host/);
    bad('reg.example/BusyBox', /lowercase/);
    bad('reg.example/a//b', /lowercase/);
    bad('reg.example/a:-bad', /tag/);
    bad('reg.example/a@sha256:abc', /digest/);
    bad('', /empty/);
  });

  it('knows loopback registries (HTTP without being asked)', function () {
    assert.ok(isLoopbackHost('127.0.0.1:5000'));
    assert.ok(isLoopbackHost('localhost'));
    assert.ok(isLoopbackHost('[::1]:5000'));
    assert.ok(!isLoopbackHost('reg.example:5000'));
    assert.ok(!isLoopbackHost('127.0.0.1.example'));
  });

  it('talks HTTPS to registries unless asked for plain HTTP or the registry is on loopback', function () {
    const tls = new RegistryClient();
    const plain = new RegistryClient({ plainHttp: true });
    assert.equal(tls.base('reg.example:5000'), 'https://reg.example:5000/v2/');
    assert.equal(plain.base('reg.example:5000'), 'http://reg.example:5000/v2/');
    assert.equal(tls.base('127.0.0.1:5000'), 'http://127.0.0.1:5000/v2/');
    tls.close();
    plain.close();
  });

  it('parses platforms and selects from candidates (arm64 variant v8 implied)', function () {
    assert.deepEqual(parsePlatform('linux/arm64/v8'), { os: 'linux', architecture: 'arm64', variant: 'v8' });
    assert.throws(() => parsePlatform('amd64'), (e) => isImageError(e, 'BAD_PLATFORM'));
    assert.ok(platformMatches({ os: 'linux', architecture: 'arm64', variant: 'v8' }, { os: 'linux', architecture: 'arm64' }));
    assert.ok(!platformMatches({ os: 'linux', architecture: 'arm', variant: 'v7' }, { os: 'linux', architecture: 'arm', variant: 'v6' }));
    const pick = selectPlatform({ os: 'linux', architecture: 'arm', variant: 'v7' }, [
      { platform: { os: 'linux', architecture: 'arm', variant: 'v6' }, item: 'v6' },
      { platform: { os: 'linux', architecture: 'arm', variant: 'v7' }, item: 'v7' },
    ], 'test index');
    assert.equal(pick, 'v7');
  });

  it('parses WWW-Authenticate challenges, quoted commas and escapes included', function () {
    const c = parseChallenge('Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push"');
    assert.equal(c.scheme, 'bearer');
    assert.deepEqual(c.params, { realm: 'http://127.0.0.1:1/token', service: 'reg', scope: 'repository:a/b:pull,push' });
    assert.deepEqual(parseChallenge('Basic realm="say \\"hi\\""').params, { realm: 'say "hi"' });
  });

  it('reads Docker config.json credentials (auth field, URL keys, username/password) and refuses broken ones', function () {
    const dir = tempDir('vmlet-auth-');
    try {
      const creds = new DockerConfigCredentials('x', JSON.stringify({
        auths: {
          'https://reg.example/v1/': { auth: Buffer.from('alice:pa:ss').toString('base64') },
          '127.0.0.1:5000': { username: 'bob', password: 'pw' },
        },
      }));
      assert.deepEqual(creds.get('reg.example'), { username: 'alice', password: 'pa:ss' });
      assert.deepEqual(creds.get('127.0.0.1:5000'), { username: 'bob', password: 'pw' });
      assert.equal(creds.get('other.example'), undefined);
      assert.throws(() => new DockerConfigCredentials('cfg', '{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}'),
        (e) => isImageError(e, 'BAD_CONFIG') && /user:password/.test((e as Error).message));
      const broken = join(dir, 'config.json');
      writeFileSync(broken, '{not json');
      assert.throws(() => DockerConfigCredentials.load(broken), (e) => isImageError(e, 'BAD_CONFIG') && /not valid JSON/.test((e as Error).message));
      assert.throws(() => DockerConfigCredentials.load(join(dir, 'absent.json')), (e) => isImageError(e, 'BAD_CONFIG'));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('validates digests strictly: they become file names', function () {
    assert.deepEqual(parseDigest(`sha256:${HEX}`), { algorithm: 'sha256', hex: HEX });
    for (const d of [`sha256:${HEX.slice(1)}`, `md5:${HEX}`, `sha256:../${HEX.slice(3)}`, `sha256:${HEX.toUpperCase()}`]) {
      assert.throws(() => parseDigest(d), (e) => isImageError(e, 'BAD_MANIFEST'), d);
    }
  });

  it('checks manifests and configs before trusting a field', function () {
    const manifest = (o: unknown): Buffer => Buffer.from(JSON.stringify(o));
    const config = { mediaType: OCI_CONFIG, digest: `sha256:${HEX}`, size: 10 };
    assert.equal(parseManifest(manifest({ schemaVersion: 2, config, layers: [] }), OCI_MANIFEST, 'm').layers.length, 0);
    assert.throws(() => parseManifest(manifest({ schemaVersion: 1, config, layers: [] }), OCI_MANIFEST, 'm'), (e) => isImageError(e, 'BAD_MANIFEST'));
    assert.throws(() => parseManifest(manifest({ schemaVersion: 2, config, layers: [{ mediaType: 'x', digest: `sha256:${HEX}`, size: -1 }] }), OCI_MANIFEST, 'm'),
      (e) => isImageError(e, 'BAD_MANIFEST') && /layers\[0\]/.test((e as Error).message));
    assert.throws(() => parseManifest(manifest({ schemaVersion: 2, config: { ...config, mediaType: 'application/vnd.example.helm+json' }, layers: [] }), OCI_MANIFEST, 'm'),
      (e) => isImageError(e, 'UNSUPPORTED_MEDIA_TYPE') && /not a container image/.test((e as Error).message));
    assert.throws(() => parseConfig(Buffer.from('{"rootfs":{"type":"layers","diff_ids":["nope"]}}'), 'c'), (e) => isImageError(e, 'BAD_MANIFEST'));
    assert.throws(() => parseConfig(Buffer.from('{"config":{"Env":"A=1"},"rootfs":{"type":"layers","diff_ids":[]}}'), 'c'),
      (e) => isImageError(e, 'BAD_CONFIG') && /Env must be a list/.test((e as Error).message));
  });
});
