// Sandbox's failure paths with a real VM on this host's /dev/kvm: a launcher
// that boots the test guest (native/testguest) instead of Linux, so the guest
// never runs an agent. The start must end in a typed error carrying the
// serial-log tail, with the VM torn down and the state directory removed, for
// a guest that dies, one that never answers, and a caller that aborts.
// (Successful sandboxes need a Linux guest: test/lab/vmlet-run.test.ts.)
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireKvm } from '../helpers/kvm';
import { Vm } from '../../native/ts/vmm';
import { requireTestguest } from '../../native/ts/testguest';
import { LaunchedVm, Sandbox, SandboxError, SandboxSpec, VmLauncher } from '../../shim/sandbox/sandbox';

/** A test guest that runs on without ever answering on vsock. */
const BUSY = 'tg.mode=bench-mmio tg.n=100000000';

function testguestLauncher(cmdline: string, launched: LaunchedVm[]): VmLauncher {
  return {
    name: 'test guest',
    async launch(spec: SandboxSpec, stateDir: string): Promise<LaunchedVm> {
      const vsockPath = join(stateDir, 'vsock.sock');
      const serialLog = join(stateDir, 'serial.log');
      const vm = await Vm.create({ kernel: requireTestguest(), memoryMiB: spec.memoryMiB, cpus: 1, serialLog, cmdline, vsock: { cid: 3, udsPath: vsockPath } });
      vm.start();
      const l = { vm, vsockPath, serialLog, layerDevices: [], origin: 'test guest' };
      launched.push(l);
      return l;
    },
  };
}

describe('sandbox start failures (test guest on /dev/kvm)', function () {
  this.timeout(60_000);
  let work: string;
  let layer: string;
  let states: string;

  before(function () {
    requireKvm(this);
    work = mkdtempSync(join(tmpdir(), 'vmlet-sandbox-kvm-'));
    mkdirSync(join(work, 'tree'));
    writeFileSync(join(work, 'tree', 'f'), 'x');
    layer = join(work, 'layer.sqfs');
    execFileSync('mksquashfs', [join(work, 'tree'), layer, '-comp', 'zstd', '-noappend', '-quiet']);
  });
  beforeEach(() => {
    states = mkdtempSync(join(work, 'states-'));
  });
  after(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  async function failedStart(cmdline: string, extra: Partial<SandboxSpec> = {}, signal?: AbortSignal): Promise<{ error: SandboxError; launched: LaunchedVm }> {
    const launched: LaunchedVm[] = [];
    const spec: SandboxSpec = { cpus: 1, memoryMiB: 64, layers: [layer], stateDir: states, ...extra };
    const error = await Sandbox.start(spec, { launcher: testguestLauncher(cmdline, launched), signal }).then(
      () => assert.fail('the start succeeded without an agent'),
      (e: unknown) => e,
    );
    assert.ok(error instanceof SandboxError, `a SandboxError, got ${String(error)}`);
    assert.equal(launched.length, 1);
    assert.deepEqual(readdirSync(states), [], 'the state directory is removed');
    return { error, launched: launched[0] };
  }

  it('a guest that stops before any agent answers: GUEST_DIED with its exit and serial tail', async () => {
    const { error, launched } = await failedStart('tg.mode=hello');
    assert.equal(error.code, 'GUEST_DIED', error.message);
    assert.match(error.message, /the guest stopped before its agent answered: guest exit code 0/);
    assert.match(error.serialTail ?? '', /^TG /m, 'the tail shows what the guest printed');
    assert.deepEqual(await launched.vm.wait(), { reason: 'guest-exit', code: 0 });
  });

  it('a guest that runs on without an agent: AGENT_TIMEOUT after the bound, VM killed', async () => {
    // bench-mmio with 10^8 register reads keeps the guest busy for many minutes without an agent.
    const { error, launched } = await failedStart(BUSY, { agentTimeoutMs: 1500 });
    assert.equal(error.code, 'AGENT_TIMEOUT', error.message);
    assert.match(error.message, /did not answer within 1500 ms .*VMLET_AGENT_TIMEOUT_MS/);
    assert.match(error.serialTail ?? '', /^TG start mode=bench-mmio/m);
    assert.equal((await launched.vm.wait()).reason, 'killed');
  });

  it('an aborted start: ABORTED, VM killed', async () => {
    const abort = new AbortController();
    setTimeout(() => abort.abort(), 300);
    const { error, launched } = await failedStart(BUSY, {}, abort.signal);
    assert.equal(error.code, 'ABORTED', error.message);
    assert.equal((await launched.vm.wait()).reason, 'killed');
  });
});
