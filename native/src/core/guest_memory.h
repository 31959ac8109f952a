// Guest RAM and the one accessor through which every device touches it.
//
// Hazard this file exists for: every address a device reads from a virtqueue
// is chosen by the guest. A descriptor may point past RAM, straddle two
// regions, or wrap around 2^64. Nothing outside this class may turn a guest
// physical address into a host pointer; everything here checks the whole
// range [gpa, gpa+len) with overflow-safe arithmetic first, and a range that
// crosses a region boundary is refused (regions are not contiguous on the host).
//
// A booted VM's RAM is anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS): it gets
// transparent huge pages under the host's default THP setting (`enabled` =
// madvise), which a memfd does not (shmem_enabled is `never` by default), and
// without them every 4 KiB the guest touches is a nested page fault. A memfd
// (RamBacking::Memfd) stays available for callers that need RAM as a file.
// A snapshot writes either kind out (snapshot/memory.cc); a restored VM maps
// that file copy-on-write (PrivateFile).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace vmlet {

struct MemoryRegion {
  uint64_t gpa = 0;     // guest physical start
  uint64_t size = 0;    // bytes
  uint8_t* host = nullptr;
  // Offset of this region in the RAM's file layout (region i at the sum of the
  // sizes before it): the memfd's offset, the snapshot memory file's offset.
  uint64_t fd_offset = 0;
};

enum class RamBacking {
  Anonymous,  // private anonymous memory, huge pages where THP allows (the default)
  Memfd,      // one shared memfd for all regions; fd() is its descriptor
};

// A checked view of guest memory: valid only while the GuestMemory lives.
struct GuestSpan {
  uint8_t* data = nullptr;
  uint64_t size = 0;
};

class GuestMemory {
 public:
  // Layout: the caller passes (gpa, size) pairs, each mapped on its own.
  // Sizes must be page multiples. Throws VmmError(Memory) on failure.
  // Each region's host mapping starts on a 2 MiB boundary so that THP (and
  // KVM's 2 MiB stage-2 entries, which need gpa and host address congruent
  // modulo 2 MiB) can cover it. MADV_HUGEPAGE unless VMLET_GUEST_RAM_THP=0.
  explicit GuestMemory(const std::vector<std::pair<uint64_t, uint64_t>>& layout,
                       RamBacking backing = RamBacking::Anonymous,
                       const std::string& name = "vmlet-guest-ram");
  // A restored VM's RAM: each region mapped MAP_PRIVATE from `path` at its
  // offset in the layout (copy-on-write: a page is read from the file when
  // first touched and copied only when the guest writes it; never copied up
  // front). The file must be at least the layout's total size. Hazard: a
  // page the guest never wrote is still the file's, so the file must not
  // change while a VM maps it. fd() is -1 in this mode.
  //
  // Overlays: ranges of RAM read from another file instead, each mapped
  // MAP_PRIVATE over its range (still copy-on-write, the file never written).
  // What they are for: a file on a huge-page tmpfs (huge=always) holding the
  // same bytes as the memory file there gives the host 2 MiB page-cache pages
  // for that range, and KVM then maps it with 2 MiB stage-2 entries: a
  // restored guest's kernel text, read all over and never written, takes a
  // handful of nested page faults instead of ~230 (shim/sandbox/huge-text.ts).
  // Each overlay's gpa and its file's size are 2 MiB multiples, it lies inside
  // one region, and overlays do not overlap; otherwise VmmError(Memory). Hazard:
  // the caller vouches that the file holds the memory file's bytes for the
  // range: the guest sees whatever it holds.
  struct Overlay {
    uint64_t gpa = 0;
    std::string path;
  };
  struct PrivateFile {
    std::string path;
    std::vector<Overlay> overlays;
  };
  GuestMemory(const std::vector<std::pair<uint64_t, uint64_t>>& layout, const PrivateFile& file);
  ~GuestMemory();
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  const std::vector<MemoryRegion>& regions() const { return regions_; }
  // The memfd (RamBacking::Memfd only); -1 for anonymous and private-file RAM.
  int fd() const { return fd_; }
  uint64_t total_size() const { return total_; }
  bool private_file() const { return private_file_; }
  // Bytes of RAM mapped from overlay files (PrivateFile::overlays).
  uint64_t overlay_bytes() const { return overlay_bytes_; }
  bool anonymous() const { return fd_ < 0 && !private_file_; }

  // The single checked translation. nullopt when any byte of the range is
  // outside one region, or gpa+len overflows. len == 0 is valid only inside RAM.
  std::optional<GuestSpan> Slice(uint64_t gpa, uint64_t len) const;

  [[nodiscard]] bool Read(uint64_t gpa, void* dst, uint64_t len) const;
  [[nodiscard]] bool Write(uint64_t gpa, const void* src, uint64_t len);

  template <typename T>
  [[nodiscard]] bool ReadObj(uint64_t gpa, T* out) const {
    static_assert(std::is_trivially_copyable<T>::value, "plain data only");
    return Read(gpa, out, sizeof(T));
  }
  template <typename T>
  [[nodiscard]] bool WriteObj(uint64_t gpa, const T& v) {
    static_assert(std::is_trivially_copyable<T>::value, "plain data only");
    return Write(gpa, &v, sizeof(T));
  }

  // Ring indexes are shared with a guest running on another CPU: reads of the
  // guest's index need acquire ordering, our index updates need release, or the
  // guest can observe an index before the entries it covers. Alignment is
  // checked because a misaligned 16-bit access is not single-copy atomic.
  [[nodiscard]] bool LoadU16Acquire(uint64_t gpa, uint16_t* out) const;
  [[nodiscard]] bool StoreU16Release(uint64_t gpa, uint16_t v);

 private:
  int fd_ = -1;
  uint64_t total_ = 0;
  std::vector<MemoryRegion> regions_;
  bool private_file_ = false;
  uint64_t overlay_bytes_ = 0;
};

}  // namespace vmlet
