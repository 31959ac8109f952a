// Sandboxes restored from a template that carries their image layers (inside
// hack/kvm-lab): shim/sandbox/template-pool.ts templateLauncher() behind the
// same Sandbox that cold-boots, so everything after launch (agent, rootfs
// stacking, exec) is the code a booted sandbox runs.
import { strict as assert } from 'node:assert';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireLabGuestKernel } from '../helpers/guest-kernel';
import { Sandbox } from '../../shim/sandbox/sandbox';
import { templateLauncher } from '../../shim/sandbox/template-pool';
import { buildTestLayers, collect } from '../unit/agent-harness';
import { spawnSync } from 'node:child_process';

const env = ['PATH=/bin'];

async function sh(sb: Sandbox, script: string): Promise<{ code: number | null; out: string; err: string }> {
  const p = await sb.exec({ args: ['sh', '-c', script], env });
  p.stdin.end();
  const [out, err, status] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
  return { code: status.code, out: out.toString(), err: err.toString() };
}

describe('sandboxes restored from a template with their image layers (inside hack/kvm-lab)', function () {
  this.timeout(300_000);
  let work: string;
  let layers: ReturnType<typeof buildTestLayers>;
  let launcher: ReturnType<typeof templateLauncher>;
  const sandboxes: Sandbox[] = [];

  before(async function () {
    requireLabGuestKernel(this);
    // The layers are made with mksquashfs from busybox-static; the guest mounts them, not this host.
    if (spawnSync('sh', ['-c', 'command -v mksquashfs']).status !== 0 || !existsSync('/bin/busybox')) {
      console.log('      !!! SKIPPED: building the test layers needs mksquashfs and /bin/busybox (busybox-static)');
      this.skip();
    }
    work = mkdtempSync(join(tmpdir(), 'vmlet-template-sandbox-'));
    layers = buildTestLayers();
    launcher = templateLauncher({ root: join(work, 'templates'), agentTimeoutMs: 120_000 });
  });
  after(async () => {
    for (const sb of sandboxes) await sb.stop();
    await launcher?.close();
    if (layers) rmSync(layers.work, { recursive: true, force: true });
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('two sandboxes start from one template (made on the first start) and see their layers stacked', async () => {
    const spec = { cpus: 1, memoryMiB: 256, layers: [layers.layer1, layers.layer2], stateDir: work, agentTimeoutMs: 120_000 };
    for (let i = 0; i < 2; i++) {
      const t0 = Date.now();
      const sb = await Sandbox.start(spec, { launcher });
      sandboxes.push(sb);
      const tm = sb.timings;
      console.log(`      sandbox ${i + 1}: started in ${Date.now() - t0} ms (${sb.launched.origin}): launch+agent ${(tm.agentReadyMs ?? NaN) - tm.launchStartMs} ms, rootfs ${(tm.rootfsReadyMs ?? NaN) - (tm.agentReadyMs ?? NaN)} ms`);
      assert.equal(sb.launched.origin, 'template restore');
    }
    assert.equal(readdirSync(join(work, 'templates')).filter((n) => /^[0-9a-f]{32}$/.test(n)).length, 1, 'one template for both');
    for (const sb of sandboxes) {
      const r = await sh(sb, 'cat /etc/greeting /etc/shadowed /etc/only1');
      assert.deepEqual([r.code, r.out], [0, 'hello from layer 2\nlayer2\nonly in layer1\n'], r.err);
    }
  });

  it('each has its own hostname, random bytes and writable layer', async () => {
    const [a, b] = sandboxes;
    const ident = async (sb: Sandbox) => (await sh(sb, 'busybox hostname; busybox head -c 32 /dev/urandom | busybox od -An -tx1 | busybox tr -d " \\n"')).out;
    const [ia, ib] = [await ident(a), await ident(b)];
    const [ha, ra] = ia.split('\n');
    const [hb, rb] = ib.split('\n');
    assert.match(ha, /^vmlet-[0-9a-f]{8}$/);
    assert.notEqual(ha, hb);
    assert.equal(ra.length, 64);
    assert.notEqual(ra, rb);
    assert.equal((await sh(a, 'echo mine > /etc/written && cat /etc/written')).out, 'mine\n');
    assert.equal((await sh(b, 'cat /etc/written 2>/dev/null || echo absent')).out, 'absent\n');
  });
});
