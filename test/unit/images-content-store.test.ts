// The content store on its own: verified atomic ingest, resume from a partial file, servers
// that ignore Range, stale locks of dead processes.
import assert from 'node:assert/strict';
import { rmSync, writeFileSync, mkdirSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { ContentStore, BlobOpener } from '../../shim/images/content-store';
import { FileLock } from '../../shim/images/lock';
import { isImageError } from '../../shim/images/errors';
import { tempDir, listFiles } from '../helpers/registry';

const data = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251));
const digest = `sha256:${createHash('sha256').update(data).digest('hex')}`;
const desc = { mediaType: 'application/octet-stream', digest, size: data.length };

/** Serves `data` from an offset in 16 KiB chunks, recording the offsets asked for. */
function opener(asked: number[], opts: { ignoreRange?: boolean; body?: Buffer } = {}): BlobOpener {
  return async (offset) => {
    asked.push(offset);
    const from = opts.ignoreRange ? 0 : offset;
    const body = (opts.body ?? data).subarray(from);
    const chunks: Buffer[] = [];
    for (let i = 0; i < body.length; i += 16384) chunks.push(body.subarray(i, i + 16384));
    return { stream: Readable.from(chunks), offset: from };
  };
}

describe('images: content store', function () {
  let root: string;
  beforeEach(function () {
    root = tempDir('vmlet-cs-');
  });
  afterEach(function () {
    rmSync(root, { recursive: true, force: true });
  });

  it('ingests a blob atomically: visible only complete and verified', async function () {
    const cs = new ContentStore(root);
    const asked: number[] = [];
    let seenDuring = false;
    await cs.ingest(desc, opener(asked), { onProgress: () => { seenDuring ||= existsSync(cs.path(digest)); } });
    assert.equal(seenDuring, false, 'never visible before it is complete');
    assert.deepEqual(readFileSync(cs.path(digest)), data);
    assert.deepEqual(asked, [0]);
    assert.deepEqual(listFiles(join(root, 'ingest')), []);
    // Present: a second ingest does not open the source at all.
    await cs.ingest(desc, opener(asked));
    assert.deepEqual(asked, [0]);
  });

  it('resumes from a partial file left by an interrupted download', async function () {
    const cs = new ContentStore(root);
    mkdirSync(join(root, 'ingest'), { recursive: true });
    writeFileSync(cs.partialPath(digest), data.subarray(0, 123_456));
    const asked: number[] = [];
    await cs.ingest(desc, opener(asked));
    assert.deepEqual(asked, [123_456]);
    assert.deepEqual(readFileSync(cs.path(digest)), data);
  });

  it('starts over when the server ignores Range', async function () {
    const cs = new ContentStore(root);
    mkdirSync(join(root, 'ingest'), { recursive: true });
    writeFileSync(cs.partialPath(digest), data.subarray(0, 50_000));
    const asked: number[] = [];
    await cs.ingest(desc, opener(asked, { ignoreRange: true }));
    assert.deepEqual(asked, [50_000]);
    assert.deepEqual(readFileSync(cs.path(digest)), data);
  });

  it('a partial file with wrong bytes ends in DIGEST_MISMATCH and is discarded, so the next try starts clean', async function () {
    const cs = new ContentStore(root);
    mkdirSync(join(root, 'ingest'), { recursive: true });
    writeFileSync(cs.partialPath(digest), Buffer.alloc(1000, 0xee));
    await assert.rejects(cs.ingest(desc, opener([])), (e) => isImageError(e, 'DIGEST_MISMATCH'));
    assert.equal(existsSync(cs.partialPath(digest)), false);
    assert.equal(await cs.has(digest), false);
    await cs.ingest(desc, opener([]));
    assert.ok(await cs.has(digest));
  });

  it('a body longer than its descriptor is SIZE_MISMATCH before a byte too many is written', async function () {
    const cs = new ContentStore(root);
    const longer = Buffer.concat([data, Buffer.from('extra')]);
    await assert.rejects(cs.ingest(desc, opener([], { body: longer })), (e) => isImageError(e, 'SIZE_MISMATCH') && /longer than/.test((e as Error).message));
    assert.deepEqual(listFiles(root).filter((f) => !f.endsWith('.lock')), []);
  });

  it('breaks a lock whose owner process is dead, and waits for a live one', async function () {
    const lockPath = join(root, 'x.lock');
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout.toString();
    writeFileSync(lockPath, dead);
    const lock = await FileLock.acquire(lockPath, { timeoutMs: 2000 });
    assert.equal(readFileSync(lockPath, 'utf8'), String(process.pid));
    await assert.rejects(FileLock.acquire(lockPath, { timeoutMs: 200, what: 'the test lock' }),
      (e) => isImageError(e, 'LOCK_TIMEOUT') && /the test lock/.test((e as Error).message));
    await lock.release();
    await (await FileLock.acquire(lockPath, { timeoutMs: 200 })).release();
  });
});
