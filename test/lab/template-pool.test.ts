// The template pool with the Linux guest (inside hack/kvm-lab): one template
// made by a cold boot + snapshot, clones restored from it. Acceptance of
// issue 7: two clones do not share random bytes, have the host's wall clock,
// and do not see each other's files; a clone runs commands exactly like a
// booted guest; a corrupted template is made anew.
import { strict as assert } from 'node:assert';
import { mkdtempSync, openSync, readdirSync, readSync, rmSync, statSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm } from '../../native/ts/vmm';
import { AgentClient } from '../../shim/agent/client';
import { agentInitramfs, guestCmdline } from '../../shim/sandbox/guest';
import { requireLabGuestKernel } from '../helpers/guest-kernel';
import { DEFAULT_HUGE_TEXT_DIR, isHugeTmpfs, kernelTextRange } from '../../shim/sandbox/huge-text';
import { RestoredGuest, TemplatePool, TemplateSpec } from '../../shim/sandbox/template-pool';
import { buildTestLayers, collect } from '../unit/agent-harness';

const env = ['PATH=/bin'];

async function sh(client: AgentClient, script: string, stdin = ''): Promise<{ code: number | null; signal: number | null; out: string; err: string }> {
  const p = await client.exec({ args: ['/bin/busybox', 'sh', '-c', script], env });
  p.stdin.end(stdin);
  const [out, err, status] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
  return { ...status, out: out.toString(), err: err.toString() };
}

async function ok(client: AgentClient, script: string): Promise<string> {
  const r = await sh(client, script);
  assert.deepEqual([r.code, r.signal], [0, null], `'${script}' failed: ${r.err}`);
  return r.out.trim();
}

