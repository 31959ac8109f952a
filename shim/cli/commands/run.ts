// `vmlet run`: one container process in a new microVM, attached to this
// terminal like `docker run`: stdio streamed byte-exact (or through a pty with
// -t), SIGINT/SIGTERM/SIGHUP/SIGQUIT forwarded, the process's exit code (128 +
// signal when it was killed) as ours. vmlet's own failures exit 125, as docker
// run's do. The microVM is a Sandbox (shim/sandbox), restored from a template
// of its (layers, cpus, memory) made on first use, or booted with --cold or when
// the template cannot be used; this file only translates the command line and
// the terminal.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { finished } from 'node:stream/promises';
import { Command, CommandContext, OptionValues, UsageError, stringOpt } from '../command';
import { convertLayer, ImageError as LayerError } from '../../../native/ts/layer';
import { Vm, VmmError } from '../../../native/ts/vmm';
import { AgentError, AgentProcess, ExecOptions, shellExitCode } from '../../agent/client';
import { MAX_USER_SPEC } from '../../agent/protocol';
import { ImageError } from '../../images/errors';
import type { ImageService } from '../../images/image-service';
import type { RuntimeConfig } from '../../images/image-store';
import { linuxGuestRefusal } from '../../sandbox/host';
import { checkLayer, coldBoot, describeExit, MAX_CPUS, MAX_MEMORY_MIB, MIN_MEMORY_MIB, Sandbox, SandboxError, VmLauncher } from '../../sandbox/sandbox';
import { templateLauncher } from '../../sandbox/template-pool';

/** docker run's status for its own failures (as opposed to the container's). */
export const EXIT_VMLET_FAILED = 125;
const DEFAULT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const FORWARDED_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT'];

/** What the command line asks for, validated; the rootfs is still a name. */
export interface RunRequest {
  rootfs: string;
  command: string[];
  cpus: number;
  memoryMiB: number;
  tty: boolean;
  interactive: boolean;
  env: string[];
  workdir?: string;
  user?: string;
  stats: boolean;
  forceKvm: boolean;
  /** Boot the guest kernel instead of restoring a template. */
  cold: boolean;
}

/** $VMLET_TEMPLATE_DIR, else `templates` under the state root (/var/lib/vmlet/templates by default). */
export function templateRoot(root: string): string {
  return process.env.VMLET_TEMPLATE_DIR || join(root, 'templates');
}

function wholeNumber(text: string | undefined, flag: string, min: number, max: number, dflt: number): number {
  if (text === undefined) return dflt;
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`${flag} '${text}' is not a whole number from ${min} to ${max}`);
  return n;
}

export function parseRunArgs(values: OptionValues, positionals: string[]): RunRequest {
  const [rootfs, ...command] = positionals;
  if (rootfs === undefined || rootfs === '') throw new UsageError('run needs a rootfs: a squashfs file, a directory or an image reference');
  const env = (Array.isArray(values.env) ? values.env : []).map(String);
  for (const e of env) if (!/^[^=]+=/.test(e)) throw new UsageError(`--env '${e}' is not KEY=VALUE`);
  const workdir = stringOpt(values, 'workdir');
  if (workdir !== undefined && !workdir.startsWith('/')) throw new UsageError(`--workdir '${workdir}' must be an absolute path inside the rootfs`);
  const user = stringOpt(values, 'user');
  if (user !== undefined) parseUser(user, '--user');
  return {
    rootfs,
    command,
    cpus: wholeNumber(stringOpt(values, 'cpus'), '--cpus', 1, MAX_CPUS, 1),
    memoryMiB: wholeNumber(stringOpt(values, 'memory'), '--memory', MIN_MEMORY_MIB, MAX_MEMORY_MIB, 256),
    tty: values.tty === true,
    interactive: values.interactive === true,
    env,
    workdir,
    user,
    stats: values.stats === true,
    forceKvm: values['force-kvm'] === true,
    cold: values.cold === true,
  };
}

/**
 * Checks the form of a user string (`user`, `uid`, `user:group`, `uid:gid`,
 * `user:gid`, `uid:group`) and returns it for the agent, which resolves names
 * in the container's own /etc/passwd and /etc/group (they live in the guest).
 * Numbers go there too: like runc, a bare uid takes its gid, HOME and
 * supplementary groups from passwd when the image has an entry for it.
 */
