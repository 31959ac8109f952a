// The VMM facade refuses bad configs and a missing/wrong KVM device with typed
// errors that say what to do. None of this needs /dev/kvm: the errors come
// before any VM exists.
import { strict as assert } from 'node:assert';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm, VmConfig, InvalidArgumentError, KvmError, VmmError } from '../../native/ts/vmm';

describe('vmm facade: config and KVM device errors (no KVM needed)', () => {
  let dir: string;
  let base: VmConfig;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'vmlet-vmm-config-'));
    base = { kernel: join(dir, 'kernel.elf'), memoryMiB: 16, cpus: 1, serialLog: join(dir, 'serial.log') };
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const rejects = async (config: VmConfig, cls: typeof VmmError, pattern: RegExp): Promise<void> => {
    await assert.rejects(Vm.create(config), (e: unknown) => {
      assert.ok(e instanceof cls, `expected ${cls.name}, got ${String(e)}`);
      assert.equal((e as Error).name, cls.name);
      assert.match((e as Error).message, pattern);
      return true;
    });
  };

  it('refuses a config without a kernel, naming the field', async () => {
    await rejects({ ...base, kernel: '' }, InvalidArgumentError, /kernel must be the path/);
  });

  it('refuses memory below 2 MiB or not a whole number of MiB', async () => {
    await rejects({ ...base, memoryMiB: 1 }, InvalidArgumentError, /memoryMiB is 1: use a whole number >= 2/);
    await rejects({ ...base, memoryMiB: 2.5 }, InvalidArgumentError, /memoryMiB is 2.5/);
  });

  it('refuses 0 or more than 255 vCPUs', async () => {
    await rejects({ ...base, cpus: 0 }, InvalidArgumentError, /cpus is 0: use 1\.\.255/);
    await rejects({ ...base, cpus: 256 }, InvalidArgumentError, /cpus is 256/);
  });

  it('refuses a config without a serial log', async () => {
    await rejects({ ...base, serialLog: '' }, InvalidArgumentError, /serialLog must be the path/);
  });

  it('refuses a reserved vsock CID', async () => {
    await rejects({ ...base, vsock: { cid: 2, udsPath: join(dir, 'v.sock') } }, InvalidArgumentError, /guest CIDs start at 3/);
  });

  it('refuses an unknown boot protocol in the native layer too', async () => {
    const bad = { ...base, bootProtocol: 'multiboot' } as unknown as VmConfig;
    await rejects(bad, InvalidArgumentError, /bootProtocol is 'multiboot': use 'auto', 'pvh' or 'linux'/);
  });

  it('a missing KVM device (kvmDevice option) says how to get one', async () => {
    await rejects({ ...base, kvmDevice: '/nonexistent/kvm' }, KvmError,
      /\/nonexistent\/kvm does not exist: load kvm_intel or kvm_amd, or run inside hack\/kvm-lab/);
  });

  it('VMLET_KVM_DEVICE points the VMM at another device node', async () => {
    const saved = process.env.VMLET_KVM_DEVICE;
    process.env.VMLET_KVM_DEVICE = '/nonexistent/kvm-from-env';
    try {
      assert.equal(Vm.defaultKvmDevice(), '/nonexistent/kvm-from-env');
      await assert.rejects(Vm.create(base), (e: unknown) => {
        assert.ok(e instanceof KvmError);
        assert.equal((e as KvmError).code, 'ENOENT');
        assert.match((e as Error).message, /kvm-from-env does not exist: load kvm_intel or kvm_amd/);
        return true;
      });
    } finally {
      if (saved === undefined) delete process.env.VMLET_KVM_DEVICE;
      else process.env.VMLET_KVM_DEVICE = saved;
    }
  });

  it('a device node that is not KVM is refused at the API version check', async () => {
    await rejects({ ...base, kvmDevice: '/dev/null' }, KvmError, /KVM_GET_API_VERSION: \/dev\/null is not a KVM device/);
  });
});
