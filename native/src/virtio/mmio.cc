#include "virtio/mmio.h"

#include <cstring>

namespace vmlet {

using namespace virtio;

struct MmioTransport::Shared {
  std::shared_ptr<IrqLine> irq;
  std::atomic<uint32_t> interrupt_status{0};
  std::atomic<uint32_t> status{0};
  std::atomic<uint32_t> config_generation{0};
};

namespace {

constexpr uint32_t kInterruptUsedBuffer = 1;
constexpr uint32_t kInterruptConfigChange = 2;

class MmioInterruptSink : public InterruptSink {
 public:
  explicit MmioInterruptSink(std::shared_ptr<MmioTransport::Shared> s) : s_(std::move(s)) {}
  void SignalUsedBuffer() override {
    s_->interrupt_status.fetch_or(kInterruptUsedBuffer);
    if (s_->irq) s_->irq->Trigger();
  }
  void SignalConfigChange() override {
    s_->config_generation.fetch_add(1);
    s_->interrupt_status.fetch_or(kInterruptConfigChange);
    if (s_->irq) s_->irq->Trigger();
  }
  void SignalNeedsReset() override {
    // Only once per device life: a hostile driver could otherwise make a
    // device thread flood the interrupt line.
    if (s_->status.fetch_or(kStatusDeviceNeedsReset) & kStatusDeviceNeedsReset) return;
    s_->interrupt_status.fetch_or(kInterruptConfigChange);
    if (s_->irq) s_->irq->Trigger();
  }

 private:
  std::shared_ptr<MmioTransport::Shared> s_;
};

uint32_t LoadLe32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void StoreLe32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

void SetLow(uint64_t* field, uint32_t v) { *field = (*field & ~0xffffffffull) | v; }
void SetHigh(uint64_t* field, uint32_t v) { *field = (*field & 0xffffffffull) | (static_cast<uint64_t>(v) << 32); }

}  // namespace

MmioTransport::MmioTransport(std::shared_ptr<VirtioDevice> dev, GuestMemory* mem, std::shared_ptr<IrqLine> irq,
                             std::shared_ptr<IoEventBinder> notify_binder)
    : dev_(std::move(dev)), mem_(mem), shared_(std::make_shared<Shared>()), binder_(std::move(notify_binder)) {
  shared_->irq = std::move(irq);
  sink_ = std::make_shared<MmioInterruptSink>(shared_);
  for (uint16_t max : dev_->queue_max_sizes()) {
    Queue q;
    q.max_size = max;
    queues_.push_back(std::move(q));
  }
  device_features_ = dev_->device_features() | kFeatureVersion1;
}

// The queues die with us: a device whose own thread outlives the transport
// (a vsock device not yet shut down) must let go of them first. The
// bindings go before that, while the VM (which holds them) still exists.
MmioTransport::~MmioTransport() {
  std::lock_guard<std::mutex> lock(mu_);
  UnbindNotifiersLocked();
  dev_->Reset();
}

uint32_t MmioTransport::status() const { return shared_->status.load(); }

size_t MmioTransport::bound_notifiers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bound_.size();
}

// After Activate: a notify bound earlier could wake a device thread that has
// no queues yet, and the notification would be lost. One racing on another
// vCPU meanwhile exits, waits for mu_ and is handed over by QueueNotify.
void MmioTransport::BindNotifiersLocked() {
  if (!binder_) return;
  for (size_t i = 0; i < queues_.size(); i++) {
    if (!queues_[i].ready) continue;
    bool bound = false;
    for (const auto& b : bound_) bound = bound || b.queue == i;
    if (bound) continue;
    int fd = dev_->QueueNotifyFd(static_cast<uint16_t>(i));
    if (fd < 0) continue;
    if (binder_->Bind(kQueueNotify, 4, i, fd)) bound_.push_back({static_cast<uint16_t>(i), fd});
  }
}

