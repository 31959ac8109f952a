// The vmlet agent protocol, host side: constants and the payload codec.
// docs/agent-protocol.md is the specification; native/guest/protocol.h is the
// agent's implementation of the same bytes.

/** The highest version this host speaks; it still accepts agents that speak only MIN_PROTOCOL_VERSION. */
export const PROTOCOL_VERSION = 3;
export const MIN_PROTOCOL_VERSION = 1;
export const HEADER_SIZE = 12;
export const MAX_PAYLOAD = 1 << 20;
export const MAX_DATA_CHUNK = 32 * 1024;
export const INITIAL_WINDOW = 256 * 1024;
export const DEFAULT_VSOCK_PORT = 1024;

export enum MsgType {
  Hello = 0x01,
  Ping = 0x02,
  SetClock = 0x03,
  MountRootfs = 0x04,
  Exec = 0x05,
  Stdin = 0x06,
  StdinEof = 0x07,
  Signal = 0x08,
  Resize = 0x09,
  OutputWindow = 0x0a,
  /** Version 2. */
  SetIdentity = 0x0b,
  HelloOk = 0x81,
  Ok = 0x82,
  Error = 0x83,
  Pong = 0x84,
  Started = 0x85,
  Output = 0x86,
  OutputEof = 0x87,
  Exit = 0x88,
  StdinWindow = 0x89,
}

/** Error codes the agent sends in ERROR replies (wire values). */
export const WIRE_ERROR_CODES = {
  1: 'BAD_FRAME',
  2: 'FRAME_TOO_LARGE',
  3: 'UNKNOWN_TYPE',
  4: 'INVALID_UTF8',
  5: 'NO_HELLO',
  6: 'VERSION_UNSUPPORTED',
  7: 'BAD_REQUEST',
  8: 'NO_SUCH_PROCESS',
  9: 'EXEC_FAILED',
  10: 'MOUNT_FAILED',
  11: 'FLOW_CONTROL',
  12: 'UNSUPPORTED',
  13: 'INTERNAL',
  14: 'IDENTITY_FAILED',
  15: 'UNKNOWN_USER',
} as const;

export type WireErrorCode = (typeof WIRE_ERROR_CODES)[keyof typeof WIRE_ERROR_CODES];
/** Codes raised by the client itself (transport and protocol violations by the agent). */
export type ClientErrorCode = 'CONNECTION_CLOSED' | 'PROTOCOL' | 'VSOCK_CONNECT_FAILED' | 'UNKNOWN_ERROR_CODE';
export type AgentErrorCode = WireErrorCode | ClientErrorCode;

