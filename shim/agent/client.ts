// The host's client of the guest agent: one home for `vmlet run`, the shim and
// the CRI server. One multiplexed connection per agent; see
// docs/agent-protocol.md for the bytes and the flow-control rules it obeys.
import { connect as netConnect, Socket } from 'node:net';
import { Readable, Writable } from 'node:stream';
import { constants as osConstants } from 'node:os';
import { randomBytes } from 'node:crypto';
import {
  AgentError,
  DEFAULT_VSOCK_PORT,
  EXEC_FLAG_TTY,
  EXEC_FLAG_USER,
  FrameHeader,
  FrameParser,
  IDENTITY_FLAG_CLOCK,
  IDENTITY_FLAG_HOSTNAME,
  INITIAL_WINDOW,
  MAX_HOSTNAME,
  MAX_IDENTITY_ENTROPY,
  MIN_IDENTITY_ENTROPY,
  MIN_PROTOCOL_VERSION,
  MAX_DATA_CHUNK,
  MAX_PAYLOAD,
  MsgType,
  PayloadReader,
  PayloadWriter,
  PROTOCOL_VERSION,
  RLIMIT,
  RlimitName,
  WIRE_ERROR_CODES,
  encodeFrame,
} from './protocol';

export { AgentError } from './protocol';
export type { AgentErrorCode } from './protocol';

export interface Rlimit {
  resource: RlimitName;
  soft: bigint;
  hard: bigint;
}

export interface ExecOptions {
  args: string[];
  /** KEY=VALUE entries; the process's whole environment (nothing is inherited). */
  env?: string[];
  /** Absolute; inside the rootfs when one is given. */
  cwd?: string;
  /** Name given to mountRootfs(); empty or absent runs in the agent's own root. */
  rootfs?: string;
  /** Set in a new UTS namespace of the process. */
  hostname?: string;
  uid?: number;
  gid?: number;
  /** Supplementary groups; absent means none. */
  groups?: number[];
  /**
   * `user`, `uid`, `user:group`, `uid:gid`, `user:gid` or `uid:group` (empty: the
   * default user, uid 0), resolved by the agent in the rootfs's /etc/passwd and
   * /etc/group as runc does: gid from passwd (0 when the uid has no entry),
   * supplementary groups from every group listing the user (none when a group
   * is given), HOME from passwd when env has none. Exclusive with uid, gid
   * and groups. Needs protocol version 3; an unknown name is UNKNOWN_USER.
   */
  user?: string;
  rlimits?: Rlimit[];
  /** A terminal instead of three pipes: stdout carries everything, stderr is empty. */
  tty?: { rows: number; cols: number };
}

export interface IdentityOptions {
  /** Bytes mixed into the guest's RNG and credited; default 64 from the host's CSPRNG. 32..512 bytes. */
  entropy?: Buffer;
  /**
   * Set the guest's CLOCK_REALTIME to the host's, read just before the frame
   * is written. Only a guest's PID-1 agent accepts it (UNSUPPORTED otherwise).
   */
  clock?: boolean;
  /** The guest's hostname (1..64 bytes); absent leaves it alone. */
  hostname?: string;
}

export interface IdentityResult {
  /** The guest's CLOCK_REALTIME (ns since the epoch) when the request arrived, before any step. */
  guestRealtimeBeforeNs: bigint;
  /** The host's CLOCK_REALTIME (ns) stamped into the request when clock was asked, else null. */
  hostRealtimeSentNs: bigint | null;
}

/** How a process ended: exactly one of code and signal is non-null. */
export interface ExitStatus {
  code: number | null;
  signal: number | null;
}

/** The shell's convention the CLI uses: the exit code, or 128 + the signal number. */
export function shellExitCode(s: ExitStatus): number {
  return s.code !== null ? s.code : 128 + (s.signal ?? 0);
}

export interface HelloInfo {
  version: number;
  maxPayload: number;
  maxChunk: number;
  initialWindow: number;
  /** The agent is PID 1 of a guest (not a host-side test instance). */
  initMode: boolean;
  agentVersion: string;
}

interface Reply {
  type: MsgType;
  payload: Buffer;
}

