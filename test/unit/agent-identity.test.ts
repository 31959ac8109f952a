// SET_IDENTITY (protocol version 2) against the real agent on this host: what
// a guest restored from a template gets first, so that siblings do not share
// RNG state, wall clock or hostname. The agent runs in namespaces so nothing
// here renames this host or sets its clock: a UTS namespace takes the
// hostname; a user namespace makes the kernel refuse the RNG ioctls and
// clock_settime (they need the initial namespace's capabilities), which is how
// the refusal paths are tested. The clock's success path sets a clock, so it
// runs only in a guest (test/lab/agent-identity.test.ts).
import { strict as assert } from 'node:assert';
import { hostname as hostHostname } from 'node:os';
import { AgentClient, AgentError } from '../../shim/agent/client';
import { encodeFrame, FrameParser, MsgType, PayloadReader, PayloadWriter, WIRE_ERROR_CODES } from '../../shim/agent/protocol';
import { RunningAgent, startAgent } from './agent-harness';
import { connect, Socket } from 'node:net';
import { spawnSync } from 'node:child_process';

/** A SET_IDENTITY payload with every field chosen by the test, including wrong ones. */
function identityPayload(o: { flags?: number; realtimeNs?: bigint; hostname?: string; entropy?: Buffer }): Buffer {
  return new PayloadWriter()
    .u32(o.flags ?? 0)
    .u64(o.realtimeNs ?? 0n)
    .str(o.hostname ?? '')
    .raw(o.entropy ?? Buffer.alloc(32, 7))
    .build();
}

/**
 * The hostname in the agent's UTS namespace, read from outside with nsenter:
 * an EXEC through an agent in a user namespace fails at setgroups (unshare
 * --map-root-user denies it), and the name must be read the same way for
 * every agent here.
 */
function agentHostname(agent: RunningAgent): string {
  const r = spawnSync('nsenter', ['--target', String(agent.child.pid), '--uts', 'uname', '-n'], { encoding: 'utf8' });
  assert.equal(r.status, 0, `nsenter: ${r.stderr}`);
  return r.stdout.trim();
}

function skipUnlessRoot(ctx: Mocha.Context): void {
  if (process.getuid?.() !== 0) {
    console.log('      !!! SKIPPED: needs root (unshare --uts, and nsenter to read the agent\'s hostname)');
    ctx.skip();
  }
}