export function parseUser(text: string, from: string): string {
  const forms = 'give user, uid, user:group, uid:gid, user:gid or uid:group';
  const bytes = Buffer.byteLength(text);
  if (bytes > MAX_USER_SPEC) throw new UsageError(`${from} is ${bytes} bytes long; at most ${MAX_USER_SPEC} (user[:group])`);
  if (text.includes('\0') || text.includes('\n')) throw new UsageError(`${from} ${JSON.stringify(text)} contains a NUL or newline; ${forms}`);
  const parts = text.split(':');
  if (parts.length > 2) throw new UsageError(`${from} '${text}' has more than one ':'; ${forms}`);
  for (const p of parts)
    if (/^\d+$/.test(p) && Number(p) >= 0xffffffff) throw new UsageError(`${from} '${text}': ids must be below 4294967295`);
  return text;
}

/** Later entries win, as `docker run -e` over the image's Env. */
function mergeEnv(...lists: string[][]): string[] {
  const byKey = new Map<string, string>();
  for (const list of lists) for (const e of list) byKey.set(e.slice(0, e.indexOf('=') >>> 0), e);
  return [...byKey.values()];
}

/** A failure of vmlet itself: printed once, exit 125. */
class RunFailure extends Error {
  constructor(message: string, readonly serialTail?: string) {
    super(message);
  }
}

interface ResolvedRootfs {
  layers: string[];
  config?: RuntimeConfig;
  describe: string;
}

function looksLikePath(s: string): boolean {
  return s.startsWith('/') || s.startsWith('./') || s.startsWith('../') || s === '.' || s === '..' || /\.(sqfs|squashfs|img)$/.test(s);
}

function run1(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d: Buffer) => (err += d.toString('utf8')));
    p.on('error', reject);
    p.on('close', (code, sig) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} exited ${code ?? sig}: ${err.trim()}`))));
  });
}

/**
 * A directory becomes one squashfs layer through our own converter (the same
 * one image layers go through), from a tar of the tree. Not cached: hashing a
 * tree costs about what converting it does; the image goes when the run ends.
 */
export async function directoryToSquashfs(dir: string, work: string): Promise<string> {
  const tar = join(work, 'rootfs.tar');
  const sqfs = join(work, 'rootfs.sqfs');
  try {
    await run1('tar', ['-C', dir, '--numeric-owner', '--xattrs', '-cf', tar, '.']);
  } catch (e) {
    throw new RunFailure(`cannot read the rootfs directory ${dir}: ${(e as Error).message}`);
  }
  try {
    // A throwaway image: a low zstd level converts several times faster.
    await convertLayer(tar, sqfs, { compression: 'none', level: 3 });
  } catch (e) {
    throw new RunFailure(`cannot convert the rootfs directory ${dir} to squashfs: ${(e as Error).message}`);
  } finally {
    rmSync(tar, { force: true });
  }
  return sqfs;
}

async function resolveRootfs(req: RunRequest, root: string, work: string): Promise<ResolvedRootfs> {
  const name = req.rootfs;
  if (existsSync(name)) {
    const st = statSync(name);
    if (st.isDirectory()) return { layers: [await directoryToSquashfs(name, work)], describe: `directory ${name}` };
    try {
      checkLayer(name);
    } catch (e) {
      throw new RunFailure((e as Error).message);
    }
    return { layers: [name], describe: `squashfs ${name}` };
  }
  if (looksLikePath(name)) throw new RunFailure(`rootfs ${name} does not exist: give a squashfs file, a directory or an image reference (see vmlet images)`);
  try {
    // Loaded only for an image reference: the image stack is a third of this
    // command's start-up, and a squashfs or directory rootfs does not need it.
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const images = require('../../images/image-service') as { ImageService: typeof ImageService };
    const { image, layers } = await new images.ImageService({ root }).rootfs(name);
    return { layers, config: image.config, describe: `image ${image.reference}` };
  } catch (e) {
    if (e instanceof ImageError) throw new RunFailure(`${e.message} (not a file or directory either)`);
    throw e;
  }
}

function processSpec(req: RunRequest, rootfs: ResolvedRootfs): Omit<ExecOptions, 'rootfs'> {
  const config = rootfs.config;
  let args = req.command;
  if (args.length === 0) {
    if (!config) throw new UsageError(`${rootfs.describe} has no image config: give the command after --`);
    args = [...(config.entrypoint ?? []), ...(config.cmd ?? [])];
    if (args.length === 0) throw new UsageError(`${rootfs.describe} has neither Entrypoint nor Cmd: give the command after --`);
  } else if (config?.entrypoint?.length) {
    // docker run: arguments after the image replace Cmd and go to the Entrypoint.
    args = [...config.entrypoint, ...args];
  }
  const base = config?.env ?? [];
  const env = mergeEnv([DEFAULT_PATH], base, req.tty ? ['TERM=xterm'] : [], req.env);
  // An empty user is Docker's default (uid 0); the agent still reads
  // passwd/group for it, so root gets its HOME and groups as under Docker.
  const user = req.user ?? config?.user ?? '';
  return {
    args,
    env,
    cwd: req.workdir ?? (config?.workingDir || '/'),
    user: parseUser(user, req.user !== undefined ? '--user' : `${rootfs.describe}'s User`),
  };
}

