// Where things live in guest-physical memory on x86_64, for both boot paths.
//
// Everything the loader writes below 1 MiB sits in fixed, non-overlapping
// slots (the Firecracker layout, which Linux and PVH guests both accept);
// kernels are loaded at or above 1 MiB, and an ELF segment that reaches below
// that is refused rather than allowed to overwrite the zero page or page tables.
// The RAM / MMIO split is fixed by the VMM contract (issue 3).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace vmlet::boot {

// Low-memory slots written by the loader.
inline constexpr uint64_t kGdtAddr = 0x500;         // boot GDT (5 entries)
inline constexpr uint64_t kPvhStartInfo = 0x6000;   // struct hvm_start_info
inline constexpr uint64_t kPvhModlist = 0x6040;     // hvm_modlist_entry[1] (the initrd)
inline constexpr uint64_t kPvhMemmap = 0x7000;      // hvm_memmap_table_entry[] (PVH only)
inline constexpr uint64_t kZeroPage = 0x7000;       // boot_params (Linux only)
inline constexpr uint64_t kBootStack = 0x8ff0;
inline constexpr uint64_t kPml4 = 0x9000;
inline constexpr uint64_t kPdpt = 0xa000;
inline constexpr uint64_t kPd = 0xb000;             // 4 page directories: 0xb000..0xefff
inline constexpr uint64_t kIdentityMapped = 4ull << 30;  // what the boot page tables cover
inline constexpr uint64_t kCmdline = 0x20000;
inline constexpr uint64_t kCmdlineMax = 0x10000;    // bytes including the NUL
inline constexpr uint64_t kEbdaStart = 0x9fc00;     // legacy BIOS area starts here: not RAM to the guest
inline constexpr uint64_t kHighMemStart = 0x100000; // 1 MiB: lowest address a kernel segment may use

// RAM split and the device window (contract, issue 3).
inline constexpr uint64_t kMmioHoleStart = 0xC0000000;
inline constexpr uint64_t kHighRamStart = 0x100000000;
inline constexpr uint64_t kVirtioMmioBase = 0xD0000000;
inline constexpr uint64_t kVirtioMmioStride = 0x1000;
inline constexpr uint32_t kVirtioFirstGsi = 5;

// Boot GDT selectors. Linux's 64-bit protocol requires __BOOT_CS = 0x10 and
// __BOOT_DS = 0x18; PVH enters through the 32-bit code segment at 0x08.
inline constexpr uint16_t kSelCode32 = 0x08;
inline constexpr uint16_t kSelCode64 = 0x10;
inline constexpr uint16_t kSelData = 0x18;
inline constexpr uint16_t kSelTss = 0x20;
inline constexpr uint64_t kGdt[5] = {
    0,                      // null
    0x00cf9b000000ffffull,  // 0x08 code, 32-bit, flat, exec/read
    0x00af9b000000ffffull,  // 0x10 code, 64-bit (L=1), flat
    0x00cf93000000ffffull,  // 0x18 data, flat, read/write
    0x00808b000000ffffull,  // 0x20 TSS (busy): VMX entry checks want a valid TR
};

// e820 / PVH memmap types.
inline constexpr uint32_t kE820Ram = 1;
inline constexpr uint32_t kE820Reserved = 2;

struct E820Entry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;
};

// The (gpa, size) regions backing a VM of `bytes` of RAM: low RAM up to the
// MMIO hole, the rest above 4 GiB.
std::vector<std::pair<uint64_t, uint64_t>> RamLayout(uint64_t bytes);

// The memory map a guest is told about: the BIOS hole 0x9fc00..1 MiB is
// left out (Linux expects legacy ROM/EBDA there), everything else is RAM.
std::vector<E820Entry> MemoryMap(const std::vector<std::pair<uint64_t, uint64_t>>& ram);

}  // namespace vmlet::boot
