// `vmlet run --cold` end to end, as a user runs it: the real CLI (node dist/shim/cli/vmlet.js)
// boots our guest kernel with vmlet-agent on the lab's standard KVM and runs one
// process in a busybox rootfs. Each `it` group is one microVM (a few seconds each
// in the lab), so checks that can share a VM share it. Every run here boots
// (--cold): the same checks on restored microVMs, vmlet run's default, are in
// vmlet-run-restore.test.ts.
import { strict as assert } from 'node:assert';
import { execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CliResult, vmletRunLabFixture, runCli, startCli, vmletJs, writeOciLayout } from '../helpers/vmlet-cli';

const MiB = 1 << 20;

function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

function show(r: CliResult): string {
  const clip = (b: Buffer): string => (b.length > 4000 ? `${b.subarray(0, 2000).toString('latin1')}\n...[${b.length} bytes]...\n${b.subarray(-2000).toString('latin1')}` : b.toString('latin1'));
  return `exit ${r.code ?? r.signal}\n--- stdout\n${clip(r.stdout)}\n--- stderr\n${clip(r.stderr)}`;
}

describe('vmlet run (inside hack/kvm-lab)', function () {
  this.timeout(180_000);
  let work: string;
  let rootDir: string;
  let sqfs: string;

  before(function () {
    ({ work, rootDir } = vmletRunLabFixture(this, 'vmlet-run-e2e-'));
    sqfs = join(work, 'rootfs.sqfs');
    execFileSync('mksquashfs', [rootDir, sqfs, '-comp', 'zstd', '-noappend', '-quiet', '-all-root']);
  });
  after(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  describe('one process on 2 vCPUs that writes into its rootfs and exits 7', () => {
    let r: CliResult;
    let hashBefore: string;
    before(async function () {
      if (!sqfs) this.skip();
      hashBefore = sha256File(sqfs);
      r = await runCli(['run', '--cold', '--cpus', '2', '--stats', sqfs, '--', 'sh', '-c',
        'echo "KERNEL $(uname -r)"; echo "NPROC $(nproc)"; echo written > /etc/written; rm /bin/ls; echo "READBACK $(cat /etc/written)"; exit 7']);
    });

    it('exits with the process\'s code', () => {
      assert.equal(r.code, 7, show(r));
    });
    it('runs the guest kernel, not the host\'s', () => {
      const m = /^KERNEL (\S+)$/m.exec(r.stdout.toString());
      assert.ok(m, show(r));
      assert.match(m[1], /-vmlet$/);
      assert.notEqual(m[1], execFileSync('uname', ['-r'], { encoding: 'utf8' }).trim());
    });
    it('brings up every vCPU asked for (SMP through the MP table)', () => {
      assert.match(r.stdout.toString(), /^NPROC 2$/m, show(r));
    });
    it('keeps writes in the guest: the squashfs on the host is unchanged', () => {
      assert.match(r.stdout.toString(), /^READBACK written$/m, show(r));
      assert.equal(sha256File(sqfs), hashBefore);
    });
    it('--stats prints the boot timings and the VM exits by reason', () => {
      const err = r.stderr.toString();
      assert.match(err, /^vmlet run: cold boot: .*launch → agent ready \d+ ms/m, show(r));
      assert.doesNotMatch(err, /template/, '--cold neither makes nor restores a template');
      const m = /VM exits (\d+): (.*)$/m.exec(err);
      assert.ok(m, show(r));
      const parts = m[2].split(', ').map((p) => p.split(' '));
      assert.equal(parts.reduce((s, [, n]) => s + Number(n), 0), Number(m[1]), 'the reasons add up to the total');
      console.log(`      ${m[0]}`);
      // A boot too takes the VM the CLI made while it resolved the rootfs; it maps no overlay.
      assert.match(err, /^vmlet run: KVM_CREATE_VM done ahead \(a VM shell\)$/m, show(r));
    });
  });

  describe('stdio: 2 MiB of stdin, 1 MiB back on each of stdout and stderr, then kill -9 $$', () => {
    let r: CliResult;
    let input: Buffer;
    before(async function () {
      if (!sqfs) this.skip();
      input = randomBytes(2 * MiB);
      r = await runCli(['run', '--cold', '-i', sqfs, '--', 'sh', '-c',
        `cat > /tmp/in; head -c ${MiB} /tmp/in; tail -c ${MiB} /tmp/in >&2; kill -9 $$`], { stdin: input });
    });

    it('exits 128 + 9 when the process is killed by SIGKILL', () => {
      assert.equal(r.code, 137, show(r));
    });
    it('delivers stdin byte-exact up to EOF (cat ends only at EOF)', () => {
      assert.equal(r.stdout.length + r.stderr.length, 2 * MiB, show(r));
    });
    it('keeps stdout and stderr separate and byte-exact', () => {
      assert.ok(r.stdout.equals(input.subarray(0, MiB)), `stdout differs from the first MiB of stdin (${r.stdout.length} bytes)`);
      assert.ok(r.stderr.equals(input.subarray(MiB)), `stderr differs from the second MiB of stdin (${r.stderr.length} bytes)`);
    });
  });

  it('forwards SIGTERM sent to the CLI to the process (exit 143)', async function () {
    if (!sqfs) this.skip();
    const run = startCli(['run', '--cold', sqfs, '--', 'sh', '-c', 'echo ready; exec sleep 1000']);
    await run.stdoutMatches(/ready\n/);
    run.child.kill('SIGTERM');
    const r = await run.done;
    assert.equal(r.code, 143, show(r));
  });

  it('stops the microVM on a second SIGINT when the process ignores the first (exit 130)', async function () {
    if (!sqfs) this.skip();
    const run = startCli(['run', '--cold', sqfs, '--', 'sh', '-c', 'trap "echo got-int" INT; echo ready; while true; do sleep 1; done']);
    await run.stdoutMatches(/ready\n/);
    run.child.kill('SIGINT');
    await run.stdoutMatches(/got-int\n/);
    run.child.kill('SIGINT');
    const r = await run.done;
    assert.equal(r.code, 130, show(r));
    assert.match(r.stderr.toString(), /second interrupt: stopping the microVM/);
  });

  it('gives the process a terminal with -t (one output stream, 24x80 when ours is not a terminal)', async function () {
    if (!sqfs) this.skip();
    const r = await runCli(['run', '--cold', '-t', sqfs, '--', 'sh', '-c', 'tty; stty size; echo "TERM=$TERM"; echo to-stderr >&2']);
    assert.equal(r.code, 0, show(r));
    const out = r.stdout.toString();
    assert.match(out, /^\/dev\/pts\/\d+\r\n24 80\r\nTERM=xterm\r\nto-stderr\r\n$/, show(r));
    assert.equal(r.stderr.length, 0, show(r));
  });

  it('with -t -i on a real terminal: keystrokes reach the shell, the window size is ours and follows a resize', async function () {
    if (!sqfs) this.skip();
    // script(1) gives the CLI a terminal of 30x100. Output crosses two ptys (the
    // guest's and script's), so lines end in \r\r\n. The resize: a job in the
    // CLI's own process group sets the terminal to 40x120 once the test creates
    // `flag`; the kernel sends the foreground group SIGWINCH, which the CLI
    // forwards to the guest's pty.
    const flag = join(work, 'resize-now');
    // </dev/tty: a non-interactive shell gives a background job /dev/null as stdin.
    const resizer = `(while [ ! -e ${flag} ]; do sleep 0.1; done; stty rows 40 cols 120 </dev/tty) &`;
    const inner = `stty rows 30 cols 100; ${resizer} exec ${process.execPath} ${vmletJs} run --cold -t -i ${sqfs} -- sh`;
    const child = spawn('script', ['-qec', inner, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString('latin1')));
    child.stderr.on('data', (d: Buffer) => (out += d.toString('latin1')));
    const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
    const until = async (re: RegExp): Promise<void> => {
      for (let i = 0; i < 600 && !re.test(out); i++) await new Promise((r) => setTimeout(r, 100));
      assert.match(out, re, `terminal output so far:\n${out}`);
    };
    try {
      // busybox sh's line editor asks the terminal for the cursor position (ESC [6n) after its prompt.
      await until(/\/ # /);
      child.stdin.write('stty size; echo "SIZE-$((6*7))"\r');
      await until(/30 100\r+\nSIZE-42/);
      writeFileSync(flag, '');
      // The SIGWINCH travels host -> CLI -> agent asynchronously: ask until the size changed.
      for (let i = 0; i < 50 && !/40 120\r+\nSIZE-2/.test(out); i++) {
        child.stdin.write('stty size; echo "SIZE-$((1+1))"\r');
        await new Promise((r) => setTimeout(r, 400));
      }
      await until(/40 120\r+\nSIZE-2/);
      child.stdin.write('exit 5\r');
      assert.equal(await exited, 5, out);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('runs a directory (converted to squashfs) with --env and --workdir', async function () {
    if (!rootDir) this.skip();
    const r = await runCli(['run', '--cold', '--env', 'GREETING=hello there', '--workdir', '/etc', rootDir, '--', 'sh', '-c', 'echo "$GREETING in $PWD"']);
    assert.equal(r.code, 0, show(r));
    assert.equal(r.stdout.toString(), 'hello there in /etc\n');
  });

  it('runs a stored image with its Entrypoint, Cmd, Env, WorkingDir and User', async function () {
    if (!rootDir) this.skip();
    const root = join(work, 'store');
    // GNU tar, not umoci: inside the lab umoci saw a symlink share the inode of its
    // directory (the 9p + overlay root) and wrote a hardlink to '.', which vmlet load rightly refuses.
    writeOciLayout(join(work, 'layout'), rootDir, 'v1', {
      Entrypoint: ['/bin/sh', '-c'],
      Cmd: ['echo "$MODE in $PWD as $(id -u):$(id -g)"'],
      Env: ['MODE=from-image'],
      WorkingDir: '/tmp',
      User: '1000:1000',
    });
    const load = await runCli(['--root', root, 'load', '--name', 'localhost/run-e2e/busybox:v1', join(work, 'layout')]);
    assert.equal(load.code, 0, show(load));
    const r = await runCli(['--root', root, 'run', '--cold', 'localhost/run-e2e/busybox:v1']);
    assert.equal(r.code, 0, show(r));
    assert.equal(r.stdout.toString(), 'from-image in /tmp as 1000:1000\n');
  });

  it('reports a guest kernel panic: exit 125 and the serial log tail on stderr', async function () {
    if (!sqfs) this.skip();
    // The kernel has no sysrq and PID 1 cannot be killed from inside, so panic the
    // real way: panic_on_oom=2, overcommit allowed, and one allocation larger than RAM.
    const r = await runCli(['run', '--cold', '--memory', '128', sqfs, '--', 'sh', '-c',
      'echo 1 > /proc/sys/vm/overcommit_memory; echo 2 > /proc/sys/vm/panic_on_oom; dd if=/dev/zero of=/dev/null bs=256M count=1; echo survived']);
    assert.equal(r.code, 125, show(r));
    assert.doesNotMatch(r.stdout.toString(), /survived/);
    const err = r.stderr.toString();
    assert.match(err, /the microVM stopped while the process ran|lost the connection to the guest agent/, show(r));
    assert.match(err, /guest serial log \(tail\):[\s\S]*Kernel panic - not syncing: Out of memory/, show(r));
  });
});
