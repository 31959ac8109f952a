// The real `vmlet` CLI as a child process (dist/shim/cli/vmlet.js), for tests
// that must see what a user sees: exit status, stdout and stderr kept apart,
// signals delivered to the CLI process. And a busybox rootfs to run in it.
import { execFileSync, spawn, ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../native/ts/repo-root';
import { agentBinary, busyboxStatic } from '../../shim/sandbox/guest';
import { requireLabGuestKernel } from './guest-kernel';

export const vmletJs = join(repoRoot(), 'dist', 'shim', 'cli', 'vmlet.js');

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: Buffer;
}

export interface CliRun {
  child: ChildProcess;
  /** Resolves once the CLI has exited and both of its output pipes are closed. */
  done: Promise<CliResult>;
  /** Resolves when stdout so far matches `re` (rejects if the CLI exits first). */
  stdoutMatches(re: RegExp): Promise<void>;
}

export function startCli(args: string[], opts: { env?: NodeJS.ProcessEnv; stdin?: Buffer } = {}): CliRun {
  const child = spawn(process.execPath, [vmletJs, ...args], {
    env: opts.env ?? process.env,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const watchers: { re: RegExp; resolve: () => void }[] = [];
  child.stdout!.on('data', (d: Buffer) => {
    out.push(d);
    const text = Buffer.concat(out).toString('latin1');
    for (const w of watchers.splice(0)) {
      if (w.re.test(text)) w.resolve();
      else watchers.push(w);
    }
  });
  child.stderr!.on('data', (d: Buffer) => err.push(d));
  // A CLI that exits without reading stdin closes the pipe under us: not a test failure.
  child.stdin!.on('error', () => undefined);
  if (opts.stdin) child.stdin!.end(opts.stdin);
  else child.stdin!.end();
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout: Buffer.concat(out), stderr: Buffer.concat(err) }));
  });
  return {
    child,
    done,
    stdoutMatches: (re) =>
      new Promise<void>((resolve, reject) => {
        if (re.test(Buffer.concat(out).toString('latin1'))) return resolve();
        watchers.push({ re, resolve });
        void done.then((r) => reject(new Error(`vmlet exited (${r.code ?? r.signal}) before stdout matched ${re}; stderr:\n${r.stderr.toString()}`)));
      }),
  };
}

export function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; stdin?: Buffer } = {}): Promise<CliResult> {
  return startCli(args, opts).done;
}

/** A static busybox with every applet linked in /bin, and root in /etc/passwd. */
export function populateBusyboxRootfs(rootfs: string, applets: string[]): void {
  mkdirSync(join(rootfs, 'bin'), { recursive: true });
  copyFileSync(busyboxStatic(), join(rootfs, 'bin', 'busybox'));
  for (const a of applets) if (a !== 'busybox') symlinkSync('busybox', join(rootfs, 'bin', a));
  for (const d of ['etc', 'tmp', 'proc', 'dev', 'sys']) mkdirSync(join(rootfs, d), { recursive: true });
  writeFileSync(join(rootfs, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
}

/**
 * The before() of the `vmlet run` lab suites: skips (loudly) outside the lab or
 * without the guest kernel or a built agent, else makes a scratch directory
 * (`prefix` + random) holding a busybox rootfs in `rootfs/`.
 */
export function vmletRunLabFixture(ctx: Mocha.Context, prefix: string): { work: string; rootDir: string } {
  requireLabGuestKernel(ctx);
  try {
    readFileSync(agentBinary);
  } catch {
    console.log(`      !!! SKIPPED (the agent is not built): ${agentBinary} is missing: run npm run build:agent`);
    ctx.skip();
  }
  const work = mkdtempSync(join(tmpdir(), prefix));
  const rootDir = join(work, 'rootfs');
  const applets = execFileSync('/bin/busybox', ['--list'], { encoding: 'utf8' }).split('\n').filter(Boolean);
  populateBusyboxRootfs(rootDir, applets);
  return { work, rootDir };
}

/** A one-layer OCI image layout of `rootfs` with the given runtime config. */
export function writeOciLayout(dir: string, rootfs: string, tag: string, config: Record<string, unknown>): void {
  const blobs = join(dir, 'blobs', 'sha256');
  mkdirSync(blobs, { recursive: true });
  const put = (data: Buffer): { digest: string; size: number } => {
    const hex = createHash('sha256').update(data).digest('hex');
    writeFileSync(join(blobs, hex), data);
    return { digest: `sha256:${hex}`, size: data.length };
  };
  const tar = execFileSync('tar', ['-C', rootfs, '--numeric-owner', '-cf', '-', '.'], { maxBuffer: 64 << 20 });
  const layer = put(gzipSync(tar));
  const cfg = put(Buffer.from(JSON.stringify({
    architecture: 'amd64', os: 'linux', config,
    rootfs: { type: 'layers', diff_ids: [`sha256:${createHash('sha256').update(tar).digest('hex')}`] },
  })));
  const manifestType = 'application/vnd.oci.image.manifest.v1+json';
  const manifest = put(Buffer.from(JSON.stringify({
    schemaVersion: 2, mediaType: manifestType,
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg },
    layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...layer }],
  })));
  writeFileSync(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  writeFileSync(join(dir, 'index.json'), JSON.stringify({
    schemaVersion: 2,
    manifests: [{ mediaType: manifestType, ...manifest, annotations: { 'org.opencontainers.image.ref.name': tag } }],
  }));
}