describe('agent: SET_IDENTITY as root, in a UTS namespace (host-side)', function () {
  let agent: RunningAgent;
  let client: AgentClient;
  let startName: string;

  before(async function () {
    skipUnlessRoot(this);
    agent = await startAgent({ utsNamespace: true });
    client = await agent.connect();
    startName = agentHostname(agent);
  });
  after(async () => {
    client?.close();
    await agent?.stop();
  });

  const refused = async (payload: Buffer, code: string, text: RegExp) => {
    const r = await client.rawRequest(MsgType.SetIdentity, payload);
    assert.ok(r.error instanceof AgentError, `expected an ERROR reply, got type 0x${r.type.toString(16)}`);
    assert.equal(r.error.code, code);
    assert.match(r.error.message, text);
    await client.ping(); // the connection keeps being served
    // Everything is validated before the first step: a refused request changed nothing.
    assert.equal(agentHostname(agent), startName);
  };

  it('applies entropy (RNDADDENTROPY credited + RNDRESEEDCRNG succeed as root) and the hostname', async () => {
    const before = BigInt(Date.now()) * 1_000_000n;
    const res = await client.setIdentity({ hostname: 'clone-a' });
    const after = BigInt(Date.now()) * 1_000_000n;
    assert.equal(agentHostname(agent), 'clone-a');
    assert.notEqual(hostHostname(), 'clone-a', 'this host kept its own name');
    // The reply carries the agent's clock on arrival: this host's, here.
    assert.ok(res.guestRealtimeBeforeNs >= before - 1_000_000n && res.guestRealtimeBeforeNs <= after + 1_000_000n,
      `agent clock ${res.guestRealtimeBeforeNs} outside [${before}, ${after}]`);
    assert.equal(res.hostRealtimeSentNs, null, 'no clock was sent');
    // Back to the name the other tests compare with.
    await client.setIdentity({ hostname: startName });
    assert.equal(agentHostname(agent), startName);
  });

  it('accepts exactly 32 and 512 bytes of entropy without a hostname, and leaves the name alone', async () => {
    await client.setIdentity({ entropy: Buffer.alloc(32, 1) });
    await client.setIdentity({ entropy: Buffer.alloc(512, 2) });
    assert.equal(agentHostname(agent), startName);
  });

  it('refuses 31 and 513 bytes of entropy with BAD_REQUEST naming the bounds', async () => {
    await refused(identityPayload({ entropy: Buffer.alloc(31) }), 'BAD_REQUEST', /entropy is 31 bytes; send 32\.\.512/);
    await refused(identityPayload({ entropy: Buffer.alloc(513) }), 'BAD_REQUEST', /entropy is 513 bytes; send 32\.\.512/);
    await refused(identityPayload({ entropy: Buffer.alloc(0) }), 'BAD_REQUEST', /entropy is 0 bytes/);
  });

  it('refuses a hostname of 65 bytes, or an empty one with the hostname flag', async () => {
    await refused(identityPayload({ flags: 2, hostname: 'h'.repeat(65) }), 'BAD_REQUEST', /hostname is 65 bytes; it must be 1\.\.64/);
    await refused(identityPayload({ flags: 2, hostname: '' }), 'BAD_REQUEST', /hostname is 0 bytes/);
  });

  it('refuses fields without their flag and unknown flag bits', async () => {
    await refused(identityPayload({ hostname: 'sneaky' }), 'BAD_REQUEST', /hostname is set but the hostname flag \(2\) is not/);
    await refused(identityPayload({ realtimeNs: 5n }), 'BAD_REQUEST', /realtime_ns is set but the clock flag \(1\) is not/);
    await refused(identityPayload({ flags: 4 }), 'BAD_REQUEST', /unknown bits/);
  });

  it('refuses the clock flag outside a guest (UNSUPPORTED) and applies nothing, not even the hostname', async () => {
    await refused(identityPayload({ flags: 3, realtimeNs: 1n, hostname: 'never' }), 'UNSUPPORTED', /not PID 1 .*host's clock/);
    await assert.rejects(client.setIdentity({ clock: true, hostname: 'never' }), (e: AgentError) => e.code === 'UNSUPPORTED');
    assert.equal(agentHostname(agent), startName);
  });

  it('a payload cut inside its fields gets BAD_FRAME naming the field', async () => {
    const whole = identityPayload({ flags: 2, hostname: 'cut' });
    await refused(whole.subarray(0, 10), 'BAD_FRAME', /truncated in field 'realtime_ns'/);
    await refused(whole.subarray(0, 14), 'BAD_FRAME', /truncated in field 'hostname'/);
    await refused(whole.subarray(0, 17), 'BAD_FRAME', /truncated in field 'hostname': needs 3 more bytes, 1 left/);
  });

  it('a hostname that is not UTF-8 gets INVALID_UTF8', async () => {
    const p = new PayloadWriter().u32(2).u64(0n).str(Buffer.from([0x68, 0xc3, 0x28])).raw(Buffer.alloc(32)).build();
    await refused(p, 'INVALID_UTF8', /'hostname'/);
  });

  it('the client refuses bad lengths before sending anything', async () => {
    await assert.rejects(client.setIdentity({ entropy: Buffer.alloc(10) }), /BAD_REQUEST: setIdentity entropy is 10 bytes; give 32\.\.512/);
    await assert.rejects(client.setIdentity({ hostname: '' }), /BAD_REQUEST: setIdentity hostname '' is 0 bytes/);
    await assert.rejects(client.setIdentity({ hostname: 'é'.repeat(33) }), /is 66 bytes; it must be 1\.\.64/);
    await client.ping();
  });
});

describe('agent: SET_IDENTITY and protocol versions (host-side)', function () {
  let agent: RunningAgent;
  before(async () => (agent = await startAgent({ unprivileged: true, utsNamespace: true })));
  after(async () => agent?.stop());

  it('a host that agreed on version 1 gets UNKNOWN_TYPE for SET_IDENTITY and the connection keeps working', async () => {
    const s: Socket = await new Promise((resolve, reject) => {
      const sock = connect(agent.socketPath, () => resolve(sock));
      sock.once('error', reject);
    });
    const parser = new FrameParser();
    const frames: { type: number; id: number; payload: Buffer }[] = [];
    const waiters: (() => void)[] = [];
    s.on('data', (d: Buffer) => {
      for (const f of parser.push(d)) frames.push({ type: f.header.type, id: f.header.id, payload: f.payload });
      waiters.splice(0).forEach((w) => w());
    });
    const next = async () => {
      while (frames.length === 0) await new Promise<void>((r) => waiters.push(r));
      return frames.shift()!;
    };
    try {
      s.write(encodeFrame(MsgType.Hello, 1, new PayloadWriter().u32(1).u32(1).str('old-host').build()));
      let f = await next();
      assert.equal(f.type, MsgType.HelloOk);
      assert.equal(f.payload.readUInt32LE(0), 1, 'an old host gets version 1');
      s.write(encodeFrame(MsgType.SetIdentity, 2, identityPayload({})));
      f = await next();
      assert.equal(f.type, MsgType.Error);
      assert.equal(f.id, 2);
      const r = new PayloadReader(f.payload, 'ERROR');
      assert.equal((WIRE_ERROR_CODES as Record<number, string>)[r.u32('code')], 'UNKNOWN_TYPE');
      assert.match(r.str('message'), /version 2 message; this connection agreed on version 1/);
      s.write(encodeFrame(MsgType.Ping, 3));
      f = await next();
      assert.equal(f.type, MsgType.Pong);
    } finally {
      s.destroy();
    }
  });

  it('the client refuses setIdentity on a version-1 connection before sending', async () => {
    const client = await agent.connect();
    try {
      assert.equal(client.hello?.version, 3);
      // Pretend the agent were an old build: the client checks the agreed version.
      client.hello = { ...client.hello!, version: 1 };
      await assert.rejects(client.setIdentity(), /UNSUPPORTED: SET_IDENTITY needs protocol version 2; .* agreed on version 1/);
    } finally {
      client.close();
    }
  });
});

describe('agent: SET_IDENTITY refused by the kernel (user namespace, host-side)', function () {
  let agent: RunningAgent;
  let client: AgentClient;
  before(async function () {
    skipUnlessRoot(this);
    agent = await startAgent({ unprivileged: true, utsNamespace: true });
    client = await agent.connect();
  });
  after(async () => {
    client?.close();
    await agent?.stop();
  });

  it('RNDADDENTROPY without CAP_SYS_ADMIN: IDENTITY_FAILED naming the step, later steps (hostname) not applied', async () => {
    const name = agentHostname(agent);
    // sethostname would succeed here (the UTS namespace belongs to the agent's
    // user namespace), so an unchanged name shows the steps stopped.
    await assert.rejects(client.setIdentity({ hostname: 'must-not-apply' }), (e: AgentError) => {
      assert.equal(e.code, 'IDENTITY_FAILED');
      assert.match(e.message, /failed at ioctl RNDADDENTROPY on \/dev\/urandom: Operation not permitted; later steps not applied/);
      return true;
    });
    await client.ping();
    assert.equal(agentHostname(agent), name);
  });
});

describe('agent: SET_IDENTITY clock as PID 1 refused by the kernel (user namespace, host-side)', function () {
  let agent: RunningAgent;
  let client: AgentClient;
  before(async function () {
    skipUnlessRoot(this);
    agent = await startAgent({ unprivileged: true, asPid1: true, utsNamespace: true });
    client = await agent.connect();
  });
  after(async () => {
    client?.close();
    await agent?.stop();
  });

  it('as PID 1 the clock flag is accepted; clock_settime without CAP_SYS_TIME gives IDENTITY_FAILED and nothing later', async () => {
    assert.equal(client.hello?.initMode, true);
    const name = agentHostname(agent);
    await assert.rejects(client.setIdentity({ clock: true, hostname: 'must-not-apply' }), (e: AgentError) => {
      assert.equal(e.code, 'IDENTITY_FAILED');
      assert.match(e.message, /failed at clock_settime\(CLOCK_REALTIME\): Operation not permitted; later steps not applied/);
      return true;
    });
    await client.ping();
    assert.equal(agentHostname(agent), name);
  });

  it('as PID 1 a clock of zero or before the epoch is BAD_REQUEST', async () => {
    for (const realtimeNs of [0n, 0xffffffffffffffffn /* -1 as i64 */]) {
      const r = await client.rawRequest(MsgType.SetIdentity, identityPayload({ flags: 1, realtimeNs }));
      assert.ok(r.error instanceof AgentError);
      assert.equal(r.error.code, 'BAD_REQUEST');
      assert.match(r.error.message, /realtime_ns must be positive/);
    }
    await client.ping();
  });
});