void MmioTransport::BindNewNotifiers() {
  std::lock_guard<std::mutex> lock(mu_);
  if (activated_) BindNotifiersLocked();
}

void MmioTransport::UnbindNotifiersLocked() {
  for (auto& b : bound_) binder_->Unbind(kQueueNotify, 4, b.queue, b.fd);
  bound_.clear();
}

Queue* MmioTransport::SelectedQueue() {
  return queue_sel_ < queues_.size() ? &queues_[queue_sel_] : nullptr;
}

void MmioTransport::Read(uint64_t offset, uint8_t* data, uint32_t len) {
  std::lock_guard<std::mutex> lock(mu_);
  std::memset(data, 0, len);
  if (offset >= kConfig) {
    dev_->ReadConfig(offset - kConfig, data, len);
    return;
  }
  // Registers below 0x100 are 32-bit only (4.2.2.2); anything else reads 0.
  if (len != 4 || offset % 4) return;
  Queue* q = SelectedQueue();
  uint32_t v = 0;
  switch (offset) {
    case kMagicValue: v = kMagic; break;
    case kVersion: v = 2; break;
    case kDeviceId: v = dev_->device_id(); break;
    case kVendorId: v = kVendor; break;
    case kDeviceFeatures:
      v = device_features_sel_ == 0   ? static_cast<uint32_t>(device_features_)
          : device_features_sel_ == 1 ? static_cast<uint32_t>(device_features_ >> 32)
                                      : 0;
      break;
    case kQueueNumMax: v = q ? q->max_size : 0; break;
    case kQueueNum: v = q ? q->size : 0; break;
    case kQueueReady: v = q && q->ready ? 1 : 0; break;
    case kInterruptStatus: v = shared_->interrupt_status.load(); break;
    case kStatus: v = shared_->status.load(); break;
    case kQueueDescLow: v = q ? static_cast<uint32_t>(q->desc_table) : 0; break;
    case kQueueDescHigh: v = q ? static_cast<uint32_t>(q->desc_table >> 32) : 0; break;
    case kQueueDriverLow: v = q ? static_cast<uint32_t>(q->avail_ring) : 0; break;
    case kQueueDriverHigh: v = q ? static_cast<uint32_t>(q->avail_ring >> 32) : 0; break;
    case kQueueDeviceLow: v = q ? static_cast<uint32_t>(q->used_ring) : 0; break;
    case kQueueDeviceHigh: v = q ? static_cast<uint32_t>(q->used_ring >> 32) : 0; break;
    // No shared memory regions: length all-ones means "does not exist" (4.2.2).
    case kShmLenLow:
    case kShmLenHigh:
    case kShmBaseLow:
    case kShmBaseHigh: v = 0xffffffff; break;
    case kConfigGeneration: v = shared_->config_generation.load(); break;
    default: v = 0; break;
  }
  StoreLe32(data, v);
}

