#include "kvm/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace vmlet::kvm {

std::string DefaultDevicePath() {
  const char* p = getenv("VMLET_KVM_DEVICE");
  return p && *p ? p : "/dev/kvm";
}

namespace {
struct RequiredCap {
  long cap;
  const char* name;
};
// What the VMM relies on; each is standard on any x86 KVM since Linux 4.x.
constexpr RequiredCap kRequiredCaps[] = {
    {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP (in-kernel PIC/IOAPIC/LAPIC)"},
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY (memslots)"},
    {KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"},
    {KVM_CAP_PIT2, "KVM_CAP_PIT2 (in-kernel PIT)"},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID (KVM_GET_SUPPORTED_CPUID)"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT (race-free pause/kill)"},
};
}  // namespace

Kvm::Kvm(const std::string& path) {
  fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd_ < 0) {
    int e = errno;
    if (e == ENOENT)
      throw VmmError(ErrorKind::Kvm, "open " + path,
                     path + " does not exist: load kvm_intel or kvm_amd, or run inside hack/kvm-lab", e);
    if (e == EACCES || e == EPERM)
      throw VmmError(ErrorKind::Kvm, "open " + path,
                     path + " is not accessible: add the user to the kvm group (or run as root)", e);
    throw VmmError(ErrorKind::Kvm, "open " + path, "cannot open the KVM device", e);
  }
  try {
    int api = ioctl(fd_, KVM_GET_API_VERSION, 0);
    if (api < 0) throw SysError(ErrorKind::Kvm, "KVM_GET_API_VERSION", path + " is not a KVM device");
    if (api != KVM_API_VERSION)
      throw VmmError(ErrorKind::Kvm, "KVM_GET_API_VERSION",
                     "the kernel speaks KVM API " + std::to_string(api) + ", vmlet needs " + std::to_string(KVM_API_VERSION));
    for (auto& c : kRequiredCaps)
      if (CheckExtension(c.cap) <= 0)
        throw VmmError(ErrorKind::Kvm, "KVM_CHECK_EXTENSION",
                       std::string("the host KVM lacks ") + c.name + ": vmlet needs a newer or standard KVM");
    int sz = ioctl(fd_, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (sz <= 0) throw SysError(ErrorKind::Kvm, "KVM_GET_VCPU_MMAP_SIZE");
    vcpu_mmap_size_ = static_cast<size_t>(sz);

    // The entry count is not known up front: grow until the kernel stops saying E2BIG.
    for (uint32_t n = 128;; n *= 2) {
      std::vector<uint8_t> buf(sizeof(CpuidHeader) + n * sizeof(kvm_cpuid_entry2));
      CpuidHeader h{n, 0};
      std::memcpy(buf.data(), &h, sizeof h);
      if (ioctl(fd_, kIoctlGetSupportedCpuid, buf.data()) == 0) {
        std::memcpy(&h, buf.data(), sizeof h);
        cpuid_.resize(h.nent);
        std::memcpy(cpuid_.data(), buf.data() + sizeof h, h.nent * sizeof(kvm_cpuid_entry2));
        break;
      }
      if (errno != E2BIG || n > 4096) throw SysError(ErrorKind::Kvm, "KVM_GET_SUPPORTED_CPUID");
    }
    for (uint32_t n = 256;; n *= 2) {
      std::vector<uint8_t> buf(sizeof(MsrListHeader) + n * sizeof(uint32_t));
      MsrListHeader h{n};
      std::memcpy(buf.data(), &h, sizeof h);
      if (ioctl(fd_, kIoctlGetMsrIndexList, buf.data()) == 0) {
        std::memcpy(&h, buf.data(), sizeof h);
        msrs_.resize(h.nmsrs);
        std::memcpy(msrs_.data(), buf.data() + sizeof h, h.nmsrs * sizeof(uint32_t));
        break;
      }
      if (errno != E2BIG || n > 65536) throw SysError(ErrorKind::Kvm, "KVM_GET_MSR_INDEX_LIST");
    }
  } catch (...) {
    close(fd_);
    throw;
  }
}

Kvm::~Kvm() {
  if (fd_ >= 0) close(fd_);
}

int Kvm::CheckExtension(long cap) const { return ioctl(fd_, KVM_CHECK_EXTENSION, cap); }

IrqIoctlLine::IrqIoctlLine(int vm_fd, uint32_t gsi) : gsi_(gsi) {
  vm_fd_ = fcntl(vm_fd, F_DUPFD_CLOEXEC, 0);
  if (vm_fd_ < 0) throw SysError(ErrorKind::Kvm, "dup the VM fd for GSI " + std::to_string(gsi));
}

IrqIoctlLine::~IrqIoctlLine() {
  if (vm_fd_ >= 0) close(vm_fd_);
}

// An edge, as KVM's own irqfd injection makes it: assert, then deassert.
// The PIC/IOAPIC latch the edge at the assert. The results are not checked:
// the ioctl cannot fail once the irqchip exists (Machine::Build makes it
// before any line) for a GSI below its 24 pins, and the callers (device
// threads, a vCPU's port write) would have no one to report an error to.
void IrqIoctlLine::Trigger() {
  kvm_irq_level line{};
  line.irq = gsi_;
  line.level = 1;
  (void)ioctl(vm_fd_, KVM_IRQ_LINE, &line);
  line.level = 0;
  (void)ioctl(vm_fd_, KVM_IRQ_LINE, &line);
}

namespace {
kvm_ioeventfd IoEventFdRequest(uint64_t addr, uint32_t len, uint64_t datamatch, int fd) {
  kvm_ioeventfd req{};
  req.datamatch = datamatch;
  req.addr = addr;
  req.len = len;
  req.fd = fd;
  req.flags = KVM_IOEVENTFD_FLAG_DATAMATCH;
  return req;
}
}  // namespace

bool IoEventFdBinder::Bind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) {
  kvm_ioeventfd req = IoEventFdRequest(base_ + offset, len, datamatch, fd);
  // Refusal (no KVM_CAP_IOEVENTFD, the per-VM bus device limit) is not an
  // error: the caller keeps the exit path, which is slower but complete.
  return ioctl(vm_fd_, KVM_IOEVENTFD, &req) == 0;
}

void IoEventFdBinder::Unbind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) {
  kvm_ioeventfd req = IoEventFdRequest(base_ + offset, len, datamatch, fd);
  req.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
  // Fails only if the binding is already gone; the VM drops the rest when it closes.
  (void)ioctl(vm_fd_, KVM_IOEVENTFD, &req);
}

}  // namespace vmlet::kvm
