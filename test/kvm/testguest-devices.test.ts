// The test guest (native/testguest) driving our VMM's devices on this host's
// /dev/kvm, the way a driver would: virtio-blk data checked against the host
// file, a read-only disk refusing writes, vsock streams both ways byte-exact,
// the interrupt path, the serial log and the exit code.
import { strict as assert } from 'node:assert';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm, VmConfig, VmExit } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import {
  all, connectToGuest, crc32hex, one, parseTg, pattern, randomDisk, requireTestguest, serveGuestConnect, TgOutput,
} from '../helpers/testguest';

/** Polls the serial log until a line matches (the guest announces readiness there). */
async function waitForSerial(path: string, re: RegExp, vm: Vm, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let exited = false;
  vm.wait().then(() => (exited = true), () => (exited = true));
  for (;;) {
    const text = existsSync(path) ? readFileSync(path, 'latin1') : '';
    if (re.test(text)) return;
    if (exited) throw new Error(`the VM exited before printing ${re}; serial:\n${text}`);
    if (Date.now() > deadline) throw new Error(`no ${re} on the serial log after ${timeoutMs} ms; serial:\n${text}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Rejects with `what` after ms: a host stream the guest never opened must fail the test, not hang it. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Runs the guest to its exit (killing it after timeoutMs) and parses its serial log. */
async function runToExit(vm: Vm, serialLog: string, timeoutMs: number): Promise<{ exit: VmExit; out: TgOutput; text: string }> {
  const timer = setTimeout(() => void vm.kill(), timeoutMs);
  try {
    const exit = await vm.wait();
    const text = readFileSync(serialLog, 'latin1');
    return { exit, out: parseTg(text), text };
  } finally {
    clearTimeout(timer);
  }
}

describe('testguest devices under our VMM (/dev/kvm)', function () {
  let dir: string;
  const base = (name: string, cmdline: string): VmConfig => ({
    kernel: requireTestguest(),
    cmdline,
    memoryMiB: 128,
    cpus: 1,
    serialLog: join(dir, `${name}.serial`),
  });

  before(function () {
    requireKvm(this);
    requireTestguest();
    dir = mkdtempSync(join(tmpdir(), 'tg-kvm-'));
  });
  after(() => dir && rmSync(dir, { recursive: true, force: true }));

  it('check: blk round-trips against the host file, RO disk refuses writes, vsock carries 10 MiB each way, IRQs fire, exit 0', async function () {
    this.timeout(180_000);
    const rw = join(dir, 'rw.img'), ro = join(dir, 'ro.img'), uds = join(dir, 'vsock.sock');
    const rwData = randomDisk(rw, 1 << 20), roData = randomDisk(ro, 1 << 20);
    const seed = 0x5eed, off = 4096, len = 256 << 10, bytes = 10 << 20, port = 5000, listen = 6000;
    const cfg: VmConfig = {
      ...base('check', `tg.mode=check tg.seed=${seed} tg.write_off=${off} tg.write_len=${len} ` +
        `tg.vsock_port=${port} tg.vsock_listen=${listen} tg.vsock_bytes=${bytes}`),
      disks: [{ path: rw }, { path: ro, readOnly: true }],
      vsock: { cid: 3, udsPath: uds },
    };
    const guestConnect = serveGuestConnect(uds, port, bytes, seed);
    const vm = await Vm.create(cfg);
    try {
      vm.start();
      await waitForSerial(cfg.serialLog, /^TG vsock .*ready=1$/m, vm, 60_000);
      const hostConnect = connectToGuest(uds, listen, bytes, seed);
      const { exit, out } = await runToExit(vm, cfg.serialLog, 150_000);
      const [g, h] = await within(Promise.all([guestConnect.result, hostConnect]), 10_000,
        `host vsock ends after the VM exited (${JSON.stringify(exit)}); guest said:\n${out.lines.map((x) => x.raw).join('\n')}`);

      // virtio-blk: the guest's CRC of the whole disk is the host's.
      assert.equal(one(out, 'blk-read', { dev: '0' }).fields.crc32, crc32hex(rwData));
      assert.equal(one(out, 'blk-read', { dev: '1' }).fields.crc32, crc32hex(roData));
      // The written range, verified on the host by hashing the file.
      const want = Buffer.from(rwData);
      pattern(seed, off, len).copy(want, off);
      assert.equal(crc32hex(readFileSync(rw)), crc32hex(want), 'rw.img = original bytes + the seeded pattern at [off, off+len)');
      assert.equal(one(out, 'blk-write', { dev: '0' }).fields.verify, 'ok');
      assert.equal(one(out, 'blk-ro', { dev: '1' }).fields.write_status, '1', 'VIRTIO_BLK_S_IOERR');
      assert.ok(readFileSync(ro).equals(roData), 'the read-only disk file is untouched');

      // vsock, guest -> host connect: both directions byte-exact, both ends agree on the CRCs.
      const c = one(out, 'vsock-connect').fields;
      assert.deepEqual([g.received, g.mismatches, g.sent], [bytes, 0, bytes]);
      assert.deepEqual([Number(c.sent), Number(c.recv), Number(c.mismatches)], [bytes, bytes, 0]);
      assert.equal(c.sent_crc32, g.receivedCrc);
      assert.equal(c.recv_crc32, g.sentCrc);
      // vsock, host -> guest (CONNECT <port>): the same.
      const l = one(out, 'vsock-listen').fields;
      assert.deepEqual([h.received, h.mismatches, h.sent], [bytes, 0, bytes]);
      assert.deepEqual([Number(l.sent), Number(l.recv), Number(l.mismatches)], [bytes, bytes, 0]);
      assert.equal(l.sent_crc32, h.receivedCrc);
      assert.equal(l.recv_crc32, h.sentCrc);

      assert.ok(Number(one(out, 'irq').fields.count) > 0, 'blk completions arrived through IOAPIC -> LAPIC -> IDT');
      assert.deepEqual(out.done, { pass: 7, fail: 0 }, out.lines.map((x) => x.raw).join('\n'));
      assert.deepEqual(exit, { reason: 'guest-exit', code: 0 });
    } finally {
      await vm.kill();
      guestConnect.server.close();
    }
  });

  it('serial: 300 numbered lines arrive byte-exact and in order, after the boot byte', async function () {
    this.timeout(120_000);
    const n = 300;
    const cfg = base('serial', `tg.mode=serial tg.n=${n}`);
    const vm = await Vm.create(cfg);
    vm.start();
    const { exit, out, text } = await runToExit(vm, cfg.serialLog, 100_000);
    assert.equal(text[0], '\n', 'the first byte is the one the entry point writes');
    const seq = all(out, 'serial');
    assert.equal(seq.length, n);
    seq.forEach((l, i) => assert.equal(l.raw, `TG serial seq=${i} of=${n}`));
    assert.deepEqual(out.other, []);
    assert.deepEqual(exit, { reason: 'guest-exit', code: 0 });
  });

  it('hello: one line and exit code 0', async () => {
    const cfg = base('hello', 'tg.mode=hello');
    const vm = await Vm.create(cfg);
    vm.start();
    const { exit, text } = await runToExit(vm, cfg.serialLog, 30_000);
    assert.equal(text, '\nTG hello\n');
    assert.deepEqual(exit, { reason: 'guest-exit', code: 0 });
  });

  it('triplefault: a null IDT and a fault end the VM as a triple-fault shutdown', async () => {
    const cfg = base('triple', 'tg.mode=triplefault');
    const vm = await Vm.create(cfg);
    vm.start();
    const { exit, out } = await runToExit(vm, cfg.serialLog, 30_000);
    one(out, 'triplefault');
    assert.equal(exit.reason, 'shutdown', JSON.stringify(exit));
  });

  it('emufail: a jump into the unbacked hole at 0xc0000000 is an emulation failure reported with its RIP', async () => {
    const cfg = base('emufail', 'tg.mode=emufail');
    const vm = await Vm.create(cfg);
    vm.start();
    const { exit, out } = await runToExit(vm, cfg.serialLog, 30_000);
    one(out, 'emufail');
    assert.equal(exit.reason, 'emulation-failure', JSON.stringify(exit, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v)));
    if (exit.reason === 'emulation-failure') assert.equal(exit.rip, 0xc0000000n);
  });
});
