// Pulling from a real registry (Debian docker-registry on 127.0.0.1) into a temp root:
// tags, digests, platform selection, shared layers, removal + GC, concurrency, token auth.
import assert from 'node:assert/strict';
import { existsSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { execFileSync } from 'node:child_process';
import { ImageService } from '../../shim/images/image-service';
import { DockerConfigCredentials, StaticCredentials } from '../../shim/images/auth';
import { OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, OCI_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_LAYER_GZIP } from '../../shim/images/mediatypes';
import { isImageError } from '../../shim/images/errors';
import {
  Registry, TestImages, sh, pushBlob, pushManifest, getManifest, sha256, listFiles, registryPerSuite, rootPerTest,
} from '../helpers/registry';

describe('images: pull from a real registry', function () {
  let registry: Registry;
  let images: TestImages;
  let work: string;
  let root: string;

  registryPerSuite('vmlet-pull-', ['alpha', 'beta'], (f) => ({ registry, images, work } = f));
  rootPerTest((r) => (root = r));

  it('pulls by tag: verified blobs, one squashfs per layer, the runtime config kept', async function () {
    const svc = new ImageService({ root });
    const rec = await svc.pull(images.refs.alpha);
    assert.equal(rec.reference, images.refs.alpha);
    assert.equal(rec.manifestMediaType, OCI_MANIFEST);
    assert.deepEqual(rec.platform, { os: 'linux', architecture: 'amd64' });
    assert.deepEqual(rec.config.entrypoint, ['/bin/sh', '-c']);
    assert.deepEqual(rec.config.cmd, ['echo hello']);
    assert.ok(rec.config.env.includes('GREETING=hello'));
    assert.equal(rec.config.workingDir, '/srv');
    assert.equal(rec.config.user, '1000:1000');
    assert.equal(rec.layers.length, 2);
    // What the registry serves for the tag is exactly what we recorded.
    assert.equal(rec.manifestDigest, (await getManifest(registry, 'test/alpha', 'v1')).digest);
    for (const l of rec.layers) {
      assert.ok(await svc.content.has(l.digest), `blob ${l.digest} stored`);
      assert.ok(existsSync(svc.layerPath(l.diffId)), `squashfs of ${l.diffId} stored`);
    }
    // The base layer's squashfs holds busybox; the top one the generated files.
    const base = await sh('unsquashfs', ['-lln', svc.layerPath(rec.layers[0].diffId)]);
    assert.match(base, /squashfs-root\/bin\/busybox/);
    assert.match(base, /squashfs-root\/bin\/sh -> busybox/);
    const top = await sh('unsquashfs', ['-lln', svc.layerPath(rec.layers[1].diffId)]);
    assert.match(top, /squashfs-root\/alpha\/f3/);
    assert.deepEqual((await svc.list()).map((r) => r.reference), [images.refs.alpha]);
    // What `vmlet run` asks for: layers bottom to top, by reference or by digest prefix.
    const fs = await svc.rootfs(rec.manifestDigest.slice(7, 19));
    assert.deepEqual(fs.layers, rec.layers.map((l) => svc.layerPath(l.diffId)));
    assert.equal(fs.image.reference, images.refs.alpha);
    assert.deepEqual(listFiles(join(root, 'ingest')).filter((f) => !f.endsWith('.lock')), [], 'no partial downloads left');
  });

  it('pulls by digest and records the manifest the digest names', async function () {
    const m = await getManifest(registry, 'test/beta', 'v1');
    const ref = `${registry.host}/test/beta@${m.digest}`;
    const rec = await new ImageService({ root }).pull(ref);
    assert.equal(rec.reference, ref);
    assert.equal(rec.manifestDigest, m.digest);
  });

  it('a second pull of a stored image downloads nothing', async function () {
    const svc = new ImageService({ root });
    await svc.pull(images.refs.alpha);
    const phases: string[] = [];
    await svc.pull(images.refs.alpha, { onProgress: (p) => { if (p.kind === 'layer') phases.push(p.phase); } });
    assert.deepEqual(phases, ['done', 'done']);
  });

  it('stores layers shared by two images once; rmi keeps them; gc removes only the rest', async function () {
    const svc = new ImageService({ root });
    const a = await svc.pull(images.refs.alpha);
    const b = await svc.pull(images.refs.beta);
    assert.equal(a.layers[0].digest, b.layers[0].digest, 'the fixture shares its base layer');
    assert.notEqual(a.layers[1].diffId, b.layers[1].diffId);
    assert.equal((await svc.layers.list()).length, 3, 'base + alpha + beta: the base is stored once');

    const removed = await svc.remove(images.refs.alpha);
    assert.deepEqual(removed.map((r) => r.reference), [images.refs.alpha]);
    // Removal alone deletes no content: everything beta needs is still there.
    for (const l of b.layers) assert.ok(existsSync(svc.layerPath(l.diffId)));

    const gc = await svc.gc();
    assert.deepEqual(gc.layers, [a.layers[1].diffId]);
    assert.ok(gc.blobs.includes(a.layers[1].digest));
    assert.ok(gc.blobs.includes(a.manifestDigest));
    assert.ok(gc.blobs.includes(a.configDigest));
    assert.ok(!gc.blobs.includes(a.layers[0].digest), 'the shared base blob is kept');
    for (const l of b.layers) {
      assert.ok(existsSync(svc.layerPath(l.diffId)), `beta layer ${l.diffId} kept`);
      assert.ok(await svc.content.has(l.digest));
    }
    assert.ok(await svc.content.has(b.manifestDigest));
    assert.ok(await svc.content.has(b.configDigest));

    await svc.remove(images.refs.beta);
    await svc.gc();
    assert.deepEqual(await svc.content.list(), []);
    assert.deepEqual(await svc.layers.list(), []);
  });

  it('rmi of an unknown image is NOT_FOUND', async function () {
    await assert.rejects(new ImageService({ root }).remove(`${registry.host}/test/nothing:v1`), (e) => isImageError(e, 'NOT_FOUND'));
  });

  it('two concurrent pulls of the same image (two services, one root) store each blob and layer once', async function () {
    const one = new ImageService({ root });
    const two = new ImageService({ root });
    const [r1, r2] = await Promise.all([one.pull(images.refs.alpha), two.pull(images.refs.alpha)]);
    assert.equal(r1.manifestDigest, r2.manifestDigest);
    const blobs = await one.content.list();
    assert.equal(blobs.length, 4, 'manifest + config + 2 layers');
    assert.equal((await one.layers.list()).length, 2);
    assert.deepEqual(listFiles(join(root, 'layers', 'staging')), []);
    assert.deepEqual(listFiles(join(root, 'leases')), [], 'both leases released');
    // GC right after must keep everything: both pulls recorded the image.
    assert.deepEqual(await one.gc(), { blobs: [], layers: [] });
  });

  it('GC waits for a pull in progress instead of deleting what it has fetched', async function () {
    const svc = new ImageService({ root });
    let pullDone = false;
    let gc: Promise<{ result: Awaited<ReturnType<ImageService['gc']>>; afterPull: boolean }> | undefined;
    const rec = await svc.pull(images.refs.beta, {
      onProgress: (p) => {
        // A layer blob is in the content store but no image record refers to it yet.
        if (p.kind === 'layer' && p.phase === 'converting' && gc === undefined) {
          gc = svc.gc().then((result) => ({ result, afterPull: pullDone }));
        }
      },
    });
    pullDone = true;
    assert.ok(gc, 'GC was started during the pull');
    const { result, afterPull } = await gc;
    assert.equal(afterPull, true, 'GC finished only after the pull');
    assert.deepEqual(result, { blobs: [], layers: [] });
    for (const l of rec.layers) assert.ok(existsSync(svc.layerPath(l.diffId)), 'layer survived the concurrent GC');
    assert.ok(await svc.content.has(rec.configDigest));
  });

  it('an unknown tag is NOT_FOUND and a reference without a registry host is BAD_REFERENCE', async function () {
    const svc = new ImageService({ root });
    await assert.rejects(svc.pull(`${registry.host}/test/alpha:nope`), (e) => isImageError(e, 'NOT_FOUND') && /nope/.test((e as Error).message));
    await assert.rejects(svc.pull('test/alpha:v1'), (e) => isImageError(e, 'BAD_REFERENCE') && /no registry host/.test((e as Error).message));
    assert.deepEqual(listFiles(join(root, 'blobs')), []);
  });

  it('pulls Docker schema 2 manifests and a Docker manifest list', async function () {
    await images.layout.push('beta', registry, 'test/docker:v1', 'v2s2');
    const single = await getManifest(registry, 'test/docker', 'v1');
    const list = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: DOCKER_MANIFEST_LIST,
      manifests: [{ mediaType: DOCKER_MANIFEST, digest: single.digest, size: single.data.length, platform: { os: 'linux', architecture: 'amd64' } }],
    }));
    await pushManifest(registry, 'test/docker', 'list', DOCKER_MANIFEST_LIST, list);
    const svc = new ImageService({ root });
    const rec = await svc.pull(`${registry.host}/test/docker:v1`);
    assert.equal(rec.manifestMediaType, DOCKER_MANIFEST);
    assert.ok(rec.layers.every((l) => l.mediaType === DOCKER_LAYER_GZIP));
    assert.deepEqual(rec.config.entrypoint, ['/bin/sh', '-c']);
    const viaList = await svc.pull(`${registry.host}/test/docker:list`);
    assert.equal(viaList.indexDigest, sha256(list));
    assert.equal(viaList.manifestDigest, single.digest);
    assert.equal((await svc.layers.list()).length, 2, 'same diff-ids as the OCI image: stored once');
  });

  describe('an OCI index with two platforms', function () {
    let indexRef: string;
    let amd64Digest: string;
    let arm64Digest: string;

    before(async function () {
      // arm64 variant built by hand: one layer with one file, its config, its manifest.
      const tree = join(work, 'arm64-tree');
      mkdirSync(tree, { recursive: true });
      writeFileSync(join(tree, 'arch'), 'arm64\n');
      const tarBytes = tarOf(tree);
      const layer = gzipSync(tarBytes);
      const config = Buffer.from(JSON.stringify({ architecture: 'arm64', os: 'linux', rootfs: { type: 'layers', diff_ids: [sha256(tarBytes)] }, config: { Cmd: ['/arch'] } }));
      await pushBlob(registry, 'test/multi', layer);
      await pushBlob(registry, 'test/multi', config);
      const armManifest = Buffer.from(JSON.stringify({
        schemaVersion: 2, mediaType: OCI_MANIFEST,
        config: { mediaType: OCI_CONFIG, digest: sha256(config), size: config.length },
        layers: [{ mediaType: OCI_LAYER_GZIP, digest: sha256(layer), size: layer.length }],
      }));
      arm64Digest = await pushManifest(registry, 'test/multi', sha256(armManifest), OCI_MANIFEST, armManifest);
      // amd64 variant: the busybox image, copied into this repository by skopeo.
      await images.layout.push('alpha', registry, 'test/multi:amd64');
      const amd = await getManifest(registry, 'test/multi', 'amd64');
      amd64Digest = amd.digest;
      const index = Buffer.from(JSON.stringify({
        schemaVersion: 2, mediaType: OCI_INDEX,
        manifests: [
          { mediaType: OCI_MANIFEST, digest: arm64Digest, size: armManifest.length, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
          { mediaType: OCI_MANIFEST, digest: amd64Digest, size: amd.data.length, platform: { os: 'linux', architecture: 'amd64' } },
        ],
      }));
      await pushManifest(registry, 'test/multi', 'v1', OCI_INDEX, index);
      indexRef = `${registry.host}/test/multi:v1`;
    });

    it('selects linux/amd64 by default', async function () {
      const rec = await new ImageService({ root }).pull(indexRef);
      assert.equal(rec.manifestDigest, amd64Digest);
      assert.ok(rec.indexDigest);
      assert.equal(rec.layers.length, 2);
    });

    it('selects linux/arm64 when asked, and the index stays referenced by the record', async function () {
      const svc = new ImageService({ root });
      const rec = await svc.pull(indexRef, { platform: { os: 'linux', architecture: 'arm64' } });
      assert.equal(rec.manifestDigest, arm64Digest);
      assert.deepEqual(rec.config.cmd, ['/arch']);
      assert.deepEqual(rec.platform, { os: 'linux', architecture: 'arm64' });
      assert.match(await sh('unsquashfs', ['-lln', svc.layerPath(rec.layers[0].diffId)]), /squashfs-root\/arch/);
      assert.deepEqual(await svc.gc(), { blobs: [], layers: [] });
    });

    it('a platform the index lacks is PLATFORM_NOT_FOUND, listing what it has', async function () {
      await assert.rejects(new ImageService({ root }).pull(indexRef, { platform: { os: 'linux', architecture: 's390x' } }),
        (e) => isImageError(e, 'PLATFORM_NOT_FOUND') && /linux\/arm64\/v8, linux\/amd64/.test((e as Error).message));
      assert.deepEqual(listFiles(join(root, 'blobs')), []);
    });
  });
});

