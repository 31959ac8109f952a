// `vmlet run` end to end on its default path, inside hack/kvm-lab: the microVM
// is restored from a template. The first run makes the template (boot +
// snapshot), every later one restores it; the checks of vmlet-run.test.ts
// (which boots, --cold) hold here too: exit codes, stdio kept apart byte-exact,
// signals, vCPUs, a read-only image, a guest panic reported with its serial
// tail, temp files removed. One template (busybox, 2 vCPUs, 256 MiB) serves
// the whole file; two checks make it anew on purpose (corrupt template) or
// cannot use it (unusable root), and one boots (--cold).
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CliResult, vmletRunLabFixture, runCli, startCli } from '../helpers/vmlet-cli';
import { kernelTextRange } from '../../shim/sandbox/huge-text';
import { requireGuestKernel } from '../../shim/sandbox/guest';

const MiB = 1 << 20;

function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

function show(r: CliResult): string {
  const clip = (b: Buffer): string => (b.length > 4000 ? `${b.subarray(0, 2000).toString('latin1')}\n...[${b.length} bytes]...\n${b.subarray(-2000).toString('latin1')}` : b.toString('latin1'));
  return `exit ${r.code ?? r.signal}\n--- stdout\n${clip(r.stdout)}\n--- stderr\n${clip(r.stderr)}`;
}

/** Files a run leaves in the temp dir while it runs; none may outlive it. */
function runLeftovers(): string[] {
  return readdirSync(tmpdir()).filter((n) => /^vmlet-(sandbox|run|restored|template-boot)-/.test(n)).sort();
}

