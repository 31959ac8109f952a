// Rootfs stacking by the real agent on this host: two squashfs layers built
// with mksquashfs (zstd), loop-attached read-only, under overlayfs with a
// tmpfs upper, inside a private mount namespace (`unshare -m`).
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { copyFileSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentClient, AgentError } from '../../shim/agent/client';
import { buildTestLayers, rootfsPrerequisites, run, RunningAgent, startAgent } from './agent-harness';

const fileSha = (p: string): string => createHash('sha256').update(readFileSync(p)).digest('hex');

describe('agent: rootfs stacking (squashfs layers + overlayfs, host-side in a mount namespace)', function () {
  let agent: RunningAgent;
  let client: AgentClient;
  let work: string;
  let layer1: string;
  let layer2: string;

  before(async function () {
    const missing = rootfsPrerequisites();
    if (missing) {
      console.log(`      !!! SKIPPED: rootfs stacking needs root, loop devices, unshare, mksquashfs, busybox-static: ${missing}`);
      this.skip();
    }
    ({ work, layer1, layer2 } = buildTestLayers());
    agent = await startAgent({ mountNamespace: true });
    client = await agent.connect();
  });
  after(async () => {
    client?.close();
    await agent?.stop();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  const env = ['PATH=/bin'];

  /** A read-only loop device over a new empty file (0 sectors, like a template's unfilled disk slot), detached after `use`. */
  async function withEmptyLoopDevice(name: string, use: (dev: string, file: string) => Promise<void>): Promise<void> {
    const file = join(work, name);
    writeFileSync(file, '');
    const dev = execFileSync('losetup', ['--find', '--show', '--read-only', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    try {
      await use(dev, file);
    } finally {
      // A device still mounted in the agent's namespace is only marked for
      // autoclear here; it goes when the agent stops.
      execFileSync('losetup', ['-d', dev]);
    }
  }

  it('stacks two layers: the upper layer shadows the lower, both are visible, writes land in tmpfs', async () => {
    const before = [fileSha(layer1), fileSha(layer2)];
    const merged = await client.mountRootfs('c1', [layer1, layer2]);
    assert.equal(merged, join(agent.dir, 'state', 'c1', 'rootfs'));
    const r = await run(client, ['sh', '-c', 'cat /etc/greeting /etc/shadowed /etc/only1; echo changed > /etc/greeting; rm /etc/only1; echo new > /new-file; cat /etc/greeting /new-file; ls /etc'], { rootfs: 'c1', env });
    assert.equal(r.stderr, '');
    assert.equal(r.stdout, 'hello from layer 2\nlayer2\nonly in layer1\nchanged\nnew\ngreeting\nshadowed\n');
    assert.deepEqual(r.status, { code: 0, signal: null });
    // The image files are byte-for-byte what they were.
    assert.deepEqual([fileSha(layer1), fileSha(layer2)], before);
  });

  it('a second rootfs from the same layers sees the images unchanged by the first one', async () => {
    await client.mountRootfs('c2', [layer1, layer2]);
    const r = await run(client, ['sh', '-c', 'cat /etc/greeting /etc/only1; ls /new-file 2>&1 || true'], { rootfs: 'c2', env });
    assert.match(r.stdout, /^hello from layer 2\nonly in layer1\n.*No such file/);
  });

  it('the container sees /proc and /dev, runs as the uid asked, with cwd inside the rootfs', async () => {
    const r = await run(client, ['sh', '-c', 'id -u; pwd; cat /proc/self/comm; ls /dev/null'], { rootfs: 'c1', env, uid: 1000, gid: 1000, cwd: '/etc' });
    assert.equal(r.stdout, '1000\n/etc\ncat\n/dev/null\n');
  });

  it('the container root is the rootfs alone (pivot_root in its own mount namespace): no image or host mount is reachable', async () => {
    const r = await run(client, ['sh', '-c', 'ls /; cat /proc/self/mounts'], { rootfs: 'c1', env });
    const lines = r.stdout.split('\n');
    const [listing, mounts] = [lines.slice(0, 6), lines.slice(6).filter(Boolean)];
    assert.deepEqual(listing, ['bin', 'dev', 'etc', 'new-file', 'proc', 'tmp']);
    assert.equal(mounts[0].split(' ').slice(1, 3).join(' '), '/ overlay', mounts.join('\n'));
    for (const m of mounts) {
      assert.ok(!/ squashfs /.test(m), `a layer mount is visible in the container: ${m}`);
      assert.ok(/^\S+ \/(proc|dev)?(\/\S*)? /.test(m), `unexpected mount in the container: ${m}`);
    }
  });

  it('the mounts stay inside the agent mount namespace: the host does not see them', () => {
    const mountinfo = readFileSync('/proc/self/mountinfo', 'utf8');
    assert.ok(!mountinfo.includes(join(agent.dir, 'state')), 'the overlay leaked into the host mount namespace');
  });

  describe('mount errors', () => {
    const expectMountError = async (p: Promise<unknown>, code: string, text: RegExp) =>
      assert.rejects(p, (e: unknown) => {
        assert.ok(e instanceof AgentError, String(e));
        assert.equal(e.code, code);
        assert.match(e.message, text);
        return true;
      });
    it('a missing layer file: MOUNT_FAILED naming it', () =>
      expectMountError(client.mountRootfs('e1', [join(work, 'missing.sqfs')]), 'MOUNT_FAILED', /layer 0 '.*missing\.sqfs': No such file/));
    it('a layer that is not squashfs: MOUNT_FAILED at the squashfs mount', () => {
      writeFileSync(join(work, 'not-squashfs'), 'plain text, not an image\n'.repeat(1000));
      return expectMountError(client.mountRootfs('e2', [join(work, 'not-squashfs')]), 'MOUNT_FAILED', /mount squashfs layer 0/);
    });
    it('a name that is not one path component: MOUNT_FAILED', () =>
      expectMountError(client.mountRootfs('../escape', [layer1]), 'MOUNT_FAILED', /not one path component/));
    it('no layers: MOUNT_FAILED', () => expectMountError(client.mountRootfs('e3', []), 'MOUNT_FAILED', /no layers given/));
    it('an upper kind other than tmpfs: MOUNT_FAILED', () =>
      expectMountError(client.mountRootfs('e4', [layer1], 'ext4'), 'MOUNT_FAILED', /knows only 'tmpfs'/));
    it('the same name twice: BAD_REQUEST', () => expectMountError(client.mountRootfs('c1', [layer1]), 'BAD_REQUEST', /already mounted/));
    it('a block device that stays empty (a template slot the host left empty): MOUNT_FAILED naming it, after the bounded wait', async function () {
      this.timeout(20_000);
      await withEmptyLoopDevice('empty-slot', async (dev) => {
        const t0 = Date.now();
        await expectMountError(client.mountRootfs('e5', [dev]), 'MOUNT_FAILED', /layer 0 device \/dev\/loop\d+ is an empty disk .* attached no image/);
        assert.ok(Date.now() - t0 >= 4_000, `refused after ${Date.now() - t0} ms: the wait is ~5 s`);
      });
    });
  });

  it('a layer on a block device that gets its medium late (a restored template slot) is mounted once its size arrives', async function () {
    this.timeout(20_000);
    // A loop device over an empty file has 0 sectors, as a template's disk slot
    // has until the kernel applies the configuration change the VMM raised at
    // restore; LOOP_SET_CAPACITY (losetup -c) after the file is filled plays that part.
    await withEmptyLoopDevice('late-slot', async (dev, file) => {
      const mounted = client.mountRootfs('late', [dev]);
      await new Promise((r) => setTimeout(r, 300));
      copyFileSync(layer1, file);
      execFileSync('losetup', ['-c', dev]);
      const merged = await mounted;
      const r = await run(client, ['/bin/cat', '/etc/only1'], { rootfs: 'late', env });
      assert.deepEqual(r.status, { code: 0, signal: null }, r.stderr);
      assert.equal(r.stdout, readFileSync(join(work, 'l1', 'etc', 'only1'), 'utf8'), `merged at ${merged}`);
    });
  });
});
