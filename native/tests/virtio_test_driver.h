// The driver side of virtio, for device tests without KVM: split rings laid
// out in a GuestMemory exactly as a guest driver would, and virtio-mmio
// register accesses in the order Linux's virtio_mmio.c makes them.
#pragma once

#include <dirent.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "core/bus.h"
#include "core/guest_memory.h"
#include "testing.h"
#include "virtio/device.h"
#include "virtio/mmio.h"
#include "virtio/queue.h"

namespace vmlet::testing {

// Entries in a /proc directory (/proc/self/fd, /proc/self/task): the leak
// tests compare them before and after.
inline int CountEntries(const char* dir) {
  int n = 0;
  if (DIR* d = opendir(dir)) {
    while (readdir(d)) n++;
    closedir(d);
  }
  return n;
}

// A device quiesced for a snapshot for the guard's lifetime, so that a failing
// check cannot leave it locked (and the test hung in teardown).
struct Quiesced {
  virtio::VirtioDevice& dev;
  explicit Quiesced(virtio::VirtioDevice& d) : dev(d) { dev.QuiesceForSnapshot(); }
  ~Quiesced() { dev.EndQuiesceForSnapshot(); }
};

struct CountingIrq : IrqLine {
  std::atomic<int> count{0};
  void Trigger() override { count++; }
};

struct Buf {
  uint64_t addr;
  uint32_t len;
  bool device_writes;
};

// One split virtqueue as the driver sees it.
class RingDriver {
 public:
  RingDriver(GuestMemory& mem, uint64_t base, uint16_t size)
      : mem_(mem), size_(size), desc_(base), avail_(base + 16ull * size),
        used_((avail_ + 6 + 2ull * size + 3) & ~3ull) {
    std::vector<uint8_t> zero(used_ + 6 + 8ull * size - base, 0);
    EXPECT(mem_.Write(base, zero.data(), zero.size()));
  }
  uint64_t desc() const { return desc_; }
  uint64_t avail() const { return avail_; }
  uint64_t used() const { return used_; }
  uint16_t size() const { return size_; }

  void SetDesc(uint16_t idx, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    virtio::Descriptor d{addr, len, flags, next};
    EXPECT(mem_.WriteObj(desc_ + 16ull * idx, d));
  }
  // Lays the buffers out as a chain at the next free descriptors and makes it available.
  uint16_t Add(const std::vector<Buf>& bufs) {
    uint16_t head = next_desc_;
    for (size_t i = 0; i < bufs.size(); i++) {
      uint16_t idx = static_cast<uint16_t>((head + i) % size_);
      uint16_t flags = (bufs[i].device_writes ? virtio::kDescFlagWrite : 0) |
                       (i + 1 < bufs.size() ? virtio::kDescFlagNext : 0);
      SetDesc(idx, bufs[i].addr, bufs[i].len, flags, static_cast<uint16_t>((idx + 1) % size_));
    }
    next_desc_ = static_cast<uint16_t>((head + bufs.size()) % size_);
    Publish(head);
    return head;
  }
  void Publish(uint16_t head) {
    EXPECT(mem_.WriteObj(avail_ + 4 + 2ull * (avail_idx_ % size_), head));
    avail_idx_++;
    EXPECT(mem_.StoreU16Release(avail_ + 2, avail_idx_));
  }
  // For hostile tests: claim any avail.idx.
  void SetAvailIdx(uint16_t idx) {
    avail_idx_ = idx;
    EXPECT(mem_.StoreU16Release(avail_ + 2, idx));
  }
  void SetAvailFlags(uint16_t f) { EXPECT(mem_.WriteObj(avail_, f)); }
  void SetUsedEvent(uint16_t v) { EXPECT(mem_.WriteObj(avail_ + 4 + 2ull * size_, v)); }
  uint16_t AvailEvent() {
    uint16_t v = 0;
    EXPECT(mem_.ReadObj(used_ + 4 + 8ull * size_, &v));
    return v;
  }
  uint16_t UsedIdx() {
    uint16_t v = 0;
    EXPECT(mem_.LoadU16Acquire(used_ + 2, &v));
    return v;
  }
  uint16_t UsedFlags() {
    uint16_t v = 0;
    EXPECT(mem_.LoadU16Acquire(used_, &v));
    return v;
  }
  bool HasUsed() { return UsedIdx() != last_used_; }
  virtio::UsedElem PopUsed() {
    EXPECT(HasUsed());
    virtio::UsedElem e{};
    EXPECT(mem_.ReadObj(used_ + 4 + 8ull * (last_used_ % size_), &e));
    last_used_++;
    return e;
  }

