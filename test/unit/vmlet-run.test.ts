// `vmlet run` without a VM: its command line, the refusal on a host whose KVM
// cannot run Linux, the directory → squashfs conversion, the agent initramfs
// cache, and every bad input that must fail before a VM exists, each with the
// message a user needs. The runs themselves are in test/lab/vmlet-run.test.ts.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { main } from '../../shim/cli/vmlet';
import { directoryToSquashfs, parseRunArgs, parseUser } from '../../shim/cli/commands/run';
import { UsageError } from '../../shim/cli/command';
import { hostVirtualization, linuxGuestRefusal } from '../../shim/sandbox/host';
import { checkLayer, checkSpec, SandboxError, virtioBlkDevice } from '../../shim/sandbox/sandbox';
import { agentBinary, agentInitramfs } from '../../shim/sandbox/guest';
import { populateBusyboxRootfs, runCli } from '../helpers/vmlet-cli';
import { sink } from '../helpers/sink';


async function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const stdout = sink();
  const stderr = sink();
  const code = await main(args, { stdout, stderr });
  return { code, out: stdout.text(), err: stderr.text() };
}

/** Lets the CLI past the KVM check on any host: these inputs fail before a VM would boot. */
const forced = { ...process.env, VMLET_FORCE_KVM: '1' };

