// The guest kernel (hack/guest-kernel, native/guest/kernel/vmlet.config) booted by
// our VMM on the lab's standard KVM: PVH entry of vmlinux and the Linux 64-bit
// protocol with bzImage, each to a busybox /init. The PVH boot also checks, from
// inside the guest, what the config fragment promises the agent and containers:
// a squashfs (zstd) layer on a virtio-blk disk under an overlay on tmpfs, cgroup2
// controllers, the namespaces, seccomp, the virtio drivers, kvm-clock.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Vm, VmConfig, VmExit } from '../../native/ts/vmm';
import { AgentClient } from '../../shim/agent/client';
import { agentBinary, buildAgentInitramfs, buildBusyboxInitramfs, DONE_MARKER, GuestKernel, guestCmdline, INIT_MARKER, requireLabGuestKernel } from '../helpers/guest-kernel';

const BOOT_TIMEOUT_MS = 120_000;

interface Booted {
  exit: VmExit;
  serial: string;
  cmdline: string;
}

/** Boots to the end of /init (or the timeout) and returns the whole serial log. */
async function bootToEnd(config: VmConfig): Promise<Booted> {
  const vm = await Vm.create(config);
  vm.start();
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), BOOT_TIMEOUT_MS);
  });
  const first = await Promise.race([vm.wait(), timedOut]);
  clearTimeout(timer);
  const exit = first === 'timeout' ? await vm.kill() : first;
  const serial = readFileSync(config.serialLog, 'latin1');
  if (first === 'timeout') {
    assert.fail(`the guest did not end within ${BOOT_TIMEOUT_MS} ms (then: ${JSON.stringify(exit, bigintJson)}); serial log:\n${serial}`);
  }
  return { exit, serial, cmdline: vm.cmdline() };
}

function bigintJson(_k: string, v: unknown): unknown {
  return typeof v === 'bigint' ? `0x${v.toString(16)}` : Buffer.isBuffer(v) ? v.toString('hex') : v;
}

/** The value of the `KEY: ...` line /init printed, or a failure showing the whole log. */
function field(serial: string, key: string): string {
  const m = serial.match(new RegExp(`^${key}: ?(.*?)\\r?$`, 'm'));
  if (!m) assert.fail(`the guest printed no "${key}:" line; serial log:\n${serial}`);
  return m[1];
}

