// The virtio-mmio v2 register interface (virtio 1.x 4.2.2) as a driver sees it.
#include <sys/eventfd.h>
#include <unistd.h>

#include "devices/blk.h"
#include "virtio_test_driver.h"

using namespace vmlet;
using namespace vmlet::testing;

namespace {

// A minimal device with two queues of different maximum sizes and a small
// config space, so the transport is tested on its own.
class ProbeDevice : public virtio::VirtioDevice {
 public:
  uint32_t device_id() const override { return 42; }
  uint64_t device_features() const override { return virtio::kFeatureVersion1 | (1ull << 3) | virtio::kFeatureEventIdx; }
  std::vector<uint16_t> queue_max_sizes() const override { return {64, 8}; }
  void ReadConfig(uint64_t offset, uint8_t* data, uint32_t len) override {
    for (uint32_t i = 0; i < len; i++) data[i] = offset + i < sizeof config ? config[offset + i] : 0;
  }
  void WriteConfig(uint64_t offset, const uint8_t* data, uint32_t len) override {
    for (uint32_t i = 0; i < len && offset + i < sizeof config; i++) config[offset + i] = data[i];
  }
  void AckFeatures(uint64_t f) override { acked = f; }
  void Activate(GuestMemory*, std::vector<virtio::Queue*> q, std::shared_ptr<virtio::InterruptSink> s) override {
    queues = q;
    sink = s;
    activations++;
  }
  void QueueNotify(uint16_t q) override { notified.push_back(q); }
  // Queue 0 only, when asked: queue 1 keeps the exit path.
  int QueueNotifyFd(uint16_t q) override { return q == 0 ? notify_fd : -1; }
  void Reset() override {
    resets++;
    queues.clear();
    sink.reset();
  }
  uint8_t config[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  uint64_t acked = 0;
  int activations = 0, resets = 0;
  std::vector<uint16_t> notified;
  int notify_fd = -1;
  std::vector<virtio::Queue*> queues;
  std::shared_ptr<virtio::InterruptSink> sink;
};

struct Rig {
  GuestMemory mem{{{0, 1 << 20}}};
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  std::shared_ptr<ProbeDevice> dev = std::make_shared<ProbeDevice>();
  MmioTransport t{dev, &mem, irq};
  MmioDriver drv{t};
};

}  // namespace

TEST_CASE("virtio_mmio: identity registers") {
  Rig r;
  EXPECT_EQ(r.drv.Read32(MmioTransport::kMagicValue), 0x74726976u);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kVersion), 2u);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kDeviceId), 42u);
  EXPECT(r.drv.Read32(MmioTransport::kVendorId) != 0);
  EXPECT_EQ(r.drv.DeviceFeatures(), r.dev->device_features());
  r.drv.Write32(MmioTransport::kQueueSel, 0);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueNumMax), 64u);
  r.drv.Write32(MmioTransport::kQueueSel, 1);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueNumMax), 8u);
  r.drv.Write32(MmioTransport::kQueueSel, 2);  // no such queue
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueNumMax), 0u);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kShmLenLow), 0xffffffffu);  // no shared memory regions
  // Registers are 32-bit only: a byte read of the magic reads 0.
  uint8_t b = 0xff;
  r.t.Read(MmioTransport::kMagicValue, &b, 1);
  EXPECT_EQ(b, 0);
}

TEST_CASE("virtio_mmio: config space at 0x100, any width") {
  Rig r;
  EXPECT_EQ(r.drv.Read32(0x100), 0x04030201u);
  uint8_t b;
  r.t.Read(0x105, &b, 1);
  EXPECT_EQ(b, 6);
  uint8_t w[2] = {0xaa, 0xbb};
  r.t.Write(0x100, w, 2);
  EXPECT_EQ(r.dev->config[1], 0xbb);
  EXPECT_EQ(r.drv.Read32(0x200), 0u);  // beyond the device's config
}

