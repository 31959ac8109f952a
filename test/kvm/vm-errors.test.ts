// Bad input reaching a real KVM: each is refused with a typed error that says
// what was asked, what failed and what to do, and leaves nothing behind.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { statSync, writeFileSync, readdirSync } from 'node:fs';
import { Vm, VmConfig, DiskConfig, BootError, DeviceError, InvalidArgumentError, KvmError, VmmError, addonPath } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import { asm, writeImage } from './vm-images';
import { Scratch, usage } from './vm-helpers';

describe('vm creation errors on /dev/kvm', function () {
  let scratch: Scratch;
  let good: string;
  before(function () {
    requireKvm(this);
    scratch = new Scratch();
    good = writeImage(scratch.path('good.elf'), asm.haltForever);
  });
  after(() => scratch?.remove());

  const config = (over: Partial<VmConfig>): VmConfig => ({ kernel: good, memoryMiB: 16, cpus: 1, serialLog: scratch.path('serial.log'), ...over });
  const rejects = async (c: VmConfig, cls: typeof VmmError, pattern: RegExp): Promise<void> => {
    const fdsBefore = readdirSync('/proc/self/fd').length;
    const ramBefore = usage().guestRamMappings;
    await assert.rejects(Vm.create(c), (e: unknown) => {
      assert.ok(e instanceof cls, `expected ${cls.name}, got ${String(e)}`);
      assert.match((e as Error).message, pattern);
      return true;
    });
    // A failed creation releases what it had opened (KVM, VM, memfd, serial log).
    assert.equal(readdirSync('/proc/self/fd').length, fdsBefore, 'no fd left behind');
    // Anonymous guest RAM holds no fd: its mapping is looked for itself.
    assert.equal(usage().guestRamMappings, ramBefore, 'no guest RAM left mapped');
  };

  it('a missing kernel file', async () => {
    await rejects(config({ kernel: scratch.path('nope.elf') }), BootError, /nope\.elf does not exist: check VmConfig\.kernel/);
  });

  it('a kernel that is not an image', async () => {
    const garbage = scratch.path('garbage.bin');
    writeFileSync(garbage, Buffer.from('this is not a kernel, just text\n'.repeat(100)));
    await rejects(config({ kernel: garbage }), BootError, /neither an ELF file nor a bzImage/);
  });

  it('an ELF without PVH note when PVH is asked for', async () => {
    const k = writeImage(scratch.path('nonote.elf'), asm.haltForever, { noPvhNote: true });
    await rejects(config({ kernel: k, bootProtocol: 'pvh' }), BootError, /no PVH entry note/);
  });

  it('a kernel larger than the VM memory', async () => {
    const k = writeImage(scratch.path('big.elf'), Buffer.alloc(1536 << 10, 0x90));
    await rejects(config({ kernel: k, memoryMiB: 2 }), BootError, /does not fit in guest RAM \(2 MiB\): give the VM more memory/);
  });

  it('a missing initrd', async () => {
    await rejects(config({ initrd: scratch.path('initrd.img') }), BootError, /initrd\.img does not exist: check VmConfig\.initrd/);
  });

  it('a serial log in a directory that does not exist', async () => {
    await rejects(config({ serialLog: scratch.path('no/such/dir/serial.log') }), DeviceError,
      /open serial log .*: check that its directory exists and is writable/);
  });

  it('a missing disk image is a DeviceError naming it', async () => {
    await rejects(config({ disks: [{ path: scratch.path('disk-missing.img') }] }), DeviceError, /disk-missing\.img/);
  });

  it('/dev/kvm without permission says to join the kvm group', function () {
    const st = statSync('/dev/kvm');
    if ((st.mode & 0o006) === 0o006) this.skip(); // world-accessible here: nothing to refuse
    // Root bypasses file permissions, so the attempt runs as an unprivileged user in a child.
    const script = `
      const { Vm } = require(${JSON.stringify(require.resolve('../../native/ts/vmm'))});
      Vm.create({ kernel: '/nonexistent', memoryMiB: 16, cpus: 1, serialLog: '/tmp/x' })
        .then(() => console.log('created'), (e) => console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })));`;
    let out: string;
    try {
      out = execFileSync(process.execPath, ['-e', script], { uid: 65534, gid: 65534, encoding: 'utf8', env: { PATH: process.env.PATH ?? '' } });
    } catch (e) {
      const err = e as { stderr?: string };
      if (/EPERM|EACCES.*(vmm|vmlet\.node)/.test(err.stderr ?? '')) this.skip(); // cannot drop privileges or read the addon here
      throw new Error(`child failed: ${err.stderr ?? String(e)} (addon ${addonPath})`);
    }
    const result = JSON.parse(out) as { name: string; code: string; message: string };
    assert.equal(result.name, KvmError.name);
    assert.equal(result.code, 'EACCES');
    assert.match(result.message, /\/dev\/kvm is not accessible: add the user to the kvm group/);
  });

  it('more virtio devices than the IOAPIC has pins for', async () => {
    const disk = scratch.path('disk.img');
    writeFileSync(disk, Buffer.alloc(4096));
    const disks = Array.from({ length: 20 }, () => ({ path: disk, readOnly: true }));
    await rejects(config({ disks }), InvalidArgumentError, /more than 19 virtio devices: GSIs 5\.\.23 are all taken/);
  });

  it('an unknown guest RAM backing in VMLET_GUEST_RAM', async () => {
    process.env.VMLET_GUEST_RAM = 'hugetlbfs';
    try {
      await rejects(config({}), InvalidArgumentError, /VMLET_GUEST_RAM is 'hugetlbfs'; set it to 'anonymous' \(the default\) or 'memfd', or unset it/);
    } finally {
      delete process.env.VMLET_GUEST_RAM;
    }
  });

  it('disk slots: a path beside empty, a writable slot; attachDisk to a missing disk, a disk with a medium, a stopped VM', async () => {
    const disk = scratch.path('slot-layer.img');
    writeFileSync(disk, Buffer.alloc(64 << 10, 1));
    await rejects(config({ disks: [{ empty: true, readOnly: true, path: disk } as unknown as DiskConfig] }), DeviceError, /empty disk slot has no path/);
    await rejects(config({ disks: [{ empty: true, readOnly: false } as unknown as DiskConfig] }), DeviceError, /empty disk slot is read-only/);
    const vm = await Vm.create(config({ disks: [{ path: disk, readOnly: true }, { empty: true, readOnly: true }] }));
    try {
      vm.start();
      assert.throws(() => vm.attachDisk(2, { path: disk }), (e: unknown) => e instanceof InvalidArgumentError && /disk 2 does not exist: this VM has 2 disk\(s\)/.test((e as Error).message));
      assert.throws(() => vm.attachDisk(0, { path: disk }), (e: unknown) => e instanceof InvalidArgumentError && /already holds a medium/.test((e as Error).message));
      assert.throws(() => vm.attachDisk(1, { path: scratch.path('no-such-layer') }), (e: unknown) => e instanceof DeviceError && /does not exist/.test((e as Error).message));
      vm.attachDisk(1, { path: disk });
      assert.throws(() => vm.attachDisk(1, { path: disk }), /already holds a medium/);
    } finally {
      await vm.kill();
    }
    assert.throws(() => vm.attachDisk(1, { path: disk }), (e: unknown) => e instanceof InvalidArgumentError && /killed or has exited/.test((e as Error).message));
  });

  it('malformed disks[] entries, in a config and in restore options alike, name the field', async () => {
    const bad: [unknown, RegExp][] = [
      ['disk.img', /disks must be an array/],
      [[null], /disks\[0\] must be an object/],
      [[{ readOnly: true }], /disks\[0\]\.path must be a non-empty string/],
      [[{ path: '' }], /disks\[0\]\.path must be a non-empty string/],
      [[{ empty: true, readOnly: true }, { path: 42 }], /disks\[1\]\.path must be a non-empty string/],
      [[{ path: good, readOnly: 'yes' }], /disks\[0\]\.readOnly must be a boolean/],
      [[{ empty: 1, readOnly: true }], /disks\[0\]\.empty must be a boolean/],
      [[{ path: good, id: 7 }], /disks\[0\]\.id must be a string/],
    ];
    for (const [disks, pattern] of bad) {
      await rejects(config({ disks: disks as DiskConfig[] }), InvalidArgumentError, new RegExp(`config\\.${pattern.source}`));
      // Parsed before the snapshot directory is looked at.
      await assert.rejects(
        Vm.restore({ snapshot: scratch.path('no-snapshot'), serialLog: scratch.path('restore.log'), disks: disks as DiskConfig[] }),
        (e: unknown) => e instanceof InvalidArgumentError && new RegExp(`options\\.${pattern.source}`).test((e as Error).message),
      );
    }
  });

  it('memfd guest RAM on request (VMLET_GUEST_RAM=memfd) runs a guest like anonymous RAM', async () => {
    const memfdsBefore = usage().memfds;
    process.env.VMLET_GUEST_RAM = 'memfd';
    try {
      const vm = await Vm.create(config({ kernel: writeImage(scratch.path('exit0.elf'), [...asm.movEax(0), ...asm.exitWithEax, ...asm.haltForever]) }));
      try {
        assert.equal(usage().memfds, memfdsBefore + 1, 'guest RAM in a memfd');
        vm.start();
        assert.deepEqual(await vm.wait(), { reason: 'guest-exit', code: 0 });
      } finally {
        await vm.kill();
      }
    } finally {
      delete process.env.VMLET_GUEST_RAM;
    }
  });
});