interface Pending {
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
  what: string;
}

function wireError(what: string, payload: Buffer): AgentError {
  const r = new PayloadReader(payload, 'ERROR');
  const code = r.u32('code');
  const message = r.str('message');
  const name = (WIRE_ERROR_CODES as Record<number, AgentError['code']>)[code];
  if (!name) return new AgentError('UNKNOWN_ERROR_CODE', `${what}: agent error code ${code}: ${message}`);
  return new AgentError(name, `${what}: ${message}`);
}

function signalNumber(sig: number | NodeJS.Signals): number {
  if (typeof sig === 'number') return sig;
  const n = (osConstants.signals as Record<string, number | undefined>)[sig];
  if (n === undefined) throw new AgentError('BAD_REQUEST', `unknown signal name '${sig}'`);
  return n;
}

export class AgentClient {
  private readonly parser = new FrameParser();
  private readonly pending = new Map<number, Pending>();
  private readonly processes = new Map<number, AgentProcess>();
  private nextId = 1;
  private closedError: AgentError | null = null;
  hello: HelloInfo | null = null;

  private constructor(private readonly socket: Socket) {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (e) => this.fail(new AgentError('CONNECTION_CLOSED', `agent connection failed: ${e.message}`)));
    socket.on('close', () => this.fail(new AgentError('CONNECTION_CLOSED', 'the agent closed the connection')));
  }

  /** Connects to an agent listening on a Unix socket (host-side agent, tests). */
  static async connectUnix(path: string): Promise<AgentClient> {
    const socket = await openSocket(path);
    return AgentClient.handshake(socket, Buffer.alloc(0));
  }

  /**
   * Connects through the VMM's hybrid vsock: the host end of the guest's
   * vsock is the Unix socket `udsPath`; `CONNECT <port>\n` asks it for a
   * stream to guest port `port`, answered `OK <hostport>\n`.
   */
  static async connectHybridVsock(udsPath: string, port = DEFAULT_VSOCK_PORT): Promise<AgentClient> {
    const socket = await openSocket(udsPath);
    const rest = await new Promise<Buffer>((resolve, reject) => {
      let buf = Buffer.alloc(0);
      const onData = (d: Buffer): void => {
        buf = Buffer.concat([buf, d]);
        const nl = buf.indexOf(0x0a);
        if (nl < 0) {
          if (buf.length > 64) done(new AgentError('VSOCK_CONNECT_FAILED', `no reply line from ${udsPath} after CONNECT ${port}`));
          return;
        }
        const line = buf.subarray(0, nl).toString('utf8');
        if (!/^OK \d+$/.test(line)) {
          done(new AgentError('VSOCK_CONNECT_FAILED', `CONNECT ${port} through ${udsPath} was answered '${line}': is the guest agent listening on vsock port ${port}?`));
          return;
        }
        done(null, buf.subarray(nl + 1));
      };
      const onEnd = (): void =>
        done(new AgentError('VSOCK_CONNECT_FAILED', `${udsPath} closed the connection after CONNECT ${port}: no listener on guest port ${port} (is the guest up?)`));
      const onError = (e: Error): void => done(new AgentError('VSOCK_CONNECT_FAILED', `CONNECT ${port} through ${udsPath}: ${e.message}`));
      const done = (err: AgentError | null, leftover?: Buffer): void => {
        socket.off('data', onData);
        socket.off('end', onEnd);
        socket.off('error', onError);
        if (err) {
          socket.destroy();
          reject(err);
        } else resolve(leftover ?? Buffer.alloc(0));
      };
      socket.on('data', onData);
      socket.on('end', onEnd);
      socket.on('error', onError);
      socket.write(`CONNECT ${port}\n`);
    });
    return AgentClient.handshake(socket, rest);
  }

  private static async handshake(socket: Socket, leftover: Buffer): Promise<AgentClient> {
    const client = new AgentClient(socket);
    if (leftover.length > 0) client.onData(leftover);
    const payload = new PayloadWriter().u32(MIN_PROTOCOL_VERSION).u32(PROTOCOL_VERSION).str('vmlet-host').build();
    const reply = await client.request(MsgType.Hello, payload, 'HELLO', [MsgType.HelloOk]);
    const r = new PayloadReader(reply.payload, 'HELLO_OK');
    client.hello = {
      version: r.u32('version'),
      maxPayload: r.u32('max_payload'),
      maxChunk: r.u32('max_chunk'),
      initialWindow: r.u32('initial_window'),
      initMode: r.u32('flags') === 1,
      agentVersion: r.str('agent_version'),
    };
    return client;
  }

  /** Round trip with nothing else: proves the agent is serving. */
  async ping(): Promise<void> {
    await this.request(MsgType.Ping, Buffer.alloc(0), 'PING', [MsgType.Pong]);
  }

  /** Sets the guest's clock (the agent refuses this when it is not PID 1 of a guest). */
  async setClock(now: Date = new Date()): Promise<void> {
    const ms = BigInt(now.getTime());
    const payload = new PayloadWriter().u64(ms / 1000n).u32(Number(ms % 1000n) * 1_000_000).build();
    await this.request(MsgType.SetClock, payload, 'SET_CLOCK', [MsgType.Ok]);
  }

  /**
   * Gives the guest a fresh identity (protocol version 2): entropy credited to
   * its RNG and the CRNG reseeded at once, then optionally the wall clock and
   * the hostname. A guest restored from a template needs this before anything
   * else runs in it: its siblings share its RNG state, clock and name.
   */
  async setIdentity(opts: IdentityOptions = {}): Promise<IdentityResult> {
    const version = this.hello?.version ?? 0;
    if (version < 2)
      throw new AgentError('UNSUPPORTED', `SET_IDENTITY needs protocol version 2; this agent (${this.hello?.agentVersion ?? 'unknown'}) agreed on version ${version}: rebuild the guest's agent`);
    const entropy = opts.entropy ?? randomBytes(64);
    if (entropy.length < MIN_IDENTITY_ENTROPY || entropy.length > MAX_IDENTITY_ENTROPY)
      throw new AgentError('BAD_REQUEST', `setIdentity entropy is ${entropy.length} bytes; give ${MIN_IDENTITY_ENTROPY}..${MAX_IDENTITY_ENTROPY}`);
    let flags = 0;
    if (opts.clock) flags |= IDENTITY_FLAG_CLOCK;
    if (opts.hostname !== undefined) {
      const n = Buffer.byteLength(opts.hostname, 'utf8');
      if (n < 1 || n > MAX_HOSTNAME) throw new AgentError('BAD_REQUEST', `setIdentity hostname '${opts.hostname}' is ${n} bytes; it must be 1..${MAX_HOSTNAME}`);
      flags |= IDENTITY_FLAG_HOSTNAME;
    }
    const payload = new PayloadWriter()
      .u32(flags)
      .u64(0n)
      .str(opts.hostname ?? '')
      .raw(entropy)
      .build();
    let sent: bigint | null = null;
    const reply = await this.request(MsgType.SetIdentity, payload, 'SET_IDENTITY', [MsgType.Ok], () => {
      // Stamped at the last moment before the write: every microsecond between
      // reading the host clock and the agent's clock_settime is guest error.
      if (!opts.clock) return;
      sent = realtimeNs();
      payload.writeBigUInt64LE(sent, 4);
    });
    return { guestRealtimeBeforeNs: new PayloadReader(reply.payload, 'OK').i64('realtime_before'), hostRealtimeSentNs: sent };
  }

  /**
   * Stacks layer images (lowest first: block devices in a guest, squashfs
   * files on a host) under overlayfs with a tmpfs upper layer. Returns the
   * merged directory's path as the agent sees it.
   */
  async mountRootfs(name: string, layers: string[], upper = 'tmpfs'): Promise<string> {
    const payload = new PayloadWriter().str(name).strList(layers).str(upper).build();
    const reply = await this.request(MsgType.MountRootfs, payload, `MOUNT_ROOTFS ${name}`, [MsgType.Ok]);
    return new PayloadReader(reply.payload, 'OK').str('path');
  }

  async exec(opts: ExecOptions): Promise<AgentProcess> {
    const u32 = (v: number, field: string): void => {
      if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new AgentError('BAD_REQUEST', `exec ${field} ${v} is not an integer in 0..4294967295`);
    };
    const u16 = (v: number, field: string): void => {
      if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new AgentError('BAD_REQUEST', `exec ${field} ${v} is not an integer in 0..65535`);
    };
    if (opts.user !== undefined) {
      const version = this.hello?.version ?? 0;
      if (version < 3)
        throw new AgentError('UNSUPPORTED', `exec user '${opts.user}' is resolved by the agent from protocol version 3; this agent (${this.hello?.agentVersion ?? 'unknown'}) agreed on version ${version}: rebuild the guest's agent, or give a numeric uid and gid`);
      if (opts.uid !== undefined || opts.gid !== undefined || opts.groups !== undefined)
        throw new AgentError('BAD_REQUEST', `exec user '${opts.user}' decides uid, gid and groups: do not give them too`);
    }
    u32(opts.uid ?? 0, 'uid');
    u32(opts.gid ?? 0, 'gid');
    (opts.groups ?? []).forEach((g) => u32(g, 'group'));
    if (opts.tty) {
      u16(opts.tty.rows, 'tty rows');
      u16(opts.tty.cols, 'tty cols');
    }
    for (const l of opts.rlimits ?? []) {
      if (!(l.resource in RLIMIT)) throw new AgentError('BAD_REQUEST', `exec rlimit '${String(l.resource)}' is not one of ${Object.keys(RLIMIT).join(', ')}`);
      for (const v of [l.soft, l.hard])
        if (v < 0n || v > 0xffffffffffffffffn) throw new AgentError('BAD_REQUEST', `exec rlimit ${l.resource} value ${v} is outside 0..2^64-1`);
    }
    const w = new PayloadWriter()
      .u32((opts.tty ? EXEC_FLAG_TTY : 0) | (opts.user !== undefined ? EXEC_FLAG_USER : 0))
      .strList(opts.args)
      .strList(opts.env ?? [])
      .str(opts.cwd ?? '')
      .str(opts.rootfs ?? '')
      .str(opts.hostname ?? '')
      .u32(opts.uid ?? 0)
      .u32(opts.gid ?? 0);
    const groups = opts.groups ?? [];
    w.u32(groups.length);
    for (const g of groups) w.u32(g);
    const rlimits = opts.rlimits ?? [];
    w.u32(rlimits.length);
    for (const l of rlimits) w.u32(RLIMIT[l.resource]).u64(l.soft).u64(l.hard);
    w.u16(opts.tty?.rows ?? 0).u16(opts.tty?.cols ?? 0);
    if (opts.user !== undefined) w.str(opts.user);
    const id = this.allocId();
    // The process must exist before STARTED arrives: OUTPUT may follow it in
    // the same read.
    const proc = new AgentProcess(this, id, opts.tty !== undefined);
    this.processes.set(id, proc);
    try {
      const reply = await this.requestWithId(id, MsgType.Exec, w.build(), `EXEC ${JSON.stringify(opts.args[0] ?? '')}`, [MsgType.Started]);
      proc.pid = new PayloadReader(reply.payload, 'STARTED').u32('pid');
      return proc;
    } catch (e) {
      this.processes.delete(id);
      proc.abort(e as Error);
      throw e;
    }
  }

  /** Writes raw bytes to the agent: for protocol tests that must send what this client never would. */
  sendRaw(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /**
   * Sends one frame with the given header fields and waits for the reply
   * carrying its id (for hostile-frame tests and future message types).
   */
  rawRequest(type: number, payload: Buffer, opts: { id?: number; flags?: number; length?: number } = {}): Promise<{ type: number; payload: Buffer; error?: AgentError }> {
    const id = opts.id ?? this.allocId();
    return new Promise((resolve, reject) => {
      if (this.closedError) return reject(this.closedError);
      this.pending.set(id, {
        resolve: (r) => resolve({ type: r.type, payload: r.payload }),
        reject: (e) => (e instanceof AgentError && e.code !== 'CONNECTION_CLOSED' ? resolve({ type: MsgType.Error, payload: Buffer.alloc(0), error: e }) : reject(e)),
        what: `raw frame type 0x${type.toString(16)}`,
      });
      const frame = encodeFrame(type, id, payload, opts.flags ?? 0);
      if (opts.length !== undefined) frame.writeUInt32LE(opts.length >>> 0, 0);
      this.socket.write(frame);
    });
  }

  allocId(): number {
    const id = this.nextId;
    this.nextId = this.nextId >= 0xfffffffe ? 1 : this.nextId + 1;
    return id;
  }

  close(): void {
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** @internal used by AgentProcess */
  send(type: MsgType, id: number, payload?: Buffer): void {
    if (this.closedError) return;
    this.socket.write(encodeFrame(type, id, payload));
  }

  /** @internal beforeWrite may patch the payload in place just before it is framed. */
  request(type: MsgType, payload: Buffer, what: string, expect: MsgType[], beforeWrite?: () => void): Promise<Reply> {
    return this.requestWithId(this.allocId(), type, payload, what, expect, beforeWrite);
  }

  private requestWithId(id: number, type: MsgType, payload: Buffer, what: string, expect: MsgType[], beforeWrite?: () => void): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      if (this.closedError) return reject(this.closedError);
      if (payload.length > MAX_PAYLOAD)
        return reject(new AgentError('FRAME_TOO_LARGE', `${what}: the request is ${payload.length} bytes, above the ${MAX_PAYLOAD}-byte frame limit (shorten args/env)`));
      this.pending.set(id, {
        resolve: (r) => {
          if (expect.includes(r.type)) resolve(r);
          else reject(new AgentError('PROTOCOL', `${what}: unexpected reply type 0x${r.type.toString(16)}`));
        },
        reject,
        what,
      });
      beforeWrite?.();
      this.socket.write(encodeFrame(type, id, payload));
    });
  }

  private onData(d: Buffer): void {
    let frames: { header: FrameHeader; payload: Buffer }[];
    try {
      frames = this.parser.push(d);
    } catch (e) {
      this.fail(e as AgentError);
      this.socket.destroy();
      return;
    }
    for (const f of frames) this.dispatch(f.header, f.payload);
  }

  private dispatch(h: FrameHeader, payload: Buffer): void {
    try {
      switch (h.type as MsgType) {
        case MsgType.Output:
        case MsgType.OutputEof:
        case MsgType.Exit:
        case MsgType.StdinWindow: {
          const proc = this.processes.get(h.id);
          if (!proc) throw new AgentError('PROTOCOL', `agent sent type 0x${h.type.toString(16)} for unknown process ${h.id}`);
          proc.onFrame(h.type as MsgType, payload);
          if (h.type === MsgType.Exit) this.processes.delete(h.id);
          return;
        }
        case MsgType.HelloOk:
        case MsgType.Ok:
        case MsgType.Pong:
        case MsgType.Started:
        case MsgType.Error: {
          const p = this.pending.get(h.id);
          if (!p) {
            // An ERROR about a stream message (STDIN, OUTPUT_WINDOW) names the process.
            const proc = this.processes.get(h.id);
            if (h.type === MsgType.Error && proc) {
              proc.onStreamError(wireError(`process ${h.id}`, payload));
              return;
            }
            if (h.type === MsgType.Error) return; // about a process whose EXIT we already have
            throw new AgentError('PROTOCOL', `agent replied (type 0x${h.type.toString(16)}) to id ${h.id}, which has no request`);
          }
          this.pending.delete(h.id);
          if (h.type === MsgType.Error) p.reject(wireError(p.what, payload));
          else p.resolve({ type: h.type as MsgType, payload });
          return;
        }
        default:
          throw new AgentError('PROTOCOL', `agent sent unknown message type 0x${h.type.toString(16)}`);
      }
    } catch (e) {
      this.fail(e instanceof AgentError ? e : new AgentError('PROTOCOL', String(e)));
      this.socket.destroy();
    }
  }

  private fail(err: AgentError): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const proc of this.processes.values()) proc.abort(err);
    this.processes.clear();
  }
}

