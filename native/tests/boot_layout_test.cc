// The memory layout both boot paths produce, checked byte by byte without
// KVM: what the guest finds at start_info / boot_params, the e820 map, the
// command line, the initrd, the page tables; and the refusal of images that
// cannot boot, each with the BootError a user would read.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "boot/loader.h"
#include "core/error.h"
#include "testing.h"

using namespace vmlet;
using namespace vmlet::boot;

namespace {

constexpr uint64_t kMiB = 1 << 20;

// Every file a case writes is removed when the test binary exits.
struct TempFiles {
  std::vector<std::string> paths;
  ~TempFiles() {
    for (auto& p : paths) unlink(p.c_str());
  }
};
TempFiles g_temp_files;

std::string TempFile(const std::string& name, const std::vector<uint8_t>& bytes) {
  std::string path = "/tmp/vmlet-boot-test-" + std::to_string(getpid()) + "-" + name;
  g_temp_files.paths.push_back(path);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return path;
}

template <typename T>
void Put(std::vector<uint8_t>& b, size_t off, T v) {
  if (b.size() < off + sizeof v) b.resize(off + sizeof v);
  std::memcpy(b.data() + off, &v, sizeof v);
}

template <typename T>
T Get(const GuestMemory& mem, uint64_t gpa) {
  T v{};
  if (!mem.ReadObj(gpa, &v)) throw testing::Failure("guest read at " + std::to_string(gpa) + " failed");
  return v;
}

struct ElfSpec {
  bool is64 = true;
  bool pvh_note = true;
  uint64_t paddr = 0x100000;
  uint64_t entry = 0x100000;
  std::vector<uint8_t> code = {0xf4};
  uint64_t memsz = 0;  // 0: code size
};

std::vector<uint8_t> MakeElf(const ElfSpec& s) {
  std::vector<uint8_t> b(0x100, 0);
  uint16_t ehsize = s.is64 ? 64 : 52, phentsize = s.is64 ? 56 : 32;
  uint16_t phnum = s.pvh_note ? 2 : 1;
  std::memcpy(b.data(), "\x7f" "ELF", 4);
  b[4] = s.is64 ? 2 : 1;
  b[5] = 1;
  b[6] = 1;
  Put<uint16_t>(b, 16, 2);
  Put<uint16_t>(b, 18, s.is64 ? 62 : 3);
  Put<uint32_t>(b, 20, 1);
  uint64_t code_off = 0x100, note_off = ehsize + phnum * phentsize;
  uint64_t memsz = s.memsz ? s.memsz : s.code.size();
  auto ph = [&](int i, uint32_t type, uint64_t off, uint64_t addr, uint64_t filesz, uint64_t msz) {
    size_t p = ehsize + i * phentsize;
    Put<uint32_t>(b, p, type);
    if (s.is64) {
      Put<uint64_t>(b, p + 8, off);
      Put<uint64_t>(b, p + 16, addr);
      Put<uint64_t>(b, p + 24, addr);
      Put<uint64_t>(b, p + 32, filesz);
      Put<uint64_t>(b, p + 40, msz);
    } else {
      Put<uint32_t>(b, p + 4, static_cast<uint32_t>(off));
      Put<uint32_t>(b, p + 8, static_cast<uint32_t>(addr));
      Put<uint32_t>(b, p + 12, static_cast<uint32_t>(addr));
      Put<uint32_t>(b, p + 16, static_cast<uint32_t>(filesz));
      Put<uint32_t>(b, p + 20, static_cast<uint32_t>(msz));
    }
  };
  if (s.is64) {
    Put<uint64_t>(b, 24, s.entry);
    Put<uint64_t>(b, 32, ehsize);
    Put<uint16_t>(b, 54, phentsize);
    Put<uint16_t>(b, 56, phnum);
  } else {
    Put<uint32_t>(b, 24, static_cast<uint32_t>(s.entry));
    Put<uint32_t>(b, 28, ehsize);
    Put<uint16_t>(b, 42, phentsize);
    Put<uint16_t>(b, 44, phnum);
  }
  ph(0, 1, code_off, s.paddr, s.code.size(), memsz);
  if (s.pvh_note) {
    ph(1, 4, note_off, 0, 20, 20);
    Put<uint32_t>(b, note_off, 4);
    Put<uint32_t>(b, note_off + 4, 4);
    Put<uint32_t>(b, note_off + 8, 18);
    std::memcpy(b.data() + note_off + 12, "Xen", 4);
    Put<uint32_t>(b, note_off + 16, static_cast<uint32_t>(s.entry));
  }
  b.resize(code_off);
  b.insert(b.end(), s.code.begin(), s.code.end());
  return b;
}

// A bzImage: boot sector + setup_sects of setup code, then the protected-mode payload.
std::vector<uint8_t> MakeBzImage(uint16_t version, uint32_t initrd_max, uint32_t cmdline_size,
                                 const std::vector<uint8_t>& payload) {
  const uint8_t setup_sects = 4;
  std::vector<uint8_t> b((setup_sects + 1) * 512, 0);
  b[zp::kSetupSects] = setup_sects;
  Put<uint16_t>(b, zp::kBootFlag, 0xaa55);
  b[zp::kJump] = 0xeb;
  b[zp::kJump + 1] = 0x6a;  // header runs to 0x26c
  Put<uint32_t>(b, zp::kHeader, zp::kHdrMagic);
  Put<uint16_t>(b, zp::kVersion, version);
  b[zp::kLoadFlags] = 0x01;  // LOADED_HIGH
  Put<uint32_t>(b, zp::kInitrdAddrMax, initrd_max);
  Put<uint32_t>(b, zp::kKernelAlignment, 0x200000);
  b[zp::kRelocatable] = 1;
  Put<uint16_t>(b, zp::kXLoadFlags, 0x1);  // XLF_KERNEL_64
  Put<uint32_t>(b, zp::kCmdlineSize, cmdline_size);
  Put<uint64_t>(b, zp::kPrefAddress, 0x1000000);
  Put<uint32_t>(b, zp::kInitSize, static_cast<uint32_t>(4 * kMiB));
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i++) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

// Runs the loader and returns the BootError message; fails if it did not throw one.
std::string BootErrorOf(GuestMemory& mem, const BootSpec& spec) {
  try {
    LoadKernel(mem, spec);
  } catch (const VmmError& e) {
    if (e.kind() != ErrorKind::Boot) throw testing::Failure(std::string("expected a BootError, got: ") + e.what());
    return e.what();
  }
  throw testing::Failure("expected LoadKernel to refuse " + spec.kernel);
}

#define EXPECT_CONTAINS(haystack, needle)                                                              \
  do {                                                                                                 \
    std::string h_ = (haystack);                                                                       \
    if (h_.find(needle) == std::string::npos)                                                          \
      throw ::vmlet::testing::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) +         \
                                      ": expected \"" + h_ + "\" to contain \"" + (needle) + "\"");   \
  } while (0)

}  // namespace