TEST_CASE("virtio_mmio: features the device did not offer, or no VERSION_1, clear FEATURES_OK") {
  Rig r;
  EXPECT(!r.drv.Negotiate(virtio::kFeatureVersion1 | (1ull << 7)));
  EXPECT(!r.drv.Negotiate(1ull << 3));  // legacy driver
  EXPECT(r.drv.Negotiate(virtio::kFeatureVersion1 | (1ull << 3)));
  EXPECT_EQ(r.dev->acked, virtio::kFeatureVersion1 | (1ull << 3));
  // DRIVER_OK without FEATURES_OK accepted is refused with NEEDS_RESET.
  Rig r2;
  r2.drv.Negotiate(1ull << 3);
  r2.drv.DriverOk();
  EXPECT_EQ(r2.dev->activations, 0);
  EXPECT(r2.drv.Status() & virtio::kStatusDeviceNeedsReset);
}

TEST_CASE("virtio_mmio: QueueReady validates size and ring placement") {
  Rig r;
  EXPECT(r.drv.Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(r.drv.SetupQueue(0, 48, 0x1000, 0x2000, 0x3000), 0u);     // not a power of 2
  EXPECT_EQ(r.drv.SetupQueue(0, 128, 0x1000, 0x2000, 0x3000), 0u);    // above QueueNumMax
  EXPECT_EQ(r.drv.SetupQueue(0, 0, 0x1000, 0x2000, 0x3000), 0u);      // zero
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1008, 0x2000, 0x3000), 0u);     // descriptor table misaligned
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2001, 0x3000), 0u);     // avail misaligned
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2000, 0x3002), 0u);     // used misaligned
  EXPECT_EQ(r.drv.SetupQueue(0, 64, (1 << 20) - 512, 0x2000, 0x3000), 0u);  // table runs past RAM
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2000, 1ull << 40), 0u); // used ring outside RAM
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2000, 0x3000), 1u);
  // Once ready, the layout can no longer change under the device.
  r.drv.Write32(MmioTransport::kQueueDescLow, 0x5000);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueDescLow), 0x1000u);
  EXPECT_EQ(r.drv.SetupQueue(1, 8, 0x4000, 0x4100, 0x4200), 1u);
  r.drv.DriverOk();
  EXPECT_EQ(r.dev->activations, 1);
  EXPECT_EQ(r.dev->queues.size(), 2u);
  EXPECT(r.dev->queues[0]->ready && r.dev->queues[0]->size == 64);
  EXPECT(!r.dev->queues[0]->event_idx);
}

TEST_CASE("virtio_mmio: notify reaches the device only for live queues") {
  Rig r;
  r.drv.Notify(0);  // before DRIVER_OK
  EXPECT(r.dev->notified.empty());
  EXPECT(r.drv.Negotiate(virtio::kFeatureVersion1 | virtio::kFeatureEventIdx));
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2000, 0x3000), 1u);
  r.drv.DriverOk();
  EXPECT(r.dev->queues[0]->event_idx);
  r.drv.Notify(0);
  r.drv.Notify(1);  // never made ready
  r.drv.Notify(7);  // does not exist
  EXPECT_EQ(r.dev->notified.size(), 1u);
  EXPECT_EQ(r.dev->notified[0], 0);
}

TEST_CASE("virtio_mmio: interrupt status, ack and the IRQ line") {
  Rig r;
  EXPECT(r.drv.Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2000, 0x3000), 1u);
  r.drv.DriverOk();
  r.dev->sink->SignalUsedBuffer();
  EXPECT_EQ(r.irq->count.load(), 1);
  uint32_t gen = r.drv.Read32(MmioTransport::kConfigGeneration);
  r.dev->sink->SignalConfigChange();
  EXPECT_EQ(r.drv.Read32(MmioTransport::kInterruptStatus), 3u);
  EXPECT(r.drv.Read32(MmioTransport::kConfigGeneration) != gen);
  r.drv.Write32(MmioTransport::kInterruptAck, 1);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kInterruptStatus), 2u);
  r.drv.Write32(MmioTransport::kInterruptAck, 2);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kInterruptStatus), 0u);
}