void MmioTransport::Write(uint64_t offset, const uint8_t* data, uint32_t len) {
  std::lock_guard<std::mutex> lock(mu_);
  if (offset >= kConfig) {
    // The device config may change only while the driver is not using it
    // concurrently; a device decides which fields are writable at all.
    dev_->WriteConfig(offset - kConfig, data, len);
    return;
  }
  if (len != 4 || offset % 4) return;
  uint32_t v = LoadLe32(data);
  uint32_t status = shared_->status.load();
  bool features_locked = status & (kStatusFeaturesOk | kStatusDriverOk);
  Queue* q = SelectedQueue();
  // Queue layout may change only while the queue is disabled and the device
  // not yet live (4.2.3.2); later writes are a driver bug and are ignored.
  bool queue_writable = q && !q->ready && !activated_;
  switch (offset) {
    case kDeviceFeaturesSel: device_features_sel_ = v; break;
    case kDriverFeaturesSel: driver_features_sel_ = v; break;
    case kDriverFeatures:
      if (features_locked) break;
      if (driver_features_sel_ == 0) SetLow(&driver_features_, v);
      else if (driver_features_sel_ == 1) SetHigh(&driver_features_, v);
      break;
    case kQueueSel: queue_sel_ = v; break;
    case kQueueNum:
      if (queue_writable) q->size = static_cast<uint16_t>(v > 0xffff ? 0 : v);
      break;
    case kQueueReady:
      if (!q || activated_) break;
      if (v == 1) {
        q->last_error = q->Validate(*mem_);
        q->ready = q->last_error.empty();
      } else if (v == 0) {
        q->ready = false;
      }
      break;
    case kQueueDescLow: if (queue_writable) SetLow(&q->desc_table, v); break;
    case kQueueDescHigh: if (queue_writable) SetHigh(&q->desc_table, v); break;
    case kQueueDriverLow: if (queue_writable) SetLow(&q->avail_ring, v); break;
    case kQueueDriverHigh: if (queue_writable) SetHigh(&q->avail_ring, v); break;
    case kQueueDeviceLow: if (queue_writable) SetLow(&q->used_ring, v); break;
    case kQueueDeviceHigh: if (queue_writable) SetHigh(&q->used_ring, v); break;
    case kQueueNotify:
      // A notify before DRIVER_OK, for a disabled queue, or after the device
      // asked for a reset has nothing to act on.
      if (activated_ && v < queues_.size() && queues_[v].ready && !(status & kStatusDeviceNeedsReset))
        dev_->QueueNotify(static_cast<uint16_t>(v));
      break;
    case kInterruptAck: shared_->interrupt_status.fetch_and(~v); break;
    case kStatus: WriteStatus(v); break;
    default: break;
  }
}

void MmioTransport::WriteStatus(uint32_t v) {
  if (v == 0) {
    ResetLocked();
    return;
  }
  uint32_t old = shared_->status.load();
  // DEVICE_NEEDS_RESET is the device's to set, never the driver's.
  uint32_t next = (v & ~kStatusDeviceNeedsReset) | (old & kStatusDeviceNeedsReset);
  if ((next & kStatusFeaturesOk) && !(old & kStatusFeaturesOk)) {
    // 3.1.1: the device refuses features it did not offer and, being a
    // modern-only device, a driver without VERSION_1; the driver sees
    // FEATURES_OK clear when it reads Status back and gives up.
    bool ok = (driver_features_ & ~device_features_) == 0 && (driver_features_ & kFeatureVersion1);
    if (!ok) {
      next &= ~kStatusFeaturesOk;
    } else {
      for (auto& q : queues_) {
        q.event_idx = driver_features_ & kFeatureEventIdx;
        q.indirect_allowed = driver_features_ & kFeatureIndirectDesc;
      }
      dev_->AckFeatures(driver_features_);
    }
  }
  if ((next & kStatusDriverOk) && !(old & kStatusDriverOk) && !activated_) {
    bool ok = next & kStatusFeaturesOk;
    for (auto& q : queues_) {
      if (!ok) break;
      if (q.ready && !q.Validate(*mem_).empty()) ok = false;
    }
    if (!ok) {
      next |= kStatusDeviceNeedsReset;
      shared_->status.store(next);
      shared_->interrupt_status.fetch_or(kInterruptConfigChange);
      if (shared_->irq) shared_->irq->Trigger();
      return;
    }
    std::vector<Queue*> qs;
    for (auto& q : queues_) qs.push_back(&q);
    shared_->status.store(next);
    activated_ = true;
    dev_->Activate(mem_, std::move(qs), sink_);
    BindNotifiersLocked();
    return;
  }
  shared_->status.store(next);
}

void MmioTransport::ResetLocked() {
  // Unbound first, so no new notification reaches a device thread; then the
  // device, so it stops touching queues (its threads may be mid-packet)
  // before we wipe them.
  UnbindNotifiersLocked();
  dev_->Reset();
  activated_ = false;
  for (auto& q : queues_) q.Reset();
  driver_features_ = 0;
  device_features_sel_ = driver_features_sel_ = 0;
  queue_sel_ = 0;
  shared_->interrupt_status.store(0);
  shared_->status.store(0);
}