TEST_CASE("boot: RAM is split at the MMIO hole and the e820 map leaves out the BIOS area") {
  auto small = RamLayout(64 * kMiB);
  EXPECT_EQ(small.size(), size_t{1});
  EXPECT_EQ(small[0].second, 64 * kMiB);
  auto big = RamLayout(4096 * kMiB);
  EXPECT_EQ(big.size(), size_t{2});
  EXPECT_EQ(big[0].first, uint64_t{0});
  EXPECT_EQ(big[0].second, kMmioHoleStart);
  EXPECT_EQ(big[1].first, kHighRamStart);
  EXPECT_EQ(big[1].second, 4096 * kMiB - kMmioHoleStart);
  auto map = MemoryMap(big);
  EXPECT_EQ(map.size(), size_t{3});
  EXPECT_EQ(map[0].addr, uint64_t{0});
  EXPECT_EQ(map[0].size, kEbdaStart);
  EXPECT_EQ(map[1].addr, kHighMemStart);
  EXPECT_EQ(map[1].size, kMmioHoleStart - kHighMemStart);
  EXPECT_EQ(map[2].addr, kHighRamStart);
  for (auto& e : map) EXPECT_EQ(e.type, kE820Ram);
}

TEST_CASE("boot: PVH ELF64 gets start_info, memmap, command line and initrd module in low memory") {
  GuestMemory mem(RamLayout(64 * kMiB));
  ElfSpec es;
  es.code = Pattern(3000, 1);
  es.memsz = 8192;
  es.entry = 0x100010;
  auto initrd = Pattern(100000, 9);
  BootSpec spec{TempFile("pvh64", MakeElf(es)), TempFile("initrd", initrd), "console=ttyS0 tg.mode=all", Protocol::Auto};
  BootPlan plan = LoadKernel(mem, spec);
  EXPECT(plan.protocol == Protocol::Pvh);
  EXPECT_EQ(plan.entry, uint64_t{0x100010});
  EXPECT_EQ(plan.boot_info, kPvhStartInfo);
  EXPECT_EQ(plan.page_tables, uint64_t{0});
  EXPECT_EQ(plan.kernel_start, uint64_t{0x100000});
  EXPECT_EQ(plan.kernel_end, uint64_t{0x100000 + 8192});
  std::vector<uint8_t> loaded(3000);
  EXPECT(mem.Read(0x100000, loaded.data(), loaded.size()));
  EXPECT(loaded == es.code);

  auto si = Get<HvmStartInfo>(mem, kPvhStartInfo);
  EXPECT_EQ(si.magic, kHvmStartMagic);
  EXPECT_EQ(si.version, uint32_t{1});
  EXPECT_EQ(si.cmdline_paddr, kCmdline);
  EXPECT_EQ(si.memmap_paddr, kPvhMemmap);
  EXPECT_EQ(si.memmap_entries, uint32_t{2});
  EXPECT_EQ(si.nr_modules, uint32_t{1});
  EXPECT_EQ(si.modlist_paddr, kPvhModlist);

  char cmdline[64] = {};
  EXPECT(mem.Read(kCmdline, cmdline, sizeof cmdline));
  EXPECT(std::string(cmdline) == "console=ttyS0 tg.mode=all");

  auto m0 = Get<HvmMemmapEntry>(mem, kPvhMemmap);
  auto m1 = Get<HvmMemmapEntry>(mem, kPvhMemmap + sizeof(HvmMemmapEntry));
  EXPECT_EQ(m0.addr, uint64_t{0});
  EXPECT_EQ(m0.size, kEbdaStart);
  EXPECT_EQ(m0.type, kE820Ram);
  EXPECT_EQ(m1.addr, kHighMemStart);
  EXPECT_EQ(m1.size, 64 * kMiB - kHighMemStart);

  // The initrd sits page-aligned at the top of RAM, and the module list says where.
  auto mod = Get<HvmModlistEntry>(mem, kPvhModlist);
  EXPECT_EQ(mod.size, uint64_t{100000});
  EXPECT_EQ(mod.paddr, (64 * kMiB - 100000) & ~uint64_t{0xfff});
  EXPECT_EQ(mod.paddr, plan.initrd_addr);
  std::vector<uint8_t> got(initrd.size());
  EXPECT(mem.Read(mod.paddr, got.data(), got.size()));
  EXPECT(got == initrd);

  // The boot GDT is in place for guests that reload segments from GDTR.
  EXPECT_EQ(Get<uint64_t>(mem, kGdtAddr + kSelCode32), kGdt[1]);
  EXPECT_EQ(Get<uint64_t>(mem, kGdtAddr + kSelData), kGdt[3]);
}

