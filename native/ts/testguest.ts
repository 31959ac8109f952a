// The test guest (native/testguest) from the host side: where its binary is,
// its output protocol ("TG <check> key=value ..." lines, see
// native/testguest/README.md), the seeded byte pattern it writes and expects,
// and the host ends of its vsock streams. Used by `vmlet check`, the testguest
// tests and hack/bench/vmm.bench.ts; nothing here talks to a VMM.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { crc32 as zlibCrc32 } from 'node:zlib';
import { createConnection, createServer, Server, Socket } from 'node:net';
import { join } from 'node:path';
import { repoRoot } from './repo-root';

export { repoRoot };

export const testguestElf = join(repoRoot(), 'native', 'testguest', 'build', 'testguest.elf');

/** Throws with the fix when the guest binary has not been built. */
export function requireTestguest(): string {
  if (!existsSync(testguestElf)) throw new Error(`${testguestElf} is missing: run npm run build:testguest (make -C native/testguest)`);
  return testguestElf;
}

export interface TgLine {
  check: string;
  fields: Record<string, string>;
  raw: string;
}

export interface TgOutput {
  lines: TgLine[];
  /** From the closing `TG DONE pass=<n> fail=<n>`; undefined if the guest never got there. */
  done?: { pass: number; fail: number };
  /** Every line that is not protocol output (should be none besides the leading boot byte). */
  other: string[];
}

