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

// A file's bytes. Not a std::vector: that would zero the buffer before read()
// overwrites it, an extra pass over a ~20 MiB vmlinux on every boot. Loading
// the kernel is most of Vm.create (dev host, p50: ~18 ms with memfd RAM, ~8 ms
// with anonymous huge-page RAM, ~2 ms for a tiny ELF); the copy into guest
// RAM and that RAM's page faults are the rest of it.
class FileBytes {
 public:
  explicit FileBytes(size_t n) : p_(new uint8_t[n]), n_(n) {}  // default-initialised: not zeroed
  uint8_t* data() { return p_.get(); }
  const uint8_t* data() const { return p_.get(); }
  size_t size() const { return n_; }

 private:
  std::unique_ptr<uint8_t[]> p_;
  size_t n_;
};

FileBytes ReadWholeFile(const std::string& path, const char* what, const char* field, uint64_t limit) {
  if (path.empty()) Fail(std::string("load ") + what, std::string("no file given: set VmConfig.") + field);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    if (e == ENOENT)
      Fail(std::string("load ") + what, path + " does not exist: check VmConfig." + field, e);
    Fail(std::string("load ") + what, "cannot open " + path, e);
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    int e = errno;
    close(fd);
    Fail(std::string("load ") + what, path + " is not a regular file", S_ISREG(st.st_mode) ? e : 0);
  }
  if (static_cast<uint64_t>(st.st_size) > limit) {
    close(fd);
    Fail(std::string("load ") + what, path + " is " + std::to_string(st.st_size) +
                                          " bytes, more than the guest's RAM can hold: give the VM more memory");
  }
  FileBytes buf(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < buf.size()) {
    ssize_t n = read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int e = n < 0 ? errno : 0;
      close(fd);
      Fail(std::string("load ") + what, "short read of " + path, e);
    }
    got += static_cast<size_t>(n);
  }
  close(fd);
  return buf;
}

// Bounds-checked little-endian field access into a file image: a truncated
// or lying header becomes a BootError, never a read past the buffer.
class Image {
 public:
  Image(const FileBytes& b, std::string path) : b_(b), path_(std::move(path)) {}
  template <typename T>
  T Get(uint64_t off, const char* field) const {
    T v;
    if (off > b_.size() || sizeof(T) > b_.size() - off)
      Fail("parse kernel " + path_, std::string("file is truncated: ") + field + " at offset " + Hex(off) +
                                        " lies past its end (" + std::to_string(b_.size()) + " bytes)");
    std::memcpy(&v, b_.data() + off, sizeof(T));
    return v;
  }
  bool Has(uint64_t off, uint64_t len) const { return off <= b_.size() && len <= b_.size() - off; }
  const uint8_t* data() const { return b_.data(); }
  uint64_t size() const { return b_.size(); }
  const std::string& path() const { return path_; }

 private:
  const FileBytes& b_;
  std::string path_;
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

void ParseNotes(const Image& img, uint64_t off, uint64_t len, Elf& elf) {
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
    if (namesz == 4 && std::memcmp(img.data() + name_off, "Xen", 4) == 0 && type == kXenElfnotePhys32Entry) {
      if (descsz == 4) elf.pvh_entry = img.Get<uint32_t>(desc_off, "PVH entry");
      else if (descsz == 8) elf.pvh_entry = img.Get<uint64_t>(desc_off, "PVH entry");
      else Fail("parse kernel " + img.path(), "PVH entry note has a " + std::to_string(descsz) + "-byte value, expected 4 or 8");
    }
    off = next;
  }
}

Elf ParseElf(const Image& img) {
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
      ParseNotes(img, s.offset, s.filesz, elf);
    } else {
      if (s.filesz > s.memsz) Fail("parse kernel " + img.path(), "segment " + std::to_string(i) + " has p_filesz > p_memsz");
      if (s.memsz) elf.loads.push_back(s);
    }
  }
  if (elf.loads.empty()) Fail("parse kernel " + img.path(), "ELF has no loadable segment");
  return elf;
}