TEST_CASE("boot: PVH ELF32 (i386) with the note is accepted, without initrd no module is listed") {
  GuestMemory mem(RamLayout(16 * kMiB));
  ElfSpec es;
  es.is64 = false;
  es.entry = 0x100000;
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("pvh32", MakeElf(es)), "", "", Protocol::Pvh});
  EXPECT(plan.protocol == Protocol::Pvh);
  EXPECT_EQ(plan.entry, uint64_t{0x100000});
  auto si = Get<HvmStartInfo>(mem, kPvhStartInfo);
  EXPECT_EQ(si.nr_modules, uint32_t{0});
  EXPECT_EQ(si.modlist_paddr, uint64_t{0});
  EXPECT_EQ(Get<uint8_t>(mem, kCmdline), uint8_t{0});
}

TEST_CASE("boot: an ELF64 vmlinux without PVH note gets boot_params, e820, cmdline and 4 GiB identity map") {
  GuestMemory mem(RamLayout(128 * kMiB));
  ElfSpec es;
  es.pvh_note = false;
  es.paddr = 0x1000000;
  es.entry = 0x1000000;
  es.code = Pattern(4096, 3);
  auto initrd = Pattern(5000, 4);
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("vmlinux", MakeElf(es)), TempFile("initrd2", initrd), "root=/dev/vda", Protocol::Auto});
  EXPECT(plan.protocol == Protocol::Linux64);
  EXPECT_EQ(plan.entry, uint64_t{0x1000000});
  EXPECT_EQ(plan.boot_info, kZeroPage);
  EXPECT_EQ(plan.page_tables, kPml4);

  EXPECT_EQ(Get<uint16_t>(mem, kZeroPage + zp::kBootFlag), uint16_t{0xaa55});
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kHeader), zp::kHdrMagic);
  EXPECT_EQ(Get<uint8_t>(mem, kZeroPage + zp::kTypeOfLoader), uint8_t{0xff});
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kCmdLinePtr), uint32_t{kCmdline});
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kRamdiskImage), static_cast<uint32_t>(plan.initrd_addr));
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kRamdiskSize), uint32_t{5000});
  EXPECT_EQ(plan.initrd_addr, (128 * kMiB - 5000) & ~uint64_t{0xfff});
  EXPECT(plan.initrd_addr >= plan.kernel_end);

  EXPECT_EQ(Get<uint8_t>(mem, kZeroPage + zp::kE820Entries), uint8_t{2});
  EXPECT_EQ(Get<uint64_t>(mem, kZeroPage + zp::kE820Table), uint64_t{0});
  EXPECT_EQ(Get<uint64_t>(mem, kZeroPage + zp::kE820Table + 8), kEbdaStart);
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kE820Table + 16), kE820Ram);
  EXPECT_EQ(Get<uint64_t>(mem, kZeroPage + zp::kE820Table + 20), kHighMemStart);
  EXPECT_EQ(Get<uint64_t>(mem, kZeroPage + zp::kE820Table + 28), 128 * kMiB - kHighMemStart);

  // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
  EXPECT_EQ(Get<uint64_t>(mem, kPml4), kPdpt | 3);
  for (uint64_t i = 0; i < 4; i++) EXPECT_EQ(Get<uint64_t>(mem, kPdpt + i * 8), (kPd + i * 0x1000) | 3);
  EXPECT_EQ(Get<uint64_t>(mem, kPdpt + 4 * 8), uint64_t{0});
  EXPECT_EQ(Get<uint64_t>(mem, kPd), uint64_t{0x83});
  EXPECT_EQ(Get<uint64_t>(mem, kPd + 0x1000 + 5 * 8), ((uint64_t{1} << 30) + (5 << 21)) | 0x83);
  EXPECT_EQ(Get<uint64_t>(mem, kPd + 0x3000 + 511 * 8), ((uint64_t{4} << 30) - (2 << 20)) | 0x83);
  // 64-bit code at __BOOT_CS (0x10), data at __BOOT_DS (0x18), as boot.rst requires.
  EXPECT_EQ(Get<uint64_t>(mem, kGdtAddr + kSelCode64), uint64_t{0x00af9b000000ffff});
  EXPECT_EQ(Get<uint64_t>(mem, kGdtAddr + kSelData), uint64_t{0x00cf93000000ffff});
}