 private:
  GuestMemory& mem_;
  uint16_t size_;
  uint64_t desc_, avail_, used_;
  uint16_t next_desc_ = 0;
  uint16_t avail_idx_ = 0;
  uint16_t last_used_ = 0;
};

// Register-level driver of one virtio-mmio window.
class MmioDriver {
 public:
  explicit MmioDriver(MmioTransport& t) : t_(t) {}
  uint32_t Read32(uint64_t off) {
    uint8_t b[4];
    t_.Read(off, b, 4);
    uint32_t v;
    std::memcpy(&v, b, 4);
    return v;
  }
  void Write32(uint64_t off, uint32_t v) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    t_.Write(off, b, 4);
  }
  uint64_t DeviceFeatures() {
    Write32(MmioTransport::kDeviceFeaturesSel, 0);
    uint64_t lo = Read32(MmioTransport::kDeviceFeatures);
    Write32(MmioTransport::kDeviceFeaturesSel, 1);
    return lo | (static_cast<uint64_t>(Read32(MmioTransport::kDeviceFeatures)) << 32);
  }
  // ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether the device kept FEATURES_OK.
  bool Negotiate(uint64_t features) {
    Write32(MmioTransport::kStatus, 0);
    Write32(MmioTransport::kStatus, virtio::kStatusAcknowledge);
    Write32(MmioTransport::kStatus, virtio::kStatusAcknowledge | virtio::kStatusDriver);
    Write32(MmioTransport::kDriverFeaturesSel, 0);
    Write32(MmioTransport::kDriverFeatures, static_cast<uint32_t>(features));
    Write32(MmioTransport::kDriverFeaturesSel, 1);
    Write32(MmioTransport::kDriverFeatures, static_cast<uint32_t>(features >> 32));
    Write32(MmioTransport::kStatus, virtio::kStatusAcknowledge | virtio::kStatusDriver | virtio::kStatusFeaturesOk);
    return Read32(MmioTransport::kStatus) & virtio::kStatusFeaturesOk;
  }
  // Returns QueueReady as read back (0 when the device refused the layout).
  uint32_t SetupQueue(uint32_t index, const RingDriver& r) { return SetupQueue(index, r.size(), r.desc(), r.avail(), r.used()); }
  uint32_t SetupQueue(uint32_t index, uint32_t size, uint64_t desc, uint64_t avail, uint64_t used) {
    Write32(MmioTransport::kQueueSel, index);
    Write32(MmioTransport::kQueueNum, size);
    Write32(MmioTransport::kQueueDescLow, static_cast<uint32_t>(desc));
    Write32(MmioTransport::kQueueDescHigh, static_cast<uint32_t>(desc >> 32));
    Write32(MmioTransport::kQueueDriverLow, static_cast<uint32_t>(avail));
    Write32(MmioTransport::kQueueDriverHigh, static_cast<uint32_t>(avail >> 32));
    Write32(MmioTransport::kQueueDeviceLow, static_cast<uint32_t>(used));
    Write32(MmioTransport::kQueueDeviceHigh, static_cast<uint32_t>(used >> 32));
    Write32(MmioTransport::kQueueReady, 1);
    return Read32(MmioTransport::kQueueReady);
  }
  void DriverOk() {
    Write32(MmioTransport::kStatus, virtio::kStatusAcknowledge | virtio::kStatusDriver | virtio::kStatusFeaturesOk |
                                        virtio::kStatusDriverOk);
  }
  void Notify(uint32_t q) { Write32(MmioTransport::kQueueNotify, q); }
  uint32_t Status() { return Read32(MmioTransport::kStatus); }
  // Reads and acknowledges InterruptStatus, like vm_interrupt() in Linux.
  uint32_t AckInterrupts() {
    uint32_t s = Read32(MmioTransport::kInterruptStatus);
    Write32(MmioTransport::kInterruptAck, s);
    return s;
  }

 private:
  MmioTransport& t_;
};

// Plays KVM's part: a bound (offset, value) write signals the eventfd and
// never reaches the transport; anything else is an exit to the transport.
struct EventFdBinder : IoEventBinder {
  std::mutex mu;
  std::map<uint64_t, int> bound;  // datamatch -> eventfd, for QueueNotify only
  bool refuse = false;
  int binds = 0, unbinds = 0;
  bool Bind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) override {
    std::lock_guard<std::mutex> g(mu);
    EXPECT_EQ(offset, static_cast<uint64_t>(MmioTransport::kQueueNotify));
    EXPECT_EQ(len, 4u);
    EXPECT(fd >= 0);
    if (refuse) return false;
    EXPECT(!bound.count(datamatch));
    bound[datamatch] = fd;
    binds++;
    return true;
  }
  void Unbind(uint64_t, uint32_t, uint64_t datamatch, int fd) override {
    std::lock_guard<std::mutex> g(mu);
    EXPECT(bound.count(datamatch) && bound[datamatch] == fd);
    bound.erase(datamatch);
    unbinds++;
  }
  // The guest's QueueNotify write: true when it ended in the eventfd.
  bool Notify(MmioDriver& drv, uint32_t q) {
    int fd = -1;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = bound.find(q);
      if (it != bound.end()) fd = it->second;
    }
    if (fd < 0) {
      drv.Notify(q);
      return false;
    }
    uint64_t one = 1;
    EXPECT(write(fd, &one, sizeof one) == sizeof one);
    return true;
  }
};

}  // namespace vmlet::testing