export class AgentError extends Error {
  override readonly name = 'AgentError';
  constructor(
    readonly code: AgentErrorCode,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

export const EXEC_FLAG_TTY = 1;
/** Version 3: EXEC ends with `str user` (user[:group]), resolved by the agent in the process's rootfs. */
export const EXEC_FLAG_USER = 2;
/** The agent refuses longer user strings (BAD_REQUEST); names are at most 32 bytes on Linux. */
export const MAX_USER_SPEC = 256;

/** SET_IDENTITY flags: which optional parts the request carries (entropy is always applied). */
export const IDENTITY_FLAG_CLOCK = 1;
export const IDENTITY_FLAG_HOSTNAME = 2;
export const MIN_IDENTITY_ENTROPY = 32;
export const MAX_IDENTITY_ENTROPY = 512;
export const MAX_HOSTNAME = 64;

export interface FrameHeader {
  length: number;
  type: number;
  flags: number;
  id: number;
}

export function encodeFrame(type: number, id: number, payload: Buffer = Buffer.alloc(0), flags = 0): Buffer {
  const out = Buffer.allocUnsafe(HEADER_SIZE + payload.length);
  out.writeUInt32LE(payload.length, 0);
  out.writeUInt16LE(type, 4);
  out.writeUInt16LE(flags, 6);
  out.writeUInt32LE(id >>> 0, 8);
  payload.copy(out, HEADER_SIZE);
  return out;
}

/** Builds a payload field by field, little-endian, as the spec lays it out. */
export class PayloadWriter {
  private readonly parts: Buffer[] = [];
  u8(v: number): this {
    const b = Buffer.allocUnsafe(1);
    b.writeUInt8(v, 0);
    this.parts.push(b);
    return this;
  }
  u16(v: number): this {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16LE(v, 0);
    this.parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32LE(v >>> 0, 0);
    this.parts.push(b);
    return this;
  }
  u64(v: bigint): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64LE(v, 0);
    this.parts.push(b);
    return this;
  }
  /** A string, or raw bytes sent as a string field (tests use this for bad UTF-8). */
  str(s: string | Buffer): this {
    const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
    this.u32(b.length);
    this.parts.push(b);
    return this;
  }
  strList(list: readonly (string | Buffer)[]): this {
    this.u32(list.length);
    for (const s of list) this.str(s);
    return this;
  }
  raw(b: Buffer): this {
    this.parts.push(b);
    return this;
  }
  build(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** Reads an agent reply; any shortfall is a PROTOCOL error (the agent broke the spec). */
export class PayloadReader {
  private off = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}
  private need(n: number, field: string): void {
    if (this.buf.length - this.off < n)
      throw new AgentError('PROTOCOL', `${this.what} from the agent is truncated in field '${field}'`);
  }
  u8(field: string): number {
    this.need(1, field);
    return this.buf.readUInt8(this.off++);
  }
  u32(field: string): number {
    this.need(4, field);
    const v = this.buf.readUInt32LE(this.off);
    this.off += 4;
    return v;
  }
  i64(field: string): bigint {
    this.need(8, field);
    const v = this.buf.readBigInt64LE(this.off);
    this.off += 8;
    return v;
  }
  i32(field: string): number {
    this.need(4, field);
    const v = this.buf.readInt32LE(this.off);
    this.off += 4;
    return v;
  }
  str(field: string): string {
    const n = this.u32(field);
    this.need(n, field);
    const s = this.buf.toString('utf8', this.off, this.off + n);
    this.off += n;
    return s;
  }
  rest(): Buffer {
    const b = this.buf.subarray(this.off);
    this.off = this.buf.length;
    return b;
  }
}

/**
 * Splits the agent's byte stream into frames. The agent never sends a payload
 * above MAX_PAYLOAD; one that claims more is a broken agent, not data to buffer.
 */
export class FrameParser {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(data: Buffer): { header: FrameHeader; payload: Buffer }[] {
    this.chunks.push(data);
    this.buffered += data.length;
    const out: { header: FrameHeader; payload: Buffer }[] = [];
    for (;;) {
      if (this.buffered < HEADER_SIZE) break;
      const head = this.peek(HEADER_SIZE);
      const header: FrameHeader = {
        length: head.readUInt32LE(0),
        type: head.readUInt16LE(4),
        flags: head.readUInt16LE(6),
        id: head.readUInt32LE(8),
      };
      if (header.length > MAX_PAYLOAD)
        throw new AgentError('PROTOCOL', `agent sent a frame of ${header.length} bytes, above the ${MAX_PAYLOAD}-byte limit`);
      if (this.buffered < HEADER_SIZE + header.length) break;
      const whole = this.take(HEADER_SIZE + header.length);
      out.push({ header, payload: whole.subarray(HEADER_SIZE) });
    }
    return out;
  }

  private peek(n: number): Buffer {
    if (this.chunks[0].length < n) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0].subarray(0, n);
  }

  private take(n: number): Buffer {
    if (this.chunks[0].length < n) this.chunks = [Buffer.concat(this.chunks)];
    const first = this.chunks[0];
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.buffered -= n;
    return out;
  }
}

/** Linux rlimit resource numbers (asm-generic), by the names OCI uses. */
export const RLIMIT = {
  RLIMIT_CPU: 0,
  RLIMIT_FSIZE: 1,
  RLIMIT_DATA: 2,
  RLIMIT_STACK: 3,
  RLIMIT_CORE: 4,
  RLIMIT_RSS: 5,
  RLIMIT_NPROC: 6,
  RLIMIT_NOFILE: 7,
  RLIMIT_MEMLOCK: 8,
  RLIMIT_AS: 9,
  RLIMIT_LOCKS: 10,
  RLIMIT_SIGPENDING: 11,
  RLIMIT_MSGQUEUE: 12,
  RLIMIT_NICE: 13,
  RLIMIT_RTPRIO: 14,
  RLIMIT_RTTIME: 15,
} as const;
export type RlimitName = keyof typeof RLIMIT;
export const RLIM_INFINITY = 0xffffffffffffffffn;