TEST_CASE("virtio_mmio: Status 0 resets the device, queues and features") {
  Rig r;
  EXPECT(r.drv.Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(r.drv.SetupQueue(0, 64, 0x1000, 0x2000, 0x3000), 1u);
  r.drv.DriverOk();
  r.dev->sink->SignalUsedBuffer();
  int resets = r.dev->resets;
  r.drv.Write32(MmioTransport::kStatus, 0);
  EXPECT_EQ(r.dev->resets, resets + 1);
  EXPECT_EQ(r.drv.Status(), 0u);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kInterruptStatus), 0u);
  r.drv.Write32(MmioTransport::kQueueSel, 0);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueReady), 0u);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueNum), 0u);
  EXPECT_EQ(r.drv.Read32(MmioTransport::kQueueDescLow), 0u);
  // The driver can go round again.
  EXPECT(r.drv.Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(r.drv.SetupQueue(0, 32, 0x1000, 0x2000, 0x3000), 1u);
  r.drv.DriverOk();
  EXPECT_EQ(r.dev->activations, 2);
}

TEST_CASE("virtio_mmio: the driver cannot set DEVICE_NEEDS_RESET itself") {
  Rig r;
  r.drv.Write32(MmioTransport::kStatus, virtio::kStatusAcknowledge | virtio::kStatusDeviceNeedsReset);
  EXPECT_EQ(r.drv.Status(), virtio::kStatusAcknowledge);
}

TEST_CASE("virtio_queue: EVENT_IDX suppresses interrupts until used_event is crossed") {
  GuestMemory mem({{0, 1 << 20}});
  auto irq = std::make_shared<CountingIrq>();
  char tmpl[] = "/tmp/vmlet-evidx-XXXXXX";
  int fd = mkstemp(tmpl);
  EXPECT(ftruncate(fd, 1 << 20) == 0);
  close(fd);
  MmioTransport t(MakeVirtioBlk({tmpl, false, ""}), &mem, irq);
  unlink(tmpl);
  MmioDriver drv(t);
  RingDriver ring(mem, 0x1000, 16);
  EXPECT(drv.Negotiate(virtio::kFeatureVersion1 | virtio::kFeatureEventIdx));
  EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
  drv.DriverOk();
  struct __attribute__((packed)) {
    uint32_t type, reserved;
    uint64_t sector;
  } h{blk::kTypeIn, 0, 0};
  EXPECT(mem.WriteObj(0x8000, h));
  auto one = [&] {
    ring.Add({{0x8000, 16, false}, {0x10000, 512, true}, {0x9000, 1, true}});
    drv.Notify(0);
  };
  one();  // first completion always interrupts
  EXPECT_EQ(irq->count.load(), 1);
  // After going empty the device asks to be notified at the next entry.
  EXPECT_EQ(ring.AvailEvent(), 1);
  ring.SetUsedEvent(3);  // "interrupt me when used.idx passes 3"
  one();                 // used.idx 2
  one();                 // used.idx 3
  EXPECT_EQ(irq->count.load(), 1);
  one();  // used.idx 4: crosses used_event 3
  EXPECT_EQ(irq->count.load(), 2);
}

