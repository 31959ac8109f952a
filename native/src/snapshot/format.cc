#include "snapshot/format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "core/error.h"
#include "snapshot/stream.h"

namespace vmlet::snapshot {

namespace {

// Slicing-free table CRC32C: sections are KiBs, the memory file uses the
// SSE4.2 path (memory.cc).
struct Crc32cTable {
  uint32_t t[256];
  Crc32cTable() {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
      t[i] = c;
    }
  }
};

uint32_t Le32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t Le64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

[[noreturn]] void Bad(const std::string& what, const std::string& why) {
  throw VmmError(ErrorKind::Snapshot, "read snapshot", what + ": " + why);
}

}  // namespace

uint32_t Crc32c(const void* data, size_t len, uint32_t crc) {
  static const Crc32cTable table;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < len; i++) crc = table.t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

std::vector<uint8_t> EncodeStateFile(const std::vector<Section>& sections) {
  Writer table;
  uint64_t offset = kHeaderBytes + sections.size() * kTableEntryBytes;
  for (auto& s : sections) {
    table.U32(s.id);
    table.U32(Crc32c(s.data.data(), s.data.size()));
    table.U64(offset);
    table.U64(s.data.size());
    offset += s.data.size();
  }
  Writer out;
  out.Raw(kMagic, sizeof kMagic);
  out.U32(kFormatVersion);
  out.U32(static_cast<uint32_t>(sections.size()));
  out.U64(offset);
  out.U32(Crc32c(table.data().data(), table.data().size()));
  out.U32(Crc32c(out.data().data(), 28));
  out.Raw(table.data().data(), table.data().size());
  for (auto& s : sections) out.Raw(s.data.data(), s.data.size());
  return std::move(out.data());
}

std::vector<Section> DecodeStateFile(const uint8_t* p, size_t n, const std::string& what) {
  if (n < kHeaderBytes)
    Bad(what, "truncated: " + std::to_string(n) + " bytes, shorter than the " + std::to_string(kHeaderBytes) + "-byte header");
  if (std::memcmp(p, kMagic, sizeof kMagic) != 0) Bad(what, "not a vmlet snapshot state file (bad magic)");
  uint32_t version = Le32(p + 8);
  if (version != kFormatVersion)
    Bad(what, "snapshot format version " + std::to_string(version) + "; this vmlet reads only version " +
                  std::to_string(kFormatVersion) + ": take the snapshot again with this vmlet");
  if (Crc32c(p, 28) != Le32(p + 28)) Bad(what, "header checksum mismatch (the file is corrupt)");
  uint32_t count = Le32(p + 12);
  uint64_t file_bytes = Le64(p + 16);
  if (n < file_bytes)
    Bad(what, "truncated: " + std::to_string(n) + " of " + std::to_string(file_bytes) + " bytes");
  if (n > file_bytes) Bad(what, std::to_string(n - file_bytes) + " bytes after the recorded end of the file");
  if (count > kMaxSections) Bad(what, std::to_string(count) + " sections is more than any snapshot has");
  uint64_t table_end = kHeaderBytes + uint64_t(count) * kTableEntryBytes;
  if (table_end > n) Bad(what, "the section table runs past the end of the file");
  if (Crc32c(p + kHeaderBytes, table_end - kHeaderBytes) != Le32(p + 24))
    Bad(what, "section table checksum mismatch (the file is corrupt)");
  std::vector<Section> out;
  uint64_t expect = table_end;
  for (uint32_t i = 0; i < count; i++) {
    const uint8_t* e = p + kHeaderBytes + uint64_t(i) * kTableEntryBytes;
    uint32_t id = Le32(e), crc = Le32(e + 4);
    uint64_t off = Le64(e + 8), len = Le64(e + 16);
    if (off != expect || len > n - off)
      Bad(what, "section " + std::to_string(i) + " (id " + std::to_string(id) + ") lies outside the file");
    if (Crc32c(p + off, len) != crc)
      Bad(what, "section " + std::to_string(i) + " (id " + std::to_string(id) + ") checksum mismatch (the file is corrupt)");
    for (auto& s : out)
      if (s.id == id) Bad(what, "section id " + std::to_string(id) + " appears twice");
    out.push_back(Section{id, std::vector<uint8_t>(p + off, p + off + len)});
    expect = off + len;
  }
  if (expect != n) Bad(what, "the sections do not end where the file does");
  return out;
}

void WriteStateFile(const std::string& path, const std::vector<Section>& sections) {
  std::vector<uint8_t> bytes = EncodeStateFile(sections);
  std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) throw SysError(ErrorKind::Snapshot, "create snapshot state file", tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t w = write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      auto e = SysError(ErrorKind::Snapshot, "write snapshot state file", tmp);
      close(fd);
      unlink(tmp.c_str());
      throw e;
    }
    done += size_t(w);
  }
  if (fdatasync(fd) != 0) {
    auto e = SysError(ErrorKind::Snapshot, "sync snapshot state file", tmp);
    close(fd);
    unlink(tmp.c_str());
    throw e;
  }
  close(fd);
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    auto e = SysError(ErrorKind::Snapshot, "rename snapshot state file", path);
    unlink(tmp.c_str());
    throw e;
  }
}

std::vector<Section> ReadStateFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    throw VmmError(ErrorKind::Snapshot, "open snapshot", path + (e == ENOENT ? ": no state file: is this a snapshot directory?" : ""), e);
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    throw VmmError(ErrorKind::Snapshot, "open snapshot", path + " is not a regular file");
  }
  // A state file is KiBs per vCPU; anything huge is not one of ours.
  if (st.st_size > (64ll << 20)) {
    close(fd);
    throw VmmError(ErrorKind::Snapshot, "open snapshot", path + " is " + std::to_string(st.st_size) + " bytes, too large for a state file");
  }
  std::vector<uint8_t> buf(size_t(st.st_size));
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t r = read(fd, buf.data() + done, buf.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      auto e = SysError(ErrorKind::Snapshot, "read snapshot state file", path);
      close(fd);
      throw e;
    }
    if (r == 0) break;
    done += size_t(r);
  }
  close(fd);
  buf.resize(done);
  return DecodeStateFile(buf.data(), buf.size(), path);
}

const Section* FindSection(const std::vector<Section>& s, uint32_t id) {
  for (auto& x : s)
    if (x.id == id) return &x;
  return nullptr;
}

}  // namespace vmlet::snapshot
