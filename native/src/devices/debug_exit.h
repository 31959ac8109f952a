// isa-debug-exit compatible port (0xf4, 4 bytes): a guest write of value v
// stops the VM with exit { reason: 'guest-exit', code: v }. This is how the
// test guest ends a run: an I/O write is reliable on every KVM, where a
// triple fault or ACPI power-off is not.
#pragma once
#include <cstdint>
#include <functional>

#include "core/bus.h"

namespace vmlet::devices {

class DebugExit : public BusDevice {
 public:
  static constexpr uint64_t kBase = 0xf4;
  static constexpr uint64_t kSize = 4;
  explicit DebugExit(std::function<void(uint32_t code)> on_exit) : on_exit_(std::move(on_exit)) {}

  void Read(uint64_t, uint8_t* data, uint32_t len) override {
    for (uint32_t i = 0; i < len; i++) data[i] = 0xff;
  }
  void Write(uint64_t offset, const uint8_t* data, uint32_t len) override;

 private:
  std::function<void(uint32_t)> on_exit_;
};

}  // namespace vmlet::devices