describe('template pool with the Linux guest (inside hack/kvm-lab)', function () {
  this.timeout(300_000);
  let work: string;
  let pool: TemplatePool;
  let poolSpec: TemplateSpec;
  const guests: RestoredGuest[] = [];

  before(async function () {
    const kernel = requireLabGuestKernel(this);
    work = mkdtempSync(join(tmpdir(), 'vmlet-pool-'));
    poolSpec = { kernel: kernel.vmlinux, initrd: agentInitramfs({ busybox: true }), cpus: 1, memoryMiB: 256, cmdline: guestCmdline('quiet') };
    pool = new TemplatePool({
      spec: poolSpec,
      root: join(work, 'templates'),
      stateDir: work,
      agentTimeoutMs: 120_000,
    });
  });
  after(async () => {
    for (const g of guests) await g.close();
    await pool?.close();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('the first acquire makes the template (boot + snapshot); two clones are restored from that one template', async () => {
    const t0 = Date.now();
    const template = await pool.template();
    console.log(`      template made in ${Date.now() - t0} ms: ${JSON.stringify(template.manifest.meta)}`);
    for (const hostname of ['clone-a', 'clone-b']) {
      const t1 = Date.now();
      const g = await pool.acquire({ hostname });
      guests.push(g);
      const ms = (a: bigint, b: bigint) => (Number(b - a) / 1e6).toFixed(1);
      console.log(`      ${hostname}: acquire ${Date.now() - t1} ms (restore → agent ${ms(g.timings.restoreNs, g.timings.agentReadyNs)} ms, identity ${ms(g.timings.agentReadyNs, g.timings.identityNs)} ms; guest clock was ${Number(g.identity.guestRealtimeBeforeNs - g.identity.hostRealtimeSentNs!) / 1e9} s off)`);
      assert.equal(g.template.manifest.id, template.manifest.id, 'restored from the one template');
      // Its kernel text comes from the huge-page tmpfs (huge-text.ts), which the lab lets vmlet mount.
      assert.equal(g.vm.stats().memoryOverlayBytes, kernelTextRange(poolSpec.kernel)!.bytes, 'kernel text mapped from the huge-page file');
    }
    assert.deepEqual(pool.store.list(), [pool.key()]);
    assert.ok(isHugeTmpfs(DEFAULT_HUGE_TEXT_DIR), `${DEFAULT_HUGE_TEXT_DIR} is a huge-page tmpfs`);
  });

  it('VMLET_HUGE_TEXT=0: the clone maps all its RAM from the memory file, and runs the same', async () => {
    process.env.VMLET_HUGE_TEXT = '0';
    const plain = new TemplatePool({ spec: poolSpec, root: join(work, 'templates'), stateDir: work, agentTimeoutMs: 120_000 });
    try {
      const g = await plain.acquire({ hostname: 'clone-4k' });
      try {
        assert.equal(g.vm.stats().memoryOverlayBytes, 0);
        assert.equal(await ok(g.client, 'busybox hostname'), 'clone-4k');
      } finally {
        await g.close();
      }
    } finally {
      delete process.env.VMLET_HUGE_TEXT;
      await plain.close();
    }
  });

  it('each clone has the hostname it was given', async () => {
    assert.equal(await ok(guests[0].client, 'busybox hostname'), 'clone-a');
    assert.equal(await ok(guests[1].client, 'busybox hostname'), 'clone-b');
  });

  it('`head -c 32 /dev/urandom` differs between the two clones', async () => {
    const read = (g: RestoredGuest) => ok(g.client, 'busybox head -c 32 /dev/urandom | busybox od -An -tx1 | busybox tr -d " \\n"');
    const [a, b] = await Promise.all([read(guests[0]), read(guests[1])]);
    assert.equal(a.length, 64);
    assert.notEqual(a, b, 'two clones produced the same random bytes');
  });

  it('`date +%s` in each clone is within 1 s of the host', async () => {
    for (const g of guests) {
      const before = Date.now();
      const guest = Number(await ok(g.client, 'busybox date +%s'));
      const after = Date.now();
      assert.ok(guest >= Math.floor(before / 1000) - 1 && guest <= Math.floor(after / 1000) + 1, `${g.hostname}: guest ${guest} s, host ${before / 1000}..${after / 1000} s`);
    }
  });

  it('a file written in one clone is invisible in the other (copy-on-write memory)', async () => {
    await ok(guests[0].client, 'echo only-in-a > /tmp/mark && busybox cat /tmp/mark');
    const r = await sh(guests[1].client, 'busybox test -e /tmp/mark && echo present || echo absent');
    assert.equal(r.out.trim(), 'absent');
    assert.equal(await ok(guests[0].client, 'busybox cat /tmp/mark'), 'only-in-a');
  });

  it('a clone runs commands like a booted guest: exit codes, signals, stdout and stderr apart, stdin', async () => {
    const c = guests[1].client;
    const seven = await sh(c, 'echo out; echo err >&2; exit 7');
    assert.deepEqual([seven.code, seven.signal, seven.out, seven.err], [7, null, 'out\n', 'err\n']);
    const killed = await sh(c, 'kill -9 $$');
    assert.deepEqual([killed.code, killed.signal], [null, 9]);
    const cat = await sh(c, 'busybox cat', 'through stdin\n');
    assert.deepEqual([cat.code, cat.out], [0, 'through stdin\n']);
    const tty = await c.exec({ args: ['/bin/busybox', 'sh', '-c', 'busybox stty size'], env, tty: { rows: 30, cols: 100 } });
    const [out, status] = await Promise.all([collect(tty.stdout), tty.wait()]);
    assert.deepEqual(status, { code: 0, signal: null });
    assert.equal(out.toString(), '30 100\r\n');
  });

  it('a corrupted template is refused on restore, discarded, made anew once, and the clone works', async () => {
    const before = pool.store.lookup(pool.key());
    assert.ok(before);
    const snap = join(before.dir, 'snapshot');
    // The memory file is the big one; every other file is state the restore checks.
    const files = readdirSync(snap).map((n) => ({ path: join(snap, n), size: statSync(join(snap, n)).size })).sort((a, b) => a.size - b.size);
    const state = files[0];
    const fd = openSync(state.path, 'r+');
    try {
      const b = Buffer.alloc(1);
      const at = Math.floor(state.size / 2);
      readSync(fd, b, 0, 1, at);
      b[0] ^= 0x40;
      writeSync(fd, b, 0, 1, at);
    } finally {
      closeSync(fd);
    }
    const g = await pool.acquire({ hostname: 'clone-c' });
    guests.push(g);
    assert.notEqual(g.template.manifest.id, before.manifest.id, 'the template was made anew');
    assert.equal(await ok(g.client, 'busybox hostname'), 'clone-c');
    assert.deepEqual(pool.store.list(), [pool.key()]);
  });

  it('a pool with a warm clone hands it over already restored; SET_IDENTITY still makes it its own', async () => {
    const warmPool = new TemplatePool({ spec: poolSpec, root: join(work, 'templates'), stateDir: work, agentTimeoutMs: 120_000, warm: 1 });
    try {
      warmPool.refill();
      const t0 = Date.now();
      const g = await warmPool.acquire({ hostname: 'clone-warm' });
      guests.push(g);
      console.log(`      warm acquire ${Date.now() - t0} ms (identity ${(Number(g.timings.identityNs - g.timings.agentReadyNs) / 1e6).toFixed(1)} ms after the agent was ready)`);
      assert.equal(g.warm, true);
      assert.equal(await ok(g.client, 'busybox hostname'), 'clone-warm');
      const before = Date.now();
      const guest = Number(await ok(g.client, 'busybox date +%s'));
      assert.ok(Math.abs(guest - before / 1000) <= 2, `guest clock ${guest} s vs host ${before / 1000} s`);
    } finally {
      await warmPool.close();
    }
  });

  it('a pool with `shells` restores its next clones on VM shells made ahead, and close() drains them', async () => {
    Vm.drainShells();
    const shellPool = new TemplatePool({ spec: poolSpec, root: join(work, 'templates'), stateDir: work, agentTimeoutMs: 120_000, shells: 1 });
    try {
      const made: boolean[] = [];
      for (const name of ['shell-a', 'shell-b', 'shell-c']) {
        const g = await shellPool.acquire({ hostname: name });
        made.push(g.vm.stats().vmShell);
        try {
          // A clone on a shell is a clone like any other.
          assert.equal(await ok(g.client, 'busybox hostname'), name);
        } finally {
          await g.close();
        }
        // The top-up after an acquire runs in the background; the next restore
        // would wait for it, this only makes the count below exact.
        for (let i = 0; i < 100 && Vm.heldShells() < 1; i++) await new Promise((r) => setTimeout(r, 20));
        assert.equal(Vm.heldShells(), 1, 'one shell made ahead for the next restore');
      }
      console.log(`      made on a VM shell: ${made.join(', ')}`);
      assert.deepEqual(made.slice(1), [true, true], 'every restore after the first found its shell made');
    } finally {
      await shellPool.close();
    }
    assert.equal(Vm.heldShells(), 0, 'close() drained the reserve');
  });

  it('one template with empty disk slots serves two images: each clone stacks its own layers, the slots it was not given stay empty; a warm clone takes its layers while it runs', async () => {
    const { work: layers, layer1, layer2 } = buildTestLayers();
    const slotPool = new TemplatePool({ spec: { ...poolSpec, diskSlots: 3 }, root: join(work, 'templates'), stateDir: work, agentTimeoutMs: 120_000 });
    try {
      const a = await slotPool.acquire({ hostname: 'slot-a', layers: [layer1] });
      guests.push(a);
      const b = await slotPool.acquire({ hostname: 'slot-b', layers: [layer1, layer2] });
      guests.push(b);
      assert.equal(a.template.manifest.id, b.template.manifest.id, 'both restored from the one slotted template');
      assert.notEqual(slotPool.key(), pool.key(), 'the slots are part of the key');
      const shadowed = async (g: RestoredGuest): Promise<string> => {
        await g.client.mountRootfs('image', g.layerDevices);
        const p = await g.client.exec({ args: ['/bin/cat', '/etc/shadowed'], env, rootfs: 'image' });
        p.stdin.end();
        const [out, err, status] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
        assert.deepEqual(status, { code: 0, signal: null }, err.toString());
        return out.toString();
      };
      assert.equal(await shadowed(a), 'layer1\n');
      assert.equal(await shadowed(b), 'layer2\n');
      // Sizes in 512-byte sectors as the guest kernel sees them after the configuration change.
      const sectors = (g: RestoredGuest) => ok(g.client, 'for d in vda vdb vdc; do busybox cat /sys/block/$d/size; done');
      assert.equal(await sectors(a), [Math.floor(statSync(layer1).size / 512), 0, 0].join('\n'));
      assert.equal(await sectors(b), [Math.floor(statSync(layer1).size / 512), Math.floor(statSync(layer2).size / 512), 0].join('\n'));

      // A warm clone is restored with its slots empty and gets the layers while it runs (Vm.attachDisk).
      const warmSlots = new TemplatePool({ spec: { ...poolSpec, diskSlots: 3 }, root: join(work, 'templates'), stateDir: work, agentTimeoutMs: 120_000, warm: 1 });
      try {
        warmSlots.refill();
        const w = await warmSlots.acquire({ hostname: 'slot-warm', layers: [layer1, layer2] });
        guests.push(w);
        assert.equal(w.warm, true);
        assert.equal(w.template.manifest.id, a.template.manifest.id);
        assert.equal(await shadowed(w), 'layer2\n');
        assert.throws(() => w.vm.attachDisk(0, { path: layer2 }), /already holds a medium/);
      } finally {
        await warmSlots.close();
      }
    } finally {
      await slotPool.close();
      rmSync(layers, { recursive: true, force: true });
    }
  });

  it('closing the clones removes their state directories', async () => {
    for (const g of guests.splice(0)) await g.close();
    const left = readdirSync(work).filter((n) => n.startsWith('vmlet-restored-') || n.startsWith('vmlet-template-boot-'));
    assert.deepEqual(left, []);
  });
});