TEST_CASE("boot: a bzImage's setup header is copied, the kernel loaded at 1 MiB, the initrd kept under initrd_addr_max") {
  GuestMemory mem(RamLayout(64 * kMiB));
  auto payload = Pattern(10000, 5);
  auto initrd = Pattern(70000, 6);
  uint32_t initrd_max = 32 * kMiB - 1;
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("bz", MakeBzImage(0x020f, initrd_max, 255, payload)), TempFile("initrd3", initrd),
                                           "console=ttyS0", Protocol::Auto});
  EXPECT(plan.protocol == Protocol::Linux64);
  EXPECT_EQ(plan.kernel_start, uint64_t{0x100000});
  EXPECT_EQ(plan.entry, uint64_t{0x100200});  // startup_64
  EXPECT_EQ(plan.kernel_end, uint64_t{0x100000} + 4 * kMiB);  // init_size, not the file size
  std::vector<uint8_t> got(payload.size());
  EXPECT(mem.Read(0x100000, got.data(), got.size()));
  EXPECT(got == payload);
  EXPECT_EQ(Get<uint16_t>(mem, kZeroPage + zp::kVersion), uint16_t{0x020f});
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kCode32Start), uint32_t{0x100000});
  EXPECT_EQ(Get<uint8_t>(mem, kZeroPage + zp::kLoadFlags), uint8_t{0x81});  // LOADED_HIGH | CAN_USE_HEAP
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kCmdlineSize), uint32_t{255});
  EXPECT_EQ(Get<uint32_t>(mem, kZeroPage + zp::kInitrdAddrMax), initrd_max);
  EXPECT_EQ(plan.initrd_addr + plan.initrd_size <= uint64_t{initrd_max} + 1, true);
  EXPECT_EQ(plan.initrd_addr, (32 * kMiB - 70000) & ~uint64_t{0xfff});
  std::vector<uint8_t> rd(initrd.size());
  EXPECT(mem.Read(plan.initrd_addr, rd.data(), rd.size()));
  EXPECT(rd == initrd);
}

