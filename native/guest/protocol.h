// The vmlet agent protocol: frame header, message types, error codes and the
// payload codec. docs/agent-protocol.md is the specification; this header and
// shim/agent/protocol.ts are its two implementations and must agree with it.
//
// Everything here is pure (no I/O) so the fuzz drivers in fuzz/ exercise
// exactly the code the agent runs on bytes from the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vmlet::agent {

// The highest version this agent speaks and the lowest it still serves; a
// HELLO gets the highest common one. Version 2 adds SET_IDENTITY only;
// version 3 adds EXEC's USER flag (a user string resolved in the rootfs).
constexpr uint32_t kProtocolVersion = 3;
constexpr uint32_t kMinProtocolVersion = 1;
constexpr size_t kHeaderSize = 12;
// A frame's payload may not exceed this. Large enough for an EXEC with a big
// environment, small enough that one frame never makes either side allocate
// much; stream data is sent in chunks of at most kMaxDataChunk.
constexpr uint32_t kMaxPayload = 1u << 20;
constexpr uint32_t kMaxDataChunk = 32 * 1024;
// Initial per-stream credit (stdout, stderr from the agent; stdin to it).
constexpr uint32_t kInitialWindow = 256 * 1024;
// Bounds on decoded lists so a small frame cannot ask for a huge allocation.
constexpr uint32_t kMaxListItems = 65536;

enum class MsgType : uint16_t {
  // host -> agent
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
  SetIdentity = 0x0b,  // version 2
  // agent -> host
  HelloOk = 0x81,
  Ok = 0x82,
  Error = 0x83,
  Pong = 0x84,
  Started = 0x85,
  Output = 0x86,
  OutputEof = 0x87,
  Exit = 0x88,
  StdinWindow = 0x89,
};

enum class ErrorCode : uint32_t {
  BadFrame = 1,         // payload truncated, trailing bytes, reserved flags set
  FrameTooLarge = 2,    // header length above kMaxPayload; payload skipped
  UnknownType = 3,      // type not in this version; payload skipped
  InvalidUtf8 = 4,      // a string field is not valid UTF-8 (or holds NUL)
  NoHello = 5,          // a request before a successful HELLO
  VersionUnsupported = 6,
  BadRequest = 7,       // well-formed but meaningless (empty args, unknown rlimit...)
  NoSuchProcess = 8,
  ExecFailed = 9,
  MountFailed = 10,
  FlowControl = 11,     // stdin beyond the granted window
  Unsupported = 12,     // valid request this agent cannot do in its mode
  Internal = 13,
  IdentityFailed = 14,  // version 2: a SET_IDENTITY step failed (step and errno named)
  UnknownUser = 15,     // version 3: EXEC's user or group name is not in the rootfs's passwd/group
};

enum class StreamId : uint8_t { Stdout = 1, Stderr = 2 };

struct FrameHeader {
  uint32_t length = 0;
  uint16_t type = 0;
  uint16_t flags = 0;
  uint32_t id = 0;
};

FrameHeader DecodeHeader(const uint8_t* p);
void EncodeHeader(uint8_t* p, const FrameHeader& h);

// A decode failure: the code and a message naming the field.
struct DecodeError {
  ErrorCode code = ErrorCode::BadFrame;
  std::string message;
};

// Reads little-endian fields out of one payload, bounds-checked. The first
// failure is latched; later reads return zero values and ok() stays false.
class PayloadReader {
 public:
  PayloadReader(const uint8_t* data, size_t size) : p_(data), size_(size) {}
  uint8_t U8(const char* field);
  uint16_t U16(const char* field);
  uint32_t U32(const char* field);
  uint64_t U64(const char* field);
  int64_t I64(const char* field) { return static_cast<int64_t>(U64(field)); }
  std::string Str(const char* field);  // u32 length + UTF-8 bytes, no NUL
  std::vector<uint8_t> Bytes(const char* field);  // the rest of the payload
  std::vector<std::string> StrList(const char* field);
  uint32_t Count(const char* field, size_t min_item_size);
  // Call once all fields are read: trailing bytes are a BadFrame.
  bool Finish();
  bool ok() const { return ok_; }
  const DecodeError& error() const { return err_; }

 private:
  bool Need(size_t n, const char* field);
  void Fail(ErrorCode code, std::string msg);
  const uint8_t* p_;
  size_t size_;
  size_t off_ = 0;
  bool ok_ = true;
  DecodeError err_;
};

