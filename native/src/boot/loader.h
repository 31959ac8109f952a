// Kernel loading for both x86_64 boot paths: PVH (an ELF with the Xen
// PHYS32_ENTRY note, entered in 32-bit protected mode with EBX = start_info)
// and the Linux 64-bit boot protocol (bzImage or ELF vmlinux, entered in long
// mode with RSI = boot_params). Everything here writes guest memory only; the
// vCPU register state it implies is described by BootPlan and applied by kvm/.
// Kept free of KVM so the layout can be unit-tested without /dev/kvm.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "boot/layout.h"
#include "core/guest_memory.h"

namespace vmlet::boot {

enum class Protocol {
  Auto,     // PVH when the ELF carries the note, else the Linux 64-bit protocol
  Pvh,      // refuse an image without a PVH entry note
  Linux64,  // bzImage or ELF64 vmlinux
};

struct BootSpec {
  std::string kernel;
  std::string initrd;   // empty: none
  std::string cmdline;
  Protocol protocol = Protocol::Auto;
};

struct BootPlan {
  Protocol protocol = Protocol::Auto;  // Pvh or Linux64 once loaded
  uint64_t entry = 0;                  // RIP / EIP at the first instruction
  uint64_t boot_info = 0;              // EBX (PVH start_info) or RSI (zero page)
  uint64_t stack = kBootStack;
  uint64_t page_tables = 0;            // CR3 for Linux64 (long mode); 0 for PVH
  uint64_t kernel_start = 0;
  uint64_t kernel_end = 0;             // exclusive, including bss / init_size
  uint64_t cmdline_addr = 0;
  uint64_t initrd_addr = 0;
  uint64_t initrd_size = 0;
  std::vector<E820Entry> memory_map;
};

// What guest RAM holds when the kernel is loaded into it. Fresh RAM (new
// anonymous memory, a new memfd) reads as zero until written, so the ELF
// segments' bss need not be cleared, which would also fault its pages in
// before the guest touches them; RAM that may have been written must be.
enum class RamState {
  Zero,
  MayHoldData,
};

// Reads the kernel (and initrd) files and lays out memory for the protocol:
// only headers are read into the process, every payload (ELF PT_LOAD
// segments, a bzImage's protected-mode kernel, the initrd) goes straight
// from the file into guest RAM.
// Throws VmmError(Boot) naming the file and what is wrong with it.
BootPlan LoadKernel(GuestMemory& mem, const BootSpec& spec, RamState ram);

// Byte offsets in boot_params / setup_header (Documentation/arch/x86/zero-page.rst,
// boot.rst); exposed for the layout tests.
namespace zp {
inline constexpr uint64_t kE820Entries = 0x1e8;
inline constexpr uint64_t kSetupSects = 0x1f1;
inline constexpr uint64_t kBootFlag = 0x1fe;
inline constexpr uint64_t kJump = 0x200;
inline constexpr uint64_t kHeader = 0x202;
inline constexpr uint64_t kVersion = 0x206;
inline constexpr uint64_t kTypeOfLoader = 0x210;
inline constexpr uint64_t kLoadFlags = 0x211;
inline constexpr uint64_t kCode32Start = 0x214;
inline constexpr uint64_t kRamdiskImage = 0x218;
inline constexpr uint64_t kRamdiskSize = 0x21c;
inline constexpr uint64_t kHeapEndPtr = 0x224;
inline constexpr uint64_t kCmdLinePtr = 0x228;
inline constexpr uint64_t kInitrdAddrMax = 0x22c;
inline constexpr uint64_t kKernelAlignment = 0x230;
inline constexpr uint64_t kRelocatable = 0x234;
inline constexpr uint64_t kXLoadFlags = 0x236;
inline constexpr uint64_t kCmdlineSize = 0x238;
inline constexpr uint64_t kPrefAddress = 0x258;
inline constexpr uint64_t kInitSize = 0x260;
inline constexpr uint64_t kE820Table = 0x2d0;
inline constexpr uint32_t kE820Max = 128;
inline constexpr uint32_t kHdrMagic = 0x53726448;  // "HdrS"
}  // namespace zp

// struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1.
struct HvmStartInfo {
  uint32_t magic;
  uint32_t version;
  uint32_t flags;
  uint32_t nr_modules;
  uint64_t modlist_paddr;
  uint64_t cmdline_paddr;
  uint64_t rsdp_paddr;
  uint64_t memmap_paddr;
  uint32_t memmap_entries;
  uint32_t reserved;
};
static_assert(sizeof(HvmStartInfo) == 56, "hvm_start_info layout");
inline constexpr uint32_t kHvmStartMagic = 0x336ec578;

struct HvmModlistEntry {
  uint64_t paddr;
  uint64_t size;
  uint64_t cmdline_paddr;
  uint64_t reserved;
};
struct HvmMemmapEntry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;
  uint32_t reserved;
};
static_assert(sizeof(HvmMemmapEntry) == 24, "hvm_memmap_table_entry layout");

}  // namespace vmlet::boot
