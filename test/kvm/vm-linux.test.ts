// An unmodified Linux (the lab's Debian 6.1 bzImage) booted by our VMM through
// the 64-bit boot protocol with an initramfs: the 8250 passes Linux's UART
// autoconfig, the console carries user-space output (THRE interrupts on IRQ 4),
// and `reboot -f` ends in the i8042 reset exit.
//
// Needs standard KVM: a Linux kernel cannot reach user space on this host's
// PVM /dev/kvm (DESIGN.md), so this runs only inside hack/kvm-lab and is
// skipped loudly elsewhere.
import { strict as assert } from 'node:assert';
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

  it('a Debian bzImage with an initramfs reaches /init, prints through the 16550A and resets via the i8042', async function () {
    this.timeout(400_000);
    const init = [
      '#!/bin/busybox sh',
      '/bin/busybox mount -t devtmpfs devtmpfs /dev',
      '/bin/busybox mount -t proc proc /proc',
      `echo ${MARKER} > /dev/console`,
      '/bin/busybox dmesg | /bin/busybox grep -e 16550A -e "Command line" > /dev/console',
      '/bin/busybox reboot -f',
      '',
    ].join('\n');
    const initrd = scratch.path('initramfs.gz');
    writeFileSync(initrd, initramfs([
      { name: 'bin', mode: 0o40755 },
      { name: 'bin/busybox', mode: 0o100755, data: readFileSync(BUSYBOX as string) },
      { name: 'dev', mode: 0o40755 },
      { name: 'proc', mode: 0o40755 },
      { name: 'init', mode: 0o100755, data: Buffer.from(init) },
    ]));
    const serialLog = scratch.path('linux.log');
    const vm = await Vm.create({
      kernel: process.env.VMLET_LAB_KERNEL as string, initrd, memoryMiB: 256, cpus: 1, serialLog,
      // reboot=k: no ACPI here, so reboot goes straight to the keyboard controller.
      cmdline: 'console=ttyS0 reboot=k panic=-1 quiet',
    });
    vm.start();
    const exit = await exitWithin(vm, 360_000);
    const log = readFileSync(serialLog, 'latin1');
    assert.deepEqual(exit, { reason: 'reset' }, `serial log:\n${log}`);
    assert.ok(log.includes(MARKER), `init's output is on the console:\n${log}`);
    assert.match(log, /Command line: console=ttyS0 reboot=k panic=-1 quiet/);
    assert.match(log, /ttyS0 at I\/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A/);
    assert.ok(log.includes('reboot: Restarting system'));
  });
});
