// Booting guests on the real /dev/kvm through both entry paths. The guests are
// a few bytes of machine code assembled in vm-images.ts; each reports what it
// found (the start_info magic via EBX, the e820 count via RSI) through the
// debug-exit port, so the exit code proves the register and memory set-up.
import { strict as assert } from 'node:assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { Vm } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import { asm, helloGuest, writeImage } from './vm-images';
import { Scratch, exitWithin } from './vm-helpers';

describe('vm boot on /dev/kvm', function () {
  let scratch: Scratch;
  before(function () {
    requireKvm(this);
    scratch = new Scratch();
  });
  after(() => scratch?.remove());

  it('PVH: serial output arrives byte-exact and the debug-exit code comes back', async () => {
    const kernel = scratch.path('hello.elf');
    writeImage(kernel, helloGuest('hello from a PVH guest\r\nsecond line\n', 42));
    const serialLog = scratch.path('hello.log');
    const before = process.hrtime.bigint();
    const vm = await Vm.create({ kernel, memoryMiB: 32, cpus: 1, serialLog });
    vm.start();
    const exit = await exitWithin(vm, 20_000);
    assert.deepEqual(exit, { reason: 'guest-exit', code: 42 });
    assert.equal(readFileSync(serialLog, 'latin1'), 'hello from a PVH guest\r\nsecond line\n');
    const stats = vm.stats();
    // one I/O exit per byte written plus the debug-exit write
    assert.equal(stats.exits.io, 'hello from a PVH guest\r\nsecond line\n'.length + 1);
    assert.ok(stats.createdNs !== undefined && stats.createdNs >= before, 'createdNs is on the process.hrtime clock');
    assert.ok(stats.firstEntryNs !== undefined && stats.firstEntryNs >= stats.createdNs, 'first KVM_RUN after creation');
    // Loading the kernel is part of creation, so it fits between the two.
    assert.ok(stats.bootLoadNs !== undefined && stats.bootLoadNs > 0n && stats.bootLoadNs <= stats.firstEntryNs - stats.createdNs,
      `bootLoadNs ${stats.bootLoadNs} within create -> first KVM_RUN`);
  });

  it('PVH (ELF64 and ELF32): EBX points at hvm_start_info with its magic', async () => {
    for (const elf32 of [false, true]) {
      const kernel = writeImage(scratch.path(`magic-${elf32}.elf`), [...asm.loadStartInfoMagic, ...asm.exitWithEax, ...asm.haltForever], { elf32 });
      const vm = await Vm.create({ kernel, memoryMiB: 16, cpus: 1, serialLog: scratch.path('magic.log'), bootProtocol: 'pvh' });
      vm.start();
      assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: 0x336ec578 }, `elf32=${elf32}`);
    }
  });

  it('Linux 64-bit protocol: entered in long mode with RSI at boot_params and its e820 map', async () => {
    const kernel = writeImage(scratch.path('linux64.elf'), [...asm.loadE820Count, ...asm.exitWithEax, ...asm.haltForever], { noPvhNote: true });
    // 64 MiB: low RAM split around the BIOS hole (2 entries); 4 GiB: plus RAM above the MMIO hole (3).
    for (const [memoryMiB, entries] of [[64, 2], [4096, 3]] as const) {
      const vm = await Vm.create({ kernel, memoryMiB, cpus: 1, serialLog: scratch.path('linux64.log') });
      vm.start();
      assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: entries }, `${memoryMiB} MiB`);
    }
  });

  it('several vCPUs: the application processors wait for SIPI while the BSP runs to its exit', async () => {
    const kernel = writeImage(scratch.path('smp.elf'), [...asm.movEax(7), ...asm.exitWithEax, ...asm.haltForever]);
    const vm = await Vm.create({ kernel, memoryMiB: 16, cpus: 4, serialLog: scratch.path('smp.log'), maskKvmParavirt: true });
    vm.start();
    assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: 7 });
  });

  it('the command line reaches the guest unchanged when there are no virtio devices', async () => {
    const kernel = writeImage(scratch.path('cmd.elf'), asm.haltForever);
    const vm = await Vm.create({ kernel, memoryMiB: 16, cpus: 1, serialLog: scratch.path('cmd.log'), cmdline: 'console=ttyS0 tg.mode=hello' });
    assert.equal(vm.cmdline(), 'console=ttyS0 tg.mode=hello');
    assert.deepEqual(await vm.kill(), { reason: 'killed' });
  });

  it('virtio devices are announced on the command line: disks first, then vsock, 4 KiB windows from 0xd0000000 on GSI 5+i', async () => {
    const kernel = writeImage(scratch.path('dev.elf'), asm.haltForever);
    const a = scratch.path('a.img');
    const b = scratch.path('b.img');
    writeFileSync(a, Buffer.alloc(1 << 20));
    writeFileSync(b, Buffer.alloc(1 << 20));
    const vm = await Vm.create({
      kernel, memoryMiB: 16, cpus: 1, serialLog: scratch.path('dev.log'), cmdline: 'console=ttyS0',
      disks: [{ path: a }, { path: b, readOnly: true }], vsock: { cid: 3, udsPath: scratch.path('v.sock') },
    });
    try {
      assert.equal(vm.cmdline(), 'console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7');
    } finally {
      assert.deepEqual(await vm.kill(), { reason: 'killed' });
    }
  });

  it('CPUID as the guest sees it: APIC id and vCPU count in leaf 1, the hypervisor bit, KVM paravirt leaf masked on request', async () => {
    const cpuid = [0x0f, 0xa2];
    const run = async (name: string, code: number[], over: { cpus?: number; maskKvmParavirt?: boolean } = {}): Promise<unknown> => {
      const kernel = writeImage(scratch.path(`${name}.elf`), [...code, ...asm.exitWithEax, ...asm.haltForever]);
      const vm = await Vm.create({ kernel, memoryMiB: 16, cpus: over.cpus ?? 1, serialLog: scratch.path(`${name}.log`), maskKvmParavirt: over.maskKvmParavirt });
      vm.start();
      return exitWithin(vm, 20_000);
    };
    // EBX >> 16 = APIC id << 8 | logical processor count; the BSP has APIC id 0.
    assert.deepEqual(await run('leaf1-ebx', [...asm.movEax(1), ...cpuid, 0x89, 0xd8, 0xc1, 0xe8, 0x10], { cpus: 3 }), { reason: 'guest-exit', code: 3 });
    // ECX >> 31: "running under a hypervisor".
    assert.deepEqual(await run('leaf1-ecx', [...asm.movEax(1), ...cpuid, 0x89, 0xc8, 0xc1, 0xe8, 0x1f]), { reason: 'guest-exit', code: 1 });
    const kvmFeatures = [...asm.movEax(0x40000001), ...cpuid];
    assert.deepEqual(await run('pv-masked', kvmFeatures, { maskKvmParavirt: true }), { reason: 'guest-exit', code: 0 });
    const unmasked = await run('pv-unmasked', kvmFeatures) as { reason: string; code: number };
    assert.equal(unmasked.reason, 'guest-exit');
    assert.notEqual(unmasked.code, 0, 'KVM advertises paravirt features unless masked');
  });
});
