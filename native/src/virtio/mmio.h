// The virtio-mmio transport, version 2 (virtio 1.x section 4.2), as a
// BusDevice in a 4 KiB window. It owns the registers, the feature handshake
// and the queue configuration, validates every queue before a device sees it
// (QueueReady and DRIVER_OK), and builds the InterruptSink the device signals.
//
// Hazards: registers are written by any vCPU at any time, in any order a
// buggy or hostile driver likes; the device's own threads (vsock) signal
// interrupts concurrently. One mutex serialises register access, reset and
// queue notification on the exit path; interrupt status is atomic so
// signalling never takes it.
//
// Notifications through KVM_IOEVENTFD: with a binder, the eventfd a device
// offers for a queue (VirtioDevice::QueueNotifyFd) is bound at DRIVER_OK to
// "QueueNotify written with this queue's index" and unbound, under the same
// mutex, before the device is reset or the transport dies. The device's
// thread then serves that queue without this lock; the device's own lock
// orders it against Activate/Reset (which the transport calls under mu_;
// the device never calls back into the transport with its lock held, so
// the order is always mu_ -> device lock). Any other write (another value,
// another width, a host without ioeventfd) still exits and is handled here.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "core/bus.h"
#include "core/guest_memory.h"
#include "virtio/device.h"
#include "virtio/queue.h"

namespace vmlet {

class MmioTransport : public BusDevice {
 public:
  // notify_binder may be null: every notify then takes the exit path.
  MmioTransport(std::shared_ptr<virtio::VirtioDevice> dev, GuestMemory* mem, std::shared_ptr<IrqLine> irq,
                std::shared_ptr<IoEventBinder> notify_binder = nullptr);
  ~MmioTransport() override;
  static constexpr uint64_t kWindowSize = 0x1000;

  void Read(uint64_t offset, uint8_t* data, uint32_t len) override;
  void Write(uint64_t offset, const uint8_t* data, uint32_t len) override;

  const std::shared_ptr<virtio::VirtioDevice>& device() const { return dev_; }
  // For diagnostics and tests: the driver-visible Status register.
  uint32_t status() const;
  // For tests: how many queues currently have their notify bound to an eventfd.
  size_t bound_notifiers() const;
  // Binds the notify of every ready queue the device offers an eventfd for
  // now and did not at activation (virtio-blk: a slot that got its medium
  // while the VM runs). A no-op before DRIVER_OK: activation binds them.
  void BindNewNotifiers();

  // Snapshot: registers, queue configuration and progress, then the
  // device's own state. RestoreState on a fresh transport (nothing written by
  // a driver yet) re-activates the device when the snapshot's was live; it
  // throws VmmError(Snapshot) when the state does not fit this device.
  void SaveState(snapshot::Writer& w);
  void RestoreState(snapshot::Reader& r);

  // Register offsets (virtio 1.x 4.2.2).
  enum Reg : uint64_t {
    kMagicValue = 0x000,
    kVersion = 0x004,
    kDeviceId = 0x008,
    kVendorId = 0x00c,
    kDeviceFeatures = 0x010,
    kDeviceFeaturesSel = 0x014,
    kDriverFeatures = 0x020,
    kDriverFeaturesSel = 0x024,
    kQueueSel = 0x030,
    kQueueNumMax = 0x034,
    kQueueNum = 0x038,
    kQueueReady = 0x044,
    kQueueNotify = 0x050,
    kInterruptStatus = 0x060,
    kInterruptAck = 0x064,
    kStatus = 0x070,
    kQueueDescLow = 0x080,
    kQueueDescHigh = 0x084,
    kQueueDriverLow = 0x090,
    kQueueDriverHigh = 0x094,
    kQueueDeviceLow = 0x0a0,
    kQueueDeviceHigh = 0x0a4,
    kShmSel = 0x0ac,
    kShmLenLow = 0x0b0,
    kShmLenHigh = 0x0b4,
    kShmBaseLow = 0x0b8,
    kShmBaseHigh = 0x0bc,
    kQueueReset = 0x0c0,
    kConfigGeneration = 0x0fc,
    kConfig = 0x100,
  };
  static constexpr uint32_t kMagic = 0x74726976;  // "virt"
  static constexpr uint32_t kVendor = 0x4c4d5676;  // "vVML"

  // Status and interrupt state shared with the InterruptSink, which a device
  // may hold (and signal from its own thread) until it is shut down.
  struct Shared;

 private:
  void WriteStatus(uint32_t v);
  void ResetLocked();
  void BindNotifiersLocked();
  void UnbindNotifiersLocked();
  virtio::Queue* SelectedQueue();

  std::shared_ptr<virtio::VirtioDevice> dev_;
  GuestMemory* mem_;
  std::shared_ptr<Shared> shared_;
  std::shared_ptr<virtio::InterruptSink> sink_;
  std::shared_ptr<IoEventBinder> binder_;
  struct BoundNotifier {
    uint16_t queue;
    int fd;
  };
  mutable std::mutex mu_;
  std::vector<BoundNotifier> bound_;
  std::vector<virtio::Queue> queues_;
  uint64_t device_features_;
  uint32_t device_features_sel_ = 0;
  uint32_t driver_features_sel_ = 0;
  uint64_t driver_features_ = 0;
  uint32_t queue_sel_ = 0;
  bool activated_ = false;
};

}  // namespace vmlet
