// The agent's PID-1 duties, on this host: started as PID 1 of fresh PID and
// mount namespaces (without --no-init) it mounts what a guest's init must and
// reaps orphans, exactly the code path it takes as a guest's init.
import { strict as assert } from 'node:assert';
import { AgentClient, AgentError } from '../../shim/agent/client';
import { MsgType, PayloadWriter } from '../../shim/agent/protocol';
import { spawnSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { agentBinary, buildTestLayers, collect, rootfsPrerequisites, run, RunningAgent, startAgent } from './agent-harness';

describe('agent: as PID 1 (host-side, in new PID and mount namespaces)', function () {
  let agent: RunningAgent;
  let client: AgentClient;
  const env = ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'];

  before(async function () {
    const missing = rootfsPrerequisites();
    if (missing) {
      console.log(`      !!! SKIPPED: running the agent as PID 1 in namespaces needs root and unshare: ${missing}`);
      this.skip();
    }
    agent = await startAgent({ asPid1: true });
    client = await agent.connect();
  });
  after(async () => {
    client?.close();
    await agent?.stop();
  });

  it('says in HELLO_OK that it is PID 1 of a guest', () => {
    assert.equal(client.hello?.initMode, true);
  });

  it('is PID 1 and has mounted proc, sysfs, devtmpfs, devpts, /dev/shm and cgroup2', async () => {
    const r = await run(client, ['sh', '-c', 'cat /proc/1/comm; cat /proc/self/mounts'], { env });
    const [comm, ...mounts] = r.stdout.split('\n');
    assert.equal(comm, 'vmlet-agent');
    const mounted = (path: string, type: string) =>
      assert.ok(mounts.some((l) => l.split(' ')[1] === path && l.split(' ')[2] === type), `${type} is not mounted on ${path}`);
    mounted('/proc', 'proc');
    mounted('/sys', 'sysfs');
    mounted('/dev', 'devtmpfs');
    mounted('/dev/pts', 'devpts');
    mounted('/dev/shm', 'tmpfs');
    mounted('/sys/fs/cgroup', 'cgroup2');
  });

  it('its private devpts serves terminals (/dev/ptmx reaches the new instance)', async () => {
    const p = await client.exec({ args: ['sh', '-c', 'tty; stty size'], env, tty: { rows: 33, cols: 99 } });
    const [out, status] = await Promise.all([collect(p.stdout), p.wait()]);
    assert.deepEqual(status, { code: 0, signal: null });
    assert.match(out.toString(), /^\/dev\/pts\/\d+\r\n33 99\r\n$/);
  });

  it('reaps orphans as PID 1: a detached grandchild leaves no zombie', async () => {
    const r = await run(client, ['sh', '-c', '(sleep 0.2 &); sleep 0.5; for s in /proc/[0-9]*/stat; do cat $s 2>/dev/null; echo; done'], { env });
    const zombies = r.stdout.split('\n').filter((l) => / Z /.test(l));
    assert.deepEqual(zombies, []);
  });

  it('SET_CLOCK validates its input as PID 1 (the valid case would set this host clock: not run here)', async () => {
    const nsecTooBig = new PayloadWriter().u64(0n).u32(1_000_000_000).build();
    const r = await client.rawRequest(MsgType.SetClock, nsecTooBig);
    assert.ok(r.error instanceof AgentError);
    assert.equal(r.error.code, 'BAD_REQUEST');
    assert.match(r.error.message, /nsec must be below 1e9/);
  });
});

describe('agent: as PID 1 with vmlet.layers= on the kernel command line', function () {
  let agent: RunningAgent;
  let client: AgentClient;
  let layers: ReturnType<typeof buildTestLayers>;

  before(async function () {
    const missing = rootfsPrerequisites();
    if (missing) {
      console.log(`      !!! SKIPPED: needs root, loop devices, unshare, mksquashfs, busybox-static: ${missing}`);
      this.skip();
    }
    layers = buildTestLayers();
    agent = await startAgent({
      asPid1: true,
      // Runs of spaces and tabs, as a hand-written command line may have: the agent splits on any whitespace.
      kernelCmdline: `console=ttyS0  quiet\tvmlet.layers=${layers.layer1},${layers.layer2} \t vmlet.port=1024\n`,
    });
    client = await agent.connect();
  });
  after(async () => {
    client?.close();
    await agent?.stop();
    if (layers) rmSync(layers.work, { recursive: true, force: true });
  });

  it('stacks the layers at start as rootfs "rootfs", ready for EXEC without MOUNT_ROOTFS', async () => {
    const r = await run(client, ['sh', '-c', 'cat /etc/greeting /etc/shadowed'], { rootfs: 'rootfs', env: ['PATH=/bin'] });
    assert.equal(r.stdout, 'hello from layer 2\nlayer2\n');
    assert.deepEqual(r.status, { code: 0, signal: null });
  });
});

describe('agent: command line', () => {
  const agentRun = (args: string[]) => spawnSync(agentBinary, args, { encoding: 'utf8', timeout: 10_000 });
  it('a --listen that is neither unix:/path nor vsock:PORT exits 2 naming both forms', () => {
    const r = agentRun(['--listen', 'tcp:127.0.0.1:1', '--no-init']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--listen 'tcp:127\.0\.0\.1:1': expected unix:\/path .* or vsock:PORT/);
  });
  it('an unknown argument exits 2 with the usage', () => {
    const r = agentRun(['--frobnicate']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /unknown argument '--frobnicate'(.|\n)*usage: vmlet-agent/);
  });
  it('not PID 1 and nothing to listen on exits 2 saying so', () => {
    const r = agentRun(['--no-init']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /no --listen given: nothing to serve/);
  });
  it('a socket path it cannot bind exits 1 naming the path and the errno', () => {
    const r = agentRun(['--listen', 'unix:/nonexistent-dir/agent.sock', '--no-init']);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /listen unix:\/nonexistent-dir\/agent\.sock: No such file or directory/);
  });
});