export const run: Command = {
  name: 'run',
  usage: '[options] <rootfs.sqfs | dir | image> [-- cmd args...]',
  options: {
    cpus: { type: 'string' },
    memory: { type: 'string' },
    cold: { type: 'boolean' },
    tty: { type: 'boolean', short: 't' },
    interactive: { type: 'boolean', short: 'i' },
    env: { type: 'string', short: 'e', multiple: true },
    workdir: { type: 'string', short: 'w' },
    user: { type: 'string', short: 'u' },
    stats: { type: 'boolean' },
    'force-kvm': { type: 'boolean' },
  },
  help: [
    '--cpus N          vCPUs of the microVM (default 1, at most 64)',
    '--memory MiB      guest RAM (default 256)',
    '--cold            boot the guest kernel instead of restoring a template (see below)',
    '-t, --tty         a pseudo-terminal for the process (window size follows this terminal)',
    '-i, --interactive forward stdin to the process (without it the process reads EOF)',
    '-e, --env K=V     set an environment variable (repeatable; wins over the image\'s Env)',
    '-w, --workdir D   working directory inside the rootfs (default the image\'s, else /)',
    '-u, --user U      user, uid, user:group, uid:gid, user:gid or uid:group, looked up in the',
    '                  rootfs\'s /etc/passwd and /etc/group as Docker does (default the image\'s User,',
    '                  else uid 0); HOME comes from passwd unless set with -e',
    '--stats           after the run, print whether it restored or booted, the start-up timings',
    '                  and the VM exits by reason to stderr',
    '--force-kvm       skip the check that /dev/kvm can run a Linux guest (also VMLET_FORCE_KVM=1)',
    '',
    'The rootfs is a squashfs file, a directory (converted to a temporary squashfs first) or',
    'an image in the store (vmlet pull/load); an image\'s Entrypoint/Cmd/Env/WorkingDir/User',
    'apply. Put the command after --. Signals SIGINT, SIGTERM, SIGHUP and SIGQUIT go to the',
    'process; a second Ctrl-C stops the microVM. Exit status: the process\'s, 128+N when signal N',
    'killed it, 125 when vmlet itself failed (then the guest\'s serial log tail is printed if the',
    'guest died). Hosts without vmx/svm (nested paravirtual KVM) cannot boot Linux guests:',
    'use hack/kvm-lab run -- vmlet run ...',
    '',
    'Templates: by default the microVM is restored from a snapshot of a guest booted once per',
    '(rootfs layers, --cpus, --memory, guest kernel, agent, vmlet build, host CPU). The first run',
    'of such a combination boots the guest and snapshots it (slower than --cold, once); later runs',
    'restore it, each with its own RNG state, clock and hostname. Templates live in',
    '$VMLET_TEMPLATE_DIR, else <root>/templates (/var/lib/vmlet/templates); a corrupt one is made',
    'anew, and one that cannot be used at all gives way to a cold boot with a warning on stderr.',
    'A template holds the guest\'s memory (tens of MiB each): see vmlet templates list / prune.',
    '--cold boots the guest kernel every time and neither makes nor reads templates.',
  ],
  async run(values, positionals, ctx) {
    const req = parseRunArgs(values, positionals);
    const refusal = linuxGuestRefusal({ force: req.forceKvm });
    if (refusal) {
      ctx.stderr.write(`vmlet run: ${refusal}\n`);
      return EXIT_VMLET_FAILED;
    }
    const work = mkdtempSync(join(tmpdir(), 'vmlet-run-'));
    try {
      return await execute(req, ctx, work);
    } catch (e) {
      if (e instanceof UsageError) throw e;
      const known = e instanceof RunFailure || e instanceof SandboxError || e instanceof VmmError || e instanceof AgentError || e instanceof LayerError;
      if (!known) throw e;
      ctx.stderr.write(`vmlet run: ${e instanceof VmmError ? `${e.name}: ` : ''}${(e as Error).message}\n`);
      const tail = e instanceof RunFailure ? e.serialTail : e instanceof SandboxError ? e.serialTail : undefined;
      if (tail) ctx.stderr.write(`vmlet run: guest serial log (tail):\n${tail}\n`);
      return EXIT_VMLET_FAILED;
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  },
};

/**
 * Whether this run makes its KVM VM ahead (a VM shell, kvm/vm_shell.h) while
 * it resolves the rootfs and looks up the template. VMLET_VM_SHELLS=0 turns
 * it off (to measure it, or on a host where KVM_CREATE_VM is cheap anyway:
 * kvm.nx_huge_pages=never).
 */
function shellAhead(): boolean {
  const v = process.env.VMLET_VM_SHELLS;
  if (v === undefined || v === '' || v === '1') return true;
  if (v === '0') return false;
  throw new RunFailure(`VMLET_VM_SHELLS is '${v}': set it to 1 (the default: make the VM ahead) or 0`);
}

async function execute(req: RunRequest, ctx: CommandContext, work: string): Promise<number> {
  // KVM_CREATE_VM on libuv's pool, beside the work below: the restore or boot
  // takes the shell, or waits for it if it is still being made. A failure
  // here is the create's to report, with its own context.
  if (shellAhead()) Vm.fillShells(1).catch(() => undefined);
  const rootfs = await resolveRootfs(req, ctx.root, work);
  const spec = processSpec(req, rootfs);

  // Signals: before the process exists they abort the start; after, they are
  // forwarded, and a second SIGINT stops the VM (a process ignoring SIGINT
  // must not hold the terminal hostage).
  const abort = new AbortController();
  let proc: AgentProcess | null = null;
  let sandbox: Sandbox | null = null;
  let interrupts = 0;
  let stoppedBySignal: NodeJS.Signals | null = null;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (sig === 'SIGINT') interrupts++;
    if (!proc || !sandbox) {
      stoppedBySignal ??= sig;
      abort.abort();
      return;
    }
    if (sig === 'SIGINT' && interrupts >= 2) {
      ctx.stderr.write('vmlet run: second interrupt: stopping the microVM\n');
      stoppedBySignal = sig;
      void sandbox.stop();
      return;
    }
    proc.signal(sig).catch(() => undefined);
  };
  const handlers = FORWARDED_SIGNALS.map((sig) => {
    const h = (): void => onSignal(sig);
    process.on(sig, h);
    return [sig, h] as const;
  });
  const stdin = process.stdin;
  let rawMode = false;
  let resizeHandler: (() => void) | null = null;
  const pool = req.cold ? null : templateLauncher({ root: templateRoot(ctx.root), fallback: coldBoot });
  const launcher: VmLauncher = pool ?? coldBoot;
  try {
    const t0 = Date.now();
    try {
      sandbox = await Sandbox.start({ cpus: req.cpus, memoryMiB: req.memoryMiB, layers: rootfs.layers }, { signal: abort.signal, launcher });
    } catch (e) {
      if (stoppedBySignal) return 128 + osConstants.signals[stoppedBySignal];
      throw e;
    }
    const stdout = ctx.stdout;
    const tty = req.tty ? { rows: (stdout as { rows?: number }).rows || 24, cols: (stdout as { columns?: number }).columns || 80 } : undefined;
    const started = Date.now();
    proc = await sandbox.exec({ ...spec, tty });
    const p = proc;
    if (stoppedBySignal) {
      // A signal arrived while EXEC was in flight: the process gets it now.
      p.signal(stoppedBySignal).catch(() => undefined);
      stoppedBySignal = null;
    }
    // Raw mode only when our keystrokes go to the process: with -t alone, Ctrl-C
    // must still reach us as SIGINT (and be forwarded), as with docker run -t.
    if (req.tty && req.interactive && stdin.isTTY) {
      stdin.setRawMode(true);
      rawMode = true;
    }
    if (req.tty && (stdout as { isTTY?: boolean }).isTTY) {
      resizeHandler = () => {
        const s = stdout as { rows?: number; columns?: number };
        if (s.rows && s.columns) p.resize(s.rows, s.columns).catch(() => undefined);
      };
      // Node refreshes rows/columns on SIGWINCH and then emits 'resize'.
      stdout.on('resize', resizeHandler);
    }
    if (req.interactive) stdin.pipe(p.stdin);
    else p.stdin.end();
    // `vmlet run ... | head -1`: once our reader is gone, the process's output is
    // drained and dropped so it never blocks on a full window, as it would on a pipe.
    for (const [from, to] of [[p.stdout, stdout], [p.stderr, ctx.stderr]] as const) {
      from.pipe(to, { end: false });
      to.once('error', () => {
        from.unpipe(to);
        from.resume();
      });
    }
    const drained = Promise.all([finished(p.stdout), finished(p.stderr)]).then(() => true, () => false);

    type Outcome = { kind: 'exit'; code: number } | { kind: 'vm' } | { kind: 'lost'; error: Error };
    const outcome: Outcome = await Promise.race([
      p.wait().then((s): Outcome => ({ kind: 'exit', code: shellExitCode(s) }), (error: Error): Outcome => ({ kind: 'lost', error })),
      sandbox.exited().then((): Outcome => ({ kind: 'vm' })),
    ]);
    const exitedAt = Date.now();
    if (outcome.kind === 'exit') await drained;
    if (req.stats) printStats(ctx, sandbox, t0, started, exitedAt);
    if (outcome.kind === 'exit') return outcome.code;
    if (stoppedBySignal) return 128 + osConstants.signals[stoppedBySignal];
    // The connection broke or the VM stopped under a running process: find out which.
    const exit = sandbox.exit ?? (await Promise.race([sandbox.exited(), new Promise<null>((r) => setTimeout(() => r(null), 2000))]));
    const tail = await sandbox.serialTail();
    if (exit) throw new RunFailure(`the microVM stopped while the process ran: ${describeExit(exit)}`, tail);
    throw new RunFailure(`lost the connection to the guest agent while the process ran: ${(outcome as { error: Error }).error.message}`, tail);
  } finally {
    for (const [sig, h] of handlers) process.off(sig, h);
    if (resizeHandler) ctx.stdout.off('resize', resizeHandler);
    if (rawMode) stdin.setRawMode(false);
    if (req.interactive) {
      stdin.unpipe();
      // A stdin nobody reads any more would keep the event loop alive.
      stdin.destroy();
    }
    if (sandbox) await sandbox.stop();
    await pool?.close();
  }
}

