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
#include "boot/mptable.h"
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
    LoadKernel(mem, spec, RamState::Zero);
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
  BootPlan plan = LoadKernel(mem, spec, RamState::Zero);
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
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("pvh32", MakeElf(es)), "", "", Protocol::Pvh}, RamState::Zero);
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
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("vmlinux", MakeElf(es)), TempFile("initrd2", initrd), "root=/dev/vda", Protocol::Auto}, RamState::Zero);
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
                                           "console=ttyS0", Protocol::Auto}, RamState::Zero);
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

namespace {
uint8_t ByteSum(const GuestMemory& mem, uint64_t gpa, uint64_t len) {
  std::vector<uint8_t> b(len);
  if (!mem.Read(gpa, b.data(), len)) throw testing::Failure("read failed");
  uint8_t s = 0;
  for (uint8_t c : b) s = static_cast<uint8_t>(s + c);
  return s;
}
}  // namespace

TEST_CASE("boot: the MP table announces every vCPU, the IOAPIC and 24 interrupt pins, with valid checksums") {
  GuestMemory mem(RamLayout(16 * kMiB));
  uint64_t end = WriteMpTable(mem, 4);
  // Floating pointer where Linux scans (last KiB of base memory), pointing at the table.
  char sig[5] = {};
  EXPECT(mem.Read(kMpTableAddr, sig, 4));
  EXPECT(std::string(sig) == "_MP_");
  uint32_t table = Get<uint32_t>(mem, kMpTableAddr + 4);
  EXPECT_EQ(table, uint32_t{kMpTableAddr + 16});
  EXPECT_EQ(Get<uint8_t>(mem, kMpTableAddr + 8), uint8_t{1});
  EXPECT_EQ(Get<uint8_t>(mem, kMpTableAddr + 9), uint8_t{4});
  EXPECT_EQ(ByteSum(mem, kMpTableAddr, 16), uint8_t{0});

  EXPECT(mem.Read(table, sig, 4));
  EXPECT(std::string(sig) == "PCMP");
  uint16_t len = Get<uint16_t>(mem, table + 4);
  uint16_t count = Get<uint16_t>(mem, table + 34);
  EXPECT_EQ(uint64_t{table} + len, end);
  EXPECT_EQ(ByteSum(mem, table, len), uint8_t{0});
  EXPECT_EQ(Get<uint32_t>(mem, table + 36), uint32_t{kLapicAddr});
  // 4 processors, 1 bus, 1 IOAPIC, 24 I/O interrupts, 2 local interrupts.
  EXPECT_EQ(count, uint16_t{4 + 1 + 1 + 24 + 2});
  EXPECT_EQ(len, uint16_t{44 + 4 * 20 + 8 * (1 + 1 + 24 + 2)});
  uint64_t p = table + 44;
  for (uint8_t cpu = 0; cpu < 4; cpu++, p += 20) {
    EXPECT_EQ(Get<uint8_t>(mem, p), uint8_t{0});
    EXPECT_EQ(Get<uint8_t>(mem, p + 1), cpu);
    EXPECT_EQ(Get<uint8_t>(mem, p + 3), static_cast<uint8_t>(cpu == 0 ? 3 : 1));  // enabled, BSP first
  }
  EXPECT_EQ(Get<uint8_t>(mem, p), uint8_t{1});  // bus
  p += 8;
  EXPECT_EQ(Get<uint8_t>(mem, p), uint8_t{2});  // IOAPIC, id after the CPUs
  EXPECT_EQ(Get<uint8_t>(mem, p + 1), uint8_t{4});
  EXPECT_EQ(Get<uint32_t>(mem, p + 4), uint32_t{kIoapicAddr});
  p += 8;
  for (uint8_t pin = 0; pin < 24; pin++, p += 8) {
    EXPECT_EQ(Get<uint8_t>(mem, p), uint8_t{3});
    EXPECT_EQ(Get<uint8_t>(mem, p + 5), pin);  // ISA IRQ / GSI
    EXPECT_EQ(Get<uint8_t>(mem, p + 7), pin);  // IOAPIC pin
  }
  EXPECT_EQ(Get<uint8_t>(mem, p + 1), uint8_t{3});  // ExtINT on LINT0
  EXPECT_EQ(Get<uint8_t>(mem, p + 7), uint8_t{0});
  EXPECT_EQ(Get<uint8_t>(mem, p + 9), uint8_t{1});  // NMI on LINT1
  EXPECT_EQ(Get<uint8_t>(mem, p + 15), uint8_t{1});
  // The table stays out of the RAM the e820 map reports, below the kernel at 1 MiB.
  EXPECT(kMpTableAddr >= kEbdaStart && end <= kHighMemStart);

  EXPECT_EQ(WriteMpTable(mem, 254) <= kHighMemStart, true);
  EXPECT_THROWS(WriteMpTable(mem, 0));
  EXPECT_THROWS(WriteMpTable(mem, 255));
}

