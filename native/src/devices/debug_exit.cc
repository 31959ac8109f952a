#include "devices/debug_exit.h"

namespace vmlet::devices {

void DebugExit::Write(uint64_t offset, const uint8_t* data, uint32_t len) {
  // QEMU takes the value of whatever width was written at the port's base;
  // a write at an inner offset is not an exit request.
  if (offset != 0 || len == 0) return;
  uint32_t v = 0;
  for (uint32_t i = 0; i < len && i < 4; i++) v |= uint32_t{data[i]} << (8 * i);
  on_exit_(v);
}

}  // namespace vmlet::devices
