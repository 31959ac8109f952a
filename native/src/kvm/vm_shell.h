// VM shells: KVM VMs made ahead of need, so that a restore (or a boot) skips
// KVM_CREATE_VM. Why: on a host that leaves kvm.nx_huge_pages on (the default
// wherever the CPU may be affected by iTLB multihit), KVM_CREATE_VM starts a
// kvm-nx-lpage-recovery kthread for the VM and waits for it: ~12.7 ms of a
// ~24 ms host-side restore in the KVM lab, the largest single step. A process
// that will make VMs (the template pool, `vmlet run` at start-up) fills the
// reserve off the path it is timed on; Machine takes a shell when one is held.
//
// A shell is the VM's own set-up only: KVM_CREATE_VM, the TSS and the
// identity-map pages, and the /dev/kvm handle with its CPUID and MSR lists.
// It has no RAM, irqchip, PIT or vCPUs, on purpose: RAM must be added before
// the irqchip (machine.cc: a memslot added after the irqchip and PIT cost
// ~7 ms), and vCPUs need the irqchip first, so they stay on the making path.
// A shell never ran and holds nothing of any guest; it is a fresh VM.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvm/kvm.h"

namespace vmlet::kvm {

// KVM_CREATE_VM and what must follow it before any vCPU or memory: the path
// every VM takes, shell or not. Throws VmmError(Kvm); closes the fd on throw.
int CreateVmFd(const Kvm& kvm);

// Owns its VM fd until Release(): a shell dropped on an error path closes it.
struct VmShell {
  std::unique_ptr<Kvm> kvm;  // the handle it was made through
  int vm_fd = -1;
  std::string device;        // that handle's path

  VmShell() = default;
  VmShell(VmShell&& o) noexcept : kvm(std::move(o.kvm)), vm_fd(o.vm_fd), device(std::move(o.device)) { o.vm_fd = -1; }
  VmShell& operator=(VmShell&& o) noexcept;
  VmShell(const VmShell&) = delete;
  VmShell& operator=(const VmShell&) = delete;
  ~VmShell();
  // Hands the fd to the caller, who closes it from now on.
  int Release() {
    int fd = vm_fd;
    vm_fd = -1;
    return fd;
  }
};

// Process-wide and thread-safe. A shell belongs to the process that made it:
// KVM binds a VM to its creator's address space.
class VmShellReserve {
 public:
  // Shells one process may hold: each is an fd, a kthread and a few pages of
  // kernel memory, and a reserve is meant to cover the next few VMs only.
  static constexpr size_t kMaxHeld = 16;

  static VmShellReserve& Get();

  // Makes shells through `device` until `count` are held for it (one at a
  // time, outside the lock). Returns how many are held for it. Throws
  // VmmError(InvalidArgument) for a count above kMaxHeld, VmmError(Kvm) when
  // a shell cannot be made (those made before it are kept).
  size_t Fill(const std::string& device, size_t count);
  // A shell made through `device`. When none is held but a Fill is making one
  // for it, waits for that one (it is further along than a new VM would be).
  // nullopt: none, the caller makes its VM itself.
  std::optional<VmShell> Take(const std::string& device);
  // Closes every held shell; returns how many it closed.
  size_t Drain();
  size_t Held() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable made_;
  std::vector<VmShell> held_;
  std::vector<std::string> making_;  // one entry per shell a Fill is making, by device
};

}  // namespace vmlet::kvm