describe('vmlet run restores from a template by default (inside hack/kvm-lab)', function () {
  this.timeout(300_000);
  let work: string;
  let sqfs: string;
  let templates: string;
  let env: NodeJS.ProcessEnv;
  let leftoversBefore: string[];
  /** The common arguments: one template (2 vCPUs, 256 MiB, this squashfs) for the whole file. */
  const args = (...rest: string[]): string[] => ['run', '--cpus', '2', ...rest.slice(0, -1), sqfs, '--', 'sh', '-c', rest[rest.length - 1]];
  const templateKeys = (): string[] => readdirSync(templates).filter((n) => /^[0-9a-f]{32}$/.test(n));

  before(function () {
    leftoversBefore = runLeftovers();
    let rootDir: string;
    ({ work, rootDir } = vmletRunLabFixture(this, 'vmlet-run-restore-e2e-'));
    sqfs = join(work, 'rootfs.sqfs');
    execFileSync('mksquashfs', [rootDir, sqfs, '-comp', 'zstd', '-noappend', '-quiet', '-all-root']);
    templates = join(work, 'templates');
    env = { ...process.env, VMLET_TEMPLATE_DIR: templates };
  });
  after(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  describe('the first run makes the template, writes into its rootfs on 2 vCPUs and exits 7', () => {
    let r: CliResult;
    let hashBefore: string;
    before(async function () {
      if (!sqfs) this.skip();
      hashBefore = sha256File(sqfs);
      r = await runCli(args('--stats', 'echo "NPROC $(nproc)"; echo written > /etc/written; rm /bin/ls; echo "READBACK $(cat /etc/written)"; exit 7'), { env });
      console.log(`      ${(/^vmlet run: template .*$/m.exec(r.stderr.toString()) ?? ['(no template line)'])[0]}`);
    });

    it('exits with the process\'s code', () => {
      assert.equal(r.code, 7, show(r));
    });
    it('says with --stats that it made the template and restored it', () => {
      const err = r.stderr.toString();
      assert.match(err, /^vmlet run: template restore: VM created \d+ ms, launch → agent ready \d+ ms/m, show(r));
      assert.match(err, /^vmlet run: template [0-9a-f]{32} made by this run in \d+ ms \(boot \+ snapshot\); restore → agent ready [\d.]+ ms \(host-side restore [\d.]+ ms\), SET_IDENTITY [\d.]+ ms$/m, show(r));
      assert.equal(templateKeys().length, 1);
    });
    it('brings up both vCPUs in the restored guest', () => {
      assert.match(r.stdout.toString(), /^NPROC 2$/m, show(r));
    });
    it('keeps writes in the guest: the squashfs on the host is unchanged', () => {
      assert.match(r.stdout.toString(), /^READBACK written$/m, show(r));
      assert.equal(sha256File(sqfs), hashBefore);
    });
  });

  describe('a second run restores the template made by the first', () => {
    let r: CliResult;
    let again: CliResult;
    before(async function () {
      if (!sqfs) this.skip();
      const probe = 'echo "ID $(hostname) $(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n")"; ls /etc/written 2>&1; echo to-stderr >&2; exit 3';
      r = await runCli(args('--stats', probe), { env });
      again = await runCli(args(probe), { env });
    });

    it('reuses it (--stats), exits 3 and keeps stdout and stderr apart', () => {
      assert.equal(r.code, 3, show(r));
      const err = r.stderr.toString();
      assert.match(err, /^vmlet run: template [0-9a-f]{32} reused; restore → agent ready/m, show(r));
      // The VM was made while the CLI resolved the rootfs, and the kernel text came in huge pages.
      const textMiB = kernelTextRange(requireGuestKernel().vmlinux)!.bytes / 2 ** 20;
      assert.match(err, new RegExp(`^vmlet run: KVM_CREATE_VM done ahead \\(a VM shell\\); kernel text in 2 MiB pages \\(${textMiB} MiB from the huge-page tmpfs\\)$`, 'm'), show(r));
      assert.ok(err.startsWith('to-stderr\n'), show(r));
      assert.doesNotMatch(r.stdout.toString(), /to-stderr|vmlet run:/);
      assert.equal(templateKeys().length, 1, 'no second template');
    });
    it('starts from the template, not from the previous run: its write is not there', () => {
      assert.match(r.stdout.toString(), /No such file or directory/, show(r));
    });
    it('gives each restored microVM its own hostname and random bytes', () => {
      const id = (x: CliResult) => /^ID (\S+) ([0-9a-f]{32})$/m.exec(x.stdout.toString());
      const [a, b] = [id(r), id(again)];
      assert.ok(a && b, `${show(r)}\n${show(again)}`);
      assert.notEqual(a[1], b[1]);
      assert.notEqual(a[2], b[2]);
    });
  });

  describe('one template for every image', () => {
    it('another image (other files, another size) restores the same template: its layers go into the template\'s empty disk slots', async function () {
      if (!sqfs) this.skip();
      const other = join(work, 'other-root');
      execFileSync('cp', ['-a', join(work, 'rootfs'), other]);
      writeFileSync(join(other, 'etc', 'which-image'), 'the other image\n');
      writeFileSync(join(other, 'padding'), randomBytes(3 * MiB));
      const otherSqfs = join(work, 'other.sqfs');
      execFileSync('mksquashfs', [other, otherSqfs, '-comp', 'zstd', '-noappend', '-quiet', '-all-root']);
      assert.notEqual(statSync(otherSqfs).size, statSync(sqfs).size);
      const r = await runCli(['run', '--cpus', '2', '--stats', otherSqfs, '--', 'sh', '-c', 'cat /etc/which-image; wc -c < /padding'], { env });
      assert.equal(r.code, 0, show(r));
      assert.equal(r.stdout.toString(), `the other image\n${3 * MiB}\n`, show(r));
      assert.match(r.stderr.toString(), /^vmlet run: template [0-9a-f]{32} reused; restore → agent ready/m, show(r));
      assert.equal(templateKeys().length, 1, 'no template of its own');
    });
  });

  describe('stdio: 2 MiB of stdin, 1 MiB back on each of stdout and stderr, then kill -9 $$', () => {
    let r: CliResult;
    let input: Buffer;
    before(async function () {
      if (!sqfs) this.skip();
      input = randomBytes(2 * MiB);
      r = await runCli(args('-i', `cat > /tmp/in; head -c ${MiB} /tmp/in; tail -c ${MiB} /tmp/in >&2; kill -9 $$`), { env, stdin: input });
    });

    it('exits 128 + 9 when the process is killed by SIGKILL', () => {
      assert.equal(r.code, 137, show(r));
    });
    it('keeps stdout and stderr separate and byte-exact', () => {
      assert.ok(r.stdout.equals(input.subarray(0, MiB)), `stdout differs from the first MiB of stdin (${r.stdout.length} bytes)`);
      assert.ok(r.stderr.equals(input.subarray(MiB)), `stderr differs from the second MiB of stdin (${r.stderr.length} bytes)`);
    });
  });

  // Mocha runs a suite's own tests before its child suites: every check here
  // sits in a describe so they run in the order written (the first run makes the template).
  describe('signals and the terminal', () => {
    it('forwards SIGTERM sent to the CLI to the process (exit 143)', async function () {
      if (!sqfs) this.skip();
      const run = startCli(args('echo ready; exec sleep 1000'), { env });
      await run.stdoutMatches(/ready\n/);
      run.child.kill('SIGTERM');
      const r = await run.done;
      assert.equal(r.code, 143, show(r));
    });

    it('stops the microVM on a second SIGINT when the process ignores the first (exit 130)', async function () {
      if (!sqfs) this.skip();
      const run = startCli(args('trap "echo got-int" INT; echo ready; while true; do sleep 1; done'), { env });
      await run.stdoutMatches(/ready\n/);
      run.child.kill('SIGINT');
      await run.stdoutMatches(/got-int\n/);
      run.child.kill('SIGINT');
      const r = await run.done;
      assert.equal(r.code, 130, show(r));
      assert.match(r.stderr.toString(), /second interrupt: stopping the microVM/);
    });

    it('gives the process a terminal with -t', async function () {
      if (!sqfs) this.skip();
      const r = await runCli(args('-t', 'tty; stty size; echo to-stderr >&2'), { env });
      assert.equal(r.code, 0, show(r));
      assert.match(r.stdout.toString(), /^\/dev\/pts\/\d+\r\n24 80\r\nto-stderr\r\n$/, show(r));
      assert.equal(r.stderr.length, 0, show(r));
    });

  });

  describe('failures and housekeeping', () => {
    it('reports a panic of the restored guest: exit 125 and its serial log tail', async function () {
      if (!sqfs) this.skip();
      // Filling 256 MiB of guest RAM fault by fault takes minutes in the lab: a 16 MiB
      // memory cgroup runs out at once, and panic_on_oom=2 panics on a cgroup's OOM too.
      const r = await runCli(args('echo 2 > /proc/sys/vm/panic_on_oom; mkdir -p /tmp/cg && mount -t cgroup2 none /tmp/cg && echo +memory > /tmp/cg/cgroup.subtree_control && ' +
        'mkdir /tmp/cg/small && echo 16M > /tmp/cg/small/memory.max && echo $$ > /tmp/cg/small/cgroup.procs && dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived'), { env });
      assert.equal(r.code, 125, show(r));
      assert.doesNotMatch(r.stdout.toString(), /survived/);
      assert.match(r.stderr.toString(), /guest serial log \(tail\):[\s\S]*Kernel panic - not syncing: Out of memory/, show(r));
    });

    it('vmlet templates list shows the template with its space on disk', async function () {
      if (!sqfs) this.skip();
      const r = await runCli(['templates', 'list'], { env });
      assert.equal(r.code, 0, show(r));
      const [key] = templateKeys();
      const line = r.stdout.toString().split('\n').find((l) => l.startsWith(key));
      assert.ok(line, show(r));
      // Made with empty disk slots, it names no image: any image with up to 16 layers restores it.
      assert.match(line, new RegExp(`^${key}\\s+2\\s+256 MiB\\s+[\\d.]+ MB\\s+.*any image \\(16 layer slots\\)$`));
      console.log(`      ${line}`);
    });

    it('a corrupt template is made anew, logged, and the run succeeds', async function () {
      if (!sqfs) this.skip();
      const [key] = templateKeys();
      const state = join(templates, key, 'snapshot', 'state');
      truncateSync(state, Math.floor(statSync(state).size / 2));
      const r = await runCli(args('--stats', 'echo fine'), { env });
      assert.equal(r.code, 0, show(r));
      assert.equal(r.stdout.toString(), 'fine\n');
      const err = r.stderr.toString();
      assert.match(err, new RegExp(`template ${key} .* is corrupt, making it again: `), show(r));
      assert.match(err, new RegExp(`^vmlet run: template ${key} made by this run`, 'm'), show(r));
    });

    it('a template root that cannot be used: a cold boot, with the reason on stderr', async function () {
      if (!sqfs) this.skip();
      const blocker = join(work, 'not-a-dir');
      writeFileSync(blocker, '');
      const r = await runCli(args('--stats', 'echo booted'), { env: { ...env, VMLET_TEMPLATE_DIR: join(blocker, 'templates') } });
      assert.equal(r.code, 0, show(r));
      assert.equal(r.stdout.toString(), 'booted\n');
      const err = r.stderr.toString();
      assert.match(err, /cannot start this sandbox from a template, booting it instead: BAD_TEMPLATE_ROOT/, show(r));
      assert.match(err, /^vmlet run: cold boot: /m, show(r));
      assert.match(err, /^vmlet run: booted because the template could not be used: BAD_TEMPLATE_ROOT/m, show(r));
    });

    it('--cold boots and neither makes nor touches a template', async function () {
      if (!sqfs) this.skip();
      const [key] = templateKeys();
      const used = statSync(join(templates, key)).mtimeMs;
      const r = await runCli(args('--cold', '--stats', 'echo "NPROC $(nproc)"'), { env });
      assert.equal(r.code, 0, show(r));
      assert.equal(r.stdout.toString(), 'NPROC 2\n');
      assert.match(r.stderr.toString(), /^vmlet run: cold boot: /m, show(r));
      assert.doesNotMatch(r.stderr.toString(), /template/, show(r));
      assert.deepEqual(templateKeys(), [key]);
      assert.equal(statSync(join(templates, key)).mtimeMs, used, 'its last use is unchanged');
    });

    it('leaves no temp files behind, and prune --all removes the template', async function () {
      if (!sqfs) this.skip();
      // This suite's own scratch directory (removed in after()) is not a leftover of a run.
      assert.deepEqual(runLeftovers().filter((n) => join(tmpdir(), n) !== work), leftoversBefore);
      const r = await runCli(['templates', 'prune', '--all'], { env });
      assert.equal(r.code, 0, show(r));
      assert.match(r.stdout.toString(), /^removed 1 template\(s\), [\d.]+ MB freed$/m, show(r));
      assert.deepEqual(readdirSync(templates), []);
    });
  });
});
