#include "protocol.h"

#include <algorithm>
#include <cstring>

namespace vmlet::agent {

namespace {
uint16_t Le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t Le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
void Put16(uint8_t* p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }
void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xff;
}
}  // namespace

FrameHeader DecodeHeader(const uint8_t* p) {
  FrameHeader h;
  h.length = Le32(p);
  h.type = Le16(p + 4);
  h.flags = Le16(p + 6);
  h.id = Le32(p + 8);
  return h;
}

void EncodeHeader(uint8_t* p, const FrameHeader& h) {
  Put32(p, h.length);
  Put16(p + 4, h.type);
  Put16(p + 6, h.flags);
  Put32(p + 8, h.id);
}

bool ValidUtf8(const uint8_t* p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = p[i];
    if (c == 0) return false;  // NUL would silently truncate argv/env in exec
    if (c < 0x80) { i++; continue; }
    size_t len;
    uint32_t cp;
    if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; }
    else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; }
    else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; }
    else return false;
    if (n - i < len) return false;
    for (size_t k = 1; k < len; k++) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return false;
    if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

void PayloadReader::Fail(ErrorCode code, std::string msg) {
  if (!ok_) return;
  ok_ = false;
  err_.code = code;
  err_.message = std::move(msg);
}

bool PayloadReader::Need(size_t n, const char* field) {
  if (!ok_) return false;
  if (size_ - off_ < n) {
    Fail(ErrorCode::BadFrame, std::string("payload truncated in field '") + field + "': needs " +
                                  std::to_string(n) + " more bytes, " + std::to_string(size_ - off_) + " left");
    return false;
  }
  return true;
}

uint8_t PayloadReader::U8(const char* field) {
  if (!Need(1, field)) return 0;
  return p_[off_++];
}
uint16_t PayloadReader::U16(const char* field) {
  if (!Need(2, field)) return 0;
  uint16_t v = Le16(p_ + off_);
  off_ += 2;
  return v;
}
uint32_t PayloadReader::U32(const char* field) {
  if (!Need(4, field)) return 0;
  uint32_t v = Le32(p_ + off_);
  off_ += 4;
  return v;
}
uint64_t PayloadReader::U64(const char* field) {
  if (!Need(8, field)) return 0;
  uint64_t v = Le32(p_ + off_) | (static_cast<uint64_t>(Le32(p_ + off_ + 4)) << 32);
  off_ += 8;
  return v;
}

std::string PayloadReader::Str(const char* field) {
  uint32_t n = U32(field);
  if (!Need(n, field)) return {};
  const uint8_t* s = p_ + off_;
  if (!ValidUtf8(s, n)) {
    Fail(ErrorCode::InvalidUtf8, std::string("field '") + field + "' is not valid UTF-8 (or contains NUL)");
    return {};
  }
  off_ += n;
  return std::string(reinterpret_cast<const char*>(s), n);
}

std::vector<uint8_t> PayloadReader::Bytes(const char*) {
  std::vector<uint8_t> v(p_ + off_, p_ + size_);
  off_ = size_;
  return v;
}

uint32_t PayloadReader::Count(const char* field, size_t min_item_size) {
  uint32_t n = U32(field);
  if (!ok_) return 0;
  // Each item takes at least min_item_size bytes, so a count the remaining
  // payload cannot hold is a lie: reject it before reserving anything.
  if (n > kMaxListItems || static_cast<uint64_t>(n) * min_item_size > size_ - off_) {
    Fail(ErrorCode::BadFrame, std::string("list '") + field + "' claims " + std::to_string(n) +
                                  " items, more than the payload holds");
    return 0;
  }
  return n;
}

std::vector<std::string> PayloadReader::StrList(const char* field) {
  std::vector<std::string> out;
  uint32_t n = Count(field, 4);
  out.reserve(n);
  for (uint32_t i = 0; i < n && ok_; i++) out.push_back(Str(field));
  return out;
}

bool PayloadReader::Finish() {
  if (ok_ && off_ != size_)
    Fail(ErrorCode::BadFrame, std::to_string(size_ - off_) + " unexpected trailing bytes after the last field");
  return ok_;
}

