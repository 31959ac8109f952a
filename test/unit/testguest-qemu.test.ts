// The test guest is a correct PVH guest on a second VMM: QEMU 7.2 `-M microvm`
// with TCG (pure emulation, no /dev/kvm), so a bug shared by our VMM and the
// guest cannot hide. Cheap: one boot is ~0.1 s.
import { strict as assert } from 'node:assert';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32hex, one, parseTg, pattern, qemuDebugExitCode, qemuMicrovmArgs, randomDisk, requireTestguest, TgOutput } from '../helpers/testguest';

const QEMU = 'qemu-system-x86_64';

function runQemu(args: string[], timeoutMs = 60_000): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    p.stdout.setEncoding('latin1').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('latin1').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', reject);
    p.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

describe('testguest under QEMU microvm (TCG)', function () {
  let dir: string;

  before(function () {
    if (spawnSync(QEMU, ['--version']).status !== 0) {
      console.log(`      !!! SKIPPED: ${QEMU} is not installed (hack/packages.d/peers.txt installs qemu-system-x86)`);
      this.skip();
    }
    requireTestguest();
    dir = mkdtempSync(join(tmpdir(), 'tg-qemu-'));
  });
  after(() => dir && rmSync(dir, { recursive: true, force: true }));

  it('hello: prints one line and exits 0 through the debug-exit port', async () => {
    const r = await runQemu(qemuMicrovmArgs({ accel: 'tcg', cmdline: 'tg.mode=hello' }));
    assert.equal(qemuDebugExitCode(r.status), 0, `QEMU status ${r.status}: ${r.stderr}`);
    // The leading newline is the boot byte the entry point writes first.
    assert.equal(r.stdout, '\nTG hello\n');
  });

  it('check: reads a 1 MiB random disk (CRC matches the host), writes a seeded pattern, a read-only disk refuses writes, IRQs fire', async () => {
    const rw = join(dir, 'rw.img'), ro = join(dir, 'ro.img');
    const rwData = randomDisk(rw, 1 << 20), roData = randomDisk(ro, 1 << 20);
    const seed = 4242, off = 8192, len = 192 << 10;
    const r = await runQemu(qemuMicrovmArgs({
      accel: 'tcg',
      cmdline: `tg.mode=check tg.seed=${seed} tg.write_off=${off} tg.write_len=${len}`,
      disks: [{ path: rw }, { path: ro, readOnly: true }],
    }));
    const out: TgOutput = parseTg(r.stdout);
    assert.equal(one(out, 'blk-read', { dev: '0' }).fields.crc32, crc32hex(rwData));
    assert.equal(one(out, 'blk-read', { dev: '1' }).fields.crc32, crc32hex(roData));
    const w = one(out, 'blk-write', { dev: '0' });
    assert.deepEqual([w.fields.off, w.fields.len, w.fields.verify], [String(off), String(len), 'ok']);
    const want = Buffer.from(rwData);
    pattern(seed, off, len).copy(want, off);
    assert.ok(readFileSync(rw).equals(want), 'the writable disk holds exactly the original bytes with the seeded pattern over the written range');
    assert.equal(one(out, 'blk-ro', { dev: '1' }).fields.write_status, '1', 'VIRTIO_BLK_S_IOERR');
    assert.ok(readFileSync(ro).equals(roData), 'the read-only disk is untouched');
    assert.ok(Number(one(out, 'irq').fields.count) > 0, 'blk completions arrived by interrupt');
    assert.deepEqual(out.done, { pass: 5, fail: 0 });
    assert.equal(qemuDebugExitCode(r.status), 0);
  });

  it('an unknown mode is reported with what was asked and fails the run', async () => {
    const r = await runQemu(qemuMicrovmArgs({ accel: 'tcg', cmdline: 'tg.mode=bogus' }));
    const out = parseTg(r.stdout);
    const e = one(out, 'error', { what: 'mode' });
    assert.equal(e.fields.value, 'bogus');
    assert.deepEqual(out.done, { pass: 0, fail: 1 });
    assert.equal(qemuDebugExitCode(r.status), 1);
  });
});
