#include "kvm/vm_shell.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>

#include "core/error.h"

namespace vmlet::kvm {

int CreateVmFd(const Kvm& kvm) {
  int fd = ioctl(kvm.fd(), KVM_CREATE_VM, 0);
  if (fd < 0) throw SysError(ErrorKind::Kvm, "KVM_CREATE_VM");
  try {
    // Three pages just below 4 GiB that Intel's real-mode emulation needs;
    // they sit above the virtio window and never overlap RAM.
    if (ioctl(fd, KVM_SET_TSS_ADDR, 0xfffbd000ul) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_TSS_ADDR");
    if (kvm.CheckExtension(KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0) {
      uint64_t ident = 0xfffbc000;
      if (ioctl(fd, KVM_SET_IDENTITY_MAP_ADDR, &ident) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_IDENTITY_MAP_ADDR");
    }
  } catch (...) {
    close(fd);
    throw;
  }
  return fd;
}

VmShellReserve& VmShellReserve::Get() {
  // Never destroyed: a libuv worker may still be filling it while the process
  // exits, and the kernel closes the fds then anyway.
  static VmShellReserve* reserve = new VmShellReserve;
  return *reserve;
}

VmShell& VmShell::operator=(VmShell&& o) noexcept {
  if (this != &o) {
    if (vm_fd >= 0) close(vm_fd);
    kvm = std::move(o.kvm);
    vm_fd = o.vm_fd;
    device = std::move(o.device);
    o.vm_fd = -1;
  }
  return *this;
}

VmShell::~VmShell() {
  if (vm_fd >= 0) close(vm_fd);
}

size_t VmShellReserve::Fill(const std::string& device, size_t count) {
  if (count > kMaxHeld)
    throw VmmError(ErrorKind::InvalidArgument, "fill VM shells",
                   "a reserve of " + std::to_string(count) + " shells: hold at most " + std::to_string(kMaxHeld));
  auto held_for = [&] {
    return static_cast<size_t>(std::count_if(held_.begin(), held_.end(), [&](const VmShell& s) { return s.device == device; }));
  };
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    size_t have = held_for();
    size_t coming = static_cast<size_t>(std::count(making_.begin(), making_.end(), device));
    if (have + coming >= count) return have;
    making_.push_back(device);
    lock.unlock();
    VmShell shell;
    shell.device = device;
    try {
      shell.kvm = std::make_unique<Kvm>(device);
      shell.vm_fd = CreateVmFd(*shell.kvm);
    } catch (...) {
      lock.lock();
      making_.erase(std::find(making_.begin(), making_.end(), device));
      made_.notify_all();  // a Take waiting for this one makes its own VM instead
      throw;
    }
    lock.lock();
    making_.erase(std::find(making_.begin(), making_.end(), device));
    held_.push_back(std::move(shell));
    made_.notify_all();
  }
}

std::optional<VmShell> VmShellReserve::Take(const std::string& device) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    auto it = std::find_if(held_.begin(), held_.end(), [&](const VmShell& s) { return s.device == device; });
    if (it != held_.end()) {
      VmShell s = std::move(*it);
      held_.erase(it);
      return s;
    }
    if (std::find(making_.begin(), making_.end(), device) == making_.end()) return std::nullopt;
    made_.wait(lock);
  }
}

size_t VmShellReserve::Drain() {
  std::vector<VmShell> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out.swap(held_);
  }
  return out.size();  // each shell closes its fd as `out` goes
}

size_t VmShellReserve::Held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_.size();
}

}  // namespace vmlet::kvm
