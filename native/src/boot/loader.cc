#include "boot/loader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>

#include "core/error.h"

namespace vmlet::boot {

std::vector<std::pair<uint64_t, uint64_t>> RamLayout(uint64_t bytes) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  uint64_t low = std::min(bytes, kMmioHoleStart);
  out.emplace_back(0, low);
  if (bytes > low) out.emplace_back(kHighRamStart, bytes - low);
  return out;
}

std::vector<E820Entry> MemoryMap(const std::vector<std::pair<uint64_t, uint64_t>>& ram) {
  std::vector<E820Entry> map;
  for (auto& [gpa, size] : ram) {
    uint64_t end = gpa + size;
    if (gpa < kHighMemStart) {
      map.push_back({gpa, std::min(end, kEbdaStart) - gpa, kE820Ram});
      if (end > kHighMemStart) map.push_back({kHighMemStart, end - kHighMemStart, kE820Ram});
    } else {
      map.push_back({gpa, size, kE820Ram});
    }
  }
  return map;
}

namespace {

[[noreturn]] void Fail(const std::string& op, const std::string& detail, int err = 0) {
  throw VmmError(ErrorKind::Boot, op, detail, err);
}

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// An image file (kernel or initrd) kept open and read in place. Nothing reads
// a whole file any more: the headers come from its first page (kHeadBytes),
// and each payload (an ELF's PT_LOAD segments, a bzImage's protected-mode
// kernel, the initrd) is pread straight into guest RAM. Hazard this exists
// for: in the KVM lab the tree reaches L2 over 9p, where reading the 20 MiB
// vmlinux into a buffer and copying it again was most of the 112 ms p50 /
// 557 ms p90 before the first KVM_RUN, although only ~14 MiB of it is PT_LOAD
// (the rest is symbol tables the loader never looks at).
class ImageFile {
 public:
  ImageFile(const std::string& path, const char* what, const char* field) : path_(path), what_(what) {
    if (path.empty()) Fail(std::string("load ") + what, std::string("no file given: set VmConfig.") + field);
    fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      int e = errno;
      if (e == ENOENT)
        Fail(std::string("load ") + what, path + " does not exist: check VmConfig." + field, e);
      Fail(std::string("load ") + what, "cannot open " + path, e);
    }
    struct stat st {};
    if (fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      int e = errno;
      close(fd_);
      Fail(std::string("load ") + what, path + " is not a regular file", S_ISREG(st.st_mode) ? e : 0);
    }
    size_ = static_cast<uint64_t>(st.st_size);
  }
  ~ImageFile() { close(fd_); }
  ImageFile(const ImageFile&) = delete;
  ImageFile& operator=(const ImageFile&) = delete;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Exactly `len` bytes at `off`. Callers check the range against size()
  // first, with their own message; a read that still comes up short means
  // the file shrank after it was opened, which is refused the same way.
  void ReadAt(uint64_t off, void* dst, uint64_t len) const {
    auto* p = static_cast<uint8_t*>(dst);
    uint64_t got = 0;
    while (got < len) {
      // Bounded so that one call never asks for more than ssize_t can report.
      size_t want = static_cast<size_t>(std::min<uint64_t>(len - got, 1u << 30));
      ssize_t n = pread(fd_, p + got, want, static_cast<off_t>(off + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) Fail(std::string("load ") + what_, "short read of " + path_, n < 0 ? errno : 0);
      got += static_cast<uint64_t>(n);
    }
  }

  // Reads [off, off+len) into guest RAM at gpa; the caller has checked both ranges.
  void ReadInto(GuestMemory& mem, uint64_t gpa, uint64_t off, uint64_t len) const {
    if (len == 0) return;
    auto span = mem.Slice(gpa, len);
    if (!span) Fail(std::string("load ") + what_, "cannot write " + path_ + " at " + Hex(gpa));
    ReadAt(off, span->data, len);
  }

 private:
  std::string path_;
  const char* what_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Every header any supported format has sits in the first page (ELF header and,
// for every kernel we know of, its program header table; a bzImage's setup
// header ends before 0x300). Anything beyond is read on demand.
constexpr uint64_t kHeadBytes = 4096;

// Bounds-checked little-endian field access into a file image: a truncated
// or lying header becomes a BootError, never a read past the file. Fields in
// the cached window come from memory; others are pread from the file.
class Image {
 public:
  explicit Image(const ImageFile& f) : f_(f) { Cache(0, std::min(f.size(), kHeadBytes)); }
  template <typename T>
  T Get(uint64_t off, const char* field) const {
    T v;
    Read(off, &v, sizeof v, field);
    return v;
  }
  void Read(uint64_t off, void* dst, uint64_t len, const char* field) const {
    if (!Has(off, len))
      Fail("parse kernel " + path(), std::string("file is truncated: ") + field + " at offset " + Hex(off) +
                                        " lies past its end (" + std::to_string(size()) + " bytes)");
    if (off >= window_off_ && off - window_off_ <= window_.size() && len <= window_.size() - (off - window_off_))
      std::memcpy(dst, window_.data() + (off - window_off_), len);
    else
      f_.ReadAt(off, dst, len);
  }
  // Keeps [off, off+len) in memory for the Gets that follow (one pread instead
  // of one per field: each is a round trip over 9p). The range must be in the file.
  void Cache(uint64_t off, uint64_t len) {
    window_.resize(len);
    window_off_ = off;
    f_.ReadAt(off, window_.data(), len);
  }
  bool Has(uint64_t off, uint64_t len) const { return off <= size() && len <= size() - off; }
  uint64_t size() const { return f_.size(); }
  const std::string& path() const { return f_.path(); }
  const ImageFile& file() const { return f_; }

 private:
  const ImageFile& f_;
  std::vector<uint8_t> window_;
  uint64_t window_off_ = 0;
};

struct Segment {
  uint64_t offset, paddr, filesz, memsz;
};

struct Elf {
  bool is64 = false;
  uint64_t entry = 0;
  std::vector<Segment> loads;
  std::optional<uint64_t> pvh_entry;
};

constexpr uint32_t kPtLoad = 1;
constexpr uint32_t kPtNote = 4;
constexpr uint32_t kXenElfnotePhys32Entry = 18;

// Notes are small (vmlinux: 0x6c bytes); a segment up to this size is read in
// one go, a larger (odd but valid) one field by field.
constexpr uint64_t kNoteCacheMax = 64 * 1024;

void ParseNotes(Image& img, uint64_t off, uint64_t len, Elf& elf) {
  if (len <= kNoteCacheMax) img.Cache(off, len);
  uint64_t end = off + len;
  while (off + 12 <= end) {
    uint32_t namesz = img.Get<uint32_t>(off, "note namesz");
    uint32_t descsz = img.Get<uint32_t>(off + 4, "note descsz");
    uint32_t type = img.Get<uint32_t>(off + 8, "note type");
    uint64_t name_off = off + 12;
    uint64_t desc_off = name_off + ((uint64_t{namesz} + 3) & ~uint64_t{3});
    uint64_t next = desc_off + ((uint64_t{descsz} + 3) & ~uint64_t{3});
    if (next > end || !img.Has(desc_off, descsz))
      Fail("parse kernel " + img.path(), "ELF note at offset " + Hex(off) + " runs past its segment");
    char name[4] = {};
    if (namesz == 4) img.Read(name_off, name, 4, "note name");
    if (namesz == 4 && std::memcmp(name, "Xen", 4) == 0 && type == kXenElfnotePhys32Entry) {
      if (descsz == 4) elf.pvh_entry = img.Get<uint32_t>(desc_off, "PVH entry");
      else if (descsz == 8) elf.pvh_entry = img.Get<uint64_t>(desc_off, "PVH entry");
      else Fail("parse kernel " + img.path(), "PVH entry note has a " + std::to_string(descsz) + "-byte value, expected 4 or 8");
    }
    off = next;
  }
}

Elf ParseElf(Image& img) {
  Elf elf;
  uint8_t cls = img.Get<uint8_t>(4, "ELF class");
  uint8_t data = img.Get<uint8_t>(5, "ELF data encoding");
  if (data != 1) Fail("parse kernel " + img.path(), "ELF is not little-endian: not an x86 kernel");
  uint16_t machine = img.Get<uint16_t>(18, "e_machine");
  uint64_t phoff;
  uint16_t phentsize, phnum;
  if (cls == 2) {
    if (machine != 62) Fail("parse kernel " + img.path(), "ELF64 for machine " + std::to_string(machine) + ", not x86-64 (62)");
    elf.is64 = true;
    elf.entry = img.Get<uint64_t>(24, "e_entry");
    phoff = img.Get<uint64_t>(32, "e_phoff");
    phentsize = img.Get<uint16_t>(54, "e_phentsize");
    phnum = img.Get<uint16_t>(56, "e_phnum");
    if (phentsize < 56) Fail("parse kernel " + img.path(), "e_phentsize " + std::to_string(phentsize) + " is below 56");
  } else if (cls == 1) {
    if (machine != 3 && machine != 62)
      Fail("parse kernel " + img.path(), "ELF32 for machine " + std::to_string(machine) + ", not i386 (3)");
    elf.entry = img.Get<uint32_t>(24, "e_entry");
    phoff = img.Get<uint32_t>(28, "e_phoff");
    phentsize = img.Get<uint16_t>(42, "e_phentsize");
    phnum = img.Get<uint16_t>(44, "e_phnum");
    if (phentsize < 32) Fail("parse kernel " + img.path(), "e_phentsize " + std::to_string(phentsize) + " is below 32");
  } else {
    Fail("parse kernel " + img.path(), "unknown ELF class " + std::to_string(cls));
  }
  if (phnum == 0) Fail("parse kernel " + img.path(), "ELF has no program headers: nothing to load");
  if (!img.Has(phoff, uint64_t{phnum} * phentsize))
    Fail("parse kernel " + img.path(), "file is truncated: the program header table (" + std::to_string(phnum) +
                                           " entries at " + Hex(phoff) + ") lies past its end");
  // A table outside the first page: one read for all of it rather than one per field.
  if (phoff + uint64_t{phnum} * phentsize > kHeadBytes) img.Cache(phoff, uint64_t{phnum} * phentsize);
  std::vector<Segment> notes;
  for (uint16_t i = 0; i < phnum; i++) {
    uint64_t ph = phoff + uint64_t{i} * phentsize;
    uint32_t type = img.Get<uint32_t>(ph, "p_type");
    Segment s;
    if (elf.is64) {
      s = {img.Get<uint64_t>(ph + 8, "p_offset"), img.Get<uint64_t>(ph + 24, "p_paddr"),
           img.Get<uint64_t>(ph + 32, "p_filesz"), img.Get<uint64_t>(ph + 40, "p_memsz")};
    } else {
      s = {img.Get<uint32_t>(ph + 4, "p_offset"), img.Get<uint32_t>(ph + 12, "p_paddr"),
           img.Get<uint32_t>(ph + 16, "p_filesz"), img.Get<uint32_t>(ph + 20, "p_memsz")};
    }
    if (type != kPtLoad && type != kPtNote) continue;
    if (!img.Has(s.offset, s.filesz))
      Fail("parse kernel " + img.path(), "file is truncated: segment " + std::to_string(i) + " (" +
                                             std::to_string(s.filesz) + " bytes at offset " + Hex(s.offset) +
                                             ") lies past its end (" + std::to_string(img.size()) + " bytes)");
    if (type == kPtNote) {
      notes.push_back(s);  // parsed once the program headers are read: parsing moves the cached window
    } else {
      if (s.filesz > s.memsz) Fail("parse kernel " + img.path(), "segment " + std::to_string(i) + " has p_filesz > p_memsz");
      if (s.memsz) elf.loads.push_back(s);
    }
  }
  for (auto& n : notes) ParseNotes(img, n.offset, n.filesz, elf);
  if (elf.loads.empty()) Fail("parse kernel " + img.path(), "ELF has no loadable segment");
  return elf;
}

// Each segment is read from the file straight into its place in guest RAM.
// Its bss (p_memsz beyond p_filesz) is cleared only when the RAM may hold
// something: fresh guest RAM (new anonymous memory, a new memfd) reads as zero,
// and writing zeros would only fault its pages in early.
void LoadSegments(GuestMemory& mem, const Image& img, const std::vector<Segment>& loads, RamState ram_state, uint64_t* start,
                  uint64_t* end) {
  *start = UINT64_MAX;
  *end = 0;
  for (auto& s : loads) {
    if (s.paddr < kHighMemStart)
      Fail("load kernel " + img.path(), "segment at " + Hex(s.paddr) +
                                            " lies below 1 MiB, where the boot structures live: link the kernel at 1 MiB or above");
    if (s.paddr + s.memsz < s.paddr || !mem.Slice(s.paddr, s.memsz))
      Fail("load kernel " + img.path(), "segment " + Hex(s.paddr) + ".." + Hex(s.paddr + s.memsz) +
                                            " does not fit in guest RAM (" + std::to_string(mem.total_size() >> 20) +
                                            " MiB): give the VM more memory");
    img.file().ReadInto(mem, s.paddr, s.offset, s.filesz);
    if (ram_state == RamState::MayHoldData && s.memsz > s.filesz) {
      auto bss = mem.Slice(s.paddr + s.filesz, s.memsz - s.filesz);
      if (!bss) Fail("load kernel " + img.path(), "cannot clear the bss of the segment at " + Hex(s.paddr));
      std::memset(bss->data, 0, bss->size);
    }
    *start = std::min(*start, s.paddr);
    *end = std::max(*end, s.paddr + s.memsz);
  }
}

uint64_t LowRamEnd(const GuestMemory& mem) {
  for (auto& r : mem.regions())
    if (r.gpa == 0) return r.size;
  Fail("lay out guest memory", "no RAM region at address 0");
}

void WriteCmdline(GuestMemory& mem, const std::string& cmdline, uint64_t limit) {
  if (cmdline.find('\0') != std::string::npos)
    Fail("write kernel command line", "the command line contains a NUL byte");
  if (cmdline.size() + 1 > limit)
    Fail("write kernel command line", "it is " + std::to_string(cmdline.size()) + " bytes; this kernel accepts at most " +
                                          std::to_string(limit - 1));
  if (!mem.Write(kCmdline, cmdline.c_str(), cmdline.size() + 1))
    Fail("write kernel command line", "guest RAM too small for the command line at " + Hex(kCmdline));
}

// Highest page-aligned spot that ends at or below `limit` and starts above the kernel.
// The initrd is read straight into its place, so its size (fstat) decides the place first.
void PlaceInitrd(GuestMemory& mem, const BootSpec& spec, uint64_t kernel_end, uint64_t limit, BootPlan& plan) {
  if (spec.initrd.empty()) return;
  ImageFile initrd(spec.initrd, "initrd", "initrd");
  const uint64_t size = initrd.size();
  if (size > mem.total_size())
    Fail("load initrd", spec.initrd + " is " + std::to_string(size) +
                            " bytes, more than the guest's RAM can hold: give the VM more memory");
  uint64_t top = std::min(LowRamEnd(mem), limit) & ~uint64_t{0xfff};
  uint64_t floor = (kernel_end + 0xfff) & ~uint64_t{0xfff};
  if (size > top || ((top - size) & ~uint64_t{0xfff}) < floor)
    Fail("place initrd " + spec.initrd, std::to_string(size) + " bytes do not fit between the kernel's end " +
                                            Hex(floor) + " and " + Hex(top) + ": give the VM more memory");
  uint64_t addr = (top - size) & ~uint64_t{0xfff};
  if (!mem.Slice(addr, size)) Fail("place initrd " + spec.initrd, "cannot write it at " + Hex(addr));
  initrd.ReadInto(mem, addr, 0, size);
  plan.initrd_addr = addr;
  plan.initrd_size = size;
}

void WriteGdt(GuestMemory& mem) {
  if (!mem.Write(kGdtAddr, kGdt, sizeof kGdt)) Fail("write boot GDT", "guest RAM too small");
}

// 4 GiB identity map with 2 MiB pages: covers the kernel, zero page, command
// line and an initrd wherever they land below the MMIO hole.
void WritePageTables(GuestMemory& mem) {
  uint64_t pml4e = kPdpt | 0x3;
  if (!mem.WriteObj(kPml4, pml4e)) Fail("write boot page tables", "guest RAM too small");
  for (uint64_t i = 0; i < kIdentityMapped >> 30; i++) {
    uint64_t pdpte = (kPd + i * 0x1000) | 0x3;
    if (!mem.WriteObj(kPdpt + i * 8, pdpte)) Fail("write boot page tables", "guest RAM too small");
    uint64_t pd[512];
    for (uint64_t j = 0; j < 512; j++) pd[j] = ((i << 30) + (j << 21)) | 0x83;  // present, writable, 2 MiB
    if (!mem.Write(kPd + i * 0x1000, pd, sizeof pd)) Fail("write boot page tables", "guest RAM too small");
  }
}

BootPlan LoadPvh(GuestMemory& mem, const BootSpec& spec, const Image& img, const Elf& elf, RamState ram_state) {
  BootPlan plan;
  plan.protocol = Protocol::Pvh;
  plan.entry = *elf.pvh_entry;
  LoadSegments(mem, img, elf.loads, ram_state, &plan.kernel_start, &plan.kernel_end);
  WriteGdt(mem);
  WriteCmdline(mem, spec.cmdline, kCmdlineMax);
  plan.cmdline_addr = kCmdline;
  PlaceInitrd(mem, spec, plan.kernel_end, UINT64_MAX, plan);

  std::vector<std::pair<uint64_t, uint64_t>> ram;
  for (auto& r : mem.regions()) ram.emplace_back(r.gpa, r.size);
  plan.memory_map = MemoryMap(ram);

  HvmStartInfo si{};
  si.magic = kHvmStartMagic;
  si.version = 1;
  si.cmdline_paddr = kCmdline;
  si.memmap_paddr = kPvhMemmap;
  si.memmap_entries = static_cast<uint32_t>(plan.memory_map.size());
  if (plan.initrd_size) {
    si.nr_modules = 1;
    si.modlist_paddr = kPvhModlist;
    HvmModlistEntry mod{plan.initrd_addr, plan.initrd_size, 0, 0};
    if (!mem.WriteObj(kPvhModlist, mod)) Fail("write PVH module list", "guest RAM too small");
  }
  if (!mem.WriteObj(kPvhStartInfo, si)) Fail("write PVH start_info", "guest RAM too small");
  for (size_t i = 0; i < plan.memory_map.size(); i++) {
    auto& e = plan.memory_map[i];
    HvmMemmapEntry me{e.addr, e.size, e.type, 0};
    if (!mem.WriteObj(kPvhMemmap + i * sizeof me, me)) Fail("write PVH memory map", "guest RAM too small");
  }
  plan.boot_info = kPvhStartInfo;
  return plan;
}

template <typename T>
void Put(std::vector<uint8_t>& zp, uint64_t off, T v) {
  std::memcpy(zp.data() + off, &v, sizeof v);
}
template <typename T>
T Peek(const std::vector<uint8_t>& zp, uint64_t off) {
  T v;
  std::memcpy(&v, zp.data() + off, sizeof v);
  return v;
}

BootPlan LoadLinux(GuestMemory& mem, const BootSpec& spec, const Image& img, const Elf* elf, RamState ram_state) {
  BootPlan plan;
  plan.protocol = Protocol::Linux64;
  std::vector<uint8_t> zp(4096, 0);
  uint32_t initrd_max = 0x7fffffff;  // what every 64-bit kernel accepts when it does not say
  uint64_t cmdline_limit = 2048;      // protocol < 2.06 value, replaced by the header's cmdline_size

  if (elf) {
    if (!elf->is64)
      Fail("load kernel " + img.path(), "an ELF32 image without a PVH entry note cannot use the 64-bit Linux boot "
                                        "protocol: use an ELF64 vmlinux, a bzImage or a PVH kernel");
    plan.entry = elf->entry;
    LoadSegments(mem, img, elf->loads, ram_state, &plan.kernel_start, &plan.kernel_end);
    Put<uint16_t>(zp, zp::kBootFlag, 0xaa55);
    Put<uint32_t>(zp, zp::kHeader, zp::kHdrMagic);
    Put<uint32_t>(zp, zp::kKernelAlignment, 0x1000000);
    cmdline_limit = kCmdlineMax;
  } else {
    // bzImage: the setup header is copied from the image, then our fields set.
    uint16_t version = img.Get<uint16_t>(zp::kVersion, "boot protocol version");
    uint8_t loadflags = img.Get<uint8_t>(zp::kLoadFlags, "loadflags");
    uint16_t xloadflags = version >= 0x020c ? img.Get<uint16_t>(zp::kXLoadFlags, "xloadflags") : 0;
    char ver[16];
    snprintf(ver, sizeof ver, "%u.%02u", version >> 8, version & 0xff);
    if (version < 0x020c || !(xloadflags & 0x1))
      Fail("load kernel " + img.path(), std::string("bzImage boot protocol ") + ver +
                                            " is too old: vmlet enters the kernel at its 64-bit entry, which needs protocol "
                                            "2.12 (Linux 3.8) or later with XLF_KERNEL_64");
    if (!(loadflags & 0x1)) Fail("load kernel " + img.path(), "bzImage is not LOADED_HIGH (a zImage): not supported");
    uint32_t setup_sects = img.Get<uint8_t>(zp::kSetupSects, "setup_sects");
    if (setup_sects == 0) setup_sects = 4;
    uint64_t hdr_end = 0x202 + img.Get<uint8_t>(zp::kJump + 1, "setup header length");
    if (!img.Has(0, hdr_end)) Fail("load kernel " + img.path(), "file is truncated inside its setup header");
    img.Read(zp::kSetupSects, zp.data() + zp::kSetupSects, hdr_end - zp::kSetupSects, "setup header");
    uint64_t payload = (uint64_t{setup_sects} + 1) * 512;
    if (payload >= img.size()) Fail("load kernel " + img.path(), "file is truncated: no protected-mode kernel after the setup code");
    plan.kernel_start = kHighMemStart;
    uint64_t psize = img.size() - payload;
    uint64_t init_size = Peek<uint32_t>(zp, zp::kInitSize);
    plan.kernel_end = plan.kernel_start + std::max(psize, init_size);
    if (!mem.Slice(plan.kernel_start, plan.kernel_end - plan.kernel_start))
      Fail("load kernel " + img.path(), "kernel needs " + std::to_string((plan.kernel_end - plan.kernel_start) >> 20) +
                                            " MiB above 1 MiB (init_size): give the VM more memory");
    // The decompressor clears its own bss and everything up to init_size; only the file's bytes are placed.
    img.file().ReadInto(mem, plan.kernel_start, payload, psize);
    Put<uint32_t>(zp, zp::kCode32Start, static_cast<uint32_t>(plan.kernel_start));
    plan.entry = plan.kernel_start + 0x200;  // startup_64
    initrd_max = Peek<uint32_t>(zp, zp::kInitrdAddrMax);
    cmdline_limit = uint64_t{Peek<uint32_t>(zp, zp::kCmdlineSize)} + 1;
    Put<uint8_t>(zp, zp::kLoadFlags, loadflags | 0x80);  // CAN_USE_HEAP
    Put<uint16_t>(zp, zp::kHeapEndPtr, 0xfe00);
  }
  Put<uint8_t>(zp, zp::kTypeOfLoader, 0xff);  // "undefined" loader id, as boot.rst asks of new loaders

  WriteCmdline(mem, spec.cmdline, std::min(cmdline_limit, kCmdlineMax));
  plan.cmdline_addr = kCmdline;
  Put<uint32_t>(zp, zp::kCmdLinePtr, static_cast<uint32_t>(kCmdline));
  Put<uint32_t>(zp, zp::kCmdlineSize, static_cast<uint32_t>(std::min(cmdline_limit, kCmdlineMax) - 1));

  PlaceInitrd(mem, spec, plan.kernel_end, uint64_t{initrd_max} + 1, plan);
  Put<uint32_t>(zp, zp::kRamdiskImage, static_cast<uint32_t>(plan.initrd_addr));
  Put<uint32_t>(zp, zp::kRamdiskSize, static_cast<uint32_t>(plan.initrd_size));

  std::vector<std::pair<uint64_t, uint64_t>> ram;
  for (auto& r : mem.regions()) ram.emplace_back(r.gpa, r.size);
  plan.memory_map = MemoryMap(ram);
  if (plan.memory_map.size() > zp::kE820Max) Fail("write e820 map", "too many entries");
  Put<uint8_t>(zp, zp::kE820Entries, static_cast<uint8_t>(plan.memory_map.size()));
  for (size_t i = 0; i < plan.memory_map.size(); i++) {
    auto& e = plan.memory_map[i];
    uint64_t off = zp::kE820Table + i * 20;  // packed struct boot_e820_entry
    Put<uint64_t>(zp, off, e.addr);
    Put<uint64_t>(zp, off + 8, e.size);
    Put<uint32_t>(zp, off + 16, e.type);
  }
  if (!mem.Write(kZeroPage, zp.data(), zp.size())) Fail("write boot_params", "guest RAM too small");
  WriteGdt(mem);
  WritePageTables(mem);
  plan.boot_info = kZeroPage;
  plan.page_tables = kPml4;
  return plan;
}

}  // namespace

BootPlan LoadKernel(GuestMemory& mem, const BootSpec& spec, RamState ram_state) {
  if (LowRamEnd(mem) < 2 * kHighMemStart)
    Fail("load kernel", "guest RAM below 4 GiB is " + std::to_string(LowRamEnd(mem) >> 10) +
                            " KiB; at least 2 MiB is needed to hold the boot structures and a kernel at 1 MiB");
  ImageFile file(spec.kernel, "kernel", "kernel");
  Image img(file);
  char magic[4] = {};
  if (img.Has(0, 4)) img.Read(0, magic, 4, "ELF magic");
  bool is_elf = std::memcmp(magic, "\x7f" "ELF", 4) == 0;
  bool is_bz = img.Has(zp::kHeader, 4) && img.Get<uint32_t>(zp::kHeader, "header") == zp::kHdrMagic &&
               img.Get<uint16_t>(zp::kBootFlag, "boot_flag") == 0xaa55;
  if (!is_elf && !is_bz)
    Fail("load kernel " + spec.kernel, "neither an ELF file nor a bzImage (no ELF magic, no 'HdrS' setup header): "
                                       "point VmConfig.kernel at a PVH ELF, an ELF vmlinux or a bzImage");
  if (is_elf) {
    Elf elf = ParseElf(img);
    if (spec.protocol == Protocol::Pvh && !elf.pvh_entry)
      Fail("load kernel " + spec.kernel, "PVH boot was requested but the ELF has no PVH entry note "
                                         "(XEN_ELFNOTE_PHYS32_ENTRY): build the kernel with CONFIG_PVH or use the Linux protocol");
    if (elf.pvh_entry && spec.protocol != Protocol::Linux64) return LoadPvh(mem, spec, img, elf, ram_state);
    return LoadLinux(mem, spec, img, &elf, ram_state);
  }
  if (spec.protocol == Protocol::Pvh)
    Fail("load kernel " + spec.kernel, "PVH boot was requested but this is a bzImage: pass the ELF vmlinux with its PVH note");
  return LoadLinux(mem, spec, img, nullptr, ram_state);
}

}  // namespace vmlet::boot
