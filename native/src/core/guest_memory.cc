#include "core/guest_memory.h"

#include <fcntl.h>
#include <cstdlib>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

namespace vmlet {

namespace {
constexpr uint64_t kPage = 4096;
constexpr uint64_t kHugePage = 2ull << 20;

// The total size of a layout of page-aligned, non-empty, non-wrapping regions.
uint64_t CheckedTotal(const std::vector<std::pair<uint64_t, uint64_t>>& layout, const char* op) {
  if (layout.empty()) throw VmmError(ErrorKind::Memory, op, "no regions given");
  uint64_t total = 0;
  for (auto& [gpa, size] : layout) {
    if (size == 0 || size % kPage || gpa % kPage || gpa + size < gpa)
      throw VmmError(ErrorKind::Memory, op,
                     "region at " + std::to_string(gpa) + " of " + std::to_string(size) + " bytes is not page aligned");
    total += size;
  }
  return total;
}

// Maps `size` bytes starting on a 2 MiB boundary: a reservation 2 MiB larger,
// the mapping placed over its first aligned address, the rest given back.
// Hazard: mmap alone only promises 4 KiB alignment, and a region that starts
// mid-way through a 2 MiB frame can use no huge page at all when gpa and host
// address are not congruent modulo 2 MiB (every RAM region's gpa is aligned).
uint8_t* MapHugeAligned(uint64_t size, int flags, int fd, uint64_t offset, const char* op) {
  if (size > (1ull << 46))
    throw VmmError(ErrorKind::Memory, op, std::to_string(size) + " bytes is more than this host's address space allows");
  const uint64_t span = size + kHugePage;
  void* base = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) throw SysError(ErrorKind::Memory, op, "reserve " + std::to_string(span) + " bytes");
  const uint64_t b = reinterpret_cast<uint64_t>(base);
  const uint64_t aligned = (b + kHugePage - 1) & ~(kHugePage - 1);
  void* p = mmap(reinterpret_cast<void*>(aligned), size, PROT_READ | PROT_WRITE, flags | MAP_FIXED, fd,
                 static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    auto e = SysError(ErrorKind::Memory, op, std::to_string(size) + " bytes");
    munmap(base, span);
    throw e;
  }
  if (aligned > b) munmap(base, aligned - b);
  const uint64_t end = aligned + size;
  if (b + span > end) munmap(reinterpret_cast<void*>(end), b + span - end);
  return static_cast<uint8_t*>(p);
}
}  // namespace

GuestMemory::GuestMemory(const std::vector<std::pair<uint64_t, uint64_t>>& layout, RamBacking backing,
                         const std::string& name) {
  total_ = CheckedTotal(layout, "create guest memory");
  if (backing == RamBacking::Memfd) {
    fd_ = memfd_create(name.c_str(), MFD_CLOEXEC);
    if (fd_ < 0) throw SysError(ErrorKind::Memory, "memfd_create for guest RAM");
    if (ftruncate(fd_, static_cast<off_t>(total_)) != 0) {
      auto e = SysError(ErrorKind::Memory, "size guest RAM memfd", std::to_string(total_) + " bytes");
      close(fd_);
      throw e;
    }
  }
  // Huge pages where the host allows them (anonymous: transparent_hugepage/
  // enabled = madvise, Debian's default, or always; a memfd: shmem_enabled =
  // advise or better, `never` by default): KVM then maps RAM with 2 MiB
  // NPT/EPT entries, and a Linux boot to the agent takes ~20 nested page faults
  // instead of ~7,000 (hack/bench/boot.bench.ts in the lab: ~8,000 KVM exits
  // down to ~1,500). A refusal only loses the speed-up. The cost: a guest that
  // touches one byte of a 2 MiB range gets the whole range.
  // VMLET_GUEST_RAM_THP=0 turns it off (to measure without it). The KVM lab
  // hangs once blamed on it came from multi-threaded TCG (hack/lab/README.md).
  const char* thp = getenv("VMLET_GUEST_RAM_THP");
  const bool huge = !(thp && std::string(thp) == "0");
  uint64_t off = 0;
  try {
    for (auto& [gpa, size] : layout) {
      // MAP_NORESERVE: guests touch a fraction of their RAM; pages come on demand.
      const int flags = fd_ >= 0 ? MAP_SHARED | MAP_NORESERVE : MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
      uint8_t* p = MapHugeAligned(size, flags, fd_, fd_ >= 0 ? off : 0, "mmap guest RAM");
      regions_.push_back(MemoryRegion{gpa, size, p, off});
      if (huge) madvise(p, size, MADV_HUGEPAGE);
      // Private RAM must not be inherited by a fork (Node forks for every child
      // process it spawns): the fork would make every guest page copy-on-write
      // in this process until the child execs, so guest writes meanwhile fault
      // and copy, and a page pinned for KVM or I/O could be split from the
      // guest's view. Shared memfd pages have no such hazard.
      if (fd_ < 0 && madvise(p, size, MADV_DONTFORK) != 0)
        throw SysError(ErrorKind::Memory, "exclude guest RAM from fork (MADV_DONTFORK)", std::to_string(size) + " bytes");
      off += size;
    }
  } catch (...) {
    for (auto& r : regions_) munmap(r.host, r.size);
    if (fd_ >= 0) close(fd_);
    throw;
  }
}

