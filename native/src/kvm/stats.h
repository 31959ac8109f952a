// KVM's binary statistics (KVM_GET_STATS_FD, Linux >= 5.14): the counters
// the kernel keeps per VM and per vCPU, including the exits it handles itself
// (HLT in kernel, ioeventfd writes, EPT/NPT faults, MSRs, interrupt windows)
// that never reach our userspace loop and so never show in MachineStats.
//
// Layout of a stats fd (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"):
// a header, an id string, one descriptor per statistic (flags, exponent,
// size in u64s, offset into the data block, bucket size, a NUL-terminated
// name of name_size bytes), and a data block of u64s read with pread at any
// time. The layout is read once; the data is read on each Snapshot.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"

namespace vmlet::kvm {

// Hazard: <linux/kvm.h> declares kvm_stats_desc with a flexible name array,
// which in C++ may add padding before it (see kvm.h). This is the C layout of
// the fixed part; the name follows at byte 16 and is name_size bytes long.
struct StatsDescFixed {
  uint32_t flags;
  int16_t exponent;
  uint16_t size;  // in u64s; 1 for a scalar, the bucket count for a histogram
  uint32_t offset;
  uint32_t bucket_size;
};
struct StatsHeader {
  uint32_t flags;
  uint32_t name_size;
  uint32_t num_desc;
  uint32_t id_offset;
  uint32_t desc_offset;
  uint32_t data_offset;
};
static_assert(sizeof(StatsDescFixed) == 16 && sizeof(StatsHeader) == 24, "C layouts");

// KVM_STATS_TYPE_* (flags & 0xf).
enum class StatType : uint32_t { Cumulative = 0, Instant = 1, Peak = 2, LinearHist = 3, LogHist = 4 };

struct StatDesc {
  std::string name;
  StatType type = StatType::Cumulative;
  uint32_t flags = 0;
  uint16_t size = 1;
  uint32_t offset = 0;  // in bytes, from the data block
};

// One stats fd: its id ("kvm-<pid>" for a VM, "kvm-<pid>/vcpu-<n>" for a vCPU)
// and its descriptors, parsed and checked once.
class StatsFd {
 public:
  // Takes ownership of fd. Throws VmmError(Kvm) naming `what` when the fd's
  // layout is not a KVM stats layout (short header, offsets outside the file,
  // names not NUL-terminated).
  StatsFd(int fd, std::string what);
  ~StatsFd();
  StatsFd(const StatsFd&) = delete;
  StatsFd& operator=(const StatsFd&) = delete;

  // Every scalar statistic's current value, by descriptor order. Histograms
  // (size > 1) are left out: they are distributions of scalars read here.
  std::vector<std::pair<const StatDesc*, uint64_t>> ReadScalars() const;
  const std::string& id() const { return id_; }
  const std::vector<StatDesc>& descriptors() const { return descs_; }

 private:
  int fd_ = -1;
  std::string what_;
  std::string id_;
  std::vector<StatDesc> descs_;
  uint32_t data_offset_ = 0;
  size_t data_bytes_ = 0;
};

// KVM_GET_STATS_FD on a VM or vCPU fd. Throws VmmError(Kvm) with what to do
// when the host KVM has no binary stats.
int OpenStatsFd(int kvm_object_fd, const std::string& what);

// The statistics of one VM: vCPU statistics summed over its vCPUs (peaks:
// the maximum) under their KVM names ("exits", "io_exits", "halt_exits"...),
// the VM's own under "vm.<name>". Safe from any thread.
class KvmStats {
 public:
  // Never throws: on a KVM without binary stats (or any failure to open
  // them) Snapshot() throws that error instead, so a VM still runs.
  KvmStats(int vm_fd, const std::vector<int>& vcpu_fds);
  ~KvmStats();
  KvmStats(const KvmStats&) = delete;
  KvmStats& operator=(const KvmStats&) = delete;

  // The current values while the VM runs; after Freeze, the values it took.
  std::map<std::string, uint64_t> Snapshot() const;
  // Takes a last snapshot and closes the stats fds (each holds a reference on
  // the kernel's VM): call before the VM's own fds are closed.
  void Freeze();

 private:
  std::map<std::string, uint64_t> ReadLocked() const;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<StatsFd>> vm_;
  std::vector<std::unique_ptr<StatsFd>> vcpus_;
  std::unique_ptr<VmmError> error_;  // why there are no stats
  bool frozen_ = false;
  std::map<std::string, uint64_t> final_;
};

}  // namespace vmlet::kvm
