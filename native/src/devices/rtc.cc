#include "devices/rtc.h"

#include <cstring>

namespace vmlet::devices {

namespace {
constexpr uint8_t kStatusB24Hour = 0x02;
constexpr uint8_t kStatusBBinary = 0x04;
constexpr uint8_t kStatusDValid = 0x80;  // "valid RAM and time": the battery is fine
}  // namespace

Rtc::Rtc(std::function<time_t()> now) : now_(std::move(now)) {
  cmos_[kStatusA] = 0x26;  // 32.768 kHz time base, 1024 Hz rate; UIP is never set
  cmos_[kStatusB] = kStatusB24Hour;
  cmos_[kStatusD] = kStatusDValid;
}

uint8_t Rtc::Encode(int value) const {
  if (cmos_[kStatusB] & kStatusBBinary) return static_cast<uint8_t>(value);
  return static_cast<uint8_t>(((value / 10) << 4) | (value % 10));
}

uint8_t Rtc::ReadRegister(uint8_t index) {
  time_t t = now_();
  struct tm tm {};
  gmtime_r(&t, &tm);
  switch (index) {
    case kSeconds: return Encode(tm.tm_sec > 59 ? 59 : tm.tm_sec);
    case kMinutes: return Encode(tm.tm_min);
    case kHours:
      if (cmos_[kStatusB] & kStatusB24Hour) return Encode(tm.tm_hour);
      // 12-hour mode: 1..12 with bit 7 for PM.
      return static_cast<uint8_t>(Encode(tm.tm_hour % 12 == 0 ? 12 : tm.tm_hour % 12) | (tm.tm_hour >= 12 ? 0x80 : 0));
    case kWeekday: return Encode(tm.tm_wday + 1);
    case kDay: return Encode(tm.tm_mday);
    case kMonth: return Encode(tm.tm_mon + 1);
    case kYear: return Encode(tm.tm_year % 100);
    case kCentury: return Encode((tm.tm_year + 1900) / 100);
    case kStatusC: return 0;  // no interrupt flags, ever
    default: return cmos_[index];
  }
}

void Rtc::Read(uint64_t offset, uint8_t* data, uint32_t len) {
  std::lock_guard<std::mutex> g(mu_);
  uint8_t v = offset == 0 ? index_ : ReadRegister(index_);
  for (uint32_t i = 0; i < len; i++) data[i] = i == 0 ? v : 0;
}

void Rtc::Write(uint64_t offset, const uint8_t* data, uint32_t len) {
  if (len == 0) return;
  std::lock_guard<std::mutex> g(mu_);
  if (offset == 0) {
    index_ = data[0] & 0x7f;  // bit 7 is the NMI mask, not part of the index
    return;
  }
  switch (index_) {
    // The clock follows the host: a guest setting the time (hwclock -w) is
    // ignored rather than drifting the VM away from it.
    case kSeconds: case kMinutes: case kHours: case kWeekday: case kDay: case kMonth: case kYear: case kCentury:
    case kStatusA: case kStatusC: case kStatusD:
      break;
    case kStatusB:
      // Keep the format bits (24-hour, binary) the guest chooses; no interrupts or SET.
      cmos_[kStatusB] = data[0] & (kStatusB24Hour | kStatusBBinary);
      break;
    default: cmos_[index_] = data[0]; break;
  }
}

void Rtc::SaveState(snapshot::Writer& w) {
  std::lock_guard<std::mutex> g(mu_);
  w.U8(index_);
  w.Bytes(cmos_, sizeof cmos_);
}

void Rtc::RestoreState(snapshot::Reader& r) {
  std::lock_guard<std::mutex> g(mu_);
  uint8_t index = r.U8();
  std::vector<uint8_t> cmos = r.Bytes(sizeof cmos_);
  if (cmos.size() != sizeof cmos_ || index > 0x7f) r.Fail("CMOS state of the wrong size");
  r.ExpectEnd();
  index_ = index;
  std::memcpy(cmos_, cmos.data(), sizeof cmos_);
}

}  // namespace vmlet::devices
