// What a virtio device is, independent of the transport that carries it.
//
// The transport (mmio.h) owns the registers, the feature handshake and the
// queue configuration; a device only sees validated queues after DRIVER_OK.
// A device never names a transport and the VMM core never names a device.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/guest_memory.h"
#include "snapshot/stream.h"
#include "virtio/queue.h"

namespace vmlet::virtio {

// Feature bits shared by every device (virtio 1.x section 6).
inline constexpr uint64_t kFeatureIndirectDesc = 1ull << 28;
inline constexpr uint64_t kFeatureEventIdx = 1ull << 29;
inline constexpr uint64_t kFeatureVersion1 = 1ull << 32;

// Device status bits (virtio 1.x 2.1).
inline constexpr uint32_t kStatusAcknowledge = 1;
inline constexpr uint32_t kStatusDriver = 2;
inline constexpr uint32_t kStatusDriverOk = 4;
inline constexpr uint32_t kStatusFeaturesOk = 8;
inline constexpr uint32_t kStatusDeviceNeedsReset = 64;
inline constexpr uint32_t kStatusFailed = 128;

// How a device tells the driver something happened. Built by the transport;
// callable from any thread (a vsock event loop signals while vCPUs notify).
class InterruptSink {
 public:
  virtual ~InterruptSink() = default;
  // InterruptStatus bit 0 ("used buffer notification") and the interrupt.
  virtual void SignalUsedBuffer() = 0;
  // InterruptStatus bit 1 ("configuration change") and the interrupt.
  virtual void SignalConfigChange() = 0;
  // The device met a state it cannot continue from (a ring the guest broke):
  // sets DEVICE_NEEDS_RESET in Status and sends a configuration change, as
  // virtio 1.x 2.1.2 asks. The device stays stopped until the driver resets it.
  virtual void SignalNeedsReset() = 0;
};

class VirtioDevice {
 public:
  virtual ~VirtioDevice() = default;
  virtual uint32_t device_id() const = 0;        // 2 = blk, 19 = vsock
  virtual uint64_t device_features() const = 0;  // includes VIRTIO_F_VERSION_1
  virtual std::vector<uint16_t> queue_max_sizes() const = 0;
  // offset is relative to the device config space; bytes outside it read as 0.
  virtual void ReadConfig(uint64_t offset, uint8_t* data, uint32_t len) = 0;
  virtual void WriteConfig(uint64_t offset, const uint8_t* data, uint32_t len) = 0;
  // The features the driver accepted (FEATURES_OK), before Activate.
  virtual void AckFeatures(uint64_t /*features*/) {}
  // DRIVER_OK: queues validated (a queue the driver left disabled has
  // ready == false and must be ignored); the device may start using them.
  virtual void Activate(GuestMemory* mem, std::vector<Queue*> queues, std::shared_ptr<InterruptSink> irq) = 0;
  // On the vCPU thread that wrote QueueNotify (the exit path; see below).
  virtual void QueueNotify(uint16_t queue_index) = 0;
  // Notifications that skip the vCPU: a device serving queue `queue_index`
  // on its own thread returns an eventfd it watches for that queue, and the
  // transport has KVM signal it when the driver writes the index to
  // QueueNotify, so the notify never exits to userspace. -1: exits only.
  // Called after Activate, under the transport's lock; the fd must stay open
  // until the device is destroyed (the transport unbinds it on reset and on
  // its own destruction, which may come after Shutdown). A notify that has
  // signalled the eventfd but not been served yet when a snapshot quiesces
  // the device is the device's to serve in QuiesceForSnapshot: the vCPU that
  // wrote it has moved on, and the saved rings must not hold a kick nobody
  // will repeat.
  virtual int QueueNotifyFd(uint16_t /*queue_index*/) { return -1; }
  // Driver wrote 0 to Status: forget the queues and all in-flight state.
  // After return the device touches neither the queues nor guest memory.
  virtual void Reset() = 0;
  // VM teardown: stop and join any thread the device owns. Idempotent.
  virtual void Shutdown() {}
  // Snapshot (VM paused, device quiesced): the device's own state beyond
  // what the transport holds. RestoreState runs on a freshly made device
  // before the transport re-activates it, and throws VmmError(Snapshot) when
  // the new backing (a disk of another size) cannot carry the saved state.
  virtual void SaveState(snapshot::Writer& /*w*/) const {}
  // Around a snapshot (vCPUs parked, same thread for both calls): a device
  // whose own threads write guest memory or queue state stops them, so the
  // queue indexes saved and the rings in the memory file agree.
  virtual void QuiesceForSnapshot() {}
  virtual void EndQuiesceForSnapshot() {}
  virtual void RestoreState(snapshot::Reader& r) { r.ExpectEnd(); }
};

}  // namespace vmlet::virtio
