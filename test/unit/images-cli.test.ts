// The `vmlet` CLI as a user runs it: a separate process, --root / VMLET_ROOT, exit codes,
// stdout for results and stderr for errors.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Registry, TestImages, listFiles, registryPerSuite, rootPerTest } from '../helpers/registry';

const VMLET = join(__dirname, '..', '..', 'shim', 'cli', 'vmlet.js');

interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

function vmlet(args: string[], env: Record<string, string> = {}): Promise<Result> {
  return new Promise((resolve) => {
    execFile(process.execPath, [VMLET, ...args], { env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

describe('images: the vmlet CLI', function () {
  let registry: Registry;
  let images: TestImages;
  let work: string;
  let root: string;

  registryPerSuite('vmlet-cli-', ['one', 'two'], (f) => ({ registry, images, work } = f));
  rootPerTest((r) => (root = r));

  it('pull, images, rmi: the whole round trip under --root', async function () {
    const pulled = await vmlet(['--root', root, 'pull', images.refs.one]);
    assert.equal(pulled.code, 0, pulled.stderr);
    assert.match(pulled.stdout, new RegExp(`^${images.refs.one} sha256:[a-f0-9]{64}\\n$`));
    // Not a terminal: one plain progress line per layer, no control characters.
    assert.match(pulled.stderr, /layer 1\/2 [a-f0-9]{12} done/);
    assert.doesNotMatch(pulled.stderr, /\x1b\[/);

    assert.equal((await vmlet(['pull', '-q', images.refs.two], { VMLET_ROOT: root })).code, 0, 'VMLET_ROOT picks the root too');
    const listed = await vmlet(['images', '--root', root]);
    assert.equal(listed.code, 0);
    const lines = listed.stdout.trim().split('\n');
    assert.match(lines[0], /^REFERENCE\s+PLATFORM\s+DIGEST\s+LAYERS\s+SIZE$/);
    assert.equal(lines.length, 3);
    assert.match(lines[1], new RegExp(`^${images.refs.one}\\s+linux/amd64\\s+[a-f0-9]{12}\\s+2\\s`));

    const json = JSON.parse((await vmlet(['--root', root, 'images', '--json'])).stdout) as { reference: string; config: { entrypoint: string[] } }[];
    assert.deepEqual(json.map((r) => r.reference), [images.refs.one, images.refs.two]);
    assert.deepEqual(json[0].config.entrypoint, ['/bin/sh', '-c']);

    const removed = await vmlet(['--root', root, 'rmi', images.refs.one]);
    assert.equal(removed.code, 0, removed.stderr);
    assert.match(removed.stdout, new RegExp(`removed ${images.refs.one}\\ndeleted 3 blob\\(s\\), 1 layer\\(s\\)`));
    assert.deepEqual((await vmlet(['--root', root, 'images', '-q'])).stdout, `${images.refs.two}\n`);
  });

  it('two vmlet processes pulling the same image into one root both succeed and store it once', async function () {
    const [a, b] = await Promise.all([vmlet(['--root', root, 'pull', '-q', images.refs.one]), vmlet(['--root', root, 'pull', '-q', images.refs.one])]);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(b.code, 0, b.stderr);
    assert.equal(a.stdout, b.stdout);
    assert.equal(listFiles(join(root, 'blobs')).length, 4, 'manifest, config, two layers: once each');
    assert.equal(listFiles(join(root, 'layers')).filter((f) => f.endsWith('.sqfs')).length, 2);
    assert.deepEqual(listFiles(join(root, 'ingest')).filter((f) => !f.endsWith('.lock')), []);
    assert.equal((await vmlet(['--root', root, 'gc'])).stdout, 'deleted 0 blob(s), 0 layer(s)\n');
  });

  it('bad input: exit 2 with usage for misuse, exit 1 with a clear message for a bad reference', async function () {
    const noArgs = await vmlet(['--root', root, 'pull']);
    assert.equal(noArgs.code, 2);
    assert.match(noArgs.stderr, /pull takes exactly one image reference[\s\S]*usage: vmlet/);
    const unknownOpt = await vmlet(['--root', root, 'pull', '--bogus', images.refs.one]);
    assert.equal(unknownOpt.code, 2);
    assert.match(unknownOpt.stderr, /--bogus/);
    const unknownCmd = await vmlet(['frobnicate']);
    assert.equal(unknownCmd.code, 2);
    assert.match(unknownCmd.stderr, /unknown command 'frobnicate'/);
    const badRef = await vmlet(['--root', root, 'pull', 'busybox']);
    assert.equal(badRef.code, 1);
    assert.match(badRef.stderr, /^vmlet pull: image reference 'busybox' is invalid: it names no registry host/);
    const badPlatform = await vmlet(['--root', root, 'pull', '--platform', 'amd64', images.refs.one]);
    assert.equal(badPlatform.code, 1);
    assert.match(badPlatform.stderr, /platform 'amd64' is invalid/);
    const missing = await vmlet(['--root', root, 'rmi', `${registry.host}/test/none:v1`]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /no image/);
    assert.deepEqual(listFiles(join(root, 'blobs')), []);
  });

  it('load of an OCI layout, then gc keeps what the loaded images use', async function () {
    const loaded = await vmlet(['--root', root, 'load', '--name', 'localhost/fixture', join(work, 'layout')]);
    assert.equal(loaded.code, 0, loaded.stderr);
    assert.match(loaded.stdout, /loaded localhost\/fixture:one sha256:/);
    const gc = await vmlet(['--root', root, 'gc']);
    assert.equal(gc.code, 0);
    assert.equal(gc.stdout, 'deleted 0 blob(s), 0 layer(s)\n');
  });

  it('--verbose logs the retries of a registry that refuses connections, then fails', async function () {
    const config = join(work, 'empty-config.json');
    writeFileSync(config, '{}');
    // A port nothing listens on: connection refused on every attempt.
    const r = await vmlet(['--root', root, '-v', 'pull', '--auth-config', config, '127.0.0.1:1/test/x:v1']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /debug images: .*retry 1\/4/);
    assert.match(r.stderr, /vmlet pull: .*cannot talk to 127\.0\.0\.1:1.*ECONNREFUSED/);
  });
});