/**
 * The host's CLOCK_REALTIME in ns, to the millisecond. performance.timeOrigin
 * + now() would give microseconds but is anchored at process start and does
 * not follow the host clock when NTP steps it; a millisecond is far inside
 * what a guest's clock needs.
 */
function realtimeNs(): bigint {
  return BigInt(Date.now()) * 1_000_000n;
}

function openSocket(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = netConnect(path);
    s.once('connect', () => {
      s.off('error', onError);
      resolve(s);
    });
    const onError = (e: Error): void => reject(new AgentError('CONNECTION_CLOSED', `cannot connect to the agent at ${path}: ${e.message}`));
    s.once('error', onError);
  });
}

/** Grant output credit back in batches: one OUTPUT_WINDOW per quarter window, not per chunk. */
const GRANT_BATCH = INITIAL_WINDOW / 4;

class OutputStream extends Readable {
  private ungranted = 0;
  private paused = false;
  constructor(
    private readonly grant: (n: number) => void,
  ) {
    super({ highWaterMark: INITIAL_WINDOW });
  }
  override _read(): void {
    if (this.paused) {
      this.paused = false;
      this.flushGrant(true);
    }
  }
  deliver(data: Buffer): void {
    this.ungranted += data.length;
    // Credit is returned only for bytes the consumer has room for: a slow
    // reader stops the agent reading the process's pipe, and the process blocks.
    if (this.push(data)) this.flushGrant(false);
    else this.paused = true;
  }
  private flushGrant(force: boolean): void {
    if (this.ungranted > 0 && (force || this.ungranted >= GRANT_BATCH)) {
      this.grant(this.ungranted);
      this.ungranted = 0;
    }
  }
}

