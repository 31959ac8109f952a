// `npm run bench agent`: the guest agent's host-side costs (no VM): a process
// started and reaped through the agent protocol over a Unix socket, and bulk
// stdout through its credit-based flow control, each beside the same work done
// by Node's own child_process from the same run (the floor any launcher pays).
// Medians (and p90) of VMLET_BENCH_RUNS runs (default 30 for exec, 5 for bulk).
// Inside a VM the transport is vsock; these figures isolate the agent itself.
import { spawn } from 'node:child_process';
import { loadavg } from 'node:os';
import { AgentClient } from '../../shim/agent/client';
import { startAgent } from '../../test/unit/agent-harness';

const EXEC_RUNS = Number(process.env.VMLET_BENCH_RUNS ?? 30);
const BULK_RUNS = Math.max(3, Math.floor(EXEC_RUNS / 6));
const BULK_MIB = 256;

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

async function time(fn: () => Promise<void>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

async function agentExec(client: AgentClient, args: string[]): Promise<number> {
  const p = await client.exec({ args, env: ['PATH=/usr/bin:/bin'] });
  p.stdin.end();
  let bytes = 0;
  p.stdout.on('data', (d: Buffer) => (bytes += d.length));
  const ended = new Promise((r) => p.stdout.on('end', r));
  p.stderr.resume();
  const s = await p.wait();
  await ended;
  if (s.code !== 0) throw new Error(`${args.join(' ')} through the agent: ${JSON.stringify(s)}`);
  return bytes;
}

function directExec(args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const c = spawn(args[0], args.slice(1), { stdio: ['ignore', 'pipe', 'ignore'], env: { PATH: '/usr/bin:/bin' } });
    let bytes = 0;
    c.stdout.on('data', (d: Buffer) => (bytes += d.length));
    c.on('error', reject);
    c.on('close', (code) => (code === 0 ? resolve(bytes) : reject(new Error(`${args.join(' ')}: exit ${code}`))));
  });
}

export async function run(): Promise<void> {
  const agent = await startAgent();
  const client = await agent.connect();
  try {
    const rows: [string, number[], number[], string][] = [];
    const execOurs: number[] = [];
    const execPeer: number[] = [];
    for (let i = 0; i < EXEC_RUNS; i++) {
      execOurs.push(await time(async () => void (await agentExec(client, ['true']))));
      execPeer.push(await time(async () => void (await directExec(['true']))));
    }
    rows.push(['exec `true` -> exit status (ms)', execOurs, execPeer, 'lower is better']);
    const bulkOurs: number[] = [];
    const bulkPeer: number[] = [];
    const args = ['head', '-c', String(BULK_MIB << 20), '/dev/zero'];
    for (let i = 0; i < BULK_RUNS; i++) {
      let n = 0;
      const a = await time(async () => void (n = await agentExec(client, args)));
      if (n !== BULK_MIB << 20) throw new Error(`agent delivered ${n} bytes of ${BULK_MIB} MiB`);
      bulkOurs.push(BULK_MIB / (a / 1000));
      const b = await time(async () => void (n = await directExec(args)));
      if (n !== BULK_MIB << 20) throw new Error(`direct spawn delivered ${n} bytes`);
      bulkPeer.push(BULK_MIB / (b / 1000));
    }
    rows.push([`stdout ${BULK_MIB} MiB (MiB/s)`, bulkOurs, bulkPeer, 'higher is better']);
    console.log(`host load average ${loadavg().map((x) => x.toFixed(2)).join(' ')}; exec runs ${EXEC_RUNS}, bulk runs ${BULK_RUNS}`);
    console.log(['what', 'agent p50', 'agent p90', 'node spawn p50', 'node spawn p90', 'ratio p50', ''].join('\t'));
    for (const [what, ours, peer, note] of rows) {
      const o = quantile(ours, 0.5);
      const p = quantile(peer, 0.5);
      console.log([what, o.toFixed(2), quantile(ours, 0.9).toFixed(2), p.toFixed(2), quantile(peer, 0.9).toFixed(2), (o / p).toFixed(2), note].join('\t'));
    }
  } finally {
    client.close();
    await agent.stop();
  }
}
