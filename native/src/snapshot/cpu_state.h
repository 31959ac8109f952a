// vCPU and VM (irqchip, PIT, clock) state through KVM's get/set ioctls, and
// its encoding in snapshot sections.
//
// Restore order (KVM's api.rst, as Firecracker and QEMU do it): CPUID is set
// when the vCPU is created (MSR writes are checked against it), then MP state,
// regs, sregs (before the LAPIC: the APIC base MSR and CR8 live there), XSAVE
// or FPU, XCRs, debug regs, LAPIC, MSRs (IA32_TSC before TSC_DEADLINE, which
// is relative to it), and vCPU events last: they carry the pending exception/
// interrupt/NMI that the earlier calls would otherwise clear.
#pragma once
#include <linux/kvm.h>

#include <cstdint>
#include <string>
#include <vector>

#include "snapshot/stream.h"

namespace vmlet::kvm {
class Kvm;
}

namespace vmlet::snapshot {

// What this KVM can save, probed once per VM. A capability KVM does not
// advertise is skipped and reported (skipped()), never faked.
struct CpuCaps {
  uint32_t xsave_bytes = 0;  // 0: no KVM_GET_XSAVE; > 4096 only via KVM_GET_XSAVE2
  bool xsave2 = false;
  bool xcrs = false;
  bool debugregs = false;
  bool tsc_khz = false;
  static CpuCaps Probe(const kvm::Kvm& kvm, int vm_fd);
  std::vector<std::string> skipped() const;
};

struct VcpuState {
  kvm_mp_state mp{};
  kvm_regs regs{};
  kvm_sregs sregs{};
  kvm_fpu fpu{};
  std::vector<uint8_t> xsave;  // empty when KVM has no XSAVE ioctls
  bool has_xcrs = false;
  kvm_xcrs xcrs{};
  bool has_debugregs = false;
  kvm_debugregs debugregs{};
  kvm_lapic_state lapic{};
  std::vector<kvm_msr_entry> msrs;
  kvm_vcpu_events events{};
  uint32_t tsc_khz = 0;  // 0: unknown

  void Encode(Writer& w) const;
  static VcpuState Decode(Reader& r);
};

// `msr_list` is KVM_GET_MSR_INDEX_LIST; MSRs KVM refuses to read are left
// out and appended to *refused (KVM_GET_MSRS stops at the first refusal).
VcpuState SaveVcpu(int vcpu_fd, const CpuCaps& caps, const std::vector<uint32_t>& msr_list, std::vector<uint32_t>* refused);
// Throws VmmError(Snapshot) when KVM refuses a piece of the state, naming it.
void RestoreVcpu(int vcpu_fd, uint32_t index, const CpuCaps& caps, const VcpuState& s);

struct VmState {
  kvm_irqchip pic_master{};
  kvm_irqchip pic_slave{};
  kvm_irqchip ioapic{};
  kvm_pit_state2 pit{};
  kvm_clock_data clock{};

  void Encode(Writer& w) const;
  static VmState Decode(Reader& r);
};
VmState SaveVm(int vm_fd);
void RestoreVm(int vm_fd, const VmState& s);

}  // namespace vmlet::snapshot