class StdinStream extends Writable {
  private credit = INITIAL_WINDOW;
  private queue: { data: Buffer; cb: (e?: Error | null) => void }[] = [];
  private finalCb: ((e?: Error | null) => void) | null = null;
  private dead = false;
  constructor(private readonly proc: AgentProcess) {
    super({ highWaterMark: MAX_DATA_CHUNK * 2 });
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    if (this.dead) return cb();
    this.queue.push({ data: chunk, cb });
    this.pump();
  }
  override _final(cb: (e?: Error | null) => void): void {
    if (this.dead) return cb();
    this.finalCb = cb;
    this.pump();
  }
  addCredit(n: number): void {
    this.credit += n;
    this.pump();
  }
  /** The process is gone: complete every pending write, the bytes have no reader. */
  drop(): void {
    this.dead = true;
    for (const q of this.queue) q.cb();
    this.queue = [];
    if (this.finalCb) {
      const cb = this.finalCb;
      this.finalCb = null;
      cb();
    }
  }
  private pump(): void {
    while (this.queue.length > 0 && this.credit > 0) {
      const head = this.queue[0];
      const n = Math.min(head.data.length, this.credit, MAX_DATA_CHUNK);
      this.proc.sendStdin(head.data.subarray(0, n));
      this.credit -= n;
      if (n === head.data.length) {
        this.queue.shift();
        head.cb();
      } else head.data = head.data.subarray(n);
    }
    if (this.queue.length === 0 && this.finalCb) {
      const cb = this.finalCb;
      this.finalCb = null;
      this.proc.sendStdinEof();
      cb();
    }
  }
}

