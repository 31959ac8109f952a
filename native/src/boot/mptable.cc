#include "boot/mptable.h"

#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"

namespace vmlet::boot {

namespace {

// Entry types and flags (MP spec 1.4, chapter 4).
constexpr uint8_t kEntryProcessor = 0, kEntryBus = 1, kEntryIoapic = 2, kEntryIoInterrupt = 3, kEntryLocalInterrupt = 4;
constexpr uint8_t kIntTypeInt = 0, kIntTypeNmi = 1, kIntTypeExtInt = 3;
constexpr uint8_t kCpuEnabled = 1, kCpuBootProcessor = 2;
constexpr uint8_t kApicVersion = 0x14;
constexpr uint8_t kIoapicVersion = 0x11;

class Builder {
 public:
  void U8(uint8_t v) { b_.push_back(v); }
  void U16(uint16_t v) { Raw(&v, 2); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void Str(const char* s, size_t n) {
    size_t len = std::strlen(s);
    for (size_t i = 0; i < n; i++) b_.push_back(i < len ? static_cast<uint8_t>(s[i]) : ' ');
  }
  void Raw(const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    b_.insert(b_.end(), c, c + n);
  }
  std::vector<uint8_t>& bytes() { return b_; }

 private:
  std::vector<uint8_t> b_;
};

// Every MP structure sums to zero over its bytes.
uint8_t Checksum(const uint8_t* p, size_t n) {
  uint8_t sum = 0;
  for (size_t i = 0; i < n; i++) sum = static_cast<uint8_t>(sum + p[i]);
  return static_cast<uint8_t>(-sum);
}

}  // namespace

uint64_t WriteMpTable(GuestMemory& mem, uint32_t cpus) {
  if (cpus == 0 || cpus > 254)
    throw VmmError(ErrorKind::Boot, "write MP table", std::to_string(cpus) + " CPUs: the MP table holds 1..254 (8-bit APIC ids, one left for the IOAPIC)");
  const uint64_t table_addr = kMpTableAddr + 16;
  const uint8_t ioapic_id = static_cast<uint8_t>(cpus);

  Builder t;
  // Configuration table header; length, entry count and checksum patched below.
  t.Str("PCMP", 4);
  t.U16(0);  // base table length
  t.U8(4);   // spec revision 1.4
  t.U8(0);   // checksum
  t.Str("VMLET", 8);
  t.Str("MICROVM", 12);
  t.U32(0);  // OEM table pointer
  t.U16(0);  // OEM table size
  t.U16(0);  // entry count
  t.U32(static_cast<uint32_t>(kLapicAddr));
  t.U16(0);  // extended table length
  t.U8(0);   // extended table checksum
  t.U8(0);
  uint16_t entries = 0;

  for (uint32_t i = 0; i < cpus; i++) {
    t.U8(kEntryProcessor);
    t.U8(static_cast<uint8_t>(i));  // APIC id, as CPUID leaf 1 reports it
    t.U8(kApicVersion);
    t.U8(kCpuEnabled | (i == 0 ? kCpuBootProcessor : 0));
    t.U32(0x600);                   // CPU signature: family 6 (the guest reads the real one from CPUID)
    t.U32((1u << 0) | (1u << 9));   // features: FPU, APIC
    t.U32(0);
    t.U32(0);
    entries++;
  }
  t.U8(kEntryBus);
  t.U8(0);  // bus id 0
  t.Str("ISA", 6);
  entries++;
  t.U8(kEntryIoapic);
  t.U8(ioapic_id);
  t.U8(kIoapicVersion);
  t.U8(1);  // enabled
  t.U32(static_cast<uint32_t>(kIoapicAddr));
  entries++;
  // ISA IRQ i / GSI i -> IOAPIC pin i: KVM's default routing, which the
  // virtio-mmio GSIs (5 + device index) rely on as well.
  for (uint32_t pin = 0; pin < kIoapicPins; pin++) {
    t.U8(kEntryIoInterrupt);
    t.U8(kIntTypeInt);
    t.U16(0);  // polarity/trigger: conforming to the bus
    t.U8(0);   // source bus: ISA
    t.U8(static_cast<uint8_t>(pin));
    t.U8(ioapic_id);
    t.U8(static_cast<uint8_t>(pin));
    entries++;
  }
  // LINT0 of the boot CPU carries the PIC (ExtINT), LINT1 of every CPU the NMI,
  // matching how the VMM programs each vCPU's LAPIC.
  t.U8(kEntryLocalInterrupt);
  t.U8(kIntTypeExtInt);
  t.U16(0);
  t.U8(0);
  t.U8(0);
  t.U8(0);     // destination: the BSP's APIC
  t.U8(0);     // LINT0
  entries++;
  t.U8(kEntryLocalInterrupt);
  t.U8(kIntTypeNmi);
  t.U16(0);
  t.U8(0);
  t.U8(0);
  t.U8(0xff);  // every APIC
  t.U8(1);     // LINT1
  entries++;

  auto& tb = t.bytes();
  uint16_t len = static_cast<uint16_t>(tb.size());
  std::memcpy(tb.data() + 4, &len, 2);
  std::memcpy(tb.data() + 34, &entries, 2);
  tb[7] = Checksum(tb.data(), tb.size());

  Builder fp;
  fp.Str("_MP_", 4);
  fp.U32(static_cast<uint32_t>(table_addr));
  fp.U8(1);  // length in 16-byte units
  fp.U8(4);  // spec revision 1.4
  fp.U8(0);  // checksum
  fp.U8(0);  // feature 1: 0 = a configuration table is present
  fp.U8(0);
  fp.U8(0);
  fp.U8(0);
  fp.U8(0);
  auto& fb = fp.bytes();
  fb[10] = Checksum(fb.data(), fb.size());

  uint64_t end = table_addr + tb.size();
  if (end > kMpTableLimit) throw VmmError(ErrorKind::Boot, "write MP table", "the table would reach past 1 MiB");
  if (!mem.Write(kMpTableAddr, fb.data(), fb.size()) || !mem.Write(table_addr, tb.data(), tb.size()))
    throw VmmError(ErrorKind::Boot, "write MP table", "guest RAM does not reach " + std::to_string(end));
  return end;
}

}  // namespace vmlet::boot