function tarOf(dir: string): Buffer {
  return execFileSync('tar', ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '-C', dir, '-cf', '-', '.']);
}

describe('images: pull from a token-auth registry (Bearer flow)', function () {
  let registry: Registry;
  let images: TestImages;
  let work: string;
  let root: string;

  registryPerSuite('vmlet-token-', ['secure'], (f) => ({ registry, images, work } = f), { token: true });
  rootPerTest((r) => (root = r));

  it('pulls with credentials from a Docker config.json: token fetched for the pull scope', async function () {
    const token = registry.token!;
    const configPath = join(work, 'config.json');
    writeFileSync(configPath, JSON.stringify({
      auths: { [registry.host]: { auth: Buffer.from(`${token.username}:${token.password}`).toString('base64') } },
    }));
    const before = token.requests.length;
    const svc = new ImageService({ root, registry: { credentials: DockerConfigCredentials.load(configPath) } });
    const rec = await svc.pull(images.refs.secure);
    assert.equal(rec.layers.length, 2);
    const mine = token.requests.slice(before);
    assert.equal(mine.length, 1, 'one token for the whole pull: manifest, config and layers reuse it');
    assert.ok(mine.every((r) => r.user === token.username && r.scope.includes('repository:test/secure:pull')));
  });

  it('without credentials the registry refuses: UNAUTHORIZED, nothing stored', async function () {
    const svc = new ImageService({ root });
    await assert.rejects(svc.pull(images.refs.secure), (e) => isImageError(e, 'UNAUTHORIZED') && /credentials/.test((e as Error).message));
    assert.deepEqual(listFiles(join(root, 'blobs')), []);
  });

  it('with a wrong password the token server refuses: UNAUTHORIZED', async function () {
    const svc = new ImageService({ root, registry: { credentials: new StaticCredentials({ [registry.host]: { username: registry.token!.username, password: 'wrong' } }) } });
    await assert.rejects(svc.pull(images.refs.secure), (e) => isImageError(e, 'UNAUTHORIZED'));
    assert.deepEqual(await svc.list(), []);
  });
});
