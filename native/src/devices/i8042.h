// Just enough of the i8042 keyboard controller (ports 0x60 and 0x64) for a
// guest to reboot: command 0xFE on 0x64 pulses the CPU reset line, which is
// what Linux `reboot` ends with, and becomes exit { reason: 'reset' }.
// Status reads say "both buffers empty" so the guest's wait loops finish.
#pragma once
#include <cstdint>
#include <functional>

#include "core/bus.h"

namespace vmlet::devices {

class I8042 : public BusDevice {
 public:
  static constexpr uint64_t kBase = 0x60;
  static constexpr uint64_t kSize = 5;  // 0x60 data .. 0x64 command/status
  explicit I8042(std::function<void()> on_reset) : on_reset_(std::move(on_reset)) {}

  void Read(uint64_t offset, uint8_t* data, uint32_t len) override;
  void Write(uint64_t offset, const uint8_t* data, uint32_t len) override;

 private:
  std::function<void()> on_reset_;
};

}  // namespace vmlet::devices