TEST_CASE("boot: unbootable images are refused with a BootError that says why") {
  GuestMemory mem(RamLayout(16 * kMiB));
  EXPECT_CONTAINS(BootErrorOf(mem, {"/nonexistent/vmlinux", "", "", Protocol::Auto}), "does not exist: check VmConfig.kernel");
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("garbage", Pattern(5000, 0x42)), "", "", Protocol::Auto}),
                  "neither an ELF file nor a bzImage");
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("empty", {}), "", "", Protocol::Auto}), "neither an ELF file nor a bzImage");

  auto elf = MakeElf(ElfSpec{});
  auto header_only = std::vector<uint8_t>(elf.begin(), elf.begin() + 70);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("trunc-ph", header_only), "", "", Protocol::Auto}), "truncated");
  ElfSpec big;
  big.code = Pattern(4096, 1);
  auto seg = MakeElf(big);
  seg.resize(seg.size() - 100);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("trunc-seg", seg), "", "", Protocol::Auto}), "truncated: segment 0");

  ElfSpec nonote;
  nonote.pvh_note = false;
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("nonote", MakeElf(nonote)), "", "", Protocol::Pvh}), "no PVH entry note");
  nonote.is64 = false;
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("elf32-nonote", MakeElf(nonote)), "", "", Protocol::Auto}),
                  "ELF32 image without a PVH entry note");

  ElfSpec low;
  low.paddr = 0x7000;
  low.entry = 0x7000;
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("low", MakeElf(low)), "", "", Protocol::Auto}), "below 1 MiB");
  ElfSpec huge;
  huge.memsz = 64 * kMiB;
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("huge", MakeElf(huge)), "", "", Protocol::Auto}), "does not fit in guest RAM");

  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("bz-old", MakeBzImage(0x0206, 0x37ffffff, 255, Pattern(512, 1))), "", "", Protocol::Auto}),
                  "bzImage boot protocol 2.06 is too old");
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("bz-pvh", MakeBzImage(0x020f, 0x37ffffff, 255, Pattern(512, 1))), "", "", Protocol::Pvh}),
                  "PVH boot was requested but this is a bzImage");
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("bz-cmd", MakeBzImage(0x020f, 0x37ffffff, 10, Pattern(512, 1))), "",
                                    "console=ttyS0 quiet", Protocol::Auto}),
                  "accepts at most 10");

  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("ok", MakeElf(ElfSpec{})), TempFile("big-initrd", Pattern(15 * kMiB, 2)), "", Protocol::Auto}),
                  "do not fit between the kernel's end");
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("ok2", MakeElf(ElfSpec{})), "/nonexistent/initrd.img", "", Protocol::Auto}),
                  "/nonexistent/initrd.img does not exist: check VmConfig.initrd");
}
