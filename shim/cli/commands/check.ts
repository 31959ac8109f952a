// `vmlet check`: proves that this host can run vmlet microVMs, end to end,
// without a Linux guest: it boots the test guest (native/testguest) under the
// VMM, which reads every disk through virtio-blk (an image's layer squashfs
// files when --image is given) and streams data both ways over virtio-vsock.
// Every figure the guest reports is checked against the host's own: the CRC
// of each disk file, the bytes written, the vsock streams.
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, UsageError, humanBytes, stringOpt } from '../command';
import { ImageService } from '../../images/image-service';
import { Vm, VmConfig, VmExit, VmmError } from '../../../native/ts/vmm';
import {
  connectToGuest, crc32, crc32hex, one, parseTg, pattern, randomDisk, requireTestguest, serveGuestConnect, StreamResult, waitForSerialLine, within,
} from '../../../native/ts/testguest';
import { hostVirtualization } from '../../sandbox/host';

async function crcOfFile(path: string): Promise<string> {
  // Layer images are tens of MB at most; one read keeps this simple and fast.
  return crc32(await readFile(path)).toString(16).padStart(8, '0');
}

interface Verdict {
  what: string;
  ok: boolean;
  detail: string;
}

export const check: Command = {
  name: 'check',
  usage: '[--image REF] [--vsock-mib N] [--memory MiB]',
  options: {
    image: { type: 'string' },
    'vsock-mib': { type: 'string' },
    memory: { type: 'string' },
  },
  help: [
    '--image REF      also attach REF\'s layer squashfs images read-only; the guest reads them whole',
    '--vsock-mib N    MiB streamed each way on each of two vsock connections (default 1)',
    '--memory MiB     guest RAM (default 64)',
  ],
  async run(values, positionals, ctx) {
    if (positionals.length > 0) throw new UsageError('check takes no arguments');
    const mib = Number(stringOpt(values, 'vsock-mib') ?? '1');
    const memoryMiB = Number(stringOpt(values, 'memory') ?? '64');
    if (!Number.isInteger(mib) || mib < 0 || mib > 1024) throw new UsageError('--vsock-mib takes a whole number from 0 to 1024');
    if (!Number.isInteger(memoryMiB) || memoryMiB < 16 || memoryMiB > 65536) throw new UsageError('--memory takes a whole number of MiB from 16 to 65536');
    const out = (line: string): void => void ctx.stdout.write(`${line}\n`);

    const virt = hostVirtualization();
    out(`host CPU virtualization: ${virt ? `${virt}: Linux guests can run here` : 'none visible (no vmx/svm): this KVM cannot run a Linux guest; vmlet tests Linux guests in hack/kvm-lab'}`);
    const guestElf = requireTestguest();

    const imageRef = stringOpt(values, 'image');
    const layers = imageRef ? (await new ImageService({ root: ctx.root }).rootfs(imageRef)).layers : [];

    const dir = mkdtempSync(join(tmpdir(), 'vmlet-check-'));
    const seed = (Date.now() >>> 0) || 1;
    const scratch = join(dir, 'scratch.img');
    const scratchData = randomDisk(scratch, 1 << 20);
    const writeOff = 4096, writeLen = 64 << 10, bytes = mib << 20, port = 5000, listen = 6000;
    const uds = join(dir, 'vsock.sock');
    const cfg: VmConfig = {
      kernel: guestElf,
      memoryMiB,
      cpus: 1,
      serialLog: join(dir, 'serial.log'),
      cmdline: `tg.mode=check tg.seed=${seed} tg.write_off=${writeOff} tg.write_len=${writeLen}` +
        (bytes > 0 ? ` tg.vsock_port=${port} tg.vsock_listen=${listen} tg.vsock_bytes=${bytes}` : ''),
      disks: [{ path: scratch, id: 'vmlet-check-scratch' }, ...layers.map((path) => ({ path, readOnly: true }))],
      vsock: bytes > 0 ? { cid: 3, udsPath: uds } : undefined,
    };

    const guestConnect = bytes > 0 ? serveGuestConnect(uds, port, bytes, seed) : undefined;
    let vm: Vm | undefined;
    const started = process.hrtime.bigint();
    try {
      try {
        vm = await Vm.create(cfg);
      } catch (e) {
        if (e instanceof VmmError) {
          ctx.stderr.write(`vmlet check: ${e.name}: ${e.message}\n`);
          return 1;
        }
        throw e;
      }
      vm.start();
      const exitPromise = vm.wait();
      let hostConnect: Promise<StreamResult> | undefined;
      if (bytes > 0) {
        await waitForSerialLine(cfg.serialLog, /^TG vsock .*ready=1$/m, exitPromise, 60_000);
        hostConnect = connectToGuest(uds, listen, bytes, seed);
      }
      const timer = setTimeout(() => void vm?.kill(), 120_000);
      const exit = await exitPromise.finally(() => clearTimeout(timer));
      const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;
      const text = readFileSync(cfg.serialLog, 'latin1');
      const tg = parseTg(text);

      const verdicts: Verdict[] = [];
      const judge = (what: string, f: () => string): void => {
        try {
          verdicts.push({ what, ok: true, detail: f() });
        } catch (e) {
          verdicts.push({ what, ok: false, detail: (e as Error).message.split('\n')[0] });
        }
      };
      judge('guest exit', () => expect(exitText(exit), 'guest-exit code 0'));
      judge('virtio-blk scratch disk read', () => {
        const want = crc32hex(scratchData);
        return `crc32 ${expect(one(tg, 'blk-read', { dev: '0' }).fields.crc32, want)} (1 MiB)`;
      });
      judge('virtio-blk scratch disk write + flush', () => {
        const want = Buffer.from(scratchData);
        pattern(seed, writeOff, writeLen).copy(want, writeOff);
        expect(crc32hex(readFileSync(scratch)), crc32hex(want));
        return `${writeLen / 1024} KiB seeded pattern found in the host file`;
      });
      for (const [i, path] of layers.entries()) {
        const want = await crcOfFile(path);
        judge(`image layer ${i + 1}/${layers.length} (read-only)`, () => {
          expect(one(tg, 'blk-read', { dev: String(i + 1) }).fields.crc32, want);
          expect(one(tg, 'blk-ro', { dev: String(i + 1) }).fields.write_status, '1');
          return `crc32 ${want} of ${humanBytes(statSync(path).size)}, write refused (IOERR)`;
        });
      }
      if (guestConnect && hostConnect) {
        // The VM has stopped: a stream the guest never opened would wait forever.
        const [g, h] = await Promise.allSettled([
          within(guestConnect.result, 10_000, 'the guest\'s connection to the host'),
          within(hostConnect, 10_000, 'the host\'s connection to the guest'),
        ]);
        judge('virtio-vsock guest → host connection', () => stream(g, one(tg, 'vsock-connect').fields, bytes));
        judge('virtio-vsock host → guest connection', () => stream(h, one(tg, 'vsock-listen').fields, bytes));
      }
      judge('guest summary', () => {
        if (!tg.done) throw new Error('the guest never printed TG DONE');
        return `${expect(String(tg.done.fail), '0')} failed of ${tg.done.pass + tg.done.fail}`;
      });

      for (const v of verdicts) out(`${v.ok ? 'ok  ' : 'FAIL'}  ${v.what}: ${v.detail}`);
      const stats = vm.stats();
      const exits = Object.entries(stats.exits).map(([k, n]) => `${k} ${n}`).join(', ');
      out(`microVM ran ${elapsedMs.toFixed(0)} ms; VM exits: ${exits}`);
      const failed = verdicts.filter((v) => !v.ok).length;
      if (failed > 0) {
        ctx.stderr.write(`vmlet check: ${failed} check(s) failed; serial log tail:\n${text.split('\n').slice(-20).join('\n')}\n`);
        return 1;
      }
      out('vmlet check: all checks passed');
      return 0;
    } finally {
      guestConnect?.server.close();
      if (vm) await vm.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  },
};

function expect(actual: string | undefined, want: string): string {
  if (actual !== want) throw new Error(`got ${actual ?? 'nothing'}, expected ${want}`);
  return actual;
}

function exitText(exit: VmExit): string {
  return exit.reason === 'guest-exit' ? `guest-exit code ${exit.code}` : `${exit.reason}${'message' in exit ? `: ${exit.message}` : ''}`;
}

function stream(r: PromiseSettledResult<StreamResult>, guest: Record<string, string>, bytes: number): string {
  if (r.status === 'rejected') throw new Error(`host end failed: ${(r.reason as Error).message}`);
  const h = r.value;
  if (h.received !== bytes || h.mismatches !== 0 || h.sent !== bytes) {
    throw new Error(`host sent ${h.sent}, received ${h.received} of ${bytes} with ${h.mismatches} bad bytes`);
  }
  if (Number(guest.recv) !== bytes || guest.mismatches !== '0') {
    throw new Error(`guest received ${guest.recv} of ${bytes} with ${guest.mismatches} bad bytes (${guest.error ?? 'no error'})`);
  }
  return `${humanBytes(bytes)} each way, byte-exact`;
}