void PayloadWriter::U16(uint16_t v) {
  uint8_t b[2];
  Put16(b, v);
  Raw(b, 2);
}
void PayloadWriter::U32(uint32_t v) {
  uint8_t b[4];
  Put32(b, v);
  Raw(b, 4);
}
void PayloadWriter::U64(uint64_t v) {
  U32(static_cast<uint32_t>(v));
  U32(static_cast<uint32_t>(v >> 32));
}
void PayloadWriter::Str(const std::string& s) {
  U32(static_cast<uint32_t>(s.size()));
  Raw(s.data(), s.size());
}
void PayloadWriter::Raw(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  buf_.insert(buf_.end(), p, p + n);
}

bool DecodeHello(PayloadReader& r, HelloReq* out) {
  out->min_version = r.U32("min_version");
  out->max_version = r.U32("max_version");
  out->client = r.Str("client");
  return r.Finish();
}

bool DecodeExec(PayloadReader& r, ExecReq* out, uint32_t version) {
  out->flags = r.U32("flags");
  out->args = r.StrList("args");
  out->env = r.StrList("env");
  out->cwd = r.Str("cwd");
  out->rootfs = r.Str("rootfs");
  out->hostname = r.Str("hostname");
  out->uid = r.U32("uid");
  out->gid = r.U32("gid");
  uint32_t ng = r.Count("groups", 4);
  for (uint32_t i = 0; i < ng && r.ok(); i++) out->groups.push_back(r.U32("groups"));
  uint32_t nl = r.Count("rlimits", 20);
  for (uint32_t i = 0; i < nl && r.ok(); i++) {
    Rlimit l;
    l.resource = r.U32("rlimits.resource");
    l.soft = r.U64("rlimits.soft");
    l.hard = r.U64("rlimits.hard");
    out->rlimits.push_back(l);
  }
  out->rows = r.U16("rows");
  out->cols = r.U16("cols");
  if (version >= 3 && (out->flags & kExecUser)) out->user = r.Str("user");
  return r.Finish();
}

bool DecodeMountRootfs(PayloadReader& r, MountRootfsReq* out) {
  out->name = r.Str("name");
  out->layers = r.StrList("layers");
  out->upper = r.Str("upper");
  return r.Finish();
}

bool DecodeSetClock(PayloadReader& r, SetClockReq* out) {
  out->sec = r.I64("sec");
  out->nsec = r.U32("nsec");
  return r.Finish();
}

bool DecodeSetIdentity(PayloadReader& r, SetIdentityReq* out) {
  out->flags = r.U32("flags");
  out->realtime_ns = r.I64("realtime_ns");
  out->hostname = r.Str("hostname");
  out->entropy = r.Bytes("entropy");
  return r.Finish();
}

bool DecodeHostMessage(const FrameHeader& h, const uint8_t* payload, size_t n, HostMessage* out,
                       DecodeError* err, uint32_t version) {
  out->header = h;
  PayloadReader r(payload, n);
  bool ok = true;
  if (h.flags != 0) {
    err->code = ErrorCode::BadFrame;
    err->message = "reserved header flags must be 0, got " + std::to_string(h.flags);
    return false;
  }
  switch (static_cast<MsgType>(h.type)) {
    case MsgType::Hello: ok = DecodeHello(r, &out->hello); break;
    case MsgType::Ping: ok = r.Finish(); break;
    case MsgType::SetClock: ok = DecodeSetClock(r, &out->clock); break;
    case MsgType::SetIdentity: ok = DecodeSetIdentity(r, &out->identity); break;
    case MsgType::MountRootfs: ok = DecodeMountRootfs(r, &out->mount); break;
    case MsgType::Exec: ok = DecodeExec(r, &out->exec, version); break;
    case MsgType::Stdin: out->data = r.Bytes("data"); ok = r.Finish(); break;
    case MsgType::StdinEof: ok = r.Finish(); break;
    case MsgType::Signal:
      out->process = r.U32("process");
      out->signal = r.U32("signal");
      ok = r.Finish();
      break;
    case MsgType::Resize:
      out->process = r.U32("process");
      out->rows = r.U16("rows");
      out->cols = r.U16("cols");
      ok = r.Finish();
      break;
    case MsgType::OutputWindow:
      out->stream = r.U8("stream");
      out->credit = r.U32("credit");
      ok = r.Finish();
      break;
    default:
      err->code = ErrorCode::UnknownType;
      err->message = "unknown message type 0x" + [](uint16_t t) {
        static const char* hex = "0123456789abcdef";
        std::string s;
        for (int i = 12; i >= 0; i -= 4) s += hex[(t >> i) & 0xf];
        return s;
      }(h.type) + " (protocol version " + std::to_string(kProtocolVersion) + ")";
      return false;
  }
  if (!ok) *err = r.error();
  return ok;
}

