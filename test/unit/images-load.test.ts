// `vmlet load`: OCI layout directories and docker-archive tars, verified like a pull.
import assert from 'node:assert/strict';
import { rmSync, writeFileSync, readFileSync, cpSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { ImageService } from '../../shim/images/image-service';
import { loadImages } from '../../shim/images/loader';
import { isImageError, ImageErrorCode } from '../../shim/images/errors';
import { OciLayout, populateBusybox, populateFiles, tempDir, sh, listFiles, rootPerTest } from '../helpers/registry';

function rejectsWith(code: ImageErrorCode, text: RegExp): (e: unknown) => boolean {
  return (e) => {
    assert.ok(isImageError(e, code), `expected ImageError ${code}, got ${String(e)}`);
    assert.match((e as Error).message, text);
    return true;
  };
}

describe('images: vmlet load', function () {
  let work: string;
  let layoutDir: string;
  let root: string;

  before(async function () {
    work = tempDir('vmlet-load-');
    layoutDir = join(work, 'fixture');
    const layout = await OciLayout.create(layoutDir);
    await layout.newImage('empty');
    await layout.addLayer('empty', 'base', populateBusybox);
    await layout.addLayer('base', 'app', (r) => populateFiles(r, 'app', 3, 10_000, 'app'));
    await layout.configure('app', { cmd: ['/bin/ls', '/app'], env: ['MODE=loaded'] });
  });
  after(function () {
    rmSync(work, { recursive: true, force: true });
  });
  rootPerTest((r) => (root = r));

  it('loads every tag of an OCI layout under --name', async function () {
    const svc = new ImageService({ root });
    const recs = await loadImages(svc, layoutDir, { name: 'localhost/fixture' });
    assert.deepEqual(recs.map((r) => r.reference).sort(), ['localhost/fixture:app', 'localhost/fixture:base', 'localhost/fixture:empty']);
    const app = await svc.get('localhost/fixture:app');
    assert.deepEqual(app.config.cmd, ['/bin/ls', '/app']);
    assert.ok(app.config.env.includes('MODE=loaded'));
    assert.equal(app.layers.length, 2);
    assert.match(await sh('unsquashfs', ['-lln', svc.layerPath(app.layers[1].diffId)]), /squashfs-root\/app\/f2/);
    assert.equal((await svc.layers.list()).length, 2, 'base layer shared by :base and :app, stored once');
  });

  it('without --name, an OCI layout is named localhost/<directory>:<tag>', async function () {
    const recs = await loadImages(new ImageService({ root }), layoutDir);
    assert.ok(recs.some((r) => r.reference === 'localhost/fixture:app'));
  });

  it('loads a docker-archive tar (skopeo) and shares layers with the same image from the layout', async function () {
    const tar = join(work, 'app.tar');
    rmSync(tar, { force: true });
    await sh('skopeo', ['copy', '-q', `oci:${layoutDir}:app`, `docker-archive:${tar}:example.test/tools/app:v2`]);
    const svc = new ImageService({ root });
    const [fromLayout] = await loadImages(svc, layoutDir, { name: 'localhost/fixture' }).then((r) => r.filter((x) => x.reference.endsWith(':app')));
    const layersBefore = await svc.layers.list();
    const [fromTar] = await loadImages(svc, tar);
    assert.equal(fromTar.reference, 'example.test/tools/app:v2');
    assert.deepEqual(fromTar.layers.map((l) => l.diffId), fromLayout.layers.map((l) => l.diffId));
    assert.deepEqual(fromTar.config, fromLayout.config);
    assert.deepEqual(await svc.layers.list(), layersBefore, 'no new squashfs: same diff-ids');
  });

  it('records a reference far longer than a file name may be', async function () {
    const long = `localhost/${'a'.repeat(200)}/${'b'.repeat(200)}`;
    const svc = new ImageService({ root });
    const recs = await loadImages(svc, layoutDir, { name: long });
    assert.ok(recs.some((r) => r.reference === `${long}:app`));
    assert.equal((await svc.get(`${long}:app`)).layers.length, 2);
    assert.equal((await svc.list()).length, 3);
  });

  it('a path that is neither an OCI layout nor a tar is BAD_ARCHIVE', async function () {
    const svc = new ImageService({ root });
    const junk = join(work, 'junk.bin');
    writeFileSync(junk, 'not a tar at all'.repeat(64));
    await assert.rejects(loadImages(svc, junk), rejectsWith('BAD_ARCHIVE', /manifest\.json|tar/));
    await assert.rejects(loadImages(svc, work), rejectsWith('BAD_ARCHIVE', /oci-layout/));
    await assert.rejects(loadImages(svc, join(work, 'missing')), rejectsWith('BAD_ARCHIVE', /ENOENT/));
    assert.deepEqual(listFiles(root).filter((f) => !f.startsWith('leases')), []);
  });

  it('a layout whose layer blob was altered is DIGEST_MISMATCH and nothing is recorded', async function () {
    const copy = join(work, 'tampered');
    rmSync(copy, { recursive: true, force: true });
    cpSync(layoutDir, copy, { recursive: true });
    const index = JSON.parse(readFileSync(join(copy, 'index.json'), 'utf8')) as { manifests: { digest: string; annotations: Record<string, string> }[] };
    const app = index.manifests.find((m) => m.annotations['org.opencontainers.image.ref.name'] === 'app')!;
    const manifest = JSON.parse(readFileSync(join(copy, 'blobs', 'sha256', app.digest.slice(7)), 'utf8')) as { layers: { digest: string }[] };
    const blob = join(copy, 'blobs', 'sha256', manifest.layers[1].digest.slice(7));
    const bytes = readFileSync(blob);
    bytes[bytes.length >> 1] ^= 0x01;
    writeFileSync(blob, bytes);
    // Only the tampered tag, so the untouched ones do not mask the check.
    index.manifests = [app];
    writeFileSync(join(copy, 'index.json'), JSON.stringify(index));
    const svc = new ImageService({ root });
    await assert.rejects(loadImages(svc, copy, { name: 'localhost/tampered' }), rejectsWith('DIGEST_MISMATCH', new RegExp(manifest.layers[1].digest)));
    assert.deepEqual(await svc.list(), []);
    assert.equal(await svc.content.has(manifest.layers[1].digest), false);
    assert.deepEqual(readdirSync(join(root, 'ingest')).filter((f) => f.endsWith('.partial')), []);
  });
});
