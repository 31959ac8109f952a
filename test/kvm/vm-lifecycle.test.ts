// How a VM ends, and the control calls around it: every exit the contract
// names (guest-exit, reset, triple fault, emulation failure with RIP and the
// instruction bytes, killed), pause/resume, and kill being idempotent.
import { strict as assert } from 'node:assert';
import { statSync } from 'node:fs';
import { Vm, InvalidArgumentError } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import { asm, writeImage, LOAD_ADDR } from './vm-images';
import { Scratch, exitWithin, sleep } from './vm-helpers';

describe('vm lifecycle and exits on /dev/kvm', function () {
  let scratch: Scratch;
  before(function () {
    requireKvm(this);
    scratch = new Scratch();
  });
  after(() => scratch?.remove());

  const boot = async (name: string, code: number[]): Promise<Vm> => {
    const vm = await Vm.create({ kernel: writeImage(scratch.path(`${name}.elf`), code), memoryMiB: 16, cpus: 1, serialLog: scratch.path(`${name}.log`) });
    vm.start();
    return vm;
  };

  it('a guest that triple-faults stops with reason shutdown and its RIP', async () => {
    const vm = await boot('ud2', asm.undefinedInstruction);
    const exit = await exitWithin(vm, 20_000);
    assert.equal(exit.reason, 'shutdown');
    // Intel keeps the faulting state; AMD resets the vCPU before KVM exits, and the message says so.
    assert.match((exit as { message: string }).message,
      /^vCPU 0 triple-faulted \(KVM_EXIT_SHUTDOWN\); (last RIP 0x100000|the host reset the vCPU on the triple fault \(as AMD SVM does\), so its last RIP is unknown)$/);
    assert.equal(vm.stats().exits.shutdown, 1);
  });

  it('a guest that jumps into the MMIO hole stops with emulation-failure at that RIP, no bytes to show', async () => {
    const vm = await boot('mmiohole', asm.jumpToMmioHole);
    const exit = await exitWithin(vm, 20_000);
    assert.equal(exit.reason, 'emulation-failure');
    if (exit.reason !== 'emulation-failure') return;
    assert.equal(exit.rip, 0xd0800000n);
    assert.equal(exit.instruction.length, 0);
    assert.match(exit.message, /at RIP 0xd0800000 on vCPU 0: RIP is not in guest RAM/);
  });

  it('an instruction KVM cannot emulate on MMIO is reported with its RIP and bytes', async () => {
    // nop; arpl [0xd0800000], ax: arpl touching MMIO must be emulated, and KVM's emulator lacks it.
    const arpl = [0x63, 0x05, 0x00, 0x00, 0x80, 0xd0];
    const vm = await boot('arpl', [0x90, ...arpl, ...asm.haltForever]);
    const exit = await exitWithin(vm, 20_000);
    assert.equal(exit.reason, 'emulation-failure');
    if (exit.reason !== 'emulation-failure') return;
    assert.equal(exit.rip, BigInt(LOAD_ADDR + 1));
    assert.equal(exit.instruction.length, 15);
    assert.deepEqual([...exit.instruction.subarray(0, arpl.length)], arpl);
    assert.match(exit.message, /at RIP 0x100001 on vCPU 0: bytes 63 05 00 00 80 d0/);
  });

  it('the i8042 reset command stops the VM with reason reset', async () => {
    const vm = await boot('reset', [...asm.resetViaI8042, ...asm.haltForever]);
    assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'reset' });
  });

  it('kill stops a spinning guest, is idempotent, and wait() gives the same exit', async () => {
    const vm = await boot('spin', asm.spinForever);
    await sleep(100);
    const [a, b] = await Promise.all([vm.kill(), vm.kill()]);
    assert.deepEqual(a, { reason: 'killed' });
    assert.deepEqual(b, { reason: 'killed' });
    assert.deepEqual(await vm.kill(), { reason: 'killed' });
    assert.deepEqual(await vm.wait(), { reason: 'killed' });
  });

  it('kill stops a halted guest (vCPU asleep inside KVM)', async () => {
    const vm = await boot('halt', asm.haltForever);
    await sleep(100);
    assert.deepEqual(await vm.kill(), { reason: 'killed' });
  });

  it('kill after the guest exited keeps the guest exit', async () => {
    const vm = await boot('exit5', [...asm.movEax(5), ...asm.exitWithEax, ...asm.haltForever]);
    assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: 5 });
    assert.deepEqual(await vm.kill(), { reason: 'guest-exit', code: 5 });
  });

  it('a VM created but never started can be killed, and then not started', async () => {
    const vm = await Vm.create({ kernel: writeImage(scratch.path('idle.elf'), asm.haltForever), memoryMiB: 16, cpus: 2, serialLog: scratch.path('idle.log') });
    assert.deepEqual(await vm.kill(), { reason: 'killed' });
    assert.throws(() => vm.start(), (e: unknown) => e instanceof InvalidArgumentError && /create a new one/.test((e as Error).message));
  });

  it('starting twice is refused', async () => {
    const vm = await boot('twice', asm.haltForever);
    try {
      assert.throws(() => vm.start(), (e: unknown) => e instanceof InvalidArgumentError && /already started/.test((e as Error).message));
    } finally {
      await vm.kill();
    }
  });

  it('pause parks every vCPU (the guest makes no progress) and resume lets it continue', async () => {
    const vm = await boot('newlines', asm.newlinesForever);
    const log = scratch.path('newlines.log');
    try {
      await sleep(150);
      await vm.pause();
      const atPause = statSync(log).size;
      assert.ok(atPause > 0, 'the guest wrote before the pause');
      const exitsAtPause = vm.stats().exits.io;
      await sleep(300);
      assert.equal(statSync(log).size, atPause, 'no serial output while paused');
      assert.equal(vm.stats().exits.io, exitsAtPause, 'no exits while paused');
      vm.resume();
      await sleep(150);
      assert.ok(statSync(log).size > atPause, 'output resumes');
    } finally {
      assert.deepEqual(await vm.kill(), { reason: 'killed' });
    }
  });

  it('a paused VM can be killed', async () => {
    const vm = await boot('pausekill', asm.spinForever);
    await vm.pause();
    assert.deepEqual(await vm.kill(), { reason: 'killed' });
  });

  it('unclaimed ports read as all-ones and are counted; the POST port is silently ignored', async () => {
    const vm = await boot('ports', [
      0xe6, 0x80, //                    out 0x80, al (POST code: ignored, not counted)
      0x66, 0xba, 0xe8, 0x02, //        mov dx, 0x2e8 (COM4: nothing there)
      0xee, //                          out dx, al
      0x31, 0xc0, //                    xor eax, eax
      0xec, //                          in al, dx
      ...asm.exitWithEax, ...asm.haltForever,
    ]);
    assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: 0xff });
    assert.equal(vm.stats().exits['io-unclaimed'], 2);
  });

  it('unclaimed MMIO reads as all-ones and is counted', async () => {
    const vm = await boot('mmio', [
      0xa1, 0x00, 0x00, 0x80, 0xd0, //  mov eax, [0xd0800000]
      ...asm.exitWithEax, ...asm.haltForever,
    ]);
    assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: 0xffffffff });
    const exits = vm.stats().exits;
    assert.equal(exits.mmio, 1);
    assert.equal(exits['mmio-unclaimed'], 1);
  });

  it('resume right after pause wins: the pause settles and the guest keeps running', async () => {
    const vm = await boot('pauseresume', asm.newlinesForever);
    const log = scratch.path('pauseresume.log');
    try {
      await sleep(50);
      const paused = vm.pause();
      vm.resume();
      await paused;
      const size = statSync(log).size;
      await sleep(200);
      assert.ok(statSync(log).size > size, 'the guest still makes progress: the resume was not overtaken by the pause');
    } finally {
      assert.deepEqual(await vm.kill(), { reason: 'killed' });
    }
  });
});