TEST_CASE("virtio_queue: NO_INTERRUPT in avail.flags suppresses interrupts without EVENT_IDX") {
  GuestMemory mem({{0, 1 << 20}});
  auto irq = std::make_shared<CountingIrq>();
  char tmpl[] = "/tmp/vmlet-noint-XXXXXX";
  int fd = mkstemp(tmpl);
  EXPECT(ftruncate(fd, 1 << 20) == 0);
  close(fd);
  MmioTransport t(MakeVirtioBlk({tmpl, false, ""}), &mem, irq);
  unlink(tmpl);
  MmioDriver drv(t);
  RingDriver ring(mem, 0x1000, 16);
  EXPECT(drv.Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
  drv.DriverOk();
  ring.SetAvailFlags(virtio::kAvailFlagNoInterrupt);
  ring.Add({{0x8000, 16, false}, {0x10000, 512, true}, {0x9000, 1, true}});
  drv.Notify(0);
  EXPECT(ring.HasUsed());
  EXPECT_EQ(irq->count.load(), 0);
}

TEST_CASE("virtio_mmio: notify eventfds are bound at DRIVER_OK, unbound on reset and on destruction; a refused bind keeps the exit path") {
  GuestMemory mem({{0, 1 << 20}});
  auto irq = std::make_shared<CountingIrq>();
  auto dev = std::make_shared<ProbeDevice>();
  dev->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  EXPECT(dev->notify_fd >= 0);
  auto binder = std::make_shared<EventFdBinder>();
  {
    MmioTransport t(dev, &mem, irq, binder);
    MmioDriver drv(t);
    RingDriver r0(mem, 0x1000, 16), r1(mem, 0x3000, 8);
    EXPECT(drv.Negotiate(virtio::kFeatureVersion1));
    EXPECT_EQ(drv.SetupQueue(0, r0), 1u);
    EXPECT_EQ(drv.SetupQueue(1, r1), 1u);
    // Nothing before DRIVER_OK: a kick then would wake a device without queues.
    EXPECT_EQ(t.bound_notifiers(), 0u);
    drv.DriverOk();
    EXPECT_EQ(t.bound_notifiers(), 1u);
    EXPECT(binder->bound.count(0) && binder->bound[0] == dev->notify_fd);
    // The bound kick ends in the eventfd, the other queue's exits to the device.
    EXPECT(binder->Notify(drv, 0));
    EXPECT(!binder->Notify(drv, 1));
    uint64_t v = 0;
    EXPECT(read(dev->notify_fd, &v, sizeof v) == sizeof v);
    EXPECT_EQ(v, 1u);
    EXPECT(dev->notified == std::vector<uint16_t>{1});
    // Reset unbinds before the device forgets its queues.
    drv.Write32(MmioTransport::kStatus, 0);
    EXPECT_EQ(t.bound_notifiers(), 0u);
    EXPECT_EQ(binder->unbinds, 1);
    // Bound again after re-initialisation, and unbound when the transport goes.
    EXPECT(drv.Negotiate(virtio::kFeatureVersion1));
    EXPECT_EQ(drv.SetupQueue(0, r0), 1u);
    drv.DriverOk();
    EXPECT_EQ(t.bound_notifiers(), 1u);
  }
  EXPECT(binder->bound.empty());
  EXPECT_EQ(binder->binds, 2);
  EXPECT_EQ(binder->unbinds, 2);

  // A host without KVM_IOEVENTFD (or out of ioeventfd slots) refuses: every kick exits.
  binder->refuse = true;
  dev->notified.clear();
  {
    MmioTransport t(dev, &mem, irq, binder);
    MmioDriver drv(t);
    RingDriver r0(mem, 0x1000, 16);
    EXPECT(drv.Negotiate(virtio::kFeatureVersion1));
    EXPECT_EQ(drv.SetupQueue(0, r0), 1u);
    drv.DriverOk();
    EXPECT_EQ(t.bound_notifiers(), 0u);
    EXPECT(!binder->Notify(drv, 0));
    EXPECT(dev->notified == std::vector<uint16_t>{0});
  }
  EXPECT_EQ(binder->unbinds, 2);
  close(dev->notify_fd);
}

TEST_CASE("virtio_queue: NO_NOTIFY in used.flags without EVENT_IDX; re-enabling reports entries added meanwhile") {
  for (bool event_idx : {false, true}) {
    GuestMemory mem({{0, 1 << 20}});
    auto irq = std::make_shared<CountingIrq>();
    auto dev = std::make_shared<ProbeDevice>();
    MmioTransport t(dev, &mem, irq);
    MmioDriver drv(t);
    RingDriver ring(mem, 0x1000, 16);
    EXPECT(drv.Negotiate(virtio::kFeatureVersion1 | (event_idx ? virtio::kFeatureEventIdx : 0)));
    EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
    drv.DriverOk();
    virtio::Queue& q = *dev->queues.at(0);
    // With EVENT_IDX the flag is not the device's to use: nothing changes.
    EXPECT_EQ(q.DisableDriverNotifications(mem), !event_idx);
    EXPECT_EQ(ring.UsedFlags(), event_idx ? 0u : 1u);
    EXPECT(!q.EnableDriverNotifications(mem));
    EXPECT_EQ(ring.UsedFlags(), 0u);
    // The lost wake-up: the driver adds an entry while the flag is set and
    // does not notify; re-enabling must say so, so the device pops again.
    EXPECT_EQ(q.DisableDriverNotifications(mem), !event_idx);
    ring.Add({{0x8000, 16, false}});
    EXPECT(q.EnableDriverNotifications(mem));
    EXPECT_EQ(ring.UsedFlags(), 0u);
    virtio::DescriptorChain chain;
    EXPECT(q.Pop(mem, virtio::ChainLimits{}, &chain) == virtio::PopResult::kChain);
    EXPECT(!q.EnableDriverNotifications(mem));
  }
}
