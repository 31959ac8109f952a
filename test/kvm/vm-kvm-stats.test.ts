// KVM's own counters for a VM (Vm.kvmStats(), KVM_GET_STATS_FD): they include
// every exit our loop sees, grow while the guest runs, and keep their last
// values once the VM has stopped and its KVM fds are closed.
import { strict as assert } from 'node:assert';
import { Vm } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import { asm, helloGuest, writeImage } from './vm-images';
import { Scratch, exitWithin, sleep } from './vm-helpers';

describe('KVM statistics of a VM (kvmStats) on /dev/kvm', function () {
  let scratch: Scratch;
  before(function () {
    // The addon opens KVM's stats fds only for VMs created with this set (see kvm/machine.cc).
    process.env.VMLET_KVM_STATS = '1';
    requireKvm(this);
    scratch = new Scratch();
  });
  after(() => {
    delete process.env.VMLET_KVM_STATS;
    scratch?.remove();
  });

  it('count at least the port I/O exits our loop handled, and stay readable after the VM stopped', async () => {
    const text = 'kvm stats\n';
    const vm = await Vm.create({ kernel: writeImage(scratch.path('hello.elf'), helloGuest(text, 3)), memoryMiB: 16, cpus: 1, serialLog: scratch.path('hello.log') });
    vm.start();
    assert.deepEqual(await exitWithin(vm, 20_000), { reason: 'guest-exit', code: 3 });
    const ours = vm.stats().exits;
    const kvm = vm.kvmStats();
    // One userspace exit per serial byte plus the debug-exit write.
    assert.equal(ours.io, text.length + 1);
    assert.ok(kvm.exits >= BigInt(ours.io), `exits ${kvm.exits} >= our io exits ${ours.io}`);
    assert.ok(kvm.exits >= kvm.io_exits, `exits ${kvm.exits} >= io_exits ${kvm.io_exits}`);
    // Standard KVM (the lab) counts each port I/O exit in io_exits; the dev hosts'
    // paravirtual KVM emulates port I/O in its instruction emulator and leaves io_exits at 0.
    if (process.env.VMLET_LAB === 'inside') assert.ok(kvm.io_exits >= BigInt(ours.io), `io_exits ${kvm.io_exits} >= our io exits ${ours.io}`);
    assert.equal(typeof kvm['vm.remote_tlb_flush'], 'bigint', `the VM's own statistics are prefixed: ${Object.keys(kvm).join(' ')}`);
    assert.deepEqual(vm.kvmStats(), kvm, 'frozen at the stop');
  });

  it('grow while a busy guest runs', async () => {
    const vm = await Vm.create({ kernel: writeImage(scratch.path('busy.elf'), asm.newlinesForever), memoryMiB: 16, cpus: 1, serialLog: scratch.path('busy.log') });
    try {
      vm.start();
      await sleep(100);
      const a = vm.kvmStats().exits;
      await sleep(100);
      const b = vm.kvmStats().exits;
      assert.ok(b > a, `exits ${a} then ${b}`);
    } finally {
      await vm.kill();
    }
  });
});
