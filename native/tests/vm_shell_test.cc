// The VM shell reserve (kvm/vm_shell.h) on this host's /dev/kvm: shells are
// real, usable VMs, kept per device, bounded, closed by Drain, and a failed
// Fill keeps what it made before.
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "core/error.h"
#include "kvm/kvm.h"
#include "kvm/vm_shell.h"
#include "testing.h"

using namespace vmlet;
using namespace vmlet::kvm;

namespace {

size_t OpenFds() {
  size_t n = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/fd")) n++;
  return n;
}

// Every case starts and ends with an empty reserve: it is process-wide.
struct EmptyReserve {
  EmptyReserve() { VmShellReserve::Get().Drain(); }
  ~EmptyReserve() { VmShellReserve::Get().Drain(); }
};

}  // namespace

TEST_CASE("vm shells: Fill holds real VMs for its device; Take hands one over, usable; Drain closes the rest") {
  EmptyReserve guard;
  auto& r = VmShellReserve::Get();
  const std::string dev = DefaultDevicePath();
  size_t fds = OpenFds();
  EXPECT_EQ(r.Fill(dev, 2), 2u);
  EXPECT_EQ(r.Held(), 2u);
  EXPECT_EQ(r.Fill(dev, 1), 2u);  // already more than asked: nothing made, nothing closed
  EXPECT_EQ(r.Held(), 2u);
  // Each shell is a VM fd and its /dev/kvm handle.
  EXPECT_EQ(OpenFds(), fds + 4);

  EXPECT(!r.Take("/dev/not-this-kvm").has_value());  // kept per device
  std::optional<VmShell> s = r.Take(dev);
  EXPECT(s.has_value());
  EXPECT(s->device == dev);
  EXPECT_EQ(r.Held(), 1u);
  // A VM that never ran: it takes a vCPU and reports its capabilities.
  int vcpu = ioctl(s->vm_fd, KVM_CREATE_VCPU, 0);
  EXPECT(vcpu >= 0);
  close(vcpu);
  EXPECT(ioctl(s->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQCHIP) > 0);
  int fd = s->Release();
  EXPECT_EQ(s->vm_fd, -1);
  s.reset();
  EXPECT(fcntl(fd, F_GETFD) >= 0);  // released: the shell did not close it
  close(fd);

  EXPECT_EQ(r.Drain(), 1u);
  EXPECT_EQ(r.Held(), 0u);
  EXPECT(!r.Take(dev).has_value());
  EXPECT_EQ(OpenFds(), fds);
}

TEST_CASE("vm shells: a shell dropped without Release closes its VM") {
  EmptyReserve guard;
  size_t fds = OpenFds();
  VmShellReserve::Get().Fill(DefaultDevicePath(), 1);
  { std::optional<VmShell> s = VmShellReserve::Get().Take(DefaultDevicePath()); }
  EXPECT_EQ(OpenFds(), fds);
}

TEST_CASE("vm shells: a count over the bound and a missing device are refused; what was held stays") {
  EmptyReserve guard;
  auto& r = VmShellReserve::Get();
  const std::string dev = DefaultDevicePath();
  r.Fill(dev, 1);
  try {
    r.Fill(dev, VmShellReserve::kMaxHeld + 1);
    throw testing::Failure("a count over kMaxHeld was taken");
  } catch (const VmmError& e) {
    EXPECT(e.kind() == ErrorKind::InvalidArgument);
    EXPECT(std::string(e.what()).find("at most 16") != std::string::npos);
  }
  try {
    r.Fill("/nonexistent/kvm", 1);
    throw testing::Failure("a missing device made a shell");
  } catch (const VmmError& e) {
    EXPECT(e.kind() == ErrorKind::Kvm);
  }
  EXPECT_EQ(r.Held(), 1u);
  EXPECT(!r.Take("/nonexistent/kvm").has_value());  // the failed fill left no one to wait for
  EXPECT(r.Take(dev).has_value());
}

TEST_CASE("vm shells: concurrent fills make the count asked, not one set each") {
  EmptyReserve guard;
  auto& r = VmShellReserve::Get();
  const std::string dev = DefaultDevicePath();
  std::thread a([&] { r.Fill(dev, 3); });
  std::thread b([&] { r.Fill(dev, 3); });
  a.join();
  b.join();
  EXPECT_EQ(r.Held(), 3u);
}