// The loader reads only headers into the process and preads every payload
// straight into guest RAM; these pin down the edges of that path.
namespace {

struct RawSegment {
  uint32_t type;
  uint64_t offset, paddr, filesz, memsz;
  std::vector<uint8_t> bytes;  // written at `offset` (may be shorter than filesz to fake a lie)
};

// An ELF64 x86-64 file with the program header table at `phoff` and the given
// segments' bytes at their offsets; `file_size` pads (or cuts) the file.
std::vector<uint8_t> RawElf64(uint64_t entry, uint64_t phoff, const std::vector<RawSegment>& segs, uint64_t file_size) {
  std::vector<uint8_t> b(64, 0);
  std::memcpy(b.data(), "\x7f" "ELF", 4);
  b[4] = 2;
  b[5] = 1;
  b[6] = 1;
  Put<uint16_t>(b, 16, 2);
  Put<uint16_t>(b, 18, 62);
  Put<uint32_t>(b, 20, 1);
  Put<uint64_t>(b, 24, entry);
  Put<uint64_t>(b, 32, phoff);
  Put<uint16_t>(b, 52, 64);
  Put<uint16_t>(b, 54, 56);
  Put<uint16_t>(b, 56, static_cast<uint16_t>(segs.size()));
  for (size_t i = 0; i < segs.size(); i++) {
    uint64_t p = phoff + i * 56;
    Put<uint32_t>(b, p, segs[i].type);
    Put<uint64_t>(b, p + 8, segs[i].offset);
    Put<uint64_t>(b, p + 16, segs[i].paddr);
    Put<uint64_t>(b, p + 24, segs[i].paddr);
    Put<uint64_t>(b, p + 32, segs[i].filesz);
    Put<uint64_t>(b, p + 40, segs[i].memsz);
    if (b.size() < segs[i].offset + segs[i].bytes.size()) b.resize(segs[i].offset + segs[i].bytes.size());
    std::memcpy(b.data() + segs[i].offset, segs[i].bytes.data(), segs[i].bytes.size());
  }
  b.resize(file_size);
  return b;
}

std::vector<uint8_t> PvhNote(uint32_t entry) {
  std::vector<uint8_t> n(20, 0);
  Put<uint32_t>(n, 0, 4);
  Put<uint32_t>(n, 4, 4);
  Put<uint32_t>(n, 8, 18);
  std::memcpy(n.data() + 12, "Xen", 4);
  Put<uint32_t>(n, 16, entry);
  return n;
}

std::vector<uint8_t> GuestBytes(const GuestMemory& mem, uint64_t gpa, uint64_t len) {
  std::vector<uint8_t> b(len);
  if (!mem.Read(gpa, b.data(), len)) throw testing::Failure("guest read at " + std::to_string(gpa) + " failed");
  return b;
}

void Fill(GuestMemory& mem, uint8_t byte) {
  for (auto& r : mem.regions()) std::memset(r.host, byte, r.size);
}

}  // namespace

