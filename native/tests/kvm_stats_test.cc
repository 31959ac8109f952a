// KVM's binary statistics (kvm/stats.h) read from a real VM and vCPU on this
// host's /dev/kvm, and the layouts that must be refused.
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <set>

#include "core/error.h"
#include "kvm/kvm.h"
#include "kvm/stats.h"
#include "testing.h"

using namespace vmlet;
using namespace vmlet::kvm;

namespace {

struct RawVm {
  int vm = -1;
  int vcpu = -1;
  std::unique_ptr<Kvm> kvm;
  RawVm() {
    kvm = std::make_unique<Kvm>(DefaultDevicePath());
    vm = ioctl(kvm->fd(), KVM_CREATE_VM, 0);
    if (vm < 0) throw SysError(ErrorKind::Kvm, "KVM_CREATE_VM");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) throw SysError(ErrorKind::Kvm, "KVM_CREATE_VCPU");
  }
  ~RawVm() {
    if (vcpu >= 0) close(vcpu);
    if (vm >= 0) close(vm);
  }
};

size_t OpenFds() {
  size_t n = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/fd")) n++;
  return n;
}

int MemfdWith(const void* bytes, size_t len) {
  int fd = memfd_create("not-kvm-stats", MFD_CLOEXEC);
  if (fd < 0) throw SysError(ErrorKind::Kvm, "memfd_create");
  if (write(fd, bytes, len) != static_cast<ssize_t>(len)) throw SysError(ErrorKind::Kvm, "write memfd");
  return fd;
}

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const VmmError& e) {
    EXPECT(e.kind() == ErrorKind::Kvm);
    return e.what();
  }
  throw testing::Failure("expected a VmmError(Kvm)");
}

}  // namespace

TEST_CASE("kvm stats: a real VM's and vCPU's stats fds parse, with the exit counters among the vCPU's") {
  RawVm raw;
  StatsFd vm(OpenStatsFd(raw.vm, "the VM"), "the VM");
  StatsFd vcpu(OpenStatsFd(raw.vcpu, "vCPU 0"), "vCPU 0");
  EXPECT(vm.id().rfind("kvm-", 0) == 0);
  EXPECT(vcpu.id().find("vcpu") != std::string::npos);
  std::set<std::string> names;
  for (const StatDesc& d : vcpu.descriptors()) EXPECT(names.insert(d.name).second);
  for (const char* want : {"exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits"}) {
    if (!names.count(want)) throw testing::Failure(std::string("no vCPU statistic '") + want + "'");
  }
  auto scalars = vcpu.ReadScalars();
  EXPECT(!scalars.empty());
  bool saw_exits = false;
  for (auto& [d, v] : scalars) {
    EXPECT_EQ(d->size, 1);
    if (d->name == "exits") {
      saw_exits = true;
      EXPECT(d->type == StatType::Cumulative);
      EXPECT_EQ(v, 0u);  // never run
    }
  }
  EXPECT(saw_exits);
  EXPECT(!vm.ReadScalars().empty());
}

TEST_CASE("kvm stats: the VM's set sums vCPUs, prefixes the VM's own, survives Freeze and closes its fds") {
  RawVm raw;
  size_t before = OpenFds();
  {
    KvmStats stats(raw.vm, {raw.vcpu});
    EXPECT_EQ(OpenFds(), before + 2);
    auto live = stats.Snapshot();
    EXPECT(live.count("exits") == 1);
    size_t vm_keys = 0;
    for (auto& [k, v] : live) vm_keys += k.rfind("vm.", 0) == 0;
    EXPECT(vm_keys > 0);
    stats.Freeze();
    EXPECT_EQ(OpenFds(), before);
    auto frozen = stats.Snapshot();
    EXPECT(frozen == live);  // nothing ran in between
  }
  EXPECT_EQ(OpenFds(), before);
}

TEST_CASE("kvm stats: a file that is not a KVM stats fd is refused and says so") {
  char few[10] = {};
  int fd = MemfdWith(few, sizeof few);
  std::string why = ErrorOf([&] { StatsFd s(fd, "a short file"); });
  EXPECT(why.find("a short file") != std::string::npos);
  EXPECT(why.find("not a KVM stats fd") != std::string::npos);

  StatsHeader h{0, 48, 1u << 20, 24, 72, 1000};
  fd = MemfdWith(&h, sizeof h);
  why = ErrorOf([&] { StatsFd s(fd, "a huge header"); });
  EXPECT(why.find("not a KVM stats layout") != std::string::npos);

  // A descriptor whose name fills name_size without its NUL.
  struct {
    StatsHeader h;
    char id[8];
    StatsDescFixed d;
    char name[8];
  } bad{{0, 8, 1, 24, 32, 56}, "kvm-1", {0, 0, 1, 0, 0}, {'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'}};
  fd = MemfdWith(&bad, sizeof bad);
  why = ErrorOf([&] { StatsFd s(fd, "an unterminated name"); });
  EXPECT(why.find("unterminated name") != std::string::npos);
}

TEST_CASE("kvm stats: KVM_GET_STATS_FD on something that is not KVM names what is missing") {
  int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  EXPECT(fd >= 0);
  std::string why = ErrorOf([&] { OpenStatsFd(fd, "/dev/null"); });
  EXPECT(why.find("KVM_GET_STATS_FD on /dev/null") != std::string::npos);
  EXPECT(why.find("no binary statistics") != std::string::npos);
  EXPECT(why.find("errno") != std::string::npos);
  // The VM's set does not throw at creation: the error waits for Snapshot.
  KvmStats none(fd, {});
  close(fd);
  EXPECT(ErrorOf([&] { none.Snapshot(); }).find("no binary statistics") != std::string::npos);
}