function printStats(ctx: CommandContext, sandbox: Sandbox, t0: number, started: number, exitedAt: number): void {
  const t = sandbox.timings;
  const ms = (a: number | undefined, b: number | undefined): string => (a !== undefined && b !== undefined ? `${b - a} ms` : '?');
  ctx.stderr.write(`vmlet run: ${sandbox.launched.origin}: VM created ${ms(t.launchStartMs, t.launchedMs)}, launch → agent ready ${ms(t.launchStartMs, t.agentReadyMs)}, ` +
    `rootfs stacked ${ms(t.agentReadyMs, t.rootfsReadyMs)}, process ran ${exitedAt - started} ms, total ${exitedAt - t0} ms\n`);
  const report = sandbox.launched.report;
  const tpl = report?.template;
  const f = (n: number): string => `${n.toFixed(1)} ms`;
  if (tpl) {
    const made = tpl.madeMs !== undefined ? `made by this run in ${tpl.madeMs} ms (boot + snapshot)` : 'reused';
    ctx.stderr.write(`vmlet run: template ${tpl.key} ${made}; restore → agent ready ${f(tpl.restoreToAgentMs)}` +
      `${tpl.hostRestoreMs !== undefined ? ` (host-side restore ${f(tpl.hostRestoreMs)})` : ''}, SET_IDENTITY ${f(tpl.identityMs)}\n`);
  } else if (report?.fallbackReason) {
    ctx.stderr.write(`vmlet run: booted because the template could not be used: ${report.fallbackReason}\n`);
  }
  const st = sandbox.stats();
  const exits = Object.entries(st.exits).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  const total = exits.reduce((s, [, n]) => s + n, 0);
  ctx.stderr.write(`vmlet run: VM exits ${total}: ${exits.map(([k, n]) => `${k} ${n}`).join(', ')}\n`);
  ctx.stderr.write(`vmlet run: KVM_CREATE_VM ${st.vmShell ? 'done ahead (a VM shell)' : 'on the start path'}` +
    `${st.memoryOverlayBytes ? `; kernel text in 2 MiB pages (${st.memoryOverlayBytes / 2 ** 20} MiB from the huge-page tmpfs)` : ''}\n`);
}
