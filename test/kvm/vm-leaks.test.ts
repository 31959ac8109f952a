// A VM's resources are released when it ends, not by the garbage collector:
// after 20 VMs in sequence and 4 at once from this process, the counts of fds,
// threads and guest-RAM mappings (anonymous; memfds too) are back where they were and RSS has not grown
// beyond noise. Each guest touches 8 MiB of its RAM so a leaked mapping would
// show up as ~8 MiB of RSS per VM.
import { strict as assert } from 'node:assert';
import { Vm } from '../../native/ts/vmm';
import { one, parseTg, receiveGuestStream, requireTestguest, within } from '../../native/ts/testguest';
import { readFileSync } from 'node:fs';
import { requireKvm } from '../helpers/kvm';
import { asm, writeImage } from './vm-images';
import { Scratch, exitWithin, usage } from './vm-helpers';

// Touch one byte in each of 2048 pages from 2 MiB up, then exit with 0.
const touch8MiB = [
  0xbf, 0x00, 0x00, 0x20, 0x00, //  mov edi, 0x200000
  0xb9, 0x00, 0x08, 0x00, 0x00, //  mov ecx, 2048
  0xc6, 0x07, 0x01, //              L: mov byte [edi], 1
  0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add edi, 4096
  0xe2, 0xf5, //                    loop L
  ...asm.movEax(0), ...asm.exitWithEax, ...asm.haltForever,
];

describe('vm resource release on /dev/kvm', function () {
  let scratch: Scratch;
  let kernel: string;
  before(function () {
    requireKvm(this);
    scratch = new Scratch();
    kernel = writeImage(scratch.path('touch.elf'), touch8MiB);
  });
  after(() => scratch?.remove());

  const runOne = async (i: number, cpus: number): Promise<void> => {
    const vm = await Vm.create({ kernel, memoryMiB: 64, cpus, serialLog: scratch.path(`touch-${i}.log`) });
    vm.start();
    assert.deepEqual(await exitWithin(vm, 30_000), { reason: 'guest-exit', code: 0 });
  };

  it('20 VMs in sequence and 4 at once leave no fds, threads, guest RAM or RSS behind', async () => {
    // Warm-up: the addon loads and libuv starts its worker pool on first use.
    await runOne(-1, 2);
    await runOne(-2, 1);
    const before = usage();
    for (let i = 0; i < 20; i++) {
      await runOne(i, i % 2 ? 2 : 1);
      const now = usage();
      assert.equal(now.guestRamMappings, before.guestRamMappings, `guest RAM released before wait() resolved (VM ${i})`);
    }
    const afterSequence = usage();
    await Promise.all([0, 1, 2, 3].map((i) => runOne(100 + i, 2)));
    const after = usage();
    console.log(`      usage before ${JSON.stringify(before)}, after 20 in sequence ${JSON.stringify(afterSequence)}, after 4 at once ${JSON.stringify(after)}`);
    for (const u of [afterSequence, after]) {
      assert.equal(u.fds, before.fds, 'file descriptors');
      assert.equal(u.vcpuThreads, 0, 'vCPU threads');
      assert.equal(u.threads, before.threads, 'threads');
      assert.equal(u.memfds, before.memfds, 'memfds');
      assert.equal(u.guestRamMappings, before.guestRamMappings, 'guest RAM mappings');
      // 24 leaked VMs would be ~190 MiB; JS heap noise stays well under 24 MiB.
      assert.ok(u.rssKiB - before.rssKiB < 24 * 1024, `RSS grew by ${u.rssKiB - before.rssKiB} KiB`);
    }
  });

  it('a VM alive holds its guest RAM and vCPU threads; killing it releases them', async () => {
    const before = usage();
    const vm = await Vm.create({ kernel: writeImage(scratch.path('halt.elf'), asm.haltForever), memoryMiB: 64, cpus: 3, serialLog: scratch.path('halt.log') });
    try {
      vm.start();
      const during = usage();
      // 64 MiB is one region below the MMIO hole: one mapping; booted RAM is anonymous, no memfd.
      assert.equal(during.guestRamMappings, before.guestRamMappings + 1, 'one mapping of guest RAM');
      assert.equal(during.memfds, before.memfds, 'no memfd');
      assert.equal(during.vcpuThreads, before.vcpuThreads + 3, 'one thread per vCPU');
    } finally {
      await vm.kill();
    }
    const after = usage();
    assert.equal(after.memfds, before.memfds);
    assert.equal(after.guestRamMappings, before.guestRamMappings);
    assert.equal(after.vcpuThreads, before.vcpuThreads);
    assert.equal(after.fds, before.fds);
  });

  it('VMs whose guest streams over vsock (kicks bound to eventfds) leave no fds or threads behind', async function () {
    this.timeout(180_000);
    const kernel = requireTestguest();
    const streamOne = async (i: number): Promise<void> => {
      const uds = scratch.path(`stream-${i}.sock`), serialLog = scratch.path(`stream-${i}.log`);
      const sink = receiveGuestStream(uds, 7000);
      try {
        const vm = await Vm.create({ kernel, cmdline: 'tg.mode=bench-vsock tg.vsock_port=7000 tg.mib=2', memoryMiB: 64, cpus: 1, serialLog, vsock: { cid: 3, udsPath: uds } });
        vm.start();
        assert.deepEqual(await exitWithin(vm, 60_000), { reason: 'guest-exit', code: 0 });
        const got = await within(sink.done, 10_000, `VM ${i}: the host end of the guest stream`);
        assert.equal(got.crc, one(parseTg(readFileSync(serialLog, 'latin1')), 'vsock-bench').fields.sent_crc32, `VM ${i}`);
      } finally {
        sink.server.close();
      }
    };
    await streamOne(-1);
    const before = usage();
    for (let i = 0; i < 6; i++) await streamOne(i);
    const after = usage();
    console.log(`      usage before ${JSON.stringify(before)}, after 6 streaming VMs ${JSON.stringify(after)}`);
    assert.equal(after.fds, before.fds, 'file descriptors (notify eventfds, the IRQ lines\' VM fd duplicates, sockets)');
    assert.equal(after.threads, before.threads, 'threads (vsock event loops)');
    assert.equal(after.vcpuThreads, 0, 'vCPU threads');
  });
});
