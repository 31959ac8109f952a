#include "devices/i8042.h"

namespace vmlet::devices {

namespace {
constexpr uint64_t kCommandPort = 4;
constexpr uint8_t kCmdResetCpu = 0xfe;
}  // namespace

void I8042::Read(uint64_t offset, uint8_t* data, uint32_t len) {
  (void)offset;
  // Data port: nothing to read; status: output buffer empty, input buffer empty.
  for (uint32_t i = 0; i < len; i++) data[i] = 0;
}

void I8042::Write(uint64_t offset, const uint8_t* data, uint32_t len) {
  if (offset == kCommandPort && len >= 1 && data[0] == kCmdResetCpu) on_reset_();
}

}  // namespace vmlet::devices
