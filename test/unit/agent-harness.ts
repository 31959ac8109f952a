// Starts the real guest agent binary on this host (no VM) for the agent-*
// tests: `vmlet-agent --listen unix:<tmp>/agent.sock --no-init`, optionally in
// a private mount namespace (`unshare -m`) so its rootfs mounts never leak.
import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AgentClient, AgentProcess } from '../../shim/agent/client';

export const repoRoot = join(__dirname, '..', '..', '..');
export const agentBinary = join(repoRoot, 'native', 'guest', 'build', 'vmlet-agent');
export const fuzzBinary = join(repoRoot, 'native', 'guest', 'build', 'vmlet-agent-fuzz');

export interface RunningAgent {
  socketPath: string;
  dir: string;
  child: ChildProcess;
  /** What the agent wrote to stderr so far (its log). */
  log(): string;
  connect(): Promise<AgentClient>;
  alive(): boolean;
  stop(): Promise<void>;
}

/**
 * mountNamespace: run under `unshare --mount` (rootfs tests).
 * asPid1: run as PID 1 of new PID and mount namespaces without --no-init, so
 * the agent does its PID-1 work (early mounts, reaping) as in a guest.
 * kernelCmdline: what the PID-1 agent reads instead of /proc/cmdline.
 * utsNamespace: a hostname of its own (`unshare --uts`), so SET_IDENTITY can
 * set one without renaming this host.
 * unprivileged: root only in a new user namespace (`--user --map-root-user`):
 * the kernel refuses it what needs the initial namespace's capabilities
 * (RNDADDENTROPY, clock_settime), so the refusals can be tested safely.
 */
export async function startAgent(
  opts: { mountNamespace?: boolean; asPid1?: boolean; kernelCmdline?: string; utsNamespace?: boolean; unprivileged?: boolean } = {},
): Promise<RunningAgent> {
  if (!existsSync(agentBinary)) throw new Error(`${agentBinary} is missing: run npm run build:agent`);
  const dir = mkdtempSync(join(tmpdir(), 'vmlet-agent-'));
  const socketPath = join(dir, 'agent.sock');
  const agentArgs = ['--listen', `unix:${socketPath}`, ...(opts.asPid1 ? [] : ['--no-init']), '--state-dir', join(dir, 'state')];
  if (opts.kernelCmdline !== undefined) {
    writeFileSync(join(dir, 'cmdline'), opts.kernelCmdline);
    agentArgs.push('--cmdline-file', join(dir, 'cmdline'));
  }
  const unshare = [
    ...(opts.unprivileged ? ['--user', '--map-root-user'] : []),
    ...(opts.asPid1
      ? ['--pid', '--fork', '--kill-child', '--mount', '--propagation', 'private']
      : opts.mountNamespace
        ? ['--mount', '--propagation', 'private']
        : []),
    ...(opts.utsNamespace ? ['--uts'] : []),
  ];
  const child = unshare.length > 0
    ? spawn('unshare', [...unshare, agentBinary, ...agentArgs], { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(agentBinary, agentArgs, { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr?.on('data', (d: Buffer) => (log += d.toString()));
  let exited = false;
  child.on('exit', () => (exited = true));
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (exited) throw new Error(`vmlet-agent exited at start-up: ${log}`);
    if (existsSync(socketPath)) {
      try {
        const c = await AgentClient.connectUnix(socketPath);
        c.close();
        break;
      } catch {
        // not listening yet
      }
    }
    if (Date.now() > deadline) throw new Error(`vmlet-agent did not listen on ${socketPath} within 10 s: ${log}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    socketPath,
    dir,
    child,
    log: () => log,
    connect: () => AgentClient.connectUnix(socketPath),
    alive: () => !exited,
    stop: async () => {
      if (!exited) {
        const gone = new Promise((r) => child.once('exit', r));
        // `unshare --fork` ignores SIGTERM while it waits; SIGKILL ends it and
        // --kill-child then delivers SIGKILL to the agent (PID 1 there).
        child.kill(opts.asPid1 ? 'SIGKILL' : 'SIGTERM');
        await gone;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * One host-side agent and one handshaken client shared by every test of the
 * calling describe block: starting the agent per test would cost a process
 * start each. `use` receives both once they are up.
 */
export function agentPerSuite(use: (agent: RunningAgent, client: AgentClient) => void): void {
  let agent: RunningAgent | undefined;
  let client: AgentClient | undefined;
  before(async () => {
    agent = await startAgent();
    client = await agent.connect();
    use(agent, client);
  });
  after(async () => {
    client?.close();
    await agent?.stop();
  });
}

export function collect(stream: NodeJS.ReadableStream): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    stream.on('data', (d: Buffer) => parts.push(d));
    stream.on('end', () => resolve(Buffer.concat(parts)));
    stream.on('error', reject);
  });
}

/** Runs a command to completion and returns its exit status and both outputs. */
export async function run(client: AgentClient, args: string[], extra: Partial<Parameters<AgentClient['exec']>[0]> = {}) {
  const p: AgentProcess = await client.exec({ args, env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'], ...extra });
  p.stdin.end();
  const [stdout, stderr, status] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
  return { status, stdout: stdout.toString(), stderr: stderr.toString() };
}

/** Root, unshare, loop devices and mksquashfs: what the rootfs tests need. */
export function rootfsPrerequisites(): string | null {
  if (process.getuid?.() !== 0) return 'not root (mounting squashfs and overlay needs it)';
  if (!existsSync('/dev/loop-control')) return '/dev/loop-control is missing';
  for (const tool of ['unshare', 'mksquashfs']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed`;
  }
  if (!existsSync('/bin/busybox')) return 'busybox-static is not installed';
  return null;
}

function squashfs(dir: string, out: string): void {
  const r = spawnSync('mksquashfs', [dir, out, '-comp', 'zstd', '-noappend', '-quiet', '-no-progress'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mksquashfs ${dir}: ${r.stderr}`);
}

/**
 * Two real image layers made with mksquashfs (zstd) in a new temp directory:
 * layer 1 has busybox (sh, cat, echo, ls, id, rm) and /etc/{shadowed,only1};
 * layer 2 shadows /etc/shadowed and adds /etc/greeting.
 */
export function buildTestLayers(): { work: string; layer1: string; layer2: string } {
  const work = mkdtempSync(join(tmpdir(), 'vmlet-layers-'));
  const l1 = join(work, 'l1');
  mkdirSync(join(l1, 'bin'), { recursive: true });
  mkdirSync(join(l1, 'etc'));
  mkdirSync(join(l1, 'tmp'));
  copyFileSync('/bin/busybox', join(l1, 'bin', 'busybox'));
  chmodSync(join(l1, 'bin', 'busybox'), 0o755);
  for (const applet of ['sh', 'cat', 'echo', 'ls', 'id', 'rm']) symlinkSync('busybox', join(l1, 'bin', applet));
  writeFileSync(join(l1, 'etc', 'shadowed'), 'layer1\n');
  writeFileSync(join(l1, 'etc', 'only1'), 'only in layer1\n');
  const l2 = join(work, 'l2');
  mkdirSync(join(l2, 'etc'), { recursive: true });
  writeFileSync(join(l2, 'etc', 'shadowed'), 'layer2\n');
  writeFileSync(join(l2, 'etc', 'greeting'), 'hello from layer 2\n');
  const layer1 = join(work, 'layer1.sqfs');
  const layer2 = join(work, 'layer2.sqfs');
  squashfs(l1, layer1);
  squashfs(l2, layer2);
  return { work, layer1, layer2 };
}