describe('guest kernel booted by our VMM (inside hack/kvm-lab)', function () {
  this.timeout(BOOT_TIMEOUT_MS * 2);
  let kernel: GuestKernel;
  let work: string;

  before(function () {
    kernel = requireLabGuestKernel(this);
    work = mkdtempSync(join(tmpdir(), 'vmlet-guest-boot-'));
  });
  after(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  describe('vmlinux through the PVH entry, with a squashfs layer on virtio-blk', () => {
    let booted: Booted;
    let token: string;

    before(async function () {
      if (!kernel) this.skip();
      // A value the guest can only print by reading the layer through virtio-blk + squashfs.
      token = randomBytes(8).toString('hex');
      const layerDir = join(work, 'layer');
      mkdirSync(join(layerDir, 'etc'), { recursive: true });
      writeFileSync(join(layerDir, 'etc', 'token'), `${token}\n`);
      writeFileSync(join(layerDir, 'deleted-by-upper'), 'x');
      const layer = join(work, 'layer.sqfs');
      execFileSync('mksquashfs', [layerDir, layer, '-comp', 'zstd', '-noappend', '-quiet', '-all-root', '-xattrs']);
      const initrd = buildBusyboxInitramfs(
        work,
        [
          'mount -t proc proc /proc',
          'mount -t sysfs sys /sys',
          'mount -t devtmpfs dev /dev',
          'mount -t tmpfs tmp /tmp',
          'echo "FILESYSTEMS: $(awk \'{print $NF}\' /proc/filesystems | tr \'\\n\' \' \')"',
          'echo "NAMESPACES: $(ls /proc/self/ns | tr \'\\n\' \' \')"',
          'echo "VIRTIO-DRIVERS: $(ls /sys/bus/virtio/drivers | tr \'\\n\' \' \')"',
          'echo "CPUS: $(grep -c ^processor /proc/cpuinfo)"',
          'echo "CLOCKSOURCE: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"',
          'echo "SECCOMP: $(grep ^Seccomp: /proc/self/status)"',
          'mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup',
          'echo "CGROUP2: $(cat /sys/fs/cgroup/cgroup.controllers)"',
          'mkdir -p /mnt/layer /mnt/root /tmp/upper /tmp/work',
          'mount -t squashfs -o ro /dev/vda /mnt/layer || echo "LAYER-MOUNT-FAILED"',
          'mount -t overlay overlay -o lowerdir=/mnt/layer,upperdir=/tmp/upper,workdir=/tmp/work /mnt/root || echo "OVERLAY-MOUNT-FAILED"',
          'rm /mnt/root/deleted-by-upper',
          'echo "TOKEN: $(cat /mnt/root/etc/token)"',
          'echo "ROOT-AFTER-DELETE: $(ls /mnt/root | tr \'\\n\' \' \')"',
          'unshare -m -u -i -n -p -f sh -c \'hostname contained && echo "UNSHARED: $(hostname) $$"\'',
        ].join('\n'),
      );
      booted = await bootToEnd({
        kernel: kernel.vmlinux,
        initrd,
        cmdline: guestCmdline(),
        memoryMiB: 256,
        cpus: 1,
        serialLog: join(work, 'pvh.serial'),
        disks: [{ path: layer, readOnly: true }],
        bootProtocol: 'pvh',
      });
    });

    it('reaches /init, runs it to the end and the guest reboot ends the VM as a reset', () => {
      const { serial, exit } = booted;
      assert.match(serial, /Linux version 6\.1\.\S+-vmlet /, `the kernel banner names the vmlet build; serial log:\n${serial}`);
      assert.ok(serial.includes(INIT_MARKER), `/init ran; serial log:\n${serial}`);
      assert.ok(serial.includes(DONE_MARKER), `/init ran to its end; serial log:\n${serial}`);
      assert.equal(exit.reason, 'reset', `exit ${JSON.stringify(exit, bigintJson)}; serial log:\n${serial}`);
    });

    it('finds the virtio-mmio disk from the command line the VMM appended', () => {
      assert.match(booted.cmdline, /virtio_mmio\.device=4K@0xd0000000:5/);
      assert.match(booted.serial, /virtio_blk virtio0: \[vda\]/);
    });

    it('reads a zstd squashfs layer through an overlay on tmpfs, whiteouts included', () => {
      const { serial } = booted;
      assert.ok(!serial.includes('LAYER-MOUNT-FAILED') && !serial.includes('OVERLAY-MOUNT-FAILED'), `serial log:\n${serial}`);
      assert.equal(field(serial, 'TOKEN'), token);
      assert.equal(field(serial, 'ROOT-AFTER-DELETE').trim(), 'etc');
    });

    it('has the filesystems, namespaces, cgroup2 controllers, seccomp and drivers the fragment promises', () => {
      const { serial } = booted;
      const filesystems = field(serial, 'FILESYSTEMS').split(' ');
      for (const fs of ['proc', 'sysfs', 'tmpfs', 'devtmpfs', 'cgroup2', 'ext4', 'squashfs', 'overlay', 'fuse', 'virtiofs']) {
        assert.ok(filesystems.includes(fs), `${fs} in /proc/filesystems: ${filesystems.join(' ')}`);
      }
      const namespaces = field(serial, 'NAMESPACES').split(' ');
      for (const ns of ['pid', 'uts', 'ipc', 'mnt', 'net', 'cgroup']) assert.ok(namespaces.includes(ns), `${ns} namespace: ${namespaces.join(' ')}`);
      assert.match(field(serial, 'UNSHARED'), /^contained 1$/, 'a child in new pid+uts+... namespaces is PID 1 with its own hostname');
      const controllers = field(serial, 'CGROUP2').split(' ');
      for (const c of ['cpuset', 'cpu', 'memory', 'pids']) assert.ok(controllers.includes(c), `cgroup2 controller ${c}: ${controllers.join(' ')}`);
      assert.match(field(serial, 'SECCOMP'), /^Seccomp:\s+0$/, 'seccomp is built (the field exists) and /init runs unfiltered');
      const drivers = field(serial, 'VIRTIO-DRIVERS').split(' ');
      for (const d of ['virtio_blk', 'virtio_net', 'vmw_vsock_virtio_transport', 'virtiofs']) assert.ok(drivers.includes(d), `virtio driver ${d}: ${drivers.join(' ')}`);
      assert.equal(field(serial, 'CLOCKSOURCE'), 'kvm-clock');
    });
  });

  it('boots bzImage through the Linux 64-bit boot protocol to /init', async function () {
    if (!kernel) this.skip();
    const initrd = buildBusyboxInitramfs(join(work), 'echo "UNAME: $(uname -r)"');
    const { serial, exit } = await bootToEnd({
      kernel: kernel.bzImage,
      initrd,
      cmdline: guestCmdline(),
      memoryMiB: 256,
      cpus: 1,
      serialLog: join(work, 'bzimage.serial'),
      bootProtocol: 'linux',
    });
    assert.ok(serial.includes(DONE_MARKER), `/init ran to its end; serial log:\n${serial}`);
    assert.match(field(serial, 'UNAME'), /^6\.1\.\S+-vmlet$/);
    assert.equal(exit.reason, 'reset', `exit ${JSON.stringify(exit, bigintJson)}`);
  });

  it('boots with vmlet-agent as PID 1, which answers HELLO and runs a command over vsock', async function () {
    if (!kernel) this.skip();
    if (!existsSync(agentBinary)) {
      console.log(`      !!! SKIPPED (the agent is not built): ${agentBinary} is missing: run npm run build:agent`);
      this.skip();
    }
    const udsPath = join(work, 'agent.vsock');
    const serialLog = join(work, 'agent.serial');
    const vm = await Vm.create({
      kernel: kernel.vmlinux,
      initrd: buildAgentInitramfs(work, { busybox: true }),
      cmdline: guestCmdline(),
      memoryMiB: 256,
      cpus: 1,
      serialLog,
      vsock: { cid: 3, udsPath },
    });
    vm.start();
    const t0 = Date.now();
    let client: AgentClient | undefined;
    try {
      // Until the guest's agent listens, the hybrid vsock refuses CONNECT: retry.
      let lastError: Error | undefined;
      while (!client && Date.now() - t0 < BOOT_TIMEOUT_MS) {
        try {
          client = await AgentClient.connectHybridVsock(udsPath);
        } catch (e) {
          lastError = e as Error;
          await new Promise((r) => setTimeout(r, 250));
        }
      }
      if (!client) assert.fail(`no agent on vsock port 1024 within ${BOOT_TIMEOUT_MS} ms (last: ${lastError?.message}); serial log:\n${readFileSync(serialLog, 'latin1')}`);
      console.log(`      agent ready over vsock ${Date.now() - t0} ms after start (agent ${client.hello?.agentVersion})`);
      assert.equal(client.hello?.initMode, true, 'the agent runs as PID 1 of the guest');
      const p = await client.exec({ args: ['/bin/busybox', 'uname', '-r'], env: ['PATH=/bin'] });
      const chunks: Buffer[] = [];
      p.stdout.on('data', (d: Buffer) => chunks.push(d));
      const ended = new Promise((r) => p.stdout.on('end', r));
      const status = await p.wait();
      await ended;
      assert.deepEqual(status, { code: 0, signal: null });
      assert.match(Buffer.concat(chunks).toString('utf8'), /^6\.1\.\S+-vmlet\n$/);
    } finally {
      client?.close();
      await vm.kill();
    }
  });
});