void MmioTransport::SaveState(snapshot::Writer& w) {
  std::lock_guard<std::mutex> lock(mu_);
  w.U32(dev_->device_id());
  w.U64(device_features_);
  w.U32(device_features_sel_);
  w.U32(driver_features_sel_);
  w.U64(driver_features_);
  w.U32(queue_sel_);
  w.Bool(activated_);
  w.U32(shared_->status.load());
  w.U32(shared_->interrupt_status.load());
  w.U32(shared_->config_generation.load());
  w.U32(static_cast<uint32_t>(queues_.size()));
  for (auto& q : queues_) {
    w.U16(q.max_size);
    w.U16(q.size);
    w.Bool(q.ready);
    w.U64(q.desc_table);
    w.U64(q.avail_ring);
    w.U64(q.used_ring);
    w.Bool(q.event_idx);
    w.Bool(q.indirect_allowed);
    w.U16(q.next_avail);
    w.U16(q.next_used);
    w.Bool(q.broken);
    w.U16(q.signalled_used);
    w.Bool(q.signalled_used_valid);
  }
  snapshot::Writer dev;
  dev_->SaveState(dev);
  w.Bytes(dev.data().data(), dev.data().size());
}

void MmioTransport::RestoreState(snapshot::Reader& r) {
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t id = r.U32();
  if (id != dev_->device_id())
    r.Fail("the snapshot has virtio device id " + std::to_string(id) + " in this slot, the VM now has " +
           std::to_string(dev_->device_id()));
  uint64_t features = r.U64();
  if (features != device_features_)
    r.Fail("the device offered other features when the snapshot was taken (a read-only disk now writable, or the reverse?)");
  device_features_sel_ = r.U32();
  driver_features_sel_ = r.U32();
  driver_features_ = r.U64();
  queue_sel_ = r.U32();
  bool activated = r.Bool();
  uint32_t status = r.U32();
  uint32_t interrupt_status = r.U32();
  uint32_t generation = r.U32();
  uint32_t nq = r.U32();
  if (nq != queues_.size()) r.Fail(std::to_string(nq) + " queues where the device has " + std::to_string(queues_.size()));
  for (auto& q : queues_) {
    if (r.U16() != q.max_size) r.Fail("a queue's maximum size changed");
    q.size = r.U16();
    q.ready = r.Bool();
    q.desc_table = r.U64();
    q.avail_ring = r.U64();
    q.used_ring = r.U64();
    q.event_idx = r.Bool();
    q.indirect_allowed = r.Bool();
    q.next_avail = r.U16();
    q.next_used = r.U16();
    q.broken = r.Bool();
    q.signalled_used = r.U16();
    q.signalled_used_valid = r.Bool();
    // The same checks QueueReady made when the driver enabled it: a queue
    // the state file claims is ready must really fit this VM's RAM.
    if (q.ready && !q.Validate(*mem_).empty()) r.Fail("a ready queue does not fit guest RAM: " + q.Validate(*mem_));
  }
  std::vector<uint8_t> dev = r.Bytes();
  r.ExpectEnd();
  snapshot::Reader dr(dev.data(), dev.size(), "virtio device " + std::to_string(id));
  dev_->RestoreState(dr);
  shared_->status.store(status);
  shared_->interrupt_status.store(interrupt_status);
  shared_->config_generation.store(generation);
  if (status & kStatusFeaturesOk) dev_->AckFeatures(driver_features_);
  if (activated) {
    std::vector<Queue*> qs;
    for (auto& q : queues_) qs.push_back(&q);
    activated_ = true;
    dev_->Activate(mem_, std::move(qs), sink_);
    BindNotifiersLocked();
  }
}

}  // namespace vmlet