size_t FrameDecoder::Feed(const uint8_t* data, size_t n) {
  size_t used = 0;
  while (used < n && pending_ == Event::None) {
    if (skip_ > 0) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(skip_, n - used));
      skip_ -= k;
      used += k;
      continue;
    }
    if (!in_payload_) {
      size_t k = std::min(kHeaderSize - have_, n - used);
      std::memcpy(hbuf_ + have_, data + used, k);
      have_ += k;
      used += k;
      if (have_ < kHeaderSize) break;
      have_ = 0;
      hdr_ = DecodeHeader(hbuf_);
      payload_.clear();
      if (hdr_.length > kMaxPayload) {
        skip_ = hdr_.length;
        pending_ = Event::Oversized;
        break;
      }
      if (hdr_.length == 0) {
        pending_ = Event::Frame;
        break;
      }
      in_payload_ = true;
      payload_.reserve(hdr_.length);
      continue;
    }
    size_t k = std::min<size_t>(hdr_.length - payload_.size(), n - used);
    payload_.insert(payload_.end(), data + used, data + used + k);
    used += k;
    if (payload_.size() == hdr_.length) {
      in_payload_ = false;
      pending_ = Event::Frame;
    }
  }
  return used;
}

FrameDecoder::Event FrameDecoder::Next() {
  Event e = pending_;
  pending_ = Event::None;
  return e;
}

std::vector<uint8_t> Frame(MsgType t, uint32_t id, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> out(kHeaderSize + payload.size());
  FrameHeader h;
  h.length = static_cast<uint32_t>(payload.size());
  h.type = static_cast<uint16_t>(t);
  h.id = id;
  EncodeHeader(out.data(), h);
  if (!payload.empty()) std::memcpy(out.data() + kHeaderSize, payload.data(), payload.size());
  return out;
}

std::vector<uint8_t> ErrorFrame(uint32_t id, ErrorCode code, const std::string& message) {
  PayloadWriter w;
  w.U32(static_cast<uint32_t>(code));
  // Messages may quote host bytes; keep the reply itself valid UTF-8.
  std::string safe = message;
  if (!ValidUtf8(reinterpret_cast<const uint8_t*>(safe.data()), safe.size())) safe = "(message not UTF-8)";
  w.Str(safe);
  return Frame(MsgType::Error, id, w.buf());
}

const char* ErrorCodeName(ErrorCode c) {
  switch (c) {
    case ErrorCode::BadFrame: return "BAD_FRAME";
    case ErrorCode::FrameTooLarge: return "FRAME_TOO_LARGE";
    case ErrorCode::UnknownType: return "UNKNOWN_TYPE";
    case ErrorCode::InvalidUtf8: return "INVALID_UTF8";
    case ErrorCode::NoHello: return "NO_HELLO";
    case ErrorCode::VersionUnsupported: return "VERSION_UNSUPPORTED";
    case ErrorCode::BadRequest: return "BAD_REQUEST";
    case ErrorCode::NoSuchProcess: return "NO_SUCH_PROCESS";
    case ErrorCode::ExecFailed: return "EXEC_FAILED";
    case ErrorCode::MountFailed: return "MOUNT_FAILED";
    case ErrorCode::FlowControl: return "FLOW_CONTROL";
    case ErrorCode::Unsupported: return "UNSUPPORTED";
    case ErrorCode::Internal: return "INTERNAL";
    case ErrorCode::IdentityFailed: return "IDENTITY_FAILED";
    case ErrorCode::UnknownUser: return "UNKNOWN_USER";
  }
  return "UNKNOWN";
}

}  // namespace vmlet::agent