/** Parses the guest's serial output. Lines not starting with "TG " are kept in `other`. */
export function parseTg(text: string): TgOutput {
  const out: TgOutput = { lines: [], other: [] };
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (line === '') continue;
    if (!line.startsWith('TG ')) {
      out.other.push(line);
      continue;
    }
    const [, check, ...rest] = line.split(' ');
    const fields: Record<string, string> = {};
    for (const kv of rest) {
      const eq = kv.indexOf('=');
      if (eq > 0) fields[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
    out.lines.push({ check, fields, raw: line });
    if (check === 'DONE') out.done = { pass: Number(fields.pass), fail: Number(fields.fail) };
  }
  return out;
}

/** The lines of one check, e.g. all(out, 'blk-read'). */
export function all(out: TgOutput, check: string): TgLine[] {
  return out.lines.filter((l) => l.check === check);
}

/** The single line of a check, with a message listing what the guest printed if it is missing. */
export function one(out: TgOutput, check: string, where: Record<string, string> = {}): TgLine {
  const found = all(out, check).filter((l) => Object.entries(where).every(([k, v]) => l.fields[k] === v));
  if (found.length !== 1) {
    throw new Error(`expected one "TG ${check}" line matching ${JSON.stringify(where)}, found ${found.length}; guest output:\n` +
      out.lines.map((l) => l.raw).concat(out.other).join('\n'));
  }
  return found[0];
}

/** CRC-32 (IEEE 802.3) as the guest prints it: 8 lower-case hex digits. */
export function crc32hex(data: Uint8Array, prev?: number): string {
  return crc32(data, prev).toString(16).padStart(8, '0');
}

export function crc32(data: Uint8Array, prev = 0): number {
  return zlibCrc32(data, prev) >>> 0;
}

/**
 * The guest's seeded pattern (README "Pattern"): little-endian 32-bit words,
 * word i = fmix32(seed + i * 0x9E3779B1), addressable at any byte offset.
 */
export function pattern(seed: number, offset: number, length: number): Buffer {
  const first = Math.floor(offset / 4);
  const words = Math.ceil((offset + length) / 4) - first;
  const buf = Buffer.allocUnsafe(words * 4);
  for (let k = 0; k < words; k++) {
    let h = (seed + Math.imul(first + k, 0x9e3779b1)) >>> 0;
    h ^= h >>> 16;
    h = Math.imul(h, 0x85ebca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35);
    h ^= h >>> 16;
    buf.writeUInt32LE(h >>> 0, k * 4);
  }
  return buf.subarray(offset - first * 4, offset - first * 4 + length);
}

/** Writes a file of random bytes and returns its content. */
export function randomDisk(path: string, bytes: number): Buffer {
  const data = randomBytes(bytes);
  writeFileSync(path, data);
  return data;
}

/** Stream seeds per direction, as the guest derives them from tg.seed (README "vsock"). */
export const vsockSeeds = (seed: number) => ({
  guestConnectSends: (seed + 1) >>> 0,
  hostAnswersConnect: (seed + 2) >>> 0,
  guestListenSends: (seed + 3) >>> 0,
  hostSendsToListener: (seed + 4) >>> 0,
  benchGuestSends: (seed + 5) >>> 0,
});

export interface StreamResult {
  received: number;
  /** Bytes that differ from the expected pattern. */
  mismatches: number;
  firstMismatch?: number;
  receivedCrc: string;
  sent: number;
  sentCrc: string;
}

/**
 * Runs one side of the guest's exchange on a connected socket: sends `bytes`
 * of pattern(sendSeed) (honouring backpressure) while checking that what
 * arrives is exactly `bytes` of pattern(recvSeed), then ends the socket.
 * `initial` is data already read past a handshake.
 */
export function exchange(sock: Socket, bytes: number, sendSeed: number, recvSeed: number, initial?: Buffer): Promise<StreamResult> {
  return new Promise((resolve, reject) => {
    const r: StreamResult = { received: 0, mismatches: 0, receivedCrc: '', sent: 0, sentCrc: '' };
    let rcrc = 0, scrc = 0, sendDone = bytes === 0, recvDone = bytes === 0, finished = false;
    const finish = (err?: Error): void => {
      if (finished) return;
      if (err) {
        finished = true;
        sock.destroy();
        reject(err);
        return;
      }
      if (!sendDone || !recvDone) return;
      finished = true;
      r.receivedCrc = rcrc.toString(16).padStart(8, '0');
      r.sentCrc = scrc.toString(16).padStart(8, '0');
      sock.end();
      resolve(r);
    };
    const onData = (chunk: Buffer): void => {
      const want = pattern(recvSeed, r.received, Math.min(chunk.length, Math.max(0, bytes - r.received)));
      for (let i = 0; i < chunk.length; i++) {
        if (i >= want.length || chunk[i] !== want[i]) {
          if (r.firstMismatch === undefined) r.firstMismatch = r.received + i;
          r.mismatches++;
        }
      }
      rcrc = crc32(chunk, rcrc);
      r.received += chunk.length;
      if (r.received >= bytes) {
        recvDone = true;
        finish();
      }
    };
    const pump = (): void => {
      while (r.sent < bytes) {
        const n = Math.min(64 << 10, bytes - r.sent);
        const chunk = pattern(sendSeed, r.sent, n);
        scrc = crc32(chunk, scrc);
        r.sent += n;
        if (!sock.write(chunk)) {
          sock.once('drain', pump);
          return;
        }
      }
      sendDone = true;
      finish();
    };
    sock.on('data', onData);
    sock.on('error', (e) => finish(e));
    sock.on('close', () => {
      if (!finished) finish(new Error(`vsock peer closed after ${r.received}/${bytes} bytes received, ${r.sent}/${bytes} sent`));
    });
    if (initial && initial.length) onData(initial);
    pump();
  });
}

/**
 * Host end of the guest-initiated connection: the VMM forwards a guest
 * connect to port P to the Unix socket `<udsPath>_<P>` (DESIGN.md "Guest <-> host").
 */
export function serveGuestConnect(udsPath: string, port: number, bytes: number, seed: number): { server: Server; result: Promise<StreamResult> } {
  const s = vsockSeeds(seed);
  let server!: Server;
  const result = new Promise<StreamResult>((resolve, reject) => {
    server = createServer((sock) => {
      server.close();
      exchange(sock, bytes, s.hostAnswersConnect, s.guestConnectSends).then(resolve, reject);
    });
    server.on('error', reject);
    server.listen(`${udsPath}_${port}`);
  });
  // A caller that fails before awaiting must not crash the run with an unhandled rejection.
  result.catch(() => undefined);
  return { server, result };
}

/** What the host end of a one-way guest stream (tg.mode=bench-vsock) has received so far. */
export interface GuestStreamSink {
  server: Server;
  /** Bytes received so far (live). */
  received(): number;
  /** Resolves when the guest closes the stream: the byte count and the CRC-32 the guest prints as sent_crc32. */
  done: Promise<{ bytes: number; crc: string }>;
}

/**
 * Accepts the guest's bench-vsock connection on `<udsPath>_<port>` (our VMM's
 * hybrid vsock) and counts and checksums what arrives until the guest closes.
 */
export function receiveGuestStream(udsPath: string, port: number): GuestStreamSink {
  let bytes = 0;
  let crc = 0;
  let server!: Server;
  const done = new Promise<{ bytes: number; crc: string }>((resolve, reject) => {
    server = createServer((sock) => {
      server.close();
      sock.on('data', (d: Buffer) => {
        bytes += d.length;
        crc = crc32(d, crc);
      });
      sock.once('error', reject);
      sock.once('end', () => {
        sock.end();
        resolve({ bytes, crc: crc.toString(16).padStart(8, '0') });
      });
    });
    server.on('error', reject);
    server.listen(`${udsPath}_${port}`);
  });
  done.catch(() => undefined);
  return { server, received: () => bytes, done };
}

/** Host-initiated connection: `CONNECT <port>\n` on `<udsPath>`, answered by `OK <hostport>\n`. */
export function connectToGuest(udsPath: string, port: number, bytes: number, seed: number): Promise<StreamResult> {
  const s = vsockSeeds(seed);
  const result = new Promise<StreamResult>((resolve, reject) => {
    const sock = createConnection(udsPath);
    let head = Buffer.alloc(0);
    const onHead = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk]);
      const nl = head.indexOf(0x0a);
      if (nl < 0) {
        if (head.length > 64) reject(new Error(`bad vsock handshake reply ${JSON.stringify(head.toString('latin1'))}`));
        return;
      }
      sock.off('data', onHead);
      const line = head.subarray(0, nl).toString('latin1');
      if (!/^OK \d+$/.test(line)) {
        sock.destroy();
        reject(new Error(`vsock CONNECT ${port} answered ${JSON.stringify(line)}, expected "OK <port>"`));
        return;
      }
      exchange(sock, bytes, s.hostSendsToListener, s.guestListenSends, head.subarray(nl + 1)).then(resolve, reject);
    };
    sock.on('data', onHead);
    sock.once('error', reject);
    sock.once('connect', () => sock.write(`CONNECT ${port}\n`));
  });
  result.catch(() => undefined);
  return result;
}

