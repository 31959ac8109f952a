// hack/guest-kernel and what it caches: the script's usage errors, the cache
// lookup, the artefacts (a PVH-capable vmlinux, a bzImage, the config without
// modules/ACPI/PCI), and a boot of the cached kernel under QEMU TCG (no KVM:
// the machine-independent proof that the kernel reaches /init; our VMM's boots
// are in test/lab/guest-boot.test.ts). The artefact checks are SKIPPED loudly
// when the kernel is not built (hack/setup builds it; ~10 min cold).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { strict as assert } from 'node:assert';
import { buildBusyboxInitramfs, DONE_MARKER, findGuestKernel, GuestKernel, guestCmdline, INIT_MARKER } from '../helpers/guest-kernel';
import { repoRoot } from '../../native/ts/repo-root';
import { busyboxStatic, dpkgVersion, guestKernelDir, notStaticElf } from '../../shim/sandbox/guest';

const script = join(repoRoot(), 'hack', 'guest-kernel');

describe('hack/guest-kernel', () => {
  it('refuses an unknown option with usage exit 2, naming the option', () => {
    const r = spawnSync(script, ['--frobnicate'], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /unknown option --frobnicate \(see --help\)/);
    assert.equal(r.stdout, '');
  });

  it('--check in a cache without this kernel exits 1, names the path it looked for and how to build it', () => {
    const empty = mkdtempSync(join(tmpdir(), 'vmlet-kcache-'));
    try {
      const r = spawnSync(script, ['--check'], { encoding: 'utf8', env: { ...process.env, VMLET_CACHE: empty } });
      assert.equal(r.status, 1);
      assert.match(r.stderr, new RegExp(`not built .*would be ${empty}/guest-kernel/[0-9a-f]{64}\\): run hack/guest-kernel`));
      assert.equal(r.stdout, '');
    } finally {
      rmSync(empty, { recursive: true, force: true });
    }
  });

  it('vmlet computes the same cache directory as the script, built or not (no script run per vmlet run)', () => {
    const empty = mkdtempSync(join(tmpdir(), 'vmlet-kcache-'));
    const saved = process.env.VMLET_CACHE;
    try {
      process.env.VMLET_CACHE = empty;
      const r = spawnSync(script, ['--check'], { encoding: 'utf8' });
      const wouldBe = /would be (\S+)\)/.exec(r.stderr);
      assert.ok(wouldBe, `hack/guest-kernel --check said: ${r.stderr}`);
      assert.equal(guestKernelDir(), wouldBe[1]);
      // Not built there: the script's own reason comes back.
      const found = findGuestKernel();
      assert.ok('missing' in found);
      assert.match(found.missing, /not built for this fragment\/source\/script/);
    } finally {
      if (saved === undefined) delete process.env.VMLET_CACHE;
      else process.env.VMLET_CACHE = saved;
      rmSync(empty, { recursive: true, force: true });
    }
  });

  it('reads a package version from a dpkg status file as dpkg-query does, and nothing from a name that only starts alike', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmlet-dpkg-'));
    try {
      const status = join(dir, 'status');
      writeFileSync(status, [
        // A field continuation that looks like a stanza's first line is not one.
        'Package: first\nVersion: 0.1\nDescription: mentions\n Package: linux-source-6.1\n Version: 0.2\n',
        'Package: linux-source-6.10\nStatus: install ok installed\nVersion: 9.9\n',
        'Package: linux-source-6.1\nStatus: install ok installed\nPriority: optional\nVersion: 6.1.192-2\nDescription: x\n Version: 0\n',
        'Package: other\nVersion: 1\n',
      ].join('\n'));
      assert.equal(dpkgVersion('linux-source-6.1', status), '6.1.192-2');
      assert.equal(dpkgVersion('linux-source-6', status), undefined);
      assert.equal(dpkgVersion('missing', status), undefined);
      assert.equal(dpkgVersion('first', status), '0.1');
      assert.equal(dpkgVersion('linux-source-6.1', join(dir, 'absent')), undefined);
      const real = spawnSync('dpkg-query', ['-W', '-f=${Version}', 'linux-source-6.1'], { encoding: 'utf8' });
      if (real.status === 0) assert.equal(dpkgVersion('linux-source-6.1'), real.stdout);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('tells a static ELF from a dynamic one and from a non-ELF by the program headers, as file(1) would', () => {
    assert.equal(notStaticElf(busyboxStatic()), undefined);
    const dynamic = process.execPath; // node is dynamically linked on Debian
    assert.match(execFileSync('file', ['-L', dynamic], { encoding: 'utf8' }), /dynamically linked/);
    assert.match(notStaticElf(dynamic) ?? '', /dynamically linked/);
    const dir = mkdtempSync(join(tmpdir(), 'vmlet-elf-'));
    try {
      writeFileSync(join(dir, 'text'), 'not an ELF at all, but long enough to read a header from it...');
      assert.equal(notStaticElf(join(dir, 'text')), 'is not an ELF file');
      const head = readFileSync(busyboxStatic()).subarray(0, 64);
      writeFileSync(join(dir, 'cut'), head); // program headers promised past the end
      assert.equal(notStaticElf(join(dir, 'cut')), 'has truncated program headers');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  describe('the cached kernel', function () {
    this.timeout(180_000);
    let kernel: GuestKernel;

    before(function () {
      const found = findGuestKernel();
      if ('missing' in found) {
        console.log(`      !!! SKIPPED (the guest kernel is not built): ${found.missing}`);
        this.skip();
      }
      kernel = found;
    });

    it('is found again by a plain run without rebuilding (same path, same vmlinux)', () => {
      const before = statSync(kernel.vmlinux).mtimeMs;
      const out = execFileSync(script, { encoding: 'utf8' }).trim();
      assert.equal(out, kernel.dir);
      assert.equal(statSync(kernel.vmlinux).mtimeMs, before);
    });

    it('is a vmlinux with the PVH entry note and a bzImage of the same -vmlet release', () => {
      const notes = execFileSync('readelf', ['-n', kernel.vmlinux], { encoding: 'utf8' });
      assert.match(notes, /Xen\s+0x[0-9a-f]+\s+Unknown note type: \(0x00000012\)/, 'XEN_ELFNOTE_PHYS32_ENTRY');
      const header = execFileSync('file', [kernel.bzImage], { encoding: 'utf8' });
      assert.match(header, /Linux kernel x86 boot executable bzImage, version 6\.1\.\S+-vmlet /);
    });

    it('was configured without modules, ACPI or PCI, and with the fragment\'s PVH, virtio-mmio and vsock', () => {
      const config = readFileSync(join(kernel.dir, 'config'), 'utf8');
      for (const off of ['CONFIG_MODULES', 'CONFIG_ACPI', 'CONFIG_PCI']) assert.doesNotMatch(config, new RegExp(`^${off}=y$`, 'm'), off);
      for (const on of ['CONFIG_PVH', 'CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES', 'CONFIG_VIRTIO_VSOCKETS', 'CONFIG_SQUASHFS_ZSTD'])
        assert.match(config, new RegExp(`^${on}=y$`, 'm'), on);
    });

    it('boots through PVH under QEMU TCG -M microvm to a busybox /init that runs to its end', async () => {
      const dir = mkdtempSync(join(tmpdir(), 'vmlet-kboot-'));
      try {
        const initrd = buildBusyboxInitramfs(dir, 'echo "UNAME: $(uname -r)"');
        const args = [
          '-M', 'microvm,isa-serial=on,acpi=off', '-accel', 'tcg', '-cpu', 'max', '-m', '256',
          '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot', '-serial', 'stdio',
          '-kernel', kernel.vmlinux, '-initrd', initrd, '-append', guestCmdline(),
        ];
        const { serial, status } = await new Promise<{ serial: string; status: number | null }>((resolve, reject) => {
          const p = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
          let serial = '';
          p.stdout.setEncoding('latin1').on('data', (d: string) => (serial += d));
          p.stderr.setEncoding('latin1').on('data', (d: string) => (serial += d));
          const timer = setTimeout(() => p.kill('SIGKILL'), 150_000);
          p.on('error', reject);
          p.on('close', (code) => {
            clearTimeout(timer);
            resolve({ serial, status: code });
          });
        });
        assert.ok(serial.includes(INIT_MARKER) && serial.includes(DONE_MARKER), `/init ran to its end; QEMU exit ${status}; serial:\n${serial}`);
        assert.match(serial, /^UNAME: 6\.1\.\S+-vmlet\r?$/m);
        // -no-reboot: the guest's reboot -f (a triple fault on microvm, which has no i8042) ends QEMU with 0.
        assert.equal(status, 0, `QEMU exit; serial:\n${serial}`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
});
