// SET_IDENTITY in a real guest (inside hack/kvm-lab): what the host-side tests
// cannot do without touching the host — set CLOCK_REALTIME, reseed the
// guest's CRNG as its PID 1 — and how a cold-booted guest gets the wall clock
// at all (kvmclock's wall clock, no message needed).
import { strict as assert } from 'node:assert';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm } from '../../native/ts/vmm';
import { AgentClient } from '../../shim/agent/client';
import { PROTOCOL_VERSION } from '../../shim/agent/protocol';
import { agentInitramfs, guestCmdline } from '../../shim/sandbox/guest';
import { requireLabGuestKernel } from '../helpers/guest-kernel';
import { waitForAgent } from '../../shim/sandbox/sandbox';
import { collect } from '../unit/agent-harness';

const env = ['PATH=/bin'];

/** Runs a busybox sh script in the agent's own root (the initramfs has /bin/busybox and no applet links). */
async function sh(client: AgentClient, script: string): Promise<string> {
  const p = await client.exec({ args: ['/bin/busybox', 'sh', '-c', script], env });
  p.stdin.end();
  const [out, err, status] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
  assert.deepEqual(status, { code: 0, signal: null }, `'${script}' failed: ${err.toString()}`);
  return out.toString().trim();
}

/** The guest's `date +%s`, checked against this host's clock read around it (1 s of slack each side). */
async function assertClockMatchesHost(client: AgentClient, what: string): Promise<number> {
  const before = Date.now();
  const guest = Number(await sh(client, 'busybox date +%s'));
  const after = Date.now();
  const lo = Math.floor(before / 1000) - 1;
  const hi = Math.floor(after / 1000) + 1;
  assert.ok(guest >= lo && guest <= hi, `${what}: guest clock ${guest} s is not within 1 s of the host's [${lo + 1}, ${hi - 1}]`);
  return guest;
}

describe('agent SET_IDENTITY in a guest (inside hack/kvm-lab)', function () {
  this.timeout(180_000);
  let work: string;
  let vm: Vm | undefined;
  let client: AgentClient;

  before(async function () {
    const kernel = requireLabGuestKernel(this);
    work = mkdtempSync(join(tmpdir(), 'vmlet-identity-'));
    const vsockPath = join(work, 'vsock.sock');
    const serialLog = join(work, 'serial.log');
    vm = await Vm.create({
      kernel: kernel.vmlinux,
      initrd: agentInitramfs({ busybox: true }),
      cmdline: guestCmdline('quiet'),
      memoryMiB: 256,
      cpus: 1,
      serialLog,
      bootProtocol: 'pvh',
      vsock: { cid: 3, udsPath: vsockPath },
    });
    vm.start();
    client = await waitForAgent({ vm, vsockPath, serialLog, layerDevices: [], origin: 'cold boot' }, 120_000);
  });
  after(async () => {
    client?.destroy();
    await vm?.kill();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('a cold-booted guest already has the host wall clock (kvmclock), with no message from the host', async () => {
    // The newest version both sides speak: this agent and client are built together.
    assert.equal(client.hello?.version, PROTOCOL_VERSION);
    await assertClockMatchesHost(client, 'after a cold boot');
  });

  it('the clock flag sets a guest clock that is off by an hour back to the host clock, and the reply shows the old one', async () => {
    // SET_CLOCK (version 1) moves the guest an hour ahead, as a stale restored clock would be.
    await client.setClock(new Date(Date.now() + 3_600_000));
    const ahead = Number(await sh(client, 'busybox date +%s'));
    assert.ok(ahead > Date.now() / 1000 + 3500, `the guest clock did not move ahead (${ahead})`);
    const res = await client.setIdentity({ clock: true });
    assert.ok(res.hostRealtimeSentNs !== null);
    const skewS = Number(res.guestRealtimeBeforeNs - res.hostRealtimeSentNs!) / 1e9;
    assert.ok(skewS > 3500 && skewS < 3700, `the reply's pre-request guest clock is ${skewS} s from the host's, expected ~3600`);
    await assertClockMatchesHost(client, 'after SET_IDENTITY');
  });

  it('as the guest PID 1 the RNG ioctls succeed and the hostname is set', async () => {
    const res = await client.setIdentity({ hostname: 'clone-7', entropy: Buffer.alloc(32, 0xa5) });
    assert.equal(res.hostRealtimeSentNs, null);
    assert.equal(await sh(client, 'busybox hostname; busybox cat /proc/sys/kernel/hostname'), 'clone-7\nclone-7');
    // Credited entropy leaves the pool counted as full (Linux 6.1 reports 256 once seeded).
    assert.equal(await sh(client, 'busybox cat /proc/sys/kernel/random/entropy_avail'), '256');
    assert.equal((await sh(client, 'busybox head -c 32 /dev/urandom | busybox od -An -tx1 | busybox tr -d " \\n"')).length, 64);
  });
});
