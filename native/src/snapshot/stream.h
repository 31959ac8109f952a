// The byte encoding of snapshot sections: little-endian integers, length-
// prefixed byte strings and raw kernel structs (x86-64 ABI, checked by size).
//
// Hazard: a snapshot file is input like any other; it may be truncated or
// flipped even after its checksums pass (a bug, or a hand-made file). Every
// read is bounds-checked and ends in SnapshotError naming the section, never
// in a read past the buffer.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"

namespace vmlet::snapshot {

// CRC32C (Castagnoli), the checksum of every section and of the table.
uint32_t Crc32c(const void* data, size_t len, uint32_t crc = 0);

class Writer {
 public:
  void U8(uint8_t v) { Raw(&v, 1); }
  void U16(uint16_t v) { Raw(&v, 2); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void Bool(bool v) { U8(v ? 1 : 0); }
  void Bytes(const void* p, size_t n) {
    U64(n);
    Raw(p, n);
  }
  void Str(const std::string& s) { Bytes(s.data(), s.size()); }
  // A kernel struct: its size first, so a layout change is caught on read.
  template <typename T>
  void Struct(const T& v) {
    static_assert(std::is_trivially_copyable<T>::value, "plain data only");
    Bytes(&v, sizeof v);
  }
  void Raw(const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    buf_.insert(buf_.end(), b, b + n);
  }
  const std::vector<uint8_t>& data() const { return buf_; }
  std::vector<uint8_t>& data() { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

class Reader {
 public:
  // `what` names the section in errors ("vCPU 1", "device 2 (virtio-blk)").
  Reader(const uint8_t* p, size_t n, std::string what) : p_(p), n_(n), what_(std::move(what)) {}
  uint8_t U8() { return Get<uint8_t>(); }
  uint16_t U16() { return Get<uint16_t>(); }
  uint32_t U32() { return Get<uint32_t>(); }
  uint64_t U64() { return Get<uint64_t>(); }
  bool Bool() {
    uint8_t v = U8();
    if (v > 1) Fail("a boolean field holds " + std::to_string(v));
    return v == 1;
  }
  std::vector<uint8_t> Bytes(size_t max = 64u << 20) {
    uint64_t n = U64();
    if (n > max || n > n_ - off_) Fail("a byte string of " + std::to_string(n) + " bytes runs past the section");
    std::vector<uint8_t> v(p_ + off_, p_ + off_ + n);
    off_ += n;
    return v;
  }
  std::string Str(size_t max = 1u << 20) {
    auto b = Bytes(max);
    return std::string(b.begin(), b.end());
  }
  template <typename T>
  void Struct(T* out) {
    static_assert(std::is_trivially_copyable<T>::value, "plain data only");
    uint64_t n = U64();
    if (n != sizeof(T))
      Fail("a state record is " + std::to_string(n) + " bytes where this vmlet expects " + std::to_string(sizeof(T)));
    Raw(out, sizeof(T));
  }
  void Raw(void* dst, size_t n) {
    if (n > n_ - off_) Fail("section ends early");
    std::memcpy(dst, p_ + off_, n);
    off_ += n;
  }
  bool AtEnd() const { return off_ == n_; }
  // Every section is read to its end: left-over bytes mean a different layout.
  void ExpectEnd() {
    if (!AtEnd()) Fail(std::to_string(n_ - off_) + " unread bytes at its end");
  }
  [[noreturn]] void Fail(const std::string& why) const {
    throw VmmError(ErrorKind::Snapshot, "read snapshot", what_ + ": " + why + " (the snapshot is corrupt or from another vmlet)");
  }

 private:
  template <typename T>
  T Get() {
    T v;
    Raw(&v, sizeof v);
    return v;
  }
  const uint8_t* p_;
  size_t n_;
  size_t off_ = 0;
  std::string what_;
};

}  // namespace vmlet::snapshot