describe('vmlet run: command line', () => {
  it('takes the rootfs, then the command after --, with the documented defaults', () => {
    const r = parseRunArgs({}, ['img.sqfs', 'sh', '-c', 'exit 7']);
    assert.deepEqual(r, {
      rootfs: 'img.sqfs', command: ['sh', '-c', 'exit 7'], cpus: 1, memoryMiB: 256, tty: false, interactive: false,
      env: [], workdir: undefined, user: undefined, stats: false, forceKvm: false, cold: false,
    });
  });

  it('parses every option through the real entry point (help shows them)', async () => {
    const r = await cli(['run', '--help']);
    assert.equal(r.code, 0);
    for (const opt of ['--cpus N', '--memory MiB', '--cold', '-t, --tty', '-i, --interactive', '-e, --env K=V', '--workdir', '--stats', '--force-kvm'])
      assert.ok(r.out.includes(opt), `help mentions ${opt}:\n${r.out}`);
    // Restoring is the default; the help says what --cold changes and where templates live.
    assert.match(r.out, /--cold\s+boot the guest kernel instead of restoring a template/);
    assert.match(r.out, /restored from a snapshot of a guest booted once per\s+\(rootfs layers, --cpus, --memory/);
    assert.match(r.out, /\$VMLET_TEMPLATE_DIR, else <root>\/templates/);
    assert.match(r.out, /vmlet templates list \/ prune/);
    assert.match(r.out, /hack\/kvm-lab run -- vmlet run/);
    const v = parseRunArgs({ cpus: '2', memory: '512', tty: true, interactive: true, env: ['A=1', 'B=x=y'], workdir: '/srv', user: '1000:100', stats: true, cold: true }, ['r', 'true']);
    assert.equal(v.cpus, 2);
    assert.equal(v.memoryMiB, 512);
    assert.deepEqual(v.env, ['A=1', 'B=x=y']);
    assert.equal(v.tty && v.interactive && v.stats, true);
    assert.equal(v.workdir, '/srv');
    assert.equal(v.cold, true);
  });

  for (const [flag, value, why] of [
    ['--cpus', '0', /--cpus '0' is not a whole number from 1 to 64/],
    ['--cpus', '65', /--cpus '65' is not a whole number from 1 to 64/],
    ['--cpus', '1.5', /--cpus '1.5' is not a whole number/],
    ['--cpus', 'two', /--cpus 'two' is not a whole number/],
    ['--memory', '32', /--memory '32' is not a whole number from 64 to 65536/],
    ['--memory', '1e3', /--memory '1e3' is not a whole number/],
    ['--env', 'NOVALUE', /--env 'NOVALUE' is not KEY=VALUE/],
    ['--workdir', 'relative/dir', /--workdir 'relative\/dir' must be an absolute path/],
    ['--user', 'a:b:c', /--user 'a:b:c' has more than one ':'; give user, uid, user:group, uid:gid, user:gid or uid:group/],
    ['--user', '4294967295', /--user '4294967295': ids must be below 4294967295/],
    ['--user', 'app:99999999999', /--user 'app:99999999999': ids must be below 4294967295/],
    ['--user', 'x'.repeat(257), /--user is 257 bytes long; at most 256/],
    ['--user', 'é'.repeat(129), /--user is 258 bytes long; at most 256/],
  ] as const) {
    it(`refuses ${flag} ${value} with usage exit 2 and says why`, async () => {
      const r = await cli(['run', flag, value, 'r.sqfs', '--', 'true']);
      assert.equal(r.code, 2, r.err);
      assert.match(r.err, why);
      assert.match(r.err, /usage: vmlet .* run \[options\]/);
    });
  }

  it('refuses a run without any rootfs', async () => {
    const r = await cli(['run']);
    assert.equal(r.code, 2);
    assert.match(r.err, /run needs a rootfs: a squashfs file, a directory or an image reference/);
  });

  it('passes every user form through to the agent unchanged (names are resolved in the guest)', () => {
    for (const u of ['nginx', '1000', 'app:staff', '1000:50', 'app:50', '1000:staff', 'root', '', 'nginx:'])
      assert.equal(parseUser(u, 'x'), u);
    assert.equal(parseRunArgs({ user: 'app:staff' }, ['r', 'true']).user, 'app:staff');
  });

  it('names where a bad user came from (flag or image User) in the usage error', () => {
    assert.throws(() => parseUser('app:staff:x', "image 'x:1''s User"), (e: Error) => e instanceof UsageError && /image 'x:1''s User 'app:staff:x' has more than one ':'/.test(e.message));
    assert.throws(() => parseUser('app\0x', '--user'), (e: Error) => e instanceof UsageError && /--user "app\\u0000x" contains a NUL or newline/.test(e.message));
  });
});

describe('vmlet run: hosts whose KVM cannot run a Linux guest', () => {
  it('knows vmx and svm from /proc/cpuinfo flags', () => {
    assert.equal(hostVirtualization('flags\t\t: fpu vme de pse vmx sse'), 'Intel VT-x (vmx)');
    assert.equal(hostVirtualization('flags\t\t: fpu svm sse'), 'AMD-V (svm)');
    assert.equal(hostVirtualization('flags\t\t: fpu vme svm_lock sse'), '');
    const noVirt = 'flags\t\t: fpu vme de pse';
    assert.match(linuxGuestRefusal({ cpuinfo: noVirt, env: {} }) ?? '', /no vmx\/svm flag.*hack\/kvm-lab run -- vmlet run.*--force-kvm.*VMLET_FORCE_KVM=1/);
    assert.equal(linuxGuestRefusal({ cpuinfo: noVirt, env: {}, force: true }), null);
    assert.equal(linuxGuestRefusal({ cpuinfo: noVirt, env: { VMLET_FORCE_KVM: '1' } }), null);
    assert.equal(linuxGuestRefusal({ cpuinfo: noVirt, env: { VMLET_LAB: 'inside' } }), null);
    assert.equal(linuxGuestRefusal({ cpuinfo: 'flags : vmx', env: {} }), null);
  });

  it('the CLI on this host refuses at once with exit 125 and the way out', async function () {
    if (hostVirtualization() !== '' || process.env.VMLET_LAB === 'inside') {
      console.log('      !!! SKIPPED (this host has vmx/svm or is the lab: there is nothing to refuse)');
      this.skip();
    }
    const env = { ...process.env };
    delete env.VMLET_FORCE_KVM;
    // A rootfs that does not even exist: the refusal must come before any other work.
    const r = await runCli(['run', '/nonexistent.sqfs', '--', 'true'], { env });
    assert.equal(r.code, 125, r.stderr.toString());
    assert.match(r.stderr.toString(), /^vmlet run: this host's CPU shows no hardware virtualization .*hack\/kvm-lab run -- vmlet run \.\.\..*--force-kvm/);
    assert.equal(r.stdout.length, 0);
  });
});

describe('vmlet run: rootfs input', function () {
  this.timeout(60_000);
  let work: string;
  before(() => {
    work = mkdtempSync(join(tmpdir(), 'vmlet-run-unit-'));
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  it('converts a directory to a zstd squashfs with our writer, files and links intact', async () => {
    const dir = join(work, 'tree');
    populateBusyboxRootfs(dir, ['sh', 'cat']);
    writeFileSync(join(dir, 'etc', 'motd'), 'hello from the tree\n');
    const out = join(work, 'conv');
    mkdirSync(out);
    const sqfs = await directoryToSquashfs(dir, out);
    checkLayer(sqfs); // zstd, or the guest could not mount it
    const listing = execFileSync('unsquashfs', ['-lln', sqfs], { encoding: 'utf8' });
    assert.match(listing, /squashfs-root\/bin\/sh -> busybox/);
    assert.match(listing, /squashfs-root\/bin\/busybox/);
    assert.equal(execFileSync('unsquashfs', ['-cat', sqfs, 'etc/motd'], { encoding: 'utf8' }), 'hello from the tree\n');
    assert.deepEqual(execFileSync('ls', [out], { encoding: 'utf8' }).trim().split('\n'), ['rootfs.sqfs'], 'the intermediate tar is gone');
  });

  it('refuses a missing rootfs path', async () => {
    const r = await runCli(['run', join(work, 'missing.sqfs'), '--', 'true'], { env: forced });
    assert.equal(r.code, 125);
    assert.match(r.stderr.toString(), /rootfs .*missing\.sqfs does not exist: give a squashfs file, a directory or an image reference/);
  });

  it('refuses a VMLET_VM_SHELLS other than 0 or 1, naming both', async () => {
    const r = await runCli(['run', join(work, 'missing.sqfs'), '--', 'true'], { env: { ...forced, VMLET_VM_SHELLS: 'yes' } });
    assert.equal(r.code, 125);
    assert.match(r.stderr.toString(), /VMLET_VM_SHELLS is 'yes': set it to 1 \(the default: make the VM ahead\) or 0/);
  });

  it('refuses a file that is not squashfs', async () => {
    const f = join(work, 'notes.txt');
    writeFileSync(f, 'not an image at all, but long enough to hold a superblock '.repeat(4));
    const r = await runCli(['run', f, '--', 'true'], { env: forced });
    assert.equal(r.code, 125);
    assert.match(r.stderr.toString(), /notes\.txt is not a squashfs image \(no 'hsqs' superblock\)/);
  });

  it('refuses a squashfs the guest kernel cannot read (gzip), naming the fix', async () => {
    const dir = join(work, 'small');
    mkdirSync(dir);
    writeFileSync(join(dir, 'f'), 'x');
    const gz = join(work, 'gzip.sqfs');
    execFileSync('mksquashfs', [dir, gz, '-comp', 'gzip', '-noappend', '-quiet']);
    const r = await runCli(['run', gz, '--', 'true'], { env: forced });
    assert.equal(r.code, 125);
    assert.match(r.stderr.toString(), /gzip\.sqfs is a gzip squashfs; the vmlet guest kernel reads only zstd: rebuild it with mksquashfs -comp zstd/);
  });

  it('refuses an image reference that is not in the store', async () => {
    const root = join(work, 'store');
    const r = await runCli(['--root', root, 'run', 'localhost/nothing/here:v1', '--', 'true'], { env: forced });
    assert.equal(r.code, 125);
    assert.match(r.stderr.toString(), /no image 'localhost\/nothing\/here:v1' in .*store; see vmlet images, or pull it first/);
  });

  it('refuses a squashfs rootfs without a command (it has no image config)', async () => {
    const dir = join(work, 'cmdless');
    mkdirSync(dir);
    writeFileSync(join(dir, 'f'), 'x');
    const z = join(work, 'cmdless.sqfs');
    execFileSync('mksquashfs', [dir, z, '-comp', 'zstd', '-noappend', '-quiet']);
    const r = await runCli(['run', z], { env: forced });
    assert.equal(r.code, 2);
    assert.match(r.stderr.toString(), /squashfs .*cmdless\.sqfs has no image config: give the command after --/);
  });
});

describe('sandbox: spec checks and the agent initramfs', () => {
  it('names virtio-blk disks as the kernel does', () => {
    assert.deepEqual([0, 1, 25, 26, 27, 701, 702].map(virtioBlkDevice),
      ['/dev/vda', '/dev/vdb', '/dev/vdz', '/dev/vdaa', '/dev/vdab', '/dev/vdzz', '/dev/vdaaa']);
  });

  it('refuses bad specs before any VM exists', () => {
    const bad = (spec: Parameters<typeof checkSpec>[0], re: RegExp): void =>
      assert.throws(() => checkSpec(spec), (e: Error) => e instanceof SandboxError && re.test(e.message) && ['BAD_SPEC', 'BAD_LAYER'].includes(e.code));
    bad({ cpus: 0, memoryMiB: 256, layers: ['x'] }, /cpus is 0: use a whole number from 1 to 64/);
    bad({ cpus: 1, memoryMiB: 10, layers: ['x'] }, /memory is 10 MiB/);
    bad({ cpus: 1, memoryMiB: 256, layers: [] }, /at least one rootfs layer/);
    bad({ cpus: 1, memoryMiB: 256, layers: Array(17).fill('x') }, /17 layers: at most 16/);
    bad({ cpus: 1, memoryMiB: 256, layers: ['/nonexistent-layer'] }, /layer \/nonexistent-layer cannot be read/);
    bad({ cpus: 1, memoryMiB: 256, layers: ['/'] }, /layer \/ is not a regular file/);
  });

  it('builds the agent initramfs once per agent/busybox and reuses it', function () {
    try {
      statSync(agentBinary);
    } catch {
      console.log(`      !!! SKIPPED (the agent is not built): ${agentBinary}`);
      this.skip();
    }
    const cache = mkdtempSync(join(tmpdir(), 'vmlet-initramfs-cache-'));
    const saved = process.env.VMLET_CACHE;
    process.env.VMLET_CACHE = cache;
    try {
      const first = agentInitramfs();
      assert.ok(first.startsWith(join(cache, 'agent-initramfs')), first);
      const mtime = statSync(first).mtimeMs;
      assert.equal(agentInitramfs(), first);
      assert.equal(statSync(first).mtimeMs, mtime, 'not rebuilt');
      const entries = execFileSync('sh', ['-c', `cpio -t --quiet < "${first}"`], { encoding: 'utf8' }).split('\n');
      for (const e of ['init', 'bin', 'dev', 'proc', 'sys', 'run']) assert.ok(entries.includes(e), `${e} in ${entries.join(' ')}`);
      assert.ok(!entries.includes('bin/busybox'), 'busybox only on request');
      const tools = agentInitramfs({ busybox: true });
      assert.notEqual(tools, first);
      assert.ok(execFileSync('sh', ['-c', `cpio -t --quiet < "${tools}"`], { encoding: 'utf8' }).split('\n').includes('bin/busybox'));
      assert.deepEqual(execFileSync('ls', [join(cache, 'agent-initramfs')], { encoding: 'utf8' }).trim().split('\n').length, 2, 'no temp file left');
    } finally {
      if (saved === undefined) delete process.env.VMLET_CACHE;
      else process.env.VMLET_CACHE = saved;
      rmSync(cache, { recursive: true, force: true });
    }
  });
});