TEST_CASE("boot: a segment that starts or runs past the end of the file is refused before anything is read") {
  GuestMemory mem(RamLayout(16 * kMiB));
  auto code = Pattern(8192, 3);
  // p_offset inside the file, p_filesz reaching 1 byte past its end.
  auto short_by_one = RawElf64(0x100000, 64, {{1, 0x1000, 0x100000, 8193, 8193, code}}, 0x1000 + 8192);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("seg-eof-1", short_by_one), "", "", Protocol::Linux64}),
                  "file is truncated: segment 0 (8193 bytes at offset 0x1000) lies past its end (12288 bytes)");
  // p_offset itself beyond the end.
  auto beyond = RawElf64(0x100000, 64, {{1, 0x100000, 0x100000, 16, 16, {}}}, 0x2000);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("seg-eof-2", beyond), "", "", Protocol::Linux64}),
                  "file is truncated: segment 0 (16 bytes at offset 0x100000) lies past its end");
  // p_offset + p_filesz wrapping around 2^64 is not "inside the file".
  auto wraps = RawElf64(0x100000, 64, {{1, 0x1000, 0x100000, ~uint64_t{0} - 0x800, ~uint64_t{0} - 0x800, code}}, 0x3000);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("seg-wrap", wraps), "", "", Protocol::Linux64}), "file is truncated: segment 0");
  // A segment that fits the file but not guest RAM.
  auto past_ram = RawElf64(0x100000, 64, {{1, 0x1000, 16 * kMiB - 4096, 8192, 8192, code}}, 0x1000 + 8192);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("seg-ram", past_ram), "", "", Protocol::Linux64}),
                  "does not fit in guest RAM (16 MiB): give the VM more memory");
}

TEST_CASE("boot: p_filesz < p_memsz: file bytes are placed, the bss is cleared only when RAM may hold data") {
  auto code = Pattern(5000, 11);
  auto file = TempFile("bss", RawElf64(0x200000, 64, {{1, 0x1000, 0x200000, 5000, 0x4000, code}}, 0x1000 + 5000));
  {
    // RamState::Zero: the loader relies on fresh RAM reading as zero and leaves
    // the bss alone (a sentinel written on purpose shows it was not touched).
    GuestMemory mem(RamLayout(16 * kMiB));
    Fill(mem, 0xaa);
    BootPlan plan = LoadKernel(mem, BootSpec{file, "", "", Protocol::Linux64}, RamState::Zero);
    EXPECT_EQ(plan.kernel_start, uint64_t{0x200000});
    EXPECT_EQ(plan.kernel_end, uint64_t{0x204000});
    EXPECT(GuestBytes(mem, 0x200000, 5000) == code);
    EXPECT(GuestBytes(mem, 0x200000 + 5000, 0x4000 - 5000) == std::vector<uint8_t>(0x4000 - 5000, 0xaa));
  }
  {
    GuestMemory mem(RamLayout(16 * kMiB));
    Fill(mem, 0xaa);
    LoadKernel(mem, BootSpec{file, "", "", Protocol::Linux64}, RamState::MayHoldData);
    EXPECT(GuestBytes(mem, 0x200000, 5000) == code);
    EXPECT(GuestBytes(mem, 0x200000 + 5000, 0x4000 - 5000) == std::vector<uint8_t>(0x4000 - 5000, 0));
    // Exactly p_memsz: the byte after it is not the kernel's.
    EXPECT_EQ(Get<uint8_t>(mem, 0x204000), uint8_t{0xaa});
    EXPECT_EQ(Get<uint8_t>(mem, 0x1fffff), uint8_t{0xaa});
  }
  {
    // Fresh RAM reads as zero without the loader's help.
    GuestMemory mem(RamLayout(16 * kMiB));
    LoadKernel(mem, BootSpec{file, "", "", Protocol::Linux64}, RamState::Zero);
    EXPECT(GuestBytes(mem, 0x200000 + 5000, 0x4000 - 5000) == std::vector<uint8_t>(0x4000 - 5000, 0));
  }
}

TEST_CASE("boot: only PT_LOAD bytes are read: a kernel file larger than guest RAM loads when its segments fit") {
  // Like a vmlinux, whose symbol tables follow the loadable segments: 20 MiB of
  // file for a 16 MiB guest, 12 KiB of it loadable.
  GuestMemory mem(RamLayout(16 * kMiB));
  auto text = Pattern(8192, 21), data = Pattern(4096, 22);
  auto elf = RawElf64(0x1000000 - 0x800000, 64,
                      {{1, 0x2000, 0x800000, 8192, 8192, text}, {1, 0x4000, 0x900000, 4096, 0x3000, data}}, 20 * kMiB);
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("fat-vmlinux", elf), "", "", Protocol::Linux64}, RamState::Zero);
  EXPECT_EQ(plan.kernel_start, uint64_t{0x800000});
  EXPECT_EQ(plan.kernel_end, uint64_t{0x903000});
  EXPECT(GuestBytes(mem, 0x800000, 8192) == text);
  EXPECT(GuestBytes(mem, 0x900000, 4096) == data);
}

