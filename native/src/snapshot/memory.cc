#include "snapshot/memory.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "core/error.h"
#include "snapshot/stream.h"

namespace vmlet::snapshot {

namespace {

constexpr uint64_t kPage = 4096;

bool IsZeroPage(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < kPage / 8; i += 4)
    if (w[i] | w[i + 1] | w[i + 2] | w[i + 3]) return false;
  return true;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cSse42(const void* data, size_t len, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  while (len >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    len -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (len--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return ~c32;
}

uint32_t PageCrc(uint32_t crc, uint64_t offset, const uint8_t* page) {
  crc = Crc32cFast(&offset, sizeof offset, crc);
  return Crc32cFast(page, kPage, crc);
}

// Calls fn(offset, length) for each data extent of fd within [begin, end).
template <typename Fn>
void ForEachDataExtent(int fd, uint64_t begin, uint64_t end, const std::string& what, Fn fn) {
  uint64_t pos = begin;
  while (pos < end) {
    off_t data = lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return;  // only holes from here on
      throw SysError(ErrorKind::Snapshot, "SEEK_DATA", what);
    }
    if (static_cast<uint64_t>(data) >= end) return;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) throw SysError(ErrorKind::Snapshot, "SEEK_HOLE", what);
    uint64_t stop = std::min<uint64_t>(static_cast<uint64_t>(hole), end);
    uint64_t first = static_cast<uint64_t>(data) & ~(kPage - 1);
    fn(first, stop - first);
    pos = stop;
  }
}

// The runs (offset in region, length) of pages of anonymous RAM that hold
// memory: present in RAM or swapped out, from /proc/self/pagemap (bit 63
// present, bit 62 swapped; readable by the process itself without privileges,
// PFNs read as 0 then, which is not needed). A page never touched is neither.
// Not mincore(): it reports a swapped-out page as absent, and that page's bytes
// would be lost from the snapshot. nullopt when pagemap cannot be read (no
// /proc, a kernel that refuses it): the caller then looks at every page, which
// is slower but still exact (reading an untouched page maps the shared zero
// page). All runs are found before any is used, so a failure half-way leaves
// nothing scanned twice (the CRC covers each page once).
std::optional<std::vector<std::pair<uint64_t, uint64_t>>> PopulatedRuns(const MemoryRegion& r) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  constexpr uint64_t kPresent = 1ull << 63, kSwapped = 1ull << 62;
  constexpr uint64_t kBatch = 4096;  // entries per read: 16 MiB of RAM, 32 KiB of pagemap
  std::vector<uint64_t> entries(kBatch);
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  const uint64_t pages = r.size / kPage;
  const uint64_t first_vpn = reinterpret_cast<uint64_t>(r.host) / kPage;
  uint64_t run_start = 0, run_pages = 0;
  for (uint64_t done = 0; done < pages;) {
    const uint64_t want = std::min(kBatch, pages - done);
    const off_t at = static_cast<off_t>((first_vpn + done) * sizeof(uint64_t));
    ssize_t n = pread(fd, entries.data(), want * sizeof(uint64_t), at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || n % sizeof(uint64_t)) {
      close(fd);
      return std::nullopt;
    }
    const uint64_t got = uint64_t(n) / sizeof(uint64_t);
    for (uint64_t i = 0; i < got; i++) {
      if (entries[i] & (kPresent | kSwapped)) {
        if (!run_pages) run_start = done + i;
        run_pages++;
      } else if (run_pages) {
        runs.emplace_back(run_start * kPage, run_pages * kPage);
        run_pages = 0;
      }
    }
    done += got;
  }
  if (run_pages) runs.emplace_back(run_start * kPage, run_pages * kPage);
  close(fd);
  return runs;
}

void PwriteAll(int fd, const uint8_t* p, uint64_t len, uint64_t off, const std::string& path) {
  while (len) {
    ssize_t w = pwrite(fd, p, len, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw SysError(ErrorKind::Snapshot, "write snapshot memory file", path);
    p += w;
    off += uint64_t(w);
    len -= uint64_t(w);
  }
}

}  // namespace

uint32_t Crc32cFast(const void* data, size_t len, uint32_t crc) {
  static const bool sse42 = __builtin_cpu_supports("sse4.2");
  return sse42 ? Crc32cSse42(data, len, crc) : Crc32c(data, len, crc);
}

MemoryFileInfo WriteMemoryFile(const GuestMemory& mem, const std::string& path) {
  int out = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (out < 0) throw SysError(ErrorKind::Snapshot, "create snapshot memory file", path);
  MemoryFileInfo info;
  info.logical_bytes = mem.total_size();
  try {
    if (ftruncate(out, static_cast<off_t>(info.logical_bytes)) != 0)
      throw SysError(ErrorKind::Snapshot, "size snapshot memory file", path);
    // Pages are visited in file order, so the CRC is independent of how
    // extents happen to be split.
    auto scan = [&](const MemoryRegion& r, uint64_t rel, uint64_t len) {
      uint64_t run_start = 0, run_len = 0;
      auto flush = [&] {
        if (run_len) PwriteAll(out, r.host + run_start, run_len, r.fd_offset + run_start, path);
        run_len = 0;
      };
      for (uint64_t o = rel; o < rel + len && o < r.size; o += kPage) {
        const uint8_t* page = r.host + o;
        if (IsZeroPage(page)) {
          flush();
          continue;
        }
        info.crc = PageCrc(info.crc, r.fd_offset + o, page);
        info.data_bytes += kPage;
        if (!run_len) run_start = o;
        run_len += kPage;
      }
      flush();
    };
    for (const auto& r : mem.regions()) {
      if (mem.fd() >= 0) {
        // Never-touched memfd extents are holes: reading them through the
        // mapping would allocate pages just to find zeros.
        ForEachDataExtent(mem.fd(), r.fd_offset, r.fd_offset + r.size, "guest RAM memfd",
                          [&](uint64_t off, uint64_t len) { scan(r, off - r.fd_offset, len); });
      } else if (mem.anonymous()) {
        // Same reason: an untouched page of anonymous RAM is not populated, and
        // only populated pages can hold anything but zeros.
        if (auto runs = PopulatedRuns(r)) {
          for (auto& [rel, len] : *runs) scan(r, rel, len);
        } else {
          scan(r, 0, r.size);
        }
      } else {
        // A restored VM's private file mapping: a page it never wrote is the
        // old file's and may be absent from memory yet hold data.
        scan(r, 0, r.size);
      }
    }
    if (fdatasync(out) != 0) throw SysError(ErrorKind::Snapshot, "sync snapshot memory file", path);
    struct stat st {};
    if (fstat(out, &st) == 0) info.allocated_bytes = uint64_t(st.st_blocks) * 512;
  } catch (...) {
    close(out);
    unlink(path.c_str());
    throw;
  }
  close(out);
  return info;
}

uint32_t MemoryFileCrc(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw SysError(ErrorKind::Snapshot, "open snapshot memory file", path);
  struct stat st {};
  fstat(fd, &st);
  uint32_t crc = 0;
  std::vector<uint8_t> buf(1u << 20);
  try {
    ForEachDataExtent(fd, 0, uint64_t(st.st_size), path, [&](uint64_t off, uint64_t len) {
      for (uint64_t done = 0; done < len;) {
        uint64_t want = std::min<uint64_t>(buf.size(), len - done);
        ssize_t r = pread(fd, buf.data(), want, static_cast<off_t>(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) throw SysError(ErrorKind::Snapshot, "read snapshot memory file", path);
        uint64_t whole = uint64_t(r) & ~(kPage - 1);
        if (!whole) throw VmmError(ErrorKind::Snapshot, "read snapshot memory file", path + ": ends inside a page");
        for (uint64_t o = 0; o < whole; o += kPage)
          if (!IsZeroPage(buf.data() + o)) crc = PageCrc(crc, off + done + o, buf.data() + o);
        done += whole;
      }
    });
  } catch (...) {
    close(fd);
    throw;
  }
  close(fd);
  return crc;
}

}  // namespace vmlet::snapshot
