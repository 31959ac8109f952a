// The KVM system device (/dev/kvm): opening it with errors that say how to
// fix the host, the API/capability checks, and the host-filtered CPUID and
// MSR lists every vCPU is set up from.
#pragma once
#include <linux/kvm.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/bus.h"

namespace vmlet::kvm {

// Hazard: the uapi headers declare the variable-length KVM structs with
// __DECLARE_FLEX_ARRAY, which in C++ puts a 1-byte empty struct before the
// array: sizeof(kvm_cpuid2) becomes 12 instead of 8, the ioctl numbers encode
// that wrong size (KVM answers EINVAL) and `entries` sits at the wrong offset.
// These are the C layouts: a fixed header, then the array right after it.
struct CpuidHeader {   // struct kvm_cpuid2
  uint32_t nent;
  uint32_t padding;
};
struct MsrsHeader {    // struct kvm_msrs
  uint32_t nmsrs;
  uint32_t pad;
};
struct MsrListHeader { // struct kvm_msr_list
  uint32_t nmsrs;
};
static_assert(sizeof(CpuidHeader) == 8 && sizeof(MsrsHeader) == 8 && sizeof(MsrListHeader) == 4, "C layouts");
inline constexpr unsigned long kIoctlGetSupportedCpuid = _IOWR(KVMIO, 0x05, CpuidHeader);
inline constexpr unsigned long kIoctlSetCpuid2 = _IOW(KVMIO, 0x90, CpuidHeader);
inline constexpr unsigned long kIoctlGetMsrIndexList = _IOWR(KVMIO, 0x02, MsrListHeader);
inline constexpr unsigned long kIoctlSetMsrs = _IOW(KVMIO, 0x89, MsrsHeader);

// VMLET_KVM_DEVICE overrides /dev/kvm (tests point it at a missing path to
// exercise the "no KVM" error; a lab can point it at another node).
std::string DefaultDevicePath();

class Kvm {
 public:
  // Throws VmmError(Kvm): missing device (how to load the module), no
  // permission (join the kvm group), wrong API version, missing capability.
  explicit Kvm(const std::string& path);
  ~Kvm();
  Kvm(const Kvm&) = delete;
  Kvm& operator=(const Kvm&) = delete;

  int fd() const { return fd_; }
  int CheckExtension(long cap) const;
  size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
  const std::vector<kvm_cpuid_entry2>& supported_cpuid() const { return cpuid_; }
  const std::vector<uint32_t>& msr_index_list() const { return msrs_; }

 private:
  int fd_ = -1;
  size_t vcpu_mmap_size_ = 0;
  std::vector<kvm_cpuid_entry2> cpuid_;
  std::vector<uint32_t> msrs_;
};

// An interrupt line pulsed with KVM_IRQ_LINE on the calling thread (the vCPU
// thread for the 8250, a device thread for virtio), safe from any thread.
// Not an irqfd: our GSIs are PIC/IOAPIC pins, and for those an eventfd
// signal cannot inject from its wake-up (x86 does that for MSI routes only),
// so KVM hands every pulse to a kworker: one more thread to wake per
// interrupt. On a host with a CPU to spare that is latency; on one without
// (the lab's single CPU, 2026-11-28) the guest HLTs until the kworker gets
// the CPU: two 5-6 ms HLTs inside the agent's 37-byte ready line. The ioctl
// injects before the caller returns, as QEMU's microvm does for its
// virtio-mmio lines. Holds its own duplicate of the VM fd, so a device that
// outlives the Machine never pulses a reused fd number.
class IrqIoctlLine : public IrqLine {
 public:
  IrqIoctlLine(int vm_fd, uint32_t gsi);
  ~IrqIoctlLine() override;
  void Trigger() override;

 private:
  int vm_fd_ = -1;
  uint32_t gsi_;
};

// Guest writes to one device window that KVM turns into eventfd signals
// (KVM_IOEVENTFD with a datamatch), so they never exit to userspace. Holds
// the VM fd without owning it: the Machine destroys every transport (which
// unbinds) before it closes the VM.
class IoEventFdBinder : public IoEventBinder {
 public:
  IoEventFdBinder(int vm_fd, uint64_t window_base) : vm_fd_(vm_fd), base_(window_base) {}
  bool Bind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) override;
  void Unbind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) override;

 private:
  int vm_fd_;
  uint64_t base_;
};

}  // namespace vmlet::kvm
