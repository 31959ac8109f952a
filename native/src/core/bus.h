// What the vCPU loop knows about devices: ranges on the MMIO or port-I/O bus.
// The core never names a device (the kvmtool habit): a device is inserted into
// a Bus at set-up, and exits are routed by address alone.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

namespace vmlet {

class BusDevice {
 public:
  virtual ~BusDevice() = default;
  // offset is relative to the device's base; len is 1, 2, 4 or 8. A device
  // must fill data on Read whatever the offset (unknown registers read as 0).
  // Called on a vCPU thread; a device shared by several vCPUs locks itself.
  virtual void Read(uint64_t offset, uint8_t* data, uint32_t len) = 0;
  virtual void Write(uint64_t offset, const uint8_t* data, uint32_t len) = 0;
};

// Set up before the first vCPU runs, read-only after: lookups take no lock.
class Bus {
 public:
  // Returns false when the range overlaps one already inserted.
  bool Insert(uint64_t base, uint64_t size, std::shared_ptr<BusDevice> dev);
  // false: no device there (the caller decides what an unclaimed access means).
  bool Read(uint64_t addr, uint8_t* data, uint32_t len) const;
  bool Write(uint64_t addr, const uint8_t* data, uint32_t len) const;

 private:
  struct Range {
    uint64_t size;
    std::shared_ptr<BusDevice> dev;
  };
  const std::pair<const uint64_t, Range>* Find(uint64_t addr, uint32_t len) const;
  std::map<uint64_t, Range> ranges_;
};

// An interrupt a device can raise from any thread: an edge on its GSI. On
// KVM a KVM_IRQ_LINE pulse (kvm/kvm.h IrqIoctlLine); tests count calls.
class IrqLine {
 public:
  virtual ~IrqLine() = default;
  virtual void Trigger() = 0;
};

// Guest writes that end in the kernel instead of a VM exit: Bind asks that a
// `len`-byte write of `datamatch` at `offset` of one device's window signal
// the eventfd `fd` (KVM_IOEVENTFD). The write is then never seen by the bus;
// any other write still is. Bind returns false when the host cannot do it,
// and the caller keeps the exit path. The binder references the VM, so every
// binding must be undone (Unbind, same arguments) before the VM fd closes,
// and `fd` must stay open until then: KVM matches the binding by eventfd.
class IoEventBinder {
 public:
  virtual ~IoEventBinder() = default;
  virtual bool Bind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) = 0;
  virtual void Unbind(uint64_t offset, uint32_t len, uint64_t datamatch, int fd) = 0;
};

}  // namespace vmlet
