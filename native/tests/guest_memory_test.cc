#include "core/guest_memory.h"

#include "testing.h"

using vmlet::GuestMemory;

TEST_CASE("guest_memory: ranges inside one region are granted") {
  GuestMemory mem({{0, 1 << 20}, {4ull << 30, 1 << 20}});
  EXPECT(mem.Slice(0, 1 << 20).has_value());
  EXPECT(mem.Slice((4ull << 30) + 100, 200).has_value());
  uint32_t v = 0xdeadbeef, back = 0;
  EXPECT(mem.WriteObj(4096, v));
  EXPECT(mem.ReadObj(4096, &back));
  EXPECT_EQ(back, v);
}

TEST_CASE("guest_memory: hostile ranges are refused") {
  GuestMemory mem({{0, 1 << 20}, {1 << 20, 1 << 20}});
  EXPECT(!mem.Slice((1 << 20) - 8, 16).has_value());  // straddles two regions
  EXPECT(!mem.Slice(2 << 20, 1).has_value());         // past the end of RAM
  EXPECT(!mem.Slice(~0ull - 4, 16).has_value());      // wraps around 2^64
  EXPECT(!mem.Slice(16, ~0ull).has_value());          // absurd length
  uint16_t x;
  EXPECT(!mem.LoadU16Acquire(3, &x));                 // misaligned ring index
}

TEST_CASE("guest_memory: unaligned layout is an error") {
  EXPECT_THROWS(GuestMemory({{0, 1000}}));
  EXPECT_THROWS(GuestMemory(std::vector<std::pair<uint64_t, uint64_t>>{}));
}