GuestMemory::GuestMemory(const std::vector<std::pair<uint64_t, uint64_t>>& layout, const PrivateFile& file) {
  const char* op = "map guest memory file";
  total_ = CheckedTotal(layout, op);
  // Overlays are checked whole before anything is mapped.
  struct OpenOverlay {
    uint64_t gpa = 0, size = 0;
    int fd = -1;
    std::string path;
  };
  std::vector<OpenOverlay> overlays;
  int fd = -1;
  auto release = [&] {
    for (auto& r : regions_) munmap(r.host, r.size);
    regions_.clear();
    for (auto& o : overlays) close(o.fd);
    if (fd >= 0) close(fd);
  };
  try {
    for (const Overlay& o : file.overlays) {
      OpenOverlay oo;
      oo.gpa = o.gpa;
      oo.path = o.path;
      oo.fd = open(o.path.c_str(), O_RDONLY | O_CLOEXEC);
      if (oo.fd < 0) throw SysError(ErrorKind::Memory, "open guest memory overlay", o.path);
      overlays.push_back(oo);
      struct stat st {};
      if (fstat(oo.fd, &st) != 0) throw SysError(ErrorKind::Memory, "stat guest memory overlay", o.path);
      overlays.back().size = static_cast<uint64_t>(st.st_size);
      const uint64_t size = overlays.back().size;
      if (o.gpa % kHugePage || size == 0 || size % kHugePage)
        throw VmmError(ErrorKind::Memory, op, "overlay " + o.path + " at guest address " + std::to_string(o.gpa) + " of " +
                                                  std::to_string(size) + " bytes: give a 2 MiB-aligned address and a non-empty file of whole 2 MiB");
      bool inside = false;
      for (auto& [gpa, rsize] : layout) inside |= o.gpa >= gpa && o.gpa - gpa <= rsize && size <= rsize - (o.gpa - gpa);
      if (!inside)
        throw VmmError(ErrorKind::Memory, op, "overlay " + o.path + " at guest address " + std::to_string(o.gpa) + " of " +
                                                  std::to_string(size) + " bytes is not inside one RAM region");
    }
    for (size_t i = 0; i < overlays.size(); i++)
      for (size_t j = i + 1; j < overlays.size(); j++)
        if (overlays[i].gpa < overlays[j].gpa + overlays[j].size && overlays[j].gpa < overlays[i].gpa + overlays[i].size)
          throw VmmError(ErrorKind::Memory, op, "overlays " + overlays[i].path + " and " + overlays[j].path + " overlap");

    fd = open(file.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw SysError(ErrorKind::Memory, "open guest memory file", file.path);
    struct stat st {};
    if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < total_)
      throw VmmError(ErrorKind::Memory, op,
                     file.path + " is " + std::to_string(st.st_size) + " bytes, less than the " + std::to_string(total_) + " bytes of RAM");
    uint64_t off = 0;
    for (auto& [gpa, size] : layout) {
      // Writable private mapping of a read-only fd: writes go to anonymous
      // copies, the file is never written. 2 MiB-aligned like booted RAM, so
      // that huge page-cache pages (an overlay's, or a file system's large
      // folios) can be mapped whole, by the host and by KVM.
      uint8_t* p = MapHugeAligned(size, MAP_PRIVATE | MAP_NORESERVE, fd, off, "mmap guest memory file");
      regions_.push_back(MemoryRegion{gpa, size, p, off});
      for (const OpenOverlay& o : overlays) {
        if (o.gpa < gpa || o.gpa - gpa >= size) continue;
        void* q = mmap(p + (o.gpa - gpa), o.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE | MAP_FIXED, o.fd, 0);
        if (q == MAP_FAILED) throw SysError(ErrorKind::Memory, "mmap guest memory overlay", o.path);
        overlay_bytes_ += o.size;
      }
      // Private like anonymous RAM: a fork would make it copy-on-write here too.
      madvise(p, size, MADV_DONTFORK);
      off += size;
    }
  } catch (...) {
    release();
    throw;
  }
  // The mappings keep the files; no fd needs to stay open per VM.
  for (auto& o : overlays) close(o.fd);
  close(fd);
  private_file_ = true;
}

GuestMemory::~GuestMemory() {
  for (auto& r : regions_) munmap(r.host, r.size);
  if (fd_ >= 0) close(fd_);
}

std::optional<GuestSpan> GuestMemory::Slice(uint64_t gpa, uint64_t len) const {
  for (const auto& r : regions_) {
    if (gpa < r.gpa) continue;
    uint64_t off = gpa - r.gpa;
    if (off >= r.size) continue;
    // off < size, so size - off cannot underflow; comparing this way never overflows.
    if (len > r.size - off) return std::nullopt;
    return GuestSpan{r.host + off, len};
  }
  return std::nullopt;
}

bool GuestMemory::Read(uint64_t gpa, void* dst, uint64_t len) const {
  auto s = Slice(gpa, len);
  if (!s) return false;
  if (len) std::memcpy(dst, s->data, len);
  return true;
}

bool GuestMemory::Write(uint64_t gpa, const void* src, uint64_t len) {
  auto s = Slice(gpa, len);
  if (!s) return false;
  if (len) std::memcpy(s->data, src, len);
  return true;
}

bool GuestMemory::LoadU16Acquire(uint64_t gpa, uint16_t* out) const {
  if (gpa & 1) return false;
  auto s = Slice(gpa, 2);
  if (!s) return false;
  *out = __atomic_load_n(reinterpret_cast<const uint16_t*>(s->data), __ATOMIC_ACQUIRE);
  return true;
}

bool GuestMemory::StoreU16Release(uint64_t gpa, uint16_t v) {
  if (gpa & 1) return false;
  auto s = Slice(gpa, 2);
  if (!s) return false;
  __atomic_store_n(reinterpret_cast<uint16_t*>(s->data), v, __ATOMIC_RELEASE);
  return true;
}

}  // namespace vmlet