/** A process the agent started. Streams are Node streams with end-to-end flow control. */
export class AgentProcess {
  pid = 0;
  readonly stdin: Writable;
  readonly stdout: Readable;
  readonly stderr: Readable;
  private readonly stdinImpl: StdinStream;
  private readonly outs: [OutputStream, OutputStream];
  private readonly exited: Promise<ExitStatus>;
  private resolveExit!: (s: ExitStatus) => void;
  private rejectExit!: (e: Error) => void;
  private finished = false;

  constructor(
    private readonly client: AgentClient,
    readonly id: number,
    readonly tty: boolean,
  ) {
    const grant = (stream: number) => (n: number) =>
      this.finished || this.client.send(MsgType.OutputWindow, this.id, new PayloadWriter().u8(stream).u32(n).build());
    this.outs = [new OutputStream(grant(1)), new OutputStream(grant(2))];
    this.stdout = this.outs[0];
    this.stderr = this.outs[1];
    // A terminal has one output stream; stderr is empty from the start.
    if (tty) this.outs[1].push(null);
    this.stdinImpl = new StdinStream(this);
    this.stdin = this.stdinImpl;
    this.exited = new Promise<ExitStatus>((resolve, reject) => {
      this.resolveExit = resolve;
      this.rejectExit = reject;
    });
    // wait() may never be called (e.g. on a failed EXEC): no unhandled rejection.
    this.exited.catch(() => undefined);
  }

