// The CMOS clock as Linux's mc146818 code reads it: BCD 24-hour by default,
// the update-in-progress bit never set, binary/12-hour when the guest asks,
// CMOS RAM kept, the NMI-mask bit ignored in the index.
#include "devices/rtc.h"
#include "testing.h"

using vmlet::devices::Rtc;

namespace {
// 2026-11-27 14:05:09 UTC, a Friday.
constexpr time_t kFixed = 1795788309;

uint8_t ReadReg(Rtc& rtc, uint8_t index) {
  rtc.Write(0, &index, 1);
  uint8_t v = 0;
  rtc.Read(1, &v, 1);
  return v;
}
void WriteReg(Rtc& rtc, uint8_t index, uint8_t value) {
  rtc.Write(0, &index, 1);
  rtc.Write(1, &value, 1);
}
}  // namespace

TEST_CASE("rtc: the host's UTC time in BCD, 24-hour, with UIP clear and a valid battery") {
  Rtc rtc([] { return kFixed; });
  EXPECT_EQ(ReadReg(rtc, Rtc::kStatusA) & 0x80, 0);  // no update in progress: Linux reads at once
  EXPECT_EQ(ReadReg(rtc, Rtc::kStatusD), 0x80);
  EXPECT_EQ(ReadReg(rtc, Rtc::kSeconds), 0x09);
  EXPECT_EQ(ReadReg(rtc, Rtc::kMinutes), 0x05);
  EXPECT_EQ(ReadReg(rtc, Rtc::kHours), 0x14);
  EXPECT_EQ(ReadReg(rtc, Rtc::kDay), 0x27);
  EXPECT_EQ(ReadReg(rtc, Rtc::kMonth), 0x11);
  EXPECT_EQ(ReadReg(rtc, Rtc::kYear), 0x26);
  EXPECT_EQ(ReadReg(rtc, Rtc::kCentury), 0x20);
  EXPECT_EQ(ReadReg(rtc, Rtc::kWeekday), 0x06);  // Sunday = 1
  EXPECT_EQ(ReadReg(rtc, 0x80 | Rtc::kHours), 0x14);  // NMI-mask bit set in the index
}

TEST_CASE("rtc: binary and 12-hour formats when the guest selects them; time writes are ignored") {
  Rtc rtc([] { return kFixed; });
  WriteReg(rtc, Rtc::kStatusB, 0x04 | 0x02);  // binary, 24-hour
  EXPECT_EQ(ReadReg(rtc, Rtc::kDay), 27);
  EXPECT_EQ(ReadReg(rtc, Rtc::kHours), 14);
  WriteReg(rtc, Rtc::kStatusB, 0x04);  // binary, 12-hour
  EXPECT_EQ(ReadReg(rtc, Rtc::kHours), 0x80 | 2);  // 2 PM
  WriteReg(rtc, Rtc::kStatusB, 0x02);
  WriteReg(rtc, Rtc::kMinutes, 0x59);
  EXPECT_EQ(ReadReg(rtc, Rtc::kMinutes), 0x05);
}

TEST_CASE("rtc: CMOS RAM bytes keep what the guest wrote") {
  Rtc rtc([] { return kFixed; });
  WriteReg(rtc, 0x0f, 0xab);
  WriteReg(rtc, 0x7f, 0x12);
  EXPECT_EQ(ReadReg(rtc, 0x0f), 0xab);
  EXPECT_EQ(ReadReg(rtc, 0x7f), 0x12);
  EXPECT_EQ(ReadReg(rtc, Rtc::kStatusC), 0);
}