void LoadSegments(GuestMemory& mem, const Image& img, const std::vector<Segment>& loads, uint64_t* start, uint64_t* end) {
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
    // Fresh guest RAM (new anonymous memory or a new memfd) reads as zero, so bss needs no clearing.
    if (!mem.Write(s.paddr, img.data() + s.offset, s.filesz))
      Fail("load kernel " + img.path(), "cannot write segment at " + Hex(s.paddr));
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
void PlaceInitrd(GuestMemory& mem, const BootSpec& spec, uint64_t kernel_end, uint64_t limit, BootPlan& plan) {
  if (spec.initrd.empty()) return;
  auto data = ReadWholeFile(spec.initrd, "initrd", "initrd", mem.total_size());
  uint64_t top = std::min(LowRamEnd(mem), limit) & ~uint64_t{0xfff};
  uint64_t floor = (kernel_end + 0xfff) & ~uint64_t{0xfff};
  if (data.size() > top || ((top - data.size()) & ~uint64_t{0xfff}) < floor)
    Fail("place initrd " + spec.initrd, std::to_string(data.size()) + " bytes do not fit between the kernel's end " +
                                            Hex(floor) + " and " + Hex(top) + ": give the VM more memory");
  uint64_t addr = (top - data.size()) & ~uint64_t{0xfff};
  if (!mem.Write(addr, data.data(), data.size()))
    Fail("place initrd " + spec.initrd, "cannot write it at " + Hex(addr));
  plan.initrd_addr = addr;
  plan.initrd_size = data.size();
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

BootPlan LoadPvh(GuestMemory& mem, const BootSpec& spec, const Image& img, const Elf& elf) {
  BootPlan plan;
  plan.protocol = Protocol::Pvh;
  plan.entry = *elf.pvh_entry;
  LoadSegments(mem, img, elf.loads, &plan.kernel_start, &plan.kernel_end);
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

BootPlan LoadLinux(GuestMemory& mem, const BootSpec& spec, const Image& img, const Elf* elf) {
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
    LoadSegments(mem, img, elf->loads, &plan.kernel_start, &plan.kernel_end);
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
    std::memcpy(zp.data() + zp::kSetupSects, img.data() + zp::kSetupSects, hdr_end - zp::kSetupSects);
    uint64_t payload = (uint64_t{setup_sects} + 1) * 512;
    if (payload >= img.size()) Fail("load kernel " + img.path(), "file is truncated: no protected-mode kernel after the setup code");
    plan.kernel_start = kHighMemStart;
    uint64_t psize = img.size() - payload;
    uint64_t init_size = Peek<uint32_t>(zp, zp::kInitSize);
    plan.kernel_end = plan.kernel_start + std::max(psize, init_size);
    if (!mem.Slice(plan.kernel_start, plan.kernel_end - plan.kernel_start))
      Fail("load kernel " + img.path(), "kernel needs " + std::to_string((plan.kernel_end - plan.kernel_start) >> 20) +
                                            " MiB above 1 MiB (init_size): give the VM more memory");
    if (!mem.Write(plan.kernel_start, img.data() + payload, psize)) Fail("load kernel " + img.path(), "cannot write kernel");
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

BootPlan LoadKernel(GuestMemory& mem, const BootSpec& spec) {
  if (LowRamEnd(mem) < 2 * kHighMemStart)
    Fail("load kernel", "guest RAM below 4 GiB is " + std::to_string(LowRamEnd(mem) >> 10) +
                            " KiB; at least 2 MiB is needed to hold the boot structures and a kernel at 1 MiB");
  auto bytes = ReadWholeFile(spec.kernel, "kernel", "kernel", mem.total_size());
  Image img(bytes, spec.kernel);
  bool is_elf = img.size() >= 4 && std::memcmp(img.data(), "\x7f" "ELF", 4) == 0;
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
    if (elf.pvh_entry && spec.protocol != Protocol::Linux64) return LoadPvh(mem, spec, img, elf);
    return LoadLinux(mem, spec, img, &elf);
  }
  if (spec.protocol == Protocol::Pvh)
    Fail("load kernel " + spec.kernel, "PVH boot was requested but this is a bzImage: pass the ELF vmlinux with its PVH note");
  return LoadLinux(mem, spec, img, nullptr);
}

}  // namespace vmlet::boot