  /**
   * Resolves once the process has exited and all of its output has arrived
   * at this client (the agent sends EXIT after both streams' EOF). As with
   * child_process's 'exit', a consumer attached late may not have *read* it
   * yet: await the streams' 'end' too when the output matters.
   */
  wait(): Promise<ExitStatus> {
    return this.exited;
  }

  async signal(sig: number | NodeJS.Signals): Promise<void> {
    const payload = new PayloadWriter().u32(this.id).u32(signalNumber(sig)).build();
    await this.client.request(MsgType.Signal, payload, `SIGNAL ${String(sig)} to process ${this.id}`, [MsgType.Ok]);
  }

  /** Sets the terminal's size; the process gets SIGWINCH from the kernel. */
  async resize(rows: number, cols: number): Promise<void> {
    for (const [v, name] of [[rows, 'rows'], [cols, 'cols']] as const)
      if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new AgentError('BAD_REQUEST', `resize ${name} ${v} is not an integer in 0..65535`);
    const payload = new PayloadWriter().u32(this.id).u16(rows).u16(cols).build();
    await this.client.request(MsgType.Resize, payload, `RESIZE process ${this.id}`, [MsgType.Ok]);
  }

  /** @internal */
  sendStdin(data: Buffer): void {
    this.client.send(MsgType.Stdin, this.id, data);
  }

