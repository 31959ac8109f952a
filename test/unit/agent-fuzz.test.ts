// Decoder fuzzing in npm test: a deterministic mutation loop over well-formed
// frames (native/guest/fuzz), bounded so it costs seconds, plus the same kind
// of mutated bytes thrown at a live agent, which must keep serving.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { connect, Socket } from 'node:net';
import { encodeFrame, MsgType, PayloadWriter } from '../../shim/agent/protocol';
import { fuzzBinary, RunningAgent, startAgent } from './agent-harness';

function parseSummary(out: string): Map<string, number> {
  const words = out.trim().split(/\s+/);
  const m = new Map<string, number>();
  for (let i = 0; i + 1 < words.length; i += 2) m.set(words[i], Number(words[i + 1]));
  return m;
}

describe('agent: decoder fuzzing', function () {
  for (const seed of [1, 2]) {
    it(`100000 mutated frame streams (seed ${seed}) decode to a message or a typed error, under ASan/UBSan`, () => {
      const r = spawnSync(fuzzBinary, ['--iterations', '100000', '--seed', String(seed)], { encoding: 'utf8' });
      assert.equal(r.status, 0, `fuzz driver failed: ${r.stderr}`);
      const s = parseSummary(r.stdout);
      // The loop must actually reach every outcome, or it is not testing them.
      for (const k of ['ok', 'BAD_FRAME', 'INVALID_UTF8', 'UNKNOWN_TYPE', 'oversized', 'SET_IDENTITY_ok', 'SET_IDENTITY_refused', 'EXEC_USER_ok', 'EXEC_USER_refused'])
        assert.ok((s.get(k) ?? 0) > 0, `no '${k}' outcome in ${r.stdout}`);
    });
  }

  describe('mutated frames against a live agent', () => {
    let agent: RunningAgent;
    // Mutated SET_IDENTITY frames can grow any flag: in a user namespace of
    // its own the kernel refuses the agent this host's RNG and clock, and its
    // UTS namespace takes any hostname a mutation makes up.
    before(async () => (agent = await startAgent({ unprivileged: true, utsNamespace: true })));
    after(async () => agent?.stop());

    it('300 connections of mutated frames: the agent survives them all and then serves a new connection', async () => {
      let rng = 0x2545f491;
      const next = () => {
        rng ^= rng << 13;
        rng ^= rng >>> 17;
        rng ^= rng << 5;
        return rng >>> 0;
      };
      const seeds = [
        encodeFrame(MsgType.Ping, 2),
        encodeFrame(MsgType.Signal, 3, new PayloadWriter().u32(77).u32(15).build()),
        encodeFrame(MsgType.Resize, 4, new PayloadWriter().u32(77).u16(10).u16(10).build()),
        encodeFrame(MsgType.Stdin, 77, Buffer.from('data')),
        encodeFrame(MsgType.OutputWindow, 77, new PayloadWriter().u8(1).u32(100).build()),
        encodeFrame(MsgType.MountRootfs, 5, new PayloadWriter().str('x').strList(['/nonexistent']).str('tmpfs').build()),
        encodeFrame(MsgType.SetIdentity, 6, new PayloadWriter().u32(0).u64(0n).str('').raw(Buffer.alloc(32, 0x5a)).build()),
      ];
      const hello = encodeFrame(MsgType.Hello, 1, new PayloadWriter().u32(1).u32(2).str('fuzz').build());
      let replies = 0;
      for (let c = 0; c < 300; c++) {
        const parts: Buffer[] = [hello];
        for (let i = 0; i < 4; i++) {
          const f = Buffer.from(seeds[next() % seeds.length]);
          for (let m = 0; m < 1 + (next() % 3); m++) f[next() % f.length] = next() & 0xff;
          parts.push(f);
        }
        const bytes = Buffer.concat(parts);
        replies += await new Promise<number>((resolve, reject) => {
          const s: Socket = connect(agent.socketPath, () => s.end(bytes));
          let got = 0;
          s.on('data', (d: Buffer) => (got += d.length));
          s.on('close', () => resolve(got));
          s.on('error', reject);
        });
      }
      assert.ok(replies > 0, 'the agent never answered a fuzz connection');
      assert.ok(agent.alive(), `the agent died: ${agent.log()}`);
      const client = await agent.connect();
      await client.ping();
      client.close();
    });
  });
});