TEST_CASE("boot: program headers and the PVH note outside the file's first page are found") {
  GuestMemory mem(RamLayout(16 * kMiB));
  auto code = Pattern(3000, 31);
  // Table at 0x3000, note at 0x5000, code at 0x6000: none in the first 4 KiB.
  auto elf = RawElf64(0x100000, 0x3000,
                      {{4, 0x5000, 0, 20, 20, PvhNote(0x100123)}, {1, 0x6000, 0x100000, 3000, 3000, code}}, 0x6000 + 3000);
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("far-headers", elf), "", "", Protocol::Auto}, RamState::Zero);
  EXPECT(plan.protocol == Protocol::Pvh);
  EXPECT_EQ(plan.entry, uint64_t{0x100123});
  EXPECT(GuestBytes(mem, 0x100000, 3000) == code);
  // A table cut off by the end of the file.
  auto cut = elf;
  cut.resize(0x3000 + 56 + 10);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("far-headers-cut", cut), "", "", Protocol::Auto}),
                  "file is truncated: the program header table (2 entries at 0x3000) lies past its end");
}

TEST_CASE("boot: an initrd larger than its window is refused, one that just fits is read in whole") {
  ElfSpec es;
  auto kernel = TempFile("initrd-kernel", MakeElf(es));
  {
    // Larger than all of guest RAM: refused from its size alone, before any read.
    GuestMemory mem(RamLayout(4 * kMiB));
    EXPECT_CONTAINS(BootErrorOf(mem, {kernel, TempFile("initrd-huge", Pattern(5 * kMiB, 1)), "", Protocol::Auto}),
                    "bytes, more than the guest's RAM can hold: give the VM more memory");
  }
  {
    // Fits RAM, but not between the kernel's end and initrd_addr_max (a bzImage's 4 MiB limit).
    GuestMemory mem(RamLayout(64 * kMiB));
    auto bz = TempFile("bz-window", MakeBzImage(0x020f, 8 * kMiB - 1, 255, Pattern(4096, 2)));
    // The kernel claims 1..5 MiB (init_size 4 MiB), so 3 MiB are left under 8 MiB.
    EXPECT_CONTAINS(BootErrorOf(mem, {bz, TempFile("initrd-window", Pattern(3 * kMiB + 1, 3)), "", Protocol::Auto}),
                    "3145729 bytes do not fit between the kernel's end 0x500000 and 0x800000: give the VM more memory");
    auto fits = Pattern(3 * kMiB, 4);
    BootPlan plan = LoadKernel(mem, BootSpec{bz, TempFile("initrd-fits", fits), "", Protocol::Auto}, RamState::Zero);
    EXPECT_EQ(plan.initrd_addr, uint64_t{0x500000});
    EXPECT_EQ(plan.initrd_size, uint64_t{3 * kMiB});
    EXPECT(GuestBytes(mem, plan.initrd_addr, fits.size()) == fits);
  }
  {
    // Not a regular file.
    GuestMemory mem(RamLayout(16 * kMiB));
    EXPECT_CONTAINS(BootErrorOf(mem, {kernel, "/tmp", "", Protocol::Auto}), "/tmp is not a regular file");
  }
}

TEST_CASE("boot: a bzImage's protected-mode kernel is read from the file at 1 MiB, and a truncated one refused") {
  GuestMemory mem(RamLayout(16 * kMiB));
  auto payload = Pattern(300000, 41);
  BootPlan plan = LoadKernel(mem, BootSpec{TempFile("bz-big", MakeBzImage(0x020f, 0x37ffffff, 255, payload)), "", "", Protocol::Auto},
                             RamState::Zero);
  EXPECT(GuestBytes(mem, plan.kernel_start, payload.size()) == payload);
  auto no_payload = MakeBzImage(0x020f, 0x37ffffff, 255, {});
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("bz-nopayload", no_payload), "", "", Protocol::Auto}),
                  "file is truncated: no protected-mode kernel after the setup code");
  auto cut_header = MakeBzImage(0x020f, 0x37ffffff, 255, {});
  cut_header.resize(0x210);
  EXPECT_CONTAINS(BootErrorOf(mem, {TempFile("bz-cut", cut_header), "", "", Protocol::Auto}), "truncated");
}