  /** @internal */
  sendStdinEof(): void {
    this.client.send(MsgType.StdinEof, this.id);
  }

  /** @internal */
  onFrame(type: MsgType, payload: Buffer): void {
    switch (type) {
      case MsgType.Output: {
        const stream = payload.readUInt8(0);
        if (stream !== 1 && stream !== 2) throw new AgentError('PROTOCOL', `OUTPUT for stream ${stream}`);
        this.outs[stream - 1].deliver(payload.subarray(1));
        return;
      }
      case MsgType.OutputEof: {
        const stream = payload.readUInt8(0);
        if (stream !== 1 && stream !== 2) throw new AgentError('PROTOCOL', `OUTPUT_EOF for stream ${stream}`);
        this.outs[stream - 1].push(null);
        return;
      }
      case MsgType.StdinWindow:
        this.stdinImpl.addCredit(new PayloadReader(payload, 'STDIN_WINDOW').u32('credit'));
        return;
      case MsgType.Exit: {
        const r = new PayloadReader(payload, 'EXIT');
        const code = r.i32('code');
        const signal = r.u32('signal');
        this.finished = true;
        this.stdinImpl.drop();
        this.resolveExit(signal !== 0 ? { code: null, signal } : { code, signal: null });
        return;
      }
      default:
        throw new AgentError('PROTOCOL', `unexpected type 0x${type.toString(16)} for a process`);
    }
  }

  /**
   * ERROR replies to this process's stream messages (STDIN, OUTPUT_WINDOW).
   * This client never provokes one; they are kept for diagnosis rather than
   * emitted as stream 'error' events nobody may be listening for.
   */
  readonly streamErrors: AgentError[] = [];

  /** @internal */
  onStreamError(e: AgentError): void {
    this.streamErrors.push(e);
  }

  /** @internal the connection is gone or EXEC failed: wait() rejects with the reason. */
  abort(e: Error): void {
    if (this.finished) return;
    this.finished = true;
    this.stdinImpl.drop();
    for (const o of this.outs) if (!o.readableEnded) o.destroy();
    this.rejectExit(e);
  }
}
