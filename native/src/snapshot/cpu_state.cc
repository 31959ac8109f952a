#include "snapshot/cpu_state.h"

#include <sys/ioctl.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "kvm/kvm.h"

namespace vmlet::snapshot {

namespace {

// struct kvm_xsave ends in a flexible array (the same C++ hazard as
// kvm_cpuid2, kvm/kvm.h): the ioctl numbers encode the 4096-byte legacy area.
struct XsaveArea {
  uint32_t region[1024];
};
constexpr unsigned long kIoctlGetXsave = _IOR(KVMIO, 0xa4, XsaveArea);
constexpr unsigned long kIoctlSetXsave = _IOW(KVMIO, 0xa5, XsaveArea);
constexpr unsigned long kIoctlGetXsave2 = _IOR(KVMIO, 0xcf, XsaveArea);
constexpr unsigned long kIoctlGetMsrs = _IOWR(KVMIO, 0x88, kvm::MsrsHeader);

constexpr uint32_t kMsrIa32Tsc = 0x10;
constexpr uint32_t kMsrTscDeadline = 0x6e0;

std::string Hex(uint64_t v) {
  char b[24];
  snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

VmmError KvmRefused(const char* ioctl_name, const std::string& what) {
  int e = errno;
  return VmmError(ErrorKind::Snapshot, ioctl_name, what + ": this KVM refused it", e);
}

void Get(int fd, unsigned long req, void* arg, const char* name, const std::string& what) {
  if (ioctl(fd, req, arg) != 0) throw VmmError(ErrorKind::Kvm, name, what, errno);
}

// KVM_GET_MSRS / KVM_SET_MSRS over one buffer in the C layout.
int MsrIoctl(int fd, unsigned long req, std::vector<kvm_msr_entry>& entries) {
  std::vector<uint8_t> buf(sizeof(kvm::MsrsHeader) + entries.size() * sizeof(kvm_msr_entry));
  kvm::MsrsHeader h{static_cast<uint32_t>(entries.size()), 0};
  std::memcpy(buf.data(), &h, sizeof h);
  std::memcpy(buf.data() + sizeof h, entries.data(), entries.size() * sizeof(kvm_msr_entry));
  int n = ioctl(fd, req, buf.data());
  if (n > 0) std::memcpy(entries.data(), buf.data() + sizeof h, size_t(n) * sizeof(kvm_msr_entry));
  return n;
}

}  // namespace

CpuCaps CpuCaps::Probe(const kvm::Kvm& kvm, int vm_fd) {
  CpuCaps c;
  if (kvm.CheckExtension(KVM_CAP_XSAVE) > 0) {
    c.xsave_bytes = sizeof(XsaveArea);
    // KVM_CAP_XSAVE2 is asked of the VM: its answer counts dynamically
    // enabled features (AMX) of this VM.
    int n = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    if (n >= static_cast<int>(sizeof(XsaveArea))) {
      c.xsave2 = true;
      c.xsave_bytes = static_cast<uint32_t>(n);
    }
  }
  c.xcrs = kvm.CheckExtension(KVM_CAP_XCRS) > 0;
  c.debugregs = kvm.CheckExtension(KVM_CAP_DEBUGREGS) > 0;
  c.tsc_khz = kvm.CheckExtension(KVM_CAP_GET_TSC_KHZ) > 0;
  return c;
}

std::vector<std::string> CpuCaps::skipped() const {
  std::vector<std::string> s;
  if (!xsave_bytes) s.push_back("xsave (no KVM_CAP_XSAVE: FPU/SSE state via KVM_GET_FPU only)");
  if (!xcrs) s.push_back("xcrs (no KVM_CAP_XCRS)");
  if (!debugregs) s.push_back("debugregs (no KVM_CAP_DEBUGREGS)");
  if (!tsc_khz) s.push_back("tsc-khz (no KVM_CAP_GET_TSC_KHZ)");
  return s;
}

VcpuState SaveVcpu(int fd, const CpuCaps& caps, const std::vector<uint32_t>& msr_list, std::vector<uint32_t>* refused) {
  VcpuState s;
  // MP state first: KVM_GET_MP_STATE folds pending INIT/SIPI into it.
  Get(fd, KVM_GET_MP_STATE, &s.mp, "KVM_GET_MP_STATE", "save vCPU");
  Get(fd, KVM_GET_REGS, &s.regs, "KVM_GET_REGS", "save vCPU");
  Get(fd, KVM_GET_SREGS, &s.sregs, "KVM_GET_SREGS", "save vCPU");
  Get(fd, KVM_GET_FPU, &s.fpu, "KVM_GET_FPU", "save vCPU");
  if (caps.xsave_bytes) {
    s.xsave.assign(caps.xsave_bytes, 0);
    Get(fd, caps.xsave2 ? kIoctlGetXsave2 : kIoctlGetXsave, s.xsave.data(), "KVM_GET_XSAVE", "save vCPU");
  }
  if (caps.xcrs) {
    s.has_xcrs = true;
    Get(fd, KVM_GET_XCRS, &s.xcrs, "KVM_GET_XCRS", "save vCPU");
  }
  if (caps.debugregs) {
    s.has_debugregs = true;
    Get(fd, KVM_GET_DEBUGREGS, &s.debugregs, "KVM_GET_DEBUGREGS", "save vCPU");
  }
  Get(fd, KVM_GET_LAPIC, &s.lapic, "KVM_GET_LAPIC", "save vCPU");
  if (caps.tsc_khz) {
    int khz = ioctl(fd, KVM_GET_TSC_KHZ, 0);
    if (khz > 0) s.tsc_khz = static_cast<uint32_t>(khz);
  }
  // Every MSR KVM lists, minus the ones it refuses to read (it stops at the
  // first and returns how many it did): drop that one, go on after it.
  std::vector<uint32_t> order(msr_list);
  // TSC_DEADLINE is relative to IA32_TSC: it must be written after it.
  std::stable_partition(order.begin(), order.end(), [](uint32_t i) { return i != kMsrTscDeadline; });
  std::vector<kvm_msr_entry> pending;
  for (uint32_t i : order) {
    kvm_msr_entry e{};
    e.index = i;
    pending.push_back(e);
  }
  while (!pending.empty()) {
    int n = MsrIoctl(fd, kIoctlGetMsrs, pending);
    if (n < 0) throw VmmError(ErrorKind::Kvm, "KVM_GET_MSRS", "save vCPU", errno);
    s.msrs.insert(s.msrs.end(), pending.begin(), pending.begin() + n);
    if (static_cast<size_t>(n) == pending.size()) break;
    if (refused) refused->push_back(pending[size_t(n)].index);
    pending.erase(pending.begin(), pending.begin() + n + 1);
  }
  // Events last: the state read before must not have changed what is pending.
  Get(fd, KVM_GET_VCPU_EVENTS, &s.events, "KVM_GET_VCPU_EVENTS", "save vCPU");
  return s;
}

void RestoreVcpu(int fd, uint32_t index, const CpuCaps& caps, const VcpuState& s) {
  std::string what = "vCPU " + std::to_string(index);
  auto set = [&](unsigned long req, const void* arg, const char* name) {
    if (ioctl(fd, req, arg) != 0) throw KvmRefused(name, "restore " + what);
  };
  if (!s.xsave.empty() && s.xsave.size() > caps.xsave_bytes)
    throw VmmError(ErrorKind::Snapshot, "restore " + what,
                   "the snapshot's XSAVE area is " + std::to_string(s.xsave.size()) + " bytes but this KVM takes " +
                       std::to_string(caps.xsave_bytes) + ": it was taken on another CPU or KVM");
  if (s.xsave.empty() && caps.xsave_bytes)
    throw VmmError(ErrorKind::Snapshot, "restore " + what, "the snapshot has no XSAVE state but this KVM has XSAVE: taken on another KVM");
  if (s.has_xcrs != caps.xcrs || s.has_debugregs != caps.debugregs)
    throw VmmError(ErrorKind::Snapshot, "restore " + what, "the snapshot's XCR/debug-register state does not match this KVM's capabilities");
  set(KVM_SET_MP_STATE, &s.mp, "KVM_SET_MP_STATE");
  set(KVM_SET_REGS, &s.regs, "KVM_SET_REGS");
  set(KVM_SET_SREGS, &s.sregs, "KVM_SET_SREGS");
  if (!s.xsave.empty()) {
    // KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says; the buffer is that size.
    std::vector<uint8_t> area(std::max<size_t>(caps.xsave_bytes, s.xsave.size()), 0);
    std::memcpy(area.data(), s.xsave.data(), s.xsave.size());
    set(kIoctlSetXsave, area.data(), "KVM_SET_XSAVE");
  } else {
    set(KVM_SET_FPU, &s.fpu, "KVM_SET_FPU");
  }
  if (s.has_xcrs) set(KVM_SET_XCRS, &s.xcrs, "KVM_SET_XCRS");
  if (s.has_debugregs) set(KVM_SET_DEBUGREGS, &s.debugregs, "KVM_SET_DEBUGREGS");
  set(KVM_SET_LAPIC, &s.lapic, "KVM_SET_LAPIC");
  if (s.tsc_khz && caps.tsc_khz) {
    // A guest calibrated its clocks to the TSC rate: on another rate KVM must
    // scale (KVM_SET_TSC_KHZ); without TSC scaling the restore is refused.
    int now = ioctl(fd, KVM_GET_TSC_KHZ, 0);
    // KVM reports the rate it calibrated, which may differ in the last kHz.
    if (now > 0 && (static_cast<uint32_t>(now) + 1 < s.tsc_khz || static_cast<uint32_t>(now) > s.tsc_khz + 1) &&
        ioctl(fd, KVM_SET_TSC_KHZ, static_cast<unsigned long>(s.tsc_khz)) != 0)
      throw VmmError(ErrorKind::Snapshot, "restore " + what,
                     "the snapshot's TSC runs at " + std::to_string(s.tsc_khz) + " kHz, this host's at " + std::to_string(now) +
                         " kHz, and KVM cannot scale it: restore on the host that took it",
                     errno);
  }
  std::vector<kvm_msr_entry> msrs = s.msrs;
  int n = MsrIoctl(fd, kvm::kIoctlSetMsrs, msrs);
  if (n < 0) {
    // The batch as a whole was refused: find which MSRs, to say so.
    int e = errno;
    std::string bad;
    for (auto& m : s.msrs) {
      std::vector<kvm_msr_entry> one{m};
      if (MsrIoctl(fd, kvm::kIoctlSetMsrs, one) != 1) bad += " " + Hex(m.index) + "=" + Hex(m.data) + "(" + std::to_string(errno) + ")";
    }
    throw VmmError(ErrorKind::Snapshot, "KVM_SET_MSRS", "restore " + what + ": " + std::to_string(s.msrs.size()) + " MSRs refused as a batch; one by one:" + (bad.empty() ? " none" : bad), e);
  }
  if (static_cast<size_t>(n) != msrs.size())
    throw VmmError(ErrorKind::Snapshot, "KVM_SET_MSRS",
                   "restore " + what + ": KVM set " + std::to_string(n) + " of " + std::to_string(msrs.size()) +
                       " MSRs and refused MSR " + Hex(msrs[size_t(n)].index) + " (taken on another CPU or KVM?)");
  // The flags are KVM_GET_VCPU_EVENTS's own: it reports only what it can take back.
  set(KVM_SET_VCPU_EVENTS, &s.events, "KVM_SET_VCPU_EVENTS");
}

void VcpuState::Encode(Writer& w) const {
  w.Struct(mp);
  w.Struct(regs);
  w.Struct(sregs);
  w.Struct(fpu);
  w.Bytes(xsave.data(), xsave.size());
  w.Bool(has_xcrs);
  w.Struct(xcrs);
  w.Bool(has_debugregs);
  w.Struct(debugregs);
  w.Struct(lapic);
  w.U32(static_cast<uint32_t>(msrs.size()));
  for (auto& m : msrs) {
    w.U32(m.index);
    w.U64(m.data);
  }
  w.Struct(events);
  w.U32(tsc_khz);
}

VcpuState VcpuState::Decode(Reader& r) {
  VcpuState s;
  r.Struct(&s.mp);
  r.Struct(&s.regs);
  r.Struct(&s.sregs);
  r.Struct(&s.fpu);
  s.xsave = r.Bytes(1u << 20);
  s.has_xcrs = r.Bool();
  r.Struct(&s.xcrs);
  s.has_debugregs = r.Bool();
  r.Struct(&s.debugregs);
  r.Struct(&s.lapic);
  uint32_t n = r.U32();
  if (n > 4096) r.Fail(std::to_string(n) + " MSRs is more than KVM lists");
  for (uint32_t i = 0; i < n; i++) {
    kvm_msr_entry e{};
    e.index = r.U32();
    e.data = r.U64();
    s.msrs.push_back(e);
  }
  r.Struct(&s.events);
  s.tsc_khz = r.U32();
  r.ExpectEnd();
  return s;
}

VmState SaveVm(int vm_fd) {
  VmState s;
  s.pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
  s.pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
  s.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
  Get(vm_fd, KVM_GET_IRQCHIP, &s.pic_master, "KVM_GET_IRQCHIP", "save the PIC (master)");
  Get(vm_fd, KVM_GET_IRQCHIP, &s.pic_slave, "KVM_GET_IRQCHIP", "save the PIC (slave)");
  Get(vm_fd, KVM_GET_IRQCHIP, &s.ioapic, "KVM_GET_IRQCHIP", "save the IOAPIC");
  Get(vm_fd, KVM_GET_PIT2, &s.pit, "KVM_GET_PIT2", "save the PIT");
  Get(vm_fd, KVM_GET_CLOCK, &s.clock, "KVM_GET_CLOCK", "save the KVM clock");
  return s;
}

void RestoreVm(int vm_fd, const VmState& s) {
  auto set = [&](unsigned long req, const void* arg, const char* name, const char* what) {
    if (ioctl(vm_fd, req, arg) != 0) throw KvmRefused(name, what);
  };
  set(KVM_SET_PIT2, &s.pit, "KVM_SET_PIT2", "restore the PIT");
  // The guest's clock continues from the snapshot's value rather than jumping
  // by the time the snapshot sat on disk (kvmclock must stay monotonic); the
  // guest corrects its wall clock itself. KVM refuses flags it only reports.
  kvm_clock_data clock{};
  clock.clock = s.clock.clock;
  set(KVM_SET_CLOCK, &clock, "KVM_SET_CLOCK", "restore the KVM clock");
  set(KVM_SET_IRQCHIP, &s.pic_master, "KVM_SET_IRQCHIP", "restore the PIC (master)");
  set(KVM_SET_IRQCHIP, &s.pic_slave, "KVM_SET_IRQCHIP", "restore the PIC (slave)");
  set(KVM_SET_IRQCHIP, &s.ioapic, "KVM_SET_IRQCHIP", "restore the IOAPIC");
}

void VmState::Encode(Writer& w) const {
  w.Struct(pic_master);
  w.Struct(pic_slave);
  w.Struct(ioapic);
  w.Struct(pit);
  w.Struct(clock);
}

VmState VmState::Decode(Reader& r) {
  VmState s;
  r.Struct(&s.pic_master);
  r.Struct(&s.pic_slave);
  r.Struct(&s.ioapic);
  r.Struct(&s.pit);
  r.Struct(&s.clock);
  r.ExpectEnd();
  if (s.pic_master.chip_id != KVM_IRQCHIP_PIC_MASTER || s.pic_slave.chip_id != KVM_IRQCHIP_PIC_SLAVE ||
      s.ioapic.chip_id != KVM_IRQCHIP_IOAPIC)
    r.Fail("irqchip ids out of order");
  return s;
}

}  // namespace vmlet::snapshot
