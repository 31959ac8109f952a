// The guest agent running processes, exercised on this host over a Unix
// socket (no VM): exit codes, signals, byte-exact stdio, pty, credentials.
import { strict as assert } from 'node:assert';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { AgentClient, AgentError, shellExitCode } from '../../shim/agent/client';
import { collect, run, RunningAgent, agentPerSuite } from './agent-harness';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('agent: processes (host-side, over a Unix socket)', function () {
  let agent: RunningAgent;
  let client: AgentClient;

  agentPerSuite((a, c) => {
    agent = a;
    client = c;
  });

  it('handshake agrees on protocol version 3 (the highest both speak) with a host-side (not PID 1) agent', () => {
    assert.equal(client.hello?.version, 3);
    assert.equal(client.hello?.initMode, false);
    assert.equal(client.hello?.maxPayload, 1 << 20);
  });

  it("sh -c 'exit 7' exits with code 7", async () => {
    const r = await run(client, ['sh', '-c', 'exit 7']);
    assert.deepEqual(r.status, { code: 7, signal: null });
    assert.equal(shellExitCode(r.status), 7);
  });

  it('kill -9 $$ is reported as signal 9, which the CLI maps to 137', async () => {
    const r = await run(client, ['sh', '-c', 'kill -9 $$']);
    assert.deepEqual(r.status, { code: null, signal: 9 });
    assert.equal(shellExitCode(r.status), 137);
  });

  it('stdout and stderr arrive separately and byte-exact, 10 MiB each, written concurrently', async () => {
    const out = randomBytes(10 << 20);
    const err = randomBytes(10 << 20);
    writeFileSync(join(agent.dir, 'out.bin'), out);
    writeFileSync(join(agent.dir, 'err.bin'), err);
    const p = await client.exec({ args: ['sh', '-c', 'cat "$0" & cat "$1" >&2; wait', join(agent.dir, 'out.bin'), join(agent.dir, 'err.bin')] });
    p.stdin.end();
    const [gotOut, gotErr, status] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
    assert.deepEqual(status, { code: 0, signal: null });
    assert.equal(gotOut.length, out.length);
    assert.equal(sha(gotOut), sha(out));
    assert.equal(gotErr.length, err.length);
    assert.equal(sha(gotErr), sha(err));
  });

  it('stdin arrives byte-exact and its EOF ends the reader', async () => {
    const input = randomBytes(3 << 20);
    const p = await client.exec({ args: ['sha256sum'], env: ['PATH=/usr/bin:/bin'] });
    const out = collect(p.stdout);
    p.stdin.end(input);
    assert.deepEqual(await p.wait(), { code: 0, signal: null });
    assert.equal((await out).toString().split(' ')[0], sha(input));
  });

  it('stdin echoed through cat comes back byte-exact (both directions under flow control at once)', async () => {
    const input = randomBytes(4 << 20);
    const p = await client.exec({ args: ['cat'], env: ['PATH=/usr/bin:/bin'] });
    const out = collect(p.stdout);
    p.stdin.end(input);
    assert.deepEqual(await p.wait(), { code: 0, signal: null });
    assert.equal(sha(await out), sha(input));
  });

  it('a process killed by SIGSEGV is reported as signal 11 (139 in CLI terms)', async () => {
    const r = await run(client, ['sh', '-c', 'kill -SEGV $$']);
    assert.deepEqual(r.status, { code: null, signal: 11 });
    assert.equal(shellExitCode(r.status), 139);
  });

  it('stdin sent to a process that closed its stdin never stalls the host (credit comes back)', async () => {
    const p = await client.exec({ args: ['sh', '-c', 'exec 0<&-; exec sleep 30'], env: ['PATH=/usr/bin:/bin'] });
    // 2 MiB is far beyond the 256 KiB window: end() completes only if the
    // agent hands back the credit of bytes it can no longer deliver.
    await new Promise<void>((resolve, reject) => p.stdin.on('error', reject).end(randomBytes(2 << 20), () => resolve()));
    process.kill(p.pid, 0); // still running: the credit did not come from its exit
    await p.signal('SIGKILL');
    assert.deepEqual(await p.wait(), { code: null, signal: 9 });
  });

  it('a request above the 1 MiB frame limit is refused by the client before it is sent', async () => {
    await assert.rejects(client.exec({ args: ['true'], env: [`BIG=${'x'.repeat(1 << 20)}`] }), (e: unknown) => {
      assert.ok(e instanceof AgentError);
      assert.equal(e.code, 'FRAME_TOO_LARGE');
      assert.match(e.message, /above the 1048576-byte frame limit/);
      return true;
    });
    await client.ping();
  });

  it('SIGTERM reaches the process: its trap runs and sets the exit code', async () => {
    const p = await client.exec({
      args: ['sh', '-c', 'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.05; done'],
      env: ['PATH=/usr/bin:/bin'],
    });
    const out = collect(p.stdout);
    await new Promise<void>((resolve) => p.stdout.once('data', () => resolve()));
    await p.signal('SIGTERM');
    assert.deepEqual(await p.wait(), { code: 3, signal: null });
    assert.match((await out).toString(), /ready\n(.|\n)*got-term\n$/);
  });

  it('SIGTERM to a process without a handler ends it with signal 15', async () => {
    const p = await client.exec({ args: ['sleep', '100'], env: ['PATH=/usr/bin:/bin'] });
    await p.signal(15);
    assert.deepEqual(await p.wait(), { code: null, signal: 15 });
  });

  it('runs 100 processes at once, each with its own output and exit code', async () => {
    const procs = await Promise.all(
      Array.from({ length: 100 }, (_, i) =>
        run(client, ['sh', '-c', 'sleep 0.2; echo "proc $0"; exit $(($0 % 50))', String(i)], { env: ['PATH=/usr/bin:/bin'] }),
      ),
    );
    procs.forEach((r, i) => {
      assert.equal(r.stdout, `proc ${i}\n`);
      assert.deepEqual(r.status, { code: i % 50, signal: null });
    });
  });

  it('a host that does not read stalls the process instead of growing the agent', async () => {
    const rssKiB = (): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${agent.child.pid}/status`, 'utf8'))![1]);
    const before = rssKiB();
    const p = await client.exec({ args: ['head', '-c', String(64 << 20), '/dev/zero'], env: ['PATH=/usr/bin:/bin'] });
    p.stdin.end();
    // Nobody reads stdout: the agent may hold at most its credit (256 KiB)
    // plus what the socket buffers take; the writer must be blocked.
    let exited = false;
    void p.wait().then(() => (exited = true));
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(exited, false, 'head finished 64 MiB while nobody read: output was buffered somewhere');
    assert.ok(rssKiB() - before < 16 * 1024, `agent RSS grew from ${before} KiB to ${rssKiB()} KiB`);
    let total = 0;
    p.stdout.on('data', (d: Buffer) => (total += d.length));
    assert.deepEqual(await p.wait(), { code: 0, signal: null });
    await new Promise((r) => setImmediate(r));
    assert.equal(total, 64 << 20);
  });

  it('a pty session: the terminal size is set at start and changed by resize (stty size)', async () => {
    const p = await client.exec({
      args: ['sh', '-c', 'stty size; read line; stty size'],
      env: ['PATH=/usr/bin:/bin', 'TERM=dumb'],
      tty: { rows: 24, cols: 80 },
    });
    let seen = '';
    const sawFirst = new Promise<void>((resolve) =>
      p.stdout.on('data', (d: Buffer) => {
        seen += d.toString();
        if (seen.includes('24 80')) resolve();
      }),
    );
    const ended = new Promise<void>((resolve) => p.stdout.on('end', () => resolve()));
    await sawFirst;
    await p.resize(40, 120);
    p.stdin.write('go\n');
    assert.deepEqual(await p.wait(), { code: 0, signal: null });
    await ended;
    // A terminal turns \n into \r\n and echoes the input line.
    assert.match(seen, /24 80\r\n(.|\r|\n)*40 120\r\n/);
    assert.equal((await collect(p.stderr)).length, 0);
  });

  it('stdin EOF on a terminal is the VEOF character: cat at a line start sees end of file', async () => {
    const p = await client.exec({ args: ['cat'], env: ['PATH=/usr/bin:/bin'], tty: { rows: 24, cols: 80 } });
    const out = collect(p.stdout);
    p.stdin.end('abc\n');
    assert.deepEqual(await p.wait(), { code: 0, signal: null });
    // The terminal echoes the line, then cat writes it back.
    assert.equal((await out).toString(), 'abc\r\nabc\r\n');
  });

  it('EXIT comes after the output of a background child that still held stdout', async () => {
    const r = await run(client, ['sh', '-c', '(sleep 0.3; echo late) & echo early'], { env: ['PATH=/usr/bin:/bin'] });
    assert.equal(r.stdout, 'early\nlate\n');
    assert.deepEqual(r.status, { code: 0, signal: null });
  });

  it('env is exactly what was asked and cwd is applied', async () => {
    const r = await run(client, ['sh', '-c', 'echo "$FOO|$(pwd)|${HOME-unset}"'], { env: ['FOO=bar baz', 'PATH=/bin:/usr/bin'], cwd: '/tmp' });
    assert.equal(r.stdout, 'bar baz|/tmp|unset\n');
  });

  it('uid, gid and supplementary groups are switched before exec', async () => {
    const r = await run(client, ['sh', '-c', 'id -u; id -g; id -G'], { uid: 1234, gid: 2345, groups: [3456, 4567] });
    assert.equal(r.status.code, 0, r.stderr);
    assert.equal(r.stdout, '1234\n2345\n2345 3456 4567\n');
  });

  it('rlimits are applied (soft and hard)', async () => {
    const r = await run(client, ['sh', '-c', 'ulimit -n; ulimit -Hn'], { rlimits: [{ resource: 'RLIMIT_NOFILE', soft: 123n, hard: 456n }] });
    assert.equal(r.stdout, '123\n456\n');
  });

  it('without rlimits a process gets the descriptor limit the agent was started with, not the agent raised one', async () => {
    const r = await run(client, ['sh', '-c', 'ulimit -n; ulimit -Hn']);
    const [soft, hard] = readFileSync(`/proc/${process.pid}/limits`, 'utf8').match(/Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/)!.slice(1);
    assert.equal(r.stdout, `${soft}\n${hard}\n`);
    const agentSoft = readFileSync(`/proc/${agent.child.pid}/limits`, 'utf8').match(/Max open files\s+(\d+|unlimited)/)![1];
    assert.equal(agentSoft, hard, 'the agent did not raise its own soft limit to the hard one');
  });

  it('hostname is set in the process own UTS namespace, not on the host', async () => {
    const r = await run(client, ['hostname'], { hostname: 'box-1' });
    assert.equal(r.stdout, 'box-1\n');
    assert.notEqual(hostname(), 'box-1');
  });

  it('an orphan left behind by a process is reaped (no zombie stays)', async () => {
    const r = await run(client, ['sh', '-c', '(sleep 0.2 &) ; echo $$'], { env: ['PATH=/usr/bin:/bin'] });
    assert.equal(r.status.code, 0);
    await new Promise((res) => setTimeout(res, 600));
    const children = readFileSync(`/proc/${agent.child.pid}/task/${agent.child.pid}/children`, 'utf8').trim();
    for (const pid of children.split(/\s+/).filter(Boolean)) {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      assert.notEqual(stat.split(') ')[1][0], 'Z', `pid ${pid} is a zombie child of the agent`);
    }
  });

  describe('errors a host can provoke', () => {
    const expectCode = async (p: Promise<unknown>, code: string, text: RegExp) => {
      await assert.rejects(p, (e: unknown) => {
        assert.ok(e instanceof AgentError, String(e));
        assert.equal(e.code, code);
        assert.match(e.message, text);
        return true;
      });
    };
    it('a program that does not exist: EXEC_FAILED at execve', () =>
      expectCode(client.exec({ args: ['/no/such/program'] }), 'EXEC_FAILED', /'\/no\/such\/program' failed at execve: No such file/));
    it('a program not on PATH: EXEC_FAILED', () =>
      expectCode(client.exec({ args: ['no-such-program-xyz'], env: ['PATH=/bin'] }), 'EXEC_FAILED', /execve: No such file/));
    it('a cwd that does not exist: EXEC_FAILED at chdir', () =>
      expectCode(client.exec({ args: ['true'], cwd: '/no/such/dir' }), 'EXEC_FAILED', /chdir: No such file/));
    it('empty args: BAD_REQUEST', () => expectCode(client.exec({ args: [] }), 'BAD_REQUEST', /args is empty/));
    it('a relative cwd: BAD_REQUEST', () => expectCode(client.exec({ args: ['true'], cwd: 'tmp' }), 'BAD_REQUEST', /absolute/));
    it('an env entry without =: BAD_REQUEST', () => expectCode(client.exec({ args: ['true'], env: ['NOEQUALS'] }), 'BAD_REQUEST', /has no '='/));
    it('soft rlimit above hard: BAD_REQUEST', () =>
      expectCode(client.exec({ args: ['true'], rlimits: [{ resource: 'RLIMIT_NOFILE', soft: 10n, hard: 5n }] }), 'BAD_REQUEST', /soft limit is above/));
    it('a rootfs that was never mounted: BAD_REQUEST', () =>
      expectCode(client.exec({ args: ['true'], rootfs: 'nope' }), 'BAD_REQUEST', /send MOUNT_ROOTFS first/));
    it('resize of a process without a terminal: BAD_REQUEST', async () => {
      const p = await client.exec({ args: ['sleep', '5'], env: ['PATH=/bin:/usr/bin'] });
      await expectCode(p.resize(10, 10), 'BAD_REQUEST', /needs a process started with a terminal/);
      await p.signal('SIGKILL');
      assert.deepEqual(await p.wait(), { code: null, signal: 9 });
    });
    it('a signal to a process that has exited: NO_SUCH_PROCESS', async () => {
      const p = await client.exec({ args: ['true'], env: ['PATH=/bin:/usr/bin'] });
      await p.wait();
      await expectCode(p.signal('SIGTERM'), 'NO_SUCH_PROCESS', /no process with id/);
    });
    it('an unknown signal number: BAD_REQUEST', async () => {
      const p = await client.exec({ args: ['sleep', '5'], env: ['PATH=/bin:/usr/bin'] });
      await expectCode(p.signal(200), 'BAD_REQUEST', /signal 200 is not in/);
      await p.signal('SIGKILL');
      await p.wait();
    });
    it('a uid outside u32 or a terminal size outside u16: BAD_REQUEST from the client, nothing sent', async () => {
      await expectCode(client.exec({ args: ['true'], uid: -1 }), 'BAD_REQUEST', /uid -1 is not an integer/);
      await expectCode(client.exec({ args: ['true'], tty: { rows: 70000, cols: 80 } }), 'BAD_REQUEST', /tty rows 70000/);
      await client.ping();
    });
    it('SET_CLOCK on a host-side agent: UNSUPPORTED (it would set the host clock)', () =>
      expectCode(client.setClock(new Date()), 'UNSUPPORTED', /not PID 1/));
  });
});