class PayloadWriter {
 public:
  void U8(uint8_t v) { buf_.push_back(v); }
  void U16(uint16_t v);
  void U32(uint32_t v);
  void U64(uint64_t v);
  void I32(int32_t v) { U32(static_cast<uint32_t>(v)); }
  void Str(const std::string& s);
  void Raw(const void* data, size_t n);
  std::vector<uint8_t>& buf() { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

bool ValidUtf8(const uint8_t* p, size_t n);

struct HelloReq {
  uint32_t min_version = 0;
  uint32_t max_version = 0;
  std::string client;
};

struct Rlimit {
  uint32_t resource = 0;
  uint64_t soft = 0;
  uint64_t hard = 0;
};

constexpr uint32_t kExecTty = 1u << 0;
// Version 3: the payload ends with `str user` (user[:group]) that the agent
// resolves in the process's rootfs; uid, gid and groups must then be 0/empty.
constexpr uint32_t kExecUser = 1u << 1;
// Flags a connection may use, by the version it agreed on.
constexpr uint32_t ExecKnownFlags(uint32_t version) { return version >= 3 ? kExecTty | kExecUser : kExecTty; }

struct ExecReq {
  uint32_t flags = 0;
  std::vector<std::string> args;
  std::vector<std::string> env;
  std::string cwd;
  std::string rootfs;  // empty: the agent's own root
  std::string hostname;  // empty: unchanged
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::vector<uint32_t> groups;
  std::vector<Rlimit> rlimits;
  uint16_t rows = 0;
  uint16_t cols = 0;
  std::string user;  // kExecUser (version 3)
};

struct MountRootfsReq {
  std::string name;
  std::vector<std::string> layers;  // lowest first
  std::string upper;  // "tmpfs" is the only kind in version 1
};

struct SetClockReq {
  int64_t sec = 0;
  uint32_t nsec = 0;
};

// SET_IDENTITY (version 2): what a guest restored from a template must not
// share with its siblings. Entropy is always applied; the clock and the
// hostname only when their flag is set, so a host-side test agent can be
// asked for the rest without touching the host's clock.
constexpr uint32_t kIdentityClock = 1u << 0;
constexpr uint32_t kIdentityHostname = 1u << 1;
constexpr uint32_t kIdentityKnownFlags = kIdentityClock | kIdentityHostname;
// 32 bytes is the 256 bits the kernel's CRNG wants to count as seeded; the
// upper bound keeps one request cheap (RNDADDENTROPY hashes every byte).
constexpr size_t kMinIdentityEntropy = 32;
constexpr size_t kMaxIdentityEntropy = 512;
constexpr size_t kMaxHostname = 64;  // HOST_NAME_MAX

struct SetIdentityReq {
  uint32_t flags = 0;
  int64_t realtime_ns = 0;  // CLOCK_REALTIME in ns since the epoch (kIdentityClock)
  std::string hostname;     // kIdentityHostname
  std::vector<uint8_t> entropy;
};

// Each returns false with r.error() set when the payload is malformed.
bool DecodeHello(PayloadReader& r, HelloReq* out);
// version: the connection's; the user field exists only from version 3, so
// a version-2 host setting bit 1 still gets what version 2 says of it.
bool DecodeExec(PayloadReader& r, ExecReq* out, uint32_t version = kProtocolVersion);
bool DecodeMountRootfs(PayloadReader& r, MountRootfsReq* out);
bool DecodeSetClock(PayloadReader& r, SetClockReq* out);
bool DecodeSetIdentity(PayloadReader& r, SetIdentityReq* out);

// One decoded host->agent message; exactly one of the members is meaningful.
struct HostMessage {
  FrameHeader header;
  HelloReq hello;
  ExecReq exec;
  MountRootfsReq mount;
  SetClockReq clock;
  SetIdentityReq identity;
  std::vector<uint8_t> data;  // Stdin
  uint32_t process = 0;  // Signal, Resize: the target process's id
  uint32_t signal = 0;
  uint16_t rows = 0, cols = 0;
  uint8_t stream = 0;
  uint32_t credit = 0;
};

// Decodes a complete payload for header.type. Unknown types and bad fields
// come back as a DecodeError the agent turns into an ERROR reply.
bool DecodeHostMessage(const FrameHeader& h, const uint8_t* payload, size_t n,
                       HostMessage* out, DecodeError* err, uint32_t version = kProtocolVersion);

// Splits a byte stream into frames without ever buffering more than one
// kMaxPayload payload; oversized payloads are skipped as they arrive.
class FrameDecoder {
 public:
  enum class Event { None, Frame, Oversized };
  // Consumes bytes from data; returns how many were consumed. When an event
  // is ready, stops and reports it through Next().
  size_t Feed(const uint8_t* data, size_t n);
  Event Next();
  const FrameHeader& header() const { return hdr_; }
  const std::vector<uint8_t>& payload() const { return payload_; }
  bool mid_frame() const { return have_ != 0 || skip_ != 0 || in_payload_; }

 private:
  uint8_t hbuf_[kHeaderSize];
  size_t have_ = 0;
  bool in_payload_ = false;
  uint64_t skip_ = 0;
  FrameHeader hdr_;
  std::vector<uint8_t> payload_;
  Event pending_ = Event::None;
};

// Frame builders for agent -> host messages.
std::vector<uint8_t> Frame(MsgType t, uint32_t id, const std::vector<uint8_t>& payload);
std::vector<uint8_t> ErrorFrame(uint32_t id, ErrorCode code, const std::string& message);

const char* ErrorCodeName(ErrorCode c);

}  // namespace vmlet::agent
