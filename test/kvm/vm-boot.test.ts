// Booting guests on the real /dev/kvm through both entry paths. The guests are
// a few bytes of machine code assembled in vm-images.ts; each reports what it
// found (the start_info magic via EBX, the e820 count via RSI) through the
// debug-exit port, so the exit code proves the register and memory set-up.
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
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
});
