// Just enough of the i8042 keyboard controller (ports 0x60 and 0x64) for a
// guest to reboot: command 0xFE on 0x64 pulses the CPU reset line, which is
// what Linux `reboot` ends with, and becomes exit { reason: 'reset' }.
// Status reads say "both buffers empty" so the guest's wait loops finish.
//
// Known cost: the controller answers no commands, so Linux's i8042 driver
// logs "Can't read CTR while initializing i8042" after one 500 ms poll of the
// status port (~10,000 I/O exits measured in hack/kvm-lab) and gives up, which
// is harmless. Answering only the CTR commands would move the cost to the AUX
// and keyboard probes unless the guest also boots with i8042.noaux
// i8042.dumbkbd (as Firecracker's do); a guest kernel without
// CONFIG_SERIO_I8042 pays nothing.
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
