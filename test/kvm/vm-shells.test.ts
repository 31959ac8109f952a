// The VM shell reserve (Vm.fillShells, kvm/vm_shell.h) on this host's
// /dev/kvm: a VM made on a shell runs like any other, a fill is bounded and
// per device, drained shells leave no fd behind, and bad counts or a missing
// device are refused with the reserve unchanged. The restore side is in
// vm-snapshot.test.ts (a restore on a shell finishes every device check).
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { InvalidArgumentError, KvmError, MAX_VM_SHELLS, Vm } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import { helloGuest, writeImage } from './vm-images';
import { Scratch, exitWithin, usage } from './vm-helpers';

describe('vm shells: KVM VMs made ahead of need (/dev/kvm)', function () {
  let scratch: Scratch;
  let kernel: string;
  before(function () {
    requireKvm(this);
    scratch = new Scratch();
    kernel = writeImage(scratch.path('hello.elf'), helloGuest('hello from a shell\n', 5));
    Vm.drainShells();
  });
  afterEach(() => {
    Vm.drainShells();
  });
  after(() => scratch?.remove());

  const hello = async (name: string): Promise<Vm> => {
    const vm = await Vm.create({ kernel, memoryMiB: 16, cpus: 2, serialLog: scratch.path(`${name}.log`) });
    vm.start();
    assert.deepEqual(await exitWithin(vm, 30_000), { reason: 'guest-exit', code: 5 });
    assert.equal(readFileSync(scratch.path(`${name}.log`), 'latin1'), 'hello from a shell\n');
    return vm;
  };

  it('a VM made on a shell runs exactly like one made without; the next one finds none and makes its own', async () => {
    assert.equal(await Vm.fillShells(1), 1);
    assert.equal(Vm.heldShells(), 1);
    const first = await hello('first');
    assert.equal(first.stats().vmShell, true, 'the held shell was taken');
    assert.equal(Vm.heldShells(), 0);
    const second = await hello('second');
    assert.equal(second.stats().vmShell, false, 'an empty reserve: KVM_CREATE_VM on the path as before');
  });

  it('a fill tops up to the count, never past it, and concurrent fills share it', async () => {
    assert.deepEqual(await Promise.all([Vm.fillShells(3), Vm.fillShells(3)]).then(() => Vm.heldShells()), 3);
    assert.equal(await Vm.fillShells(2), 3, 'more held than asked: nothing made, nothing closed');
    assert.equal(await Vm.fillShells(0), 3);
    assert.equal(Vm.drainShells(), 3);
    assert.equal(Vm.heldShells(), 0);
  });

  it('shells are kept per device: a VM on another device path does not take one', async () => {
    await Vm.fillShells(1);
    // The same device under a second name is still another path to the reserve.
    const vm = await Vm.create({ kernel, memoryMiB: 16, cpus: 1, serialLog: scratch.path('other.log'), kvmDevice: '/dev/../dev/kvm' });
    try {
      assert.equal(vm.stats().vmShell, false);
      assert.equal(Vm.heldShells(), 1);
    } finally {
      await vm.kill();
    }
  });

  it('20 fills and drains, and 10 VMs on shells, leave no fds or threads behind', async () => {
    await hello('warm-up');
    const before = usage();
    for (let i = 0; i < 20; i++) {
      await Vm.fillShells(2);
      assert.equal(usage().fds, before.fds + 4, 'each held shell is a VM fd and a /dev/kvm fd');
      Vm.drainShells();
    }
    for (let i = 0; i < 10; i++) {
      await Vm.fillShells(1);
      assert.equal((await hello(`leak-${i}`)).stats().vmShell, true);
    }
    const after = usage();
    assert.equal(after.fds, before.fds, 'file descriptors');
    assert.equal(after.threads, before.threads, 'threads');
    assert.equal(after.vcpuThreads, 0, 'vCPU threads');
  });

  it('bad counts and a missing device are refused; the reserve keeps what it held', async () => {
    await Vm.fillShells(1);
    for (const bad of [-1, MAX_VM_SHELLS + 1, 1.5, NaN, '2' as unknown as number]) {
      await assert.rejects(Vm.fillShells(bad), (e: unknown) => e instanceof InvalidArgumentError && /hold 0 to 16 VM shells/.test((e as Error).message), String(bad));
    }
    await assert.rejects(Vm.fillShells(1, scratch.path('no-kvm')), (e: unknown) => {
      assert.ok(e instanceof KvmError, String(e));
      assert.match((e as Error).message, /no-kvm/);
      return true;
    });
    assert.equal(Vm.heldShells(), 1);
    assert.equal((await hello('after-errors')).stats().vmShell, true);
  });
});