/** QEMU's isa-debug-exit turns a guest write of v into exit status (v << 1) | 1. */
export function qemuDebugExitCode(status: number | null): number | undefined {
  return status !== null && status % 2 === 1 ? (status - 1) / 2 : undefined;
}

/** The QEMU microvm command line that boots the test guest (the peer VMM in tests and benchmarks). */
export function qemuMicrovmArgs(opts: {
  accel: 'tcg' | 'kvm';
  cmdline: string;
  memoryMiB?: number;
  disks?: { path: string; readOnly?: boolean; id?: string }[];
  /** A vhost-vsock device with this guest CID (needs /dev/vhost-vsock; unique among the host's running guests). */
  vsockCid?: number;
}): string[] {
  const args = [
    // acpi=off: microvm then announces its virtio-mmio devices on the command
    // line (virtio_mmio.device=...), which is how the test guest finds them.
    '-M', 'microvm,isa-serial=on,acpi=off',
    ...(opts.accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host,-arch-capabilities'] : ['-accel', 'tcg', '-cpu', 'max']),
    '-m', String(opts.memoryMiB ?? 256),
    '-nodefaults', '-no-user-config', '-nographic', '-no-reboot',
    '-serial', 'stdio',
    '-kernel', requireTestguest(),
    '-append', opts.cmdline,
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=4',
    '-global', 'virtio-mmio.force-legacy=false',
  ];
  (opts.disks ?? []).forEach((d, i) => {
    args.push('-drive', `id=d${i},file=${d.path},format=raw,if=none,cache=writeback${d.readOnly ? ',readonly=on' : ''}`);
    args.push('-device', `virtio-blk-device,drive=d${i}${d.id ? `,serial=${d.id}` : ''}`);
  });
  if (opts.vsockCid !== undefined) args.push('-device', `vhost-vsock-device,guest-cid=${opts.vsockCid}`);
  return args;
}

/**
 * Polls the serial log (a file the VMM appends to) until a line matches: the
 * guest announces readiness there. Fails at once if the VM stops first.
 */
export async function waitForSerialLine(path: string, re: RegExp, stopped: Promise<unknown>, timeoutMs: number): Promise<void> {
  let exited = false;
  stopped.then(() => (exited = true), () => (exited = true));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = existsSync(path) ? readFileSync(path, 'latin1') : '';
    if (re.test(text)) return;
    if (exited) throw new Error(`the VM exited before printing ${re}; serial:\n${text}`);
    if (Date.now() > deadline) throw new Error(`no ${re} on the serial log after ${timeoutMs} ms; serial:\n${text}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Rejects with `what` after ms: a host stream the guest never opened must fail, not hang. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
