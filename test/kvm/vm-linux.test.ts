// An unmodified Linux (the lab's Debian 6.1 bzImage) booted by our VMM through
// the 64-bit boot protocol with an initramfs: the 8250 passes Linux's UART
// autoconfig, the console carries user-space output (THRE interrupts on IRQ 4),
// the MP table brings up the second vCPU, the CMOS clock sets the guest's
// time, and `reboot -f` ends in the i8042 reset exit.
//
// Needs standard KVM: a Linux kernel cannot reach user space on this host's
// PVM /dev/kvm (DESIGN.md), so this runs only inside hack/kvm-lab and is
// skipped loudly elsewhere.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { Vm } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import { Scratch, exitWithin } from './vm-helpers';

interface CpioEntry {
  name: string;
  mode: number;
  data?: Buffer;
}

/** A gzipped newc cpio archive, the format the kernel unpacks as initramfs. */
function initramfs(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const pad4 = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);
  let ino = 1;
  for (const e of [...entries, { name: 'TRAILER!!!', mode: 0 }]) {
    const data = e.data ?? Buffer.alloc(0);
    const fields = [ino++, e.mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, e.name.length + 1, 0];
    const header = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'latin1');
    const name = Buffer.from(e.name + '\0', 'latin1');
    parts.push(header, name, pad4(header.length + name.length), data, pad4(data.length));
  }
  return gzipSync(Buffer.concat(parts));
}

const BUSYBOX = ['/usr/bin/busybox', '/bin/busybox'].find((p) => existsSync(p));
const MARKER = 'VMLET-LINUX-INIT-REACHED';

describe('vm boots Linux (standard KVM, inside hack/kvm-lab)', function () {
  let scratch: Scratch;
  before(function () {
    requireKvm(this);
    if (process.env.VMLET_LAB !== 'inside') {
      console.log('      !!! SKIPPED (needs standard KVM): Linux cannot boot on this host\'s /dev/kvm; run inside hack/kvm-lab');
      this.skip();
    }
    const kernel = process.env.VMLET_LAB_KERNEL;
    if (!kernel || !existsSync(kernel) || !BUSYBOX)
      throw new Error(`inside the lab VMLET_LAB_KERNEL ('${kernel}') and busybox (hack/packages.d/vmm-core.txt) must exist`);
    scratch = new Scratch();
  });
  after(() => scratch?.remove());

  const init = [
    '#!/bin/busybox sh',
    '/bin/busybox mount -t devtmpfs devtmpfs /dev',
    '/bin/busybox mount -t proc proc /proc',
    `echo ${MARKER} > /dev/console`,
    '/bin/busybox dmesg | /bin/busybox grep -e 16550A -e "Command line" -e "Brought up" -e "MultiProcessor" > /dev/console',
    'echo "VMLET-GUEST-YEAR $(/bin/busybox date -u +%Y)" > /dev/console',
    '/bin/busybox reboot -f',
    '',
  ].join('\n');
  const makeInitrd = (): string => {
    const initrd = scratch.path('initramfs.gz');
    if (!existsSync(initrd)) {
      writeFileSync(initrd, initramfs([
        { name: 'bin', mode: 0o40755 },
        { name: 'bin/busybox', mode: 0o100755, data: readFileSync(BUSYBOX as string) },
        { name: 'dev', mode: 0o40755 },
        { name: 'proc', mode: 0o40755 },
        { name: 'init', mode: 0o100755, data: Buffer.from(init) },
      ]));
    }
    return initrd;
  };

  it('a Debian bzImage with an initramfs on 2 vCPUs reaches /init, prints through the 16550A and resets via the i8042', async function () {
    this.timeout(400_000);
    const initrd = makeInitrd();
    const serialLog = scratch.path('linux.log');
    const vm = await Vm.create({
      kernel: process.env.VMLET_LAB_KERNEL as string, initrd, memoryMiB: 256, cpus: 2, serialLog,
      // reboot=k: no ACPI here, so reboot goes straight to the keyboard controller.
      cmdline: 'console=ttyS0 reboot=k panic=-1 quiet',
    });
    vm.start();
    const exit = await exitWithin(vm, 360_000);
    const log = readFileSync(serialLog, 'latin1');
    console.log(`      exits to the VMM during the boot: ${JSON.stringify(vm.stats().exits)}`);
    assert.deepEqual(exit, { reason: 'reset' }, `serial log:\n${log}`);
    assert.ok(log.includes(MARKER), `init's output is on the console:\n${log}`);
    assert.match(log, /Command line: console=ttyS0 reboot=k panic=-1 quiet/);
    assert.match(log, /ttyS0 at I\/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A/);
    assert.match(log, /Intel MultiProcessor Specification v1\.4/);
    assert.match(log, /smp: Brought up 1 node, 2 CPUs/);
    // The CMOS clock gave the kernel the host's time (not 1970).
    assert.ok(log.includes(`VMLET-GUEST-YEAR ${new Date().getUTCFullYear()}`), `the guest's clock:\n${log}`);
    assert.ok(log.includes('reboot: Restarting system'));
  });

  it('the same kernel as an ELF vmlinux boots through PVH (start_info) and through the 64-bit protocol', async function () {
    this.timeout(800_000);
    // The vmlinux ELF is the xz stream inside the bzImage; Debian builds it with CONFIG_PVH.
    const bz = readFileSync(process.env.VMLET_LAB_KERNEL as string);
    const at = bz.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
    assert.ok(at > 0, 'the bzImage carries an xz-compressed vmlinux');
    const vmlinux = scratch.path('vmlinux');
    // From a file, not a pipe: xz stops after the stream and would close the pipe on the bytes that follow it.
    const xzStream = scratch.path('vmlinux.xz');
    writeFileSync(xzStream, bz.subarray(at));
    writeFileSync(vmlinux, execFileSync('xz', ['-dc', '--single-stream', xzStream], { maxBuffer: 1 << 30 }));
    const initrd = makeInitrd();
    for (const bootProtocol of ['pvh', 'linux'] as const) {
      const serialLog = scratch.path(`vmlinux-${bootProtocol}.log`);
      const vm = await Vm.create({ kernel: vmlinux, initrd, memoryMiB: 256, cpus: 1, serialLog, bootProtocol, cmdline: 'console=ttyS0 reboot=k panic=-1 quiet' });
      vm.start();
      const exit = await exitWithin(vm, 360_000);
      const log = readFileSync(serialLog, 'latin1');
      assert.deepEqual(exit, { reason: 'reset' }, `${bootProtocol}: serial log:\n${log}`);
      assert.ok(log.includes(MARKER), `${bootProtocol}: init's output is on the console:\n${log}`);
      assert.match(log, /Command line: console=ttyS0 reboot=k panic=-1 quiet/);
    }
  });
});
