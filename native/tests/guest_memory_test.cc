#include "core/guest_memory.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "testing.h"

using vmlet::GuestMemory;
using vmlet::RamBacking;

namespace {

constexpr uint64_t kHuge = 2ull << 20;

// The VmFlags line of /proc/self/smaps for the mapping that starts at `start`.
std::string VmFlagsOf(const void* start) {
  std::ifstream smaps("/proc/self/smaps");
  char head[32];
  snprintf(head, sizeof head, "%lx-", reinterpret_cast<unsigned long>(start));
  std::string line;
  bool in = false;
  while (std::getline(smaps, line)) {
    if (line.rfind(head, 0) == 0) in = true;
    else if (in && line.rfind("VmFlags:", 0) == 0) return line;
  }
  return "";
}

bool HasFlag(const std::string& vmflags, const char* flag) {
  std::istringstream words(vmflags);
  std::string w;
  while (words >> w)
    if (w == flag) return true;
  return false;
}

// Scoped setenv, so one case's setting never leaks into the next.
struct EnvVar {
  std::string name;
  EnvVar(const char* n, const char* v) : name(n) { setenv(n, v, 1); }
  ~EnvVar() { unsetenv(name.c_str()); }
};

// Whether a fork's child can read `p`: it dies of SIGSEGV when the mapping was not inherited.
bool ChildCanRead(const uint8_t* p) {
  pid_t pid = fork();
  if (pid == 0) {
    rlimit no_core{0, 0};  // the expected SIGSEGV is no crash worth a core file
    setrlimit(RLIMIT_CORE, &no_core);
    volatile uint8_t x = *p;
    (void)x;
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

TEST_CASE("guest_memory: ranges inside one region are granted") {
  GuestMemory mem({{0, 1 << 20}, {4ull << 30, 1 << 20}});
  EXPECT(mem.Slice(0, 1 << 20).has_value());
  EXPECT(mem.Slice((4ull << 30) + 100, 200).has_value());
  uint32_t v = 0xdeadbeef, back = 0;
  EXPECT(mem.WriteObj(4096, v));
  EXPECT(mem.ReadObj(4096, &back));
  EXPECT_EQ(back, v);
}

TEST_CASE("guest_memory: hostile ranges are refused") {
  GuestMemory mem({{0, 1 << 20}, {1 << 20, 1 << 20}});
  EXPECT(!mem.Slice((1 << 20) - 8, 16).has_value());  // straddles two regions
  EXPECT(!mem.Slice(2 << 20, 1).has_value());         // past the end of RAM
  EXPECT(!mem.Slice(~0ull - 4, 16).has_value());      // wraps around 2^64
  EXPECT(!mem.Slice(16, ~0ull).has_value());          // absurd length
  uint16_t x;
  EXPECT(!mem.LoadU16Acquire(3, &x));                 // misaligned ring index
}

TEST_CASE("guest_memory: unaligned layout is an error") {
  EXPECT_THROWS(GuestMemory({{0, 1000}}));
  EXPECT_THROWS(GuestMemory(std::vector<std::pair<uint64_t, uint64_t>>{}));
}

TEST_CASE("guest_memory: a booted VM's RAM is anonymous, each region on a 2 MiB boundary, zero until written") {
  const uint64_t high = 4ull << 30;
  GuestMemory mem({{0, 3 << 20}, {high, 5 << 20}});
  EXPECT(mem.anonymous());
  EXPECT(!mem.private_file());
  EXPECT_EQ(mem.fd(), -1);
  EXPECT_EQ(mem.total_size(), 8ull << 20);
  EXPECT_EQ(mem.regions().size(), 2u);
  EXPECT_EQ(mem.regions()[1].fd_offset, 3ull << 20);  // the file layout a snapshot uses
  for (auto& r : mem.regions()) EXPECT_EQ(reinterpret_cast<uint64_t>(r.host) % kHuge, 0u);
  uint64_t v = 1;
  EXPECT(mem.ReadObj(high + (5 << 20) - 8, &v));
  EXPECT_EQ(v, 0u);
  EXPECT(mem.WriteObj(high + 4096, uint64_t(0x0123456789abcdef)));
  EXPECT(mem.ReadObj(high + 4096, &v));
  EXPECT_EQ(v, 0x0123456789abcdefull);
  // The bounds are those of memfd RAM: the last byte of each region, nothing past it.
  EXPECT(mem.Slice((3 << 20) - 1, 1).has_value());
  EXPECT(!mem.Slice((3 << 20) - 1, 2).has_value());
  EXPECT(!mem.Slice(3 << 20, 1).has_value());          // the hole between the regions
  EXPECT(!mem.Slice(high - 1, 2).has_value());         // straddles into the high region
  EXPECT(mem.Slice(high, 5 << 20).has_value());
  EXPECT(!mem.Slice(high, (5 << 20) + 1).has_value());
  EXPECT(!mem.Slice(high + (5 << 20), 0).has_value());  // one past the end
  EXPECT(!mem.Slice(~0ull - 4, 16).has_value());
}

TEST_CASE("guest_memory: memfd RAM is still there on request, aligned the same, the memfd sized to the layout") {
  GuestMemory mem({{0, 1 << 20}, {4ull << 30, 3 << 20}}, RamBacking::Memfd);
  EXPECT(!mem.anonymous());
  EXPECT(mem.fd() >= 0);
  struct stat st {};
  EXPECT_EQ(fstat(mem.fd(), &st), 0);
  EXPECT_EQ(uint64_t(st.st_size), 4ull << 20);
  for (auto& r : mem.regions()) EXPECT_EQ(reinterpret_cast<uint64_t>(r.host) % kHuge, 0u);
  EXPECT(mem.WriteObj((4ull << 30) + 8, uint32_t(77)));
  uint32_t back = 0;
  EXPECT_EQ(pread(mem.fd(), &back, 4, (1 << 20) + 8), 4);  // the write is in the memfd at the region's offset
  EXPECT_EQ(back, 77u);
}

TEST_CASE("guest_memory: huge pages are asked for unless VMLET_GUEST_RAM_THP=0") {
  struct stat st {};
  if (stat("/sys/kernel/mm/transparent_hugepage", &st) != 0)
    throw vmlet::testing::Failure("this kernel has no THP (/sys/kernel/mm/transparent_hugepage): cannot check MADV_HUGEPAGE");
  {
    GuestMemory mem({{0, 4 << 20}});
    EXPECT(HasFlag(VmFlagsOf(mem.regions()[0].host), "hg"));
  }
  {
    GuestMemory mem({{0, 4 << 20}}, RamBacking::Memfd);
    EXPECT(HasFlag(VmFlagsOf(mem.regions()[0].host), "hg"));
  }
  EnvVar off("VMLET_GUEST_RAM_THP", "0");
  GuestMemory mem({{0, 4 << 20}});
  std::string flags = VmFlagsOf(mem.regions()[0].host);
  EXPECT(!flags.empty());
  EXPECT(!HasFlag(flags, "hg"));
}

TEST_CASE("guest_memory: private RAM is not inherited by a fork, shared memfd RAM is") {
  GuestMemory anon({{0, 2 << 20}});
  EXPECT(anon.WriteObj(0, uint8_t(1)));
  EXPECT(!ChildCanRead(anon.regions()[0].host));
  GuestMemory shared({{0, 2 << 20}}, RamBacking::Memfd);
  EXPECT(ChildCanRead(shared.regions()[0].host));
}
