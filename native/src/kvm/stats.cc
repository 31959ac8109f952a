#include "kvm/stats.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace vmlet::kvm {

namespace {

// Bounds a hostile or corrupt layout before anything is allocated from it;
// KVM 6.x has ~50 vCPU and ~20 VM statistics with names of 48 bytes.
constexpr uint32_t kMaxDescriptors = 4096;
constexpr uint32_t kMaxNameSize = 4096;
constexpr uint32_t kMaxStatSize = 4096;  // u64s in one histogram

void ReadExactly(int fd, void* buf, size_t len, uint64_t off, const std::string& what, const char* part) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, static_cast<char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SysError(ErrorKind::Kvm, "read KVM statistics of " + what, part);
    if (n == 0)
      throw VmmError(ErrorKind::Kvm, "read KVM statistics of " + what,
                     std::string(part) + " ends at byte " + std::to_string(off + done) + " of the stats fd, before the " +
                         std::to_string(len) + " bytes its header promises: not a KVM stats fd");
    done += static_cast<size_t>(n);
  }
}

}  // namespace

int OpenStatsFd(int kvm_object_fd, const std::string& what) {
  int fd = ioctl(kvm_object_fd, KVM_GET_STATS_FD, 0);
  if (fd >= 0) return fd;
  int e = errno;
  if (e == ENOTTY || e == EINVAL)
    throw VmmError(ErrorKind::Kvm, "KVM_GET_STATS_FD on " + what,
                   "this host's KVM has no binary statistics (they need Linux 5.14 or later); the per-reason exit counts "
                   "of the VMM's own loop (stats().exits) are still there",
                   e);
  throw VmmError(ErrorKind::Kvm, "KVM_GET_STATS_FD on " + what, {}, e);
}

StatsFd::StatsFd(int fd, std::string what) : fd_(fd), what_(std::move(what)) {
  try {
    StatsHeader h{};
    ReadExactly(fd_, &h, sizeof h, 0, what_, "the header");
    if (h.name_size == 0 || h.name_size > kMaxNameSize || h.num_desc > kMaxDescriptors)
      throw VmmError(ErrorKind::Kvm, "read KVM statistics of " + what_,
                     "header says " + std::to_string(h.num_desc) + " descriptors with names of " + std::to_string(h.name_size) +
                         " bytes: not a KVM stats layout");
    std::vector<char> id(h.name_size);
    ReadExactly(fd_, id.data(), id.size(), h.id_offset, what_, "the id");
    id_.assign(id.data(), strnlen(id.data(), id.size()));

    const size_t desc_bytes = sizeof(StatsDescFixed) + h.name_size;
    std::vector<char> raw(desc_bytes * h.num_desc);
    if (!raw.empty()) ReadExactly(fd_, raw.data(), raw.size(), h.desc_offset, what_, "the descriptors");
    data_offset_ = h.data_offset;
    for (uint32_t i = 0; i < h.num_desc; i++) {
      const char* p = raw.data() + i * desc_bytes;
      StatsDescFixed d;
      std::memcpy(&d, p, sizeof d);
      const char* name = p + sizeof d;
      size_t len = strnlen(name, h.name_size);
      if (len == 0 || len == h.name_size)
        throw VmmError(ErrorKind::Kvm, "read KVM statistics of " + what_,
                       "descriptor " + std::to_string(i) + " has an empty or unterminated name: not a KVM stats layout");
      if (d.size == 0 || d.size > kMaxStatSize)
        throw VmmError(ErrorKind::Kvm, "read KVM statistics of " + what_,
                       "statistic '" + std::string(name, len) + "' is " + std::to_string(d.size) + " u64s long");
      StatDesc sd;
      sd.name.assign(name, len);
      sd.flags = d.flags;
      sd.type = static_cast<StatType>(d.flags & KVM_STATS_TYPE_MASK);
      sd.size = d.size;
      sd.offset = d.offset;
      data_bytes_ = std::max<size_t>(data_bytes_, static_cast<size_t>(d.offset) + d.size * sizeof(uint64_t));
      descs_.push_back(std::move(sd));
    }
  } catch (...) {
    close(fd_);
    fd_ = -1;
    throw;
  }
}

StatsFd::~StatsFd() {
  if (fd_ >= 0) close(fd_);
}

std::vector<std::pair<const StatDesc*, uint64_t>> StatsFd::ReadScalars() const {
  std::vector<uint64_t> data((data_bytes_ + 7) / 8);
  // One pread: the values of one read belong to the same moment.
  if (data_bytes_) ReadExactly(fd_, data.data(), data_bytes_, data_offset_, what_, "the data block");
  std::vector<std::pair<const StatDesc*, uint64_t>> out;
  for (const StatDesc& d : descs_) {
    if (d.size != 1) continue;
    uint64_t v;
    std::memcpy(&v, reinterpret_cast<const char*>(data.data()) + d.offset, sizeof v);
    out.emplace_back(&d, v);
  }
  return out;
}

KvmStats::KvmStats(int vm_fd, const std::vector<int>& vcpu_fds) {
  try {
    vm_.push_back(std::make_unique<StatsFd>(OpenStatsFd(vm_fd, "the VM"), "the VM"));
    for (size_t i = 0; i < vcpu_fds.size(); i++) {
      std::string what = "vCPU " + std::to_string(i);
      vcpus_.push_back(std::make_unique<StatsFd>(OpenStatsFd(vcpu_fds[i], what), what));
    }
  } catch (const VmmError& e) {
    vm_.clear();
    vcpus_.clear();
    error_ = std::make_unique<VmmError>(e);
  }
}

KvmStats::~KvmStats() = default;

std::map<std::string, uint64_t> KvmStats::ReadLocked() const {
  std::map<std::string, uint64_t> out;
  auto fold = [&out](const StatsFd& f, const std::string& prefix) {
    for (auto& [d, v] : f.ReadScalars()) {
      auto [it, fresh] = out.emplace(prefix + d->name, v);
      if (fresh) continue;
      it->second = d->type == StatType::Peak ? std::max(it->second, v) : it->second + v;
    }
  };
  for (auto& f : vm_) fold(*f, "vm.");
  for (auto& f : vcpus_) fold(*f, "");
  return out;
}

std::map<std::string, uint64_t> KvmStats::Snapshot() const {
  std::lock_guard<std::mutex> g(mu_);
  if (error_) throw *error_;
  if (frozen_) return final_;
  return ReadLocked();
}

void KvmStats::Freeze() {
  std::lock_guard<std::mutex> g(mu_);
  if (frozen_ || error_) return;
  try {
    final_ = ReadLocked();
  } catch (const VmmError& e) {
    error_ = std::make_unique<VmmError>(e);
  }
  frozen_ = true;
  vm_.clear();
  vcpus_.clear();
}

}  // namespace vmlet::kvm
