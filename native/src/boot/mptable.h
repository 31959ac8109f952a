// The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
// learns how many CPUs it has, where the IOAPIC is and how ISA IRQs and GSIs
// reach it. Without it Linux brings up only the boot CPU and drives interrupts
// through the PIC alone. The layout follows what Firecracker writes (a
// well-trodden path for Linux guests): floating pointer at the start of the
// last KiB of base memory (0x9fc00, where Linux scans), configuration table
// right after it, in the area the e820 map does not report as RAM.
#pragma once
#include <cstdint>

#include "core/guest_memory.h"

namespace vmlet::boot {

inline constexpr uint64_t kMpTableAddr = 0x9fc00;
inline constexpr uint64_t kMpTableLimit = 0x100000;  // must end before the kernel's 1 MiB
inline constexpr uint64_t kLapicAddr = 0xfee00000;
inline constexpr uint64_t kIoapicAddr = 0xfec00000;
inline constexpr uint32_t kIoapicPins = 24;  // KVM's in-kernel IOAPIC

// Writes the floating pointer and the configuration table for `cpus` vCPUs
// (APIC ids 0..cpus-1; the IOAPIC takes id `cpus`). Throws VmmError(Boot) if
// the table cannot be written. Returns the table's end address.
uint64_t WriteMpTable(GuestMemory& mem, uint32_t cpus);

}  // namespace vmlet::boot
