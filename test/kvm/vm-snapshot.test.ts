// Snapshot and restore with the test guest on this host's /dev/kvm (and, run
// by npm test, inside the standard-KVM lab): a snapshot taken mid-run, while
// the guest sits between its two disks' checks with vsock live, restores into
// a new VM (the original killed) that finishes every remaining check; one
// snapshot restores twice, independently; ten restores leak nothing; and a
// damaged or mismatched snapshot is refused with SnapshotError.
import { strict as assert } from 'node:assert';
import { copyFileSync, linkSync, mkdirSync, readFileSync, readdirSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GuestMemoryError, InvalidArgumentError, RestoreOptions, SnapshotError, SnapshotInfo, Vm, VmConfig, VmExit } from '../../native/ts/vmm';
import { requireKvm } from '../helpers/kvm';
import {
  connectToGuest, crc32hex, one, parseTg, pattern, randomDisk, requireTestguest, serveGuestConnect, TgOutput, waitForSerialLine, within,
} from '../../native/ts/testguest';
import { Scratch, exitWithin, sleep, usage } from './vm-helpers';

const seed = 0x51ab, off = 8192, len = 128 << 10, port = 5000, listen = 6000;

/** Mappings of snapshot memory files in this process: a restored VM's RAM. */
function snapshotMaps(): number {
  return readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => / \/.*\/memory( \(deleted\))?$/.test(l)).length;
}

interface Original {
  snap: string;
  info: SnapshotInfo;
  /** Serial output of the original VM up to the snapshot. */
  before: TgOutput;
  /** Disk contents at the snapshot: dev0 already written by the guest, dev1 untouched. */
  disk0: Buffer;
  disk1: Buffer;
  disk1Original: Buffer;
}

