// The MC146818 CMOS real-time clock at ports 0x70 (index) / 0x71 (data):
// the host's UTC time, read-only, plus the 128 bytes of CMOS RAM.
//
// Why it exists: with nothing on these ports every read is 0xff, so the
// "update in progress" bit never clears and Linux polls it ~20,000 times at
// boot (40,000 I/O exits measured with a Debian kernel) before declaring the
// clock broken and starting at 1970. No alarm or periodic interrupt (IRQ 8).
#pragma once
#include <cstdint>
#include <ctime>
#include <functional>
#include <mutex>

#include "core/bus.h"
#include "snapshot/stream.h"

namespace vmlet::devices {

class Rtc : public BusDevice {
 public:
  static constexpr uint64_t kBase = 0x70;
  static constexpr uint64_t kSize = 2;
  // `now` returns seconds since the epoch; tests pass a fixed clock.
  explicit Rtc(std::function<time_t()> now = [] { return time(nullptr); });

  void Read(uint64_t offset, uint8_t* data, uint32_t len) override;
  void Write(uint64_t offset, const uint8_t* data, uint32_t len) override;

  // Snapshot: the index register and CMOS RAM (the time is the host's).
  void SaveState(snapshot::Writer& w);
  void RestoreState(snapshot::Reader& r);

  // Register indexes (MC146818 datasheet; Linux include/linux/mc146818rtc.h).
  enum : uint8_t {
    kSeconds = 0x00, kMinutes = 0x02, kHours = 0x04, kWeekday = 0x06, kDay = 0x07, kMonth = 0x08,
    kYear = 0x09, kStatusA = 0x0a, kStatusB = 0x0b, kStatusC = 0x0c, kStatusD = 0x0d, kCentury = 0x32,
  };

 private:
  uint8_t ReadRegister(uint8_t index);
  uint8_t Encode(int value) const;

  std::mutex mu_;
  std::function<time_t()> now_;
  uint8_t index_ = 0;
  uint8_t cmos_[128] = {};
};

}  // namespace vmlet::devices