describe('vm snapshot/restore with the test guest (/dev/kvm)', function () {
  let scratch: Scratch;
  let main: Original;
  // The guest checks stream this much over each vsock connection after the restore.
  const bytes = 256 << 10;

  /** Boots the test guest to its snapshot point, snapshots it, kills it. */
  async function takeSnapshot(name: string, vsockBytes: number, cpus = 1, memoryMiB = 64): Promise<Original> {
    const d0 = scratch.path(`${name}-d0.img`), d1 = scratch.path(`${name}-d1.img`);
    randomDisk(d0, 512 << 10);
    const disk1Original = randomDisk(d1, 512 << 10);
    const cfg: VmConfig = {
      kernel: requireTestguest(),
      cmdline: `tg.mode=check tg.seed=${seed} tg.write_off=${off} tg.write_len=${len} tg.vsock_port=${port} ` +
        `tg.vsock_listen=${listen} tg.vsock_bytes=${vsockBytes} tg.pause=after-blk0`,
      memoryMiB,
      cpus,
      serialLog: scratch.path(`${name}.serial`),
      disks: [{ path: d0, id: 'd0' }, { path: d1, id: 'd1' }],
      vsock: { cid: 3, udsPath: scratch.path(`${name}.sock`) },
    };
    const vm = await Vm.create(cfg);
    try {
      vm.start();
      // The whole line, newline included: the serial log grows a byte per exit.
      await waitForSerialLine(cfg.serialLog, /^TG pause point=after-blk0 .*waiting=transport-reset\n/m, vm.wait(), 60_000);
      await assert.rejects(vm.snapshot(scratch.path(`${name}-running`)), InvalidArgumentError, 'a running VM is refused');
      await vm.pause();
      const snap = scratch.path(`${name}-snap`);
      const info = await vm.snapshot(snap);
      await assert.rejects(vm.snapshot(snap), InvalidArgumentError, 'a non-empty directory is refused');
      return {
        snap, info, before: parseTg(readFileSync(cfg.serialLog, 'latin1')),
        disk0: readFileSync(d0), disk1: readFileSync(d1), disk1Original,
      };
    } finally {
      await vm.kill();
    }
  }

  /** Restores `o` with its own disk copies, vsock peers and serial log, runs it to its exit. */
  async function restoreAndRun(o: Original, name: string, cid: number, vsockBytes: number, extra: Partial<RestoreOptions> = {}): Promise<{ exit: VmExit; out: TgOutput; text: string; vm: Vm; disk1: string }> {
    const d0 = scratch.path(`${name}-d0.img`), d1 = scratch.path(`${name}-d1.img`), uds = scratch.path(`${name}.sock`);
    writeFileSync(d0, o.disk0);
    writeFileSync(d1, o.disk1);
    const serialLog = scratch.path(`${name}.serial`);
    const guestConnect = serveGuestConnect(uds, port, vsockBytes, seed);
    let vm: Vm | undefined;
    try {
      vm = await Vm.restore({ snapshot: o.snap, serialLog, disks: [{ path: d0, id: 'd0' }, { path: d1, id: 'd1' }], vsock: { cid, udsPath: uds }, ...extra });
      vm.start();
      await waitForSerialLine(serialLog, /^TG vsock .*ready=1$/m, vm.wait(), 60_000);
      const hostConnect = connectToGuest(uds, listen, vsockBytes, seed);
      const exit = await exitWithin(vm, 120_000);
      const text = readFileSync(serialLog, 'latin1');
      const [g, h] = await within(Promise.all([guestConnect.result, hostConnect]), 10_000, `host vsock ends of ${name}:\n${text}`);
      assert.deepEqual([g.received, g.mismatches, g.sent, h.received, h.mismatches, h.sent], [vsockBytes, 0, vsockBytes, vsockBytes, 0, vsockBytes]);
      return { exit, out: parseTg(text), text, vm, disk1: d1 };
    } finally {
      guestConnect.server.close();
      await vm?.kill();
    }
  }

  /** Every check the restored guest runs after the snapshot point, and its disk effect. */
  function assertFinished(o: Original, r: { exit: VmExit; out: TgOutput; text: string; disk1: string }, cid: number): void {
    const all = [...o.before.lines, ...r.out.lines];
    // The serial stream continues exactly where the snapshot left it: the
    // restored log starts with the line after the pause point, nothing lost or repeated.
    assert.match(r.text, /^TG vsock-reset point=after-blk0 /, `the restored log begins:\n${r.text.slice(0, 200)}`);
    const reset = one(r.out, 'vsock-reset').fields;
    assert.deepEqual([reset.event, reset.old_cid, reset.cid, reset.result], ['0', '3', String(cid), 'pass'], 'VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, then the new CID');
    assert.equal(one(r.out, 'blk-read', { dev: '1' }).fields.crc32, crc32hex(o.disk1Original), 'dev1 read after the restore matches the host file');
    const want = Buffer.from(o.disk1Original);
    pattern(seed, off, len).copy(want, off);
    assert.equal(crc32hex(readFileSync(r.disk1)), crc32hex(want), 'the restored guest wrote the pattern into its own copy of dev1');
    assert.equal(one(r.out, 'blk-write', { dev: '1' }).fields.verify, 'ok');
    assert.equal(one(r.out, 'vsock-connect').fields.result, 'pass');
    assert.equal(one(r.out, 'vsock-listen').fields.result, 'pass');
    const irq = one(r.out, 'irq').fields;
    assert.equal(irq.missed, '0', 'every blk request before and after the restore got its interrupt');
    assert.equal(irq.result, 'pass');
    assert.deepEqual(r.out.done, { pass: all.filter((x) => x.fields.result === 'pass').length, fail: 0 }, all.map((x) => x.raw).join('\n'));
    assert.deepEqual(r.exit, { reason: 'guest-exit', code: 0 });
  }

  before(async function () {
    requireKvm(this);
    requireTestguest();
    this.timeout(120_000);
    scratch = new Scratch();
    main = await takeSnapshot('main', bytes);
  });
  after(() => scratch?.remove());

  it('the snapshot: a state file and a sparse memory file holding only the pages the guest touched', function () {
    const { info } = main;
    assert.deepEqual(readdirSync(main.snap).sort(), ['memory', 'state']);
    assert.equal(info.memoryBytes, 64 << 20);
    assert.equal(statSync(join(main.snap, 'memory')).size, 64 << 20);
    assert.equal(info.cpus, 1);
    assert.equal(info.version, 1);
    assert.match(info.kernelSha256, /^[0-9a-f]{64}$/);
    assert.ok(info.memoryDataBytes > 0 && info.memoryDataBytes < 16 << 20, `${info.memoryDataBytes} bytes of guest data`);
    assert.ok(info.memoryFileBytes <= info.memoryDataBytes + (1 << 20), `sparse: ${info.memoryFileBytes} bytes allocated`);
    // The pre-snapshot half of the run: dev0 checked and written, then the pause point.
    assert.equal(one(main.before, 'blk-write', { dev: '0' }).fields.verify, 'ok');
    assert.equal(main.before.lines.at(-1)?.check, 'pause');
    console.log(`      snapshot: ${info.memoryDataBytes} bytes of guest data, ${info.memoryFileBytes} allocated, ` +
      `${Number(info.durationNs) / 1e6} ms; refused MSRs [${info.refusedMsrs.map((m) => '0x' + m.toString(16)).join(' ')}]; skipped [${info.skipped.join('; ')}]`);
  });

  it('restored mid-run, the guest finishes every remaining check: blk data, serial in order, interrupts, vsock after the transport reset', async function () {
    this.timeout(150_000);
    const r = await restoreAndRun(main, 'r1', 7, bytes);
    assertFinished(main, r, 7);
    const s = r.vm.stats();
    assert.ok(s.restoredNs !== undefined && s.firstEntryNs !== undefined && s.firstEntryNs > s.restoredNs, 'restoredNs < firstEntryNs');
    assert.equal(s.vsockResetSent, true);
    assert.equal(s.bootLoadNs, undefined, 'a restored VM loads no kernel');
    console.log(`      restore call -> first vCPU entry ${Number(s.firstEntryNs! - s.restoredNs!) / 1e6} ms`);
  });

  it('restored on a VM shell from the reserve (KVM_CREATE_VM done ahead), the guest finishes every remaining check', async function () {
    this.timeout(150_000);
    Vm.drainShells();
    assert.equal(await Vm.fillShells(1), 1);
    try {
      const r = await restoreAndRun(main, 'r-shell', 10, bytes);
      assert.equal(r.vm.stats().vmShell, true, 'the restore took the held shell');
      assert.equal(Vm.heldShells(), 0);
      assertFinished(main, r, 10);
    } finally {
      Vm.drainShells();
    }
  });

  it('restored with memory overlays holding the snapshot\'s own bytes (what huge-page kernel text uses), the guest finishes every check', async function () {
    this.timeout(150_000);
    // The test guest's code and data sit in the first MiBs: overlays there are read and written.
    const memory = readFileSync(join(main.snap, 'memory'));
    const overlays = [0, 2, 6].map((mib) => {
      const path = scratch.path(`overlay-${mib}.bin`);
      writeFileSync(path, memory.subarray(mib << 20, (mib + 2) << 20));
      return { gpa: mib << 20, path };
    });
    const before = overlays.map((o) => crc32hex(readFileSync(o.path)));
    const r = await restoreAndRun(main, 'r-overlay', 11, bytes, { memoryOverlays: overlays });
    assert.equal(r.vm.stats().memoryOverlayBytes, 6 << 20);
    assertFinished(main, r, 11);
    assert.deepEqual(overlays.map((o) => crc32hex(readFileSync(o.path))), before, 'copy-on-write: the overlay files are never written');
  });

  it('two restores of one snapshot run at once, each with its own disks, vsock and RAM; the memory file is never written', async function () {
    this.timeout(150_000);
    const memBefore = crc32hex(readFileSync(join(main.snap, 'memory')));
    const [a, b] = await Promise.all([restoreAndRun(main, 'ra', 8, bytes), restoreAndRun(main, 'rb', 9, bytes)]);
    assertFinished(main, a, 8);
    assertFinished(main, b, 9);
    assert.equal(crc32hex(readFileSync(join(main.snap, 'memory'))), memBefore, 'MAP_PRIVATE: the guests wrote only their own copies');
  });

  it('a 2-vCPU VM with RAM above 4 GiB (the second vCPU parked where the guest left it) restores and finishes its checks', async function () {
    this.timeout(150_000);
    // 3.25 GiB: 3 GiB below the PCI hole, the rest from 4 GiB up; both regions are mapped from the file.
    const smp = await takeSnapshot('smp', 4096, 2, 3328);
    assert.deepEqual([smp.info.cpus, smp.info.memoryBytes, statSync(join(smp.snap, 'memory')).size], [2, 3328 * 2 ** 20, 3328 * 2 ** 20]);
    assertFinished(smp, await restoreAndRun(smp, 'smp-r', 12, 4096), 12);
  });

  it('paused in the middle of serial output (an I/O exit just handled), restored, snapshotted again and restored: no byte repeated or lost', async function () {
    this.timeout(120_000);
    const n = 1000;
    const cfg: VmConfig = { kernel: requireTestguest(), cmdline: `tg.mode=serial tg.n=${n}`, memoryMiB: 64, cpus: 1, serialLog: scratch.path('io.serial') };
    const vm = await Vm.create(cfg);
    const snap = scratch.path('io-snap');
    try {
      vm.start();
      await waitForSerialLine(cfg.serialLog, /^TG serial seq=200 /m, vm.wait(), 60_000);
      await vm.pause();
      await vm.snapshot(snap);
    } finally {
      await vm.kill();
    }
    const before = readFileSync(cfg.serialLog, 'latin1');
    // A restored VM is itself snapshotted (its RAM is a private file mapping now) ...
    const mid = scratch.path('io-r.serial'), snap2 = scratch.path('io-snap2');
    const r = await Vm.restore({ snapshot: snap, serialLog: mid });
    try {
      r.start();
      await waitForSerialLine(mid, /^TG serial seq=500 /m, r.wait(), 60_000);
      await r.pause();
      const info2 = await r.snapshot(snap2);
      assert.equal(info2.kernelSha256, (await Vm.inspectSnapshot(snap)).kernelSha256, 'the kernel identity carries over');
    } finally {
      await r.kill();
    }
    // ... and that snapshot restored runs to the end.
    const last = scratch.path('io-r2.serial');
    const r2 = await Vm.restore({ snapshot: snap2, serialLog: last });
    r2.start();
    assert.deepEqual(await exitWithin(r2, 60_000), { reason: 'guest-exit', code: 0 });
    const middle = readFileSync(mid, 'latin1');
    const whole = before + middle + readFileSync(last, 'latin1');
    const cuts = `cuts after bytes ${before.length} and ${before.length + middle.length}`;
    const lines = whole.split('\n').filter((l) => l.startsWith('TG serial '));
    assert.equal(lines.length, n, `every line exactly once (${cuts})`);
    lines.forEach((l, i) => assert.equal(l, `TG serial seq=${i} of=${n}`, `line ${i} (${cuts})`));
  });

  it('resume() or kill() racing a snapshot: the snapshot is whole (and restores) or refused, never half-written', async function () {
    this.timeout(120_000);
    const outcomes: string[] = [];
    for (let i = 0; i < 6; i++) {
      const cfg: VmConfig = { kernel: requireTestguest(), cmdline: 'tg.mode=serial tg.n=100000', memoryMiB: 64, cpus: 1, serialLog: scratch.path(`race-${i}.serial`) };
      const vm = await Vm.create(cfg);
      const dir = scratch.path(`race-${i}`);
      try {
        vm.start();
        await waitForSerialLine(cfg.serialLog, /^TG serial seq=20 /m, vm.wait(), 60_000);
        await vm.pause();
        const taking = vm.snapshot(dir);
        // Half the runs race a resume, half a kill: at once, after a turn of the event loop, or 2 ms in.
        if (i % 3 === 1) await new Promise((r) => setImmediate(r));
        if (i % 3 === 2) await sleep(2);
        if (i % 2 === 0) vm.resume();
        else void vm.kill();
        const [r] = await Promise.allSettled([taking]);
        if (r.status === 'fulfilled') {
          const d = await Vm.inspectSnapshot(dir);
          assert.equal(d.memoryBytes, 64 << 20);
          const back = await Vm.restore({ snapshot: dir, serialLog: scratch.path(`race-${i}-r.serial`) });
          await back.kill();
          outcomes.push('whole');
        } else {
          assert.ok(r.reason instanceof InvalidArgumentError, String(r.reason));
          assert.throws(() => statSync(join(dir, 'state')), 'no state file from a refused snapshot');
          outcomes.push('refused');
        }
        // The resumed guest runs on once the snapshot let go of its vCPUs.
        if (i % 2 === 0) await waitForSerialLine(cfg.serialLog, /^TG serial seq=200 /m, vm.wait(), 60_000);
      } finally {
        await vm.kill();
      }
    }
    console.log(`      outcomes: ${outcomes.join(' ')}`);
  });

  it('10 restores in a row leave no fds, threads, mappings or RSS behind', async function () {
    this.timeout(300_000);
    const small = await takeSnapshot('leak', 4096);
    // Warm-up: the first restore loads code paths and libuv's pool grows.
    assertFinished(small, await restoreAndRun(small, 'leak-w', 10, 4096), 10);
    const before = { ...usage(), maps: snapshotMaps() };
    for (let i = 0; i < 10; i++) {
      const r = await restoreAndRun(small, `leak-${i}`, 11 + i, 4096);
      assert.deepEqual(r.exit, { reason: 'guest-exit', code: 0 }, r.text);
      assert.equal(snapshotMaps(), before.maps, `restore ${i} unmapped its RAM before wait() resolved`);
    }
    const after = { ...usage(), maps: snapshotMaps() };
    console.log(`      usage before ${JSON.stringify(before)}, after 10 restores ${JSON.stringify(after)}`);
    assert.equal(after.fds, before.fds, 'file descriptors');
    assert.equal(after.vcpuThreads, 0, 'vCPU threads');
    assert.equal(after.threads, before.threads, 'threads');
    assert.equal(after.memfds, before.memfds, 'memfds');
    assert.equal(after.maps, before.maps, 'snapshot memory mappings');
    // Each guest touches a few MiB; 10 leaked VMs would show far above this.
    assert.ok(after.rssKiB - before.rssKiB < 24 * 1024, `RSS grew by ${after.rssKiB - before.rssKiB} KiB`);
  });

  describe('a damaged or mismatched snapshot is refused with SnapshotError, and leaks nothing', function () {
    this.timeout(30_000);
    let opts: (snap: string) => RestoreOptions;
    before(function () {
      opts = (snap) => ({
        snapshot: snap, serialLog: scratch.path('bad.serial'),
        disks: [{ path: scratch.path('bad-d0.img') }, { path: scratch.path('bad-d1.img') }],
        vsock: { cid: 40, udsPath: scratch.path('bad.sock') },
      });
      writeFileSync(scratch.path('bad-d0.img'), main.disk0);
      writeFileSync(scratch.path('bad-d1.img'), main.disk1);
    });

    /** A copy of the main snapshot whose state file `damage` rewrites. */
    function damaged(name: string, damage: (state: Buffer) => Buffer): string {
      const dir = scratch.path(`bad-${name}`);
      mkdirSync(dir);
      // Restore never writes the memory file: a hard link stands in for a copy.
      linkSync(join(main.snap, 'memory'), join(dir, 'memory'));
      writeFileSync(join(dir, 'state'), damage(readFileSync(join(main.snap, 'state'))));
      return dir;
    }

    async function refused(o: RestoreOptions, reason: RegExp): Promise<void> {
      const before = usage();
      await assert.rejects(Vm.restore(o), (e: unknown) => {
        assert.ok(e instanceof SnapshotError, `SnapshotError, got ${String(e)}`);
        assert.match(e.message, reason);
        return true;
      });
      const after = usage();
      assert.deepEqual([after.fds, after.memfds, after.vcpuThreads], [before.fds, before.memfds, 0], 'nothing half-started');
    }

    it('a truncated state file', async () => {
      await refused(opts(damaged('trunc', (s) => s.subarray(0, s.length - 100))), /truncated/);
      await refused(opts(damaged('trunc-header', (s) => s.subarray(0, 20))), /truncated/);
    });
    it('a flipped byte in the header, the section table or any section', async () => {
      const state = readFileSync(join(main.snap, 'state'));
      // Header, table, and a byte in each tenth of the file.
      const offsets = [29, 40, ...Array.from({ length: 10 }, (_, i) => Math.floor((state.length * (i + 0.5)) / 10))];
      for (const at of offsets) {
        await refused(opts(damaged(`flip-${at}`, (s) => {
          const c = Buffer.from(s);
          c[at] ^= 0x10;
          return c;
        })), /checksum mismatch/);
      }
    });
    it('an unknown format version', async () => {
      await refused(opts(damaged('version', (s) => {
        const c = Buffer.from(s);
        c.writeUInt32LE(99, 8);
        return c;
      })), /format version 99; this vmlet reads only version 1/);
    });
    it('a missing state file, a truncated memory file', async () => {
      const none = scratch.path('bad-empty');
      mkdirSync(none);
      await refused(opts(none), /no state file/);
      const short = scratch.path('bad-short-mem');
      mkdirSync(short);
      copyFileSync(join(main.snap, 'state'), join(short, 'state'));
      copyFileSync(join(main.snap, 'memory'), join(short, 'memory'));
      truncateSync(join(short, 'memory'), 1 << 20);
      await refused(opts(short), /truncated or replaced/);
    });
    it('a snapshot of another kernel or initrd than expected', async () => {
      const o = opts(main.snap);
      await refused({ ...o, expect: { kernelSha256: '0'.repeat(64) } }, /booted from another kernel/);
      await refused({ ...o, expect: { initrdSha256: '0'.repeat(64) } }, /booted without an initrd/);
      const d = await Vm.inspectSnapshot(main.snap);
      assert.deepEqual([d.kernelSha256, d.initrd, d.disks, d.vsock, d.cpus], [main.info.kernelSha256, undefined, [{ readOnly: false, id: 'd0' }, { readOnly: false, id: 'd1' }], true, 1]);
      assert.match(d.cmdline, /tg\.pause=after-blk0/);
      await assert.rejects(Vm.inspectSnapshot(scratch.path('bad-trunc')), SnapshotError);
    });
    it('bad restore options are InvalidArgumentError before anything is read', async () => {
      await assert.rejects(Vm.restore({ snapshot: '', serialLog: 'x' }), InvalidArgumentError);
      await assert.rejects(Vm.restore({ snapshot: main.snap, serialLog: '' }), InvalidArgumentError);
      await assert.rejects(Vm.restore({ ...opts(main.snap), vsock: { cid: 2, udsPath: 'x' } }), /guest CIDs start at 3/);
    });
    it('memory overlays: malformed options are InvalidArgumentError naming the field; misaligned, partial, outside RAM or missing ones are GuestMemoryError', async () => {
      const o = opts(main.snap);
      const two = scratch.path('bad-overlay-2m.bin'), one = scratch.path('bad-overlay-1m.bin');
      writeFileSync(two, Buffer.alloc(2 << 20));
      writeFileSync(one, Buffer.alloc(1 << 20));
      const malformed: [unknown, RegExp][] = [
        ['x', /options\.memoryOverlays must be an array/],
        [[7], /options\.memoryOverlays\[0\] must be an object/],
        [[{ gpa: -2, path: two }], /options\.memoryOverlays\[0\]\.gpa must be a whole number/],
        [[{ gpa: 0.5, path: two }], /options\.memoryOverlays\[0\]\.gpa must be a whole number/],
        [[{ gpa: 0, path: two }, { gpa: 2 << 20 }], /options\.memoryOverlays\[1\]\.path must be a non-empty string/],
      ];
      for (const [memoryOverlays, says] of malformed)
        await assert.rejects(Vm.restore({ ...o, memoryOverlays } as RestoreOptions), (e: unknown) => e instanceof InvalidArgumentError && says.test((e as Error).message), String(says));
      const refusedMemory = async (memoryOverlays: RestoreOptions['memoryOverlays'], says: RegExp) => {
        const before = usage();
        await assert.rejects(Vm.restore({ ...o, memoryOverlays }), (e: unknown) => e instanceof GuestMemoryError && says.test((e as Error).message), String(says));
        const after = usage();
        assert.deepEqual([after.fds, after.vcpuThreads], [before.fds, 0], 'nothing half-started');
      };
      await refusedMemory([{ gpa: 1 << 20, path: two }], /2 MiB-aligned address/);
      await refusedMemory([{ gpa: 0, path: one }], /whole 2 MiB/);
      await refusedMemory([{ gpa: 64 << 20, path: two }], /not inside one RAM region/);
      await refusedMemory([{ gpa: 0, path: two }, { gpa: 0, path: two }], /overlap/);
      await refusedMemory([{ gpa: 0, path: scratch.path('no-such-overlay') }], /no-such-overlay/);
    });
    it('disks that differ: count, size, readOnly; vsock missing', async () => {
      const o = opts(main.snap);
      await refused({ ...o, disks: o.disks!.slice(0, 1) }, /has 2 disk\(s\), 1 given/);
      await refused({ ...o, disks: [o.disks![0], { ...o.disks![1], readOnly: true }] }, /disk 1 was writable/);
      const bigger = scratch.path('bad-big.img');
      writeFileSync(bigger, Buffer.alloc(1 << 20));
      await refused({ ...o, disks: [o.disks![0], { path: bigger }] }, /1024 sectors, the disk given now has 2048/);
      await refused({ ...o, vsock: undefined }, /has a vsock device/);
    });
  });
});
