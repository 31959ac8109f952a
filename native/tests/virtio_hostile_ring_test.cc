// Hostile rings: what a buggy or malicious driver can put in a split
// virtqueue, fed to virtio-blk through the mmio transport. Each case checks
// the defined outcome: the chain is returned with used.len 0 (or the request
// failed with a status), or, when the ring itself is unusable, the device
// stops and sets DEVICE_NEEDS_RESET; never a crash, hang or stray access.
#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <random>
#include <thread>

#include "devices/blk.h"
#include "virtio_test_driver.h"

using namespace vmlet;
using namespace vmlet::testing;
using vmlet::virtio::kDescFlagIndirect;
using vmlet::virtio::kDescFlagNext;
using vmlet::virtio::kDescFlagWrite;

namespace {

constexpr uint64_t kRam = 32ull << 20;
constexpr uint64_t kRing = 0x1000;
constexpr uint64_t kHeader = 0x8000;
constexpr uint64_t kStatus = 0x9000;
constexpr uint64_t kTable = 0xa000;
constexpr uint64_t kData = 0x100000;

struct Rig {
  std::string path;
  GuestMemory mem{{{0, kRam}}};
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  std::unique_ptr<MmioTransport> transport;
  std::unique_ptr<MmioDriver> drv;
  RingDriver ring;

  explicit Rig(uint16_t queue_size = 16, uint64_t drop_features = 0) : ring(mem, kRing, queue_size) {
    char tmpl[] = "/tmp/vmlet-hostile-XXXXXX";
    int fd = mkstemp(tmpl);
    EXPECT(fd >= 0);
    path = tmpl;
    EXPECT(ftruncate(fd, 1 << 20) == 0);
    close(fd);
    transport = std::make_unique<MmioTransport>(MakeVirtioBlk({path, false, ""}), &mem, irq);
    drv = std::make_unique<MmioDriver>(*transport);
    EXPECT(drv->Negotiate(drv->DeviceFeatures() & ~drop_features));
    EXPECT_EQ(drv->SetupQueue(0, ring), 1u);
    drv->DriverOk();
    struct __attribute__((packed)) {
      uint32_t type, reserved;
      uint64_t sector;
    } h{blk::kTypeIn, 0, 0};
    EXPECT(mem.WriteObj(kHeader, h));
  }
  ~Rig() { unlink(path.c_str()); }
  bool NeedsReset() { return drv->Status() & virtio::kStatusDeviceNeedsReset; }
  // The queue still serves a good request after whatever happened before.
  void ExpectStillServes() {
    EXPECT(mem.WriteObj<uint8_t>(kStatus, 0xff));
    ring.Add({{kHeader, 16, false}, {kData, 512, true}, {kStatus, 1, true}});
    drv->Notify(0);
    auto u = ring.PopUsed();
    EXPECT_EQ(u.len, 513u);
    uint8_t s;
    EXPECT(mem.ReadObj(kStatus, &s));
    EXPECT_EQ(s, blk::kStatusOk);
  }
  // Publishes a chain whose descriptors the test wrote itself; expects it
  // refused (used.len 0, status byte untouched) and the queue still alive.
  void ExpectRefused(uint16_t head) {
    EXPECT(mem.WriteObj<uint8_t>(kStatus, 0x5a));
    ring.Publish(head);
    drv->Notify(0);
    auto u = ring.PopUsed();
    EXPECT_EQ(u.id, head);
    EXPECT_EQ(u.len, 0u);
    uint8_t s;
    EXPECT(mem.ReadObj(kStatus, &s));
    EXPECT_EQ(s, 0x5a);
    EXPECT(!NeedsReset());
    ExpectStillServes();
  }
};

}  // namespace

TEST_CASE("hostile ring: descriptor outside RAM") {
  Rig rig;
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, kRam - 256, 512, kDescFlagNext | kDescFlagWrite, 2);  // straddles the end of RAM
  rig.ring.SetDesc(2, kStatus, 1, kDescFlagWrite, 0);
  rig.ExpectRefused(0);
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, ~0ull - 100, 512, kDescFlagNext | kDescFlagWrite, 2);  // wraps 2^64
  rig.ExpectRefused(0);
  rig.ring.SetDesc(1, 0xC0000000, 512, kDescFlagNext | kDescFlagWrite, 2);  // the MMIO hole
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: descriptor loop") {
  Rig rig;
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, kData, 512, kDescFlagNext | kDescFlagWrite, 2);
  rig.ring.SetDesc(2, kData, 512, kDescFlagNext | kDescFlagWrite, 1);  // back to 1, forever
  rig.ExpectRefused(0);
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 0);  // a descriptor naming itself
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: next index outside the queue, and a head outside it breaks the ring") {
  Rig rig;
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 16);  // queue size is 16
  rig.ExpectRefused(0);
  // An avail entry naming descriptor 40: there is no such chain to return.
  rig.ring.Publish(40);
  rig.drv->Notify(0);
  EXPECT(!rig.ring.HasUsed());
  EXPECT(rig.NeedsReset());
  // Notifications after that are ignored until the driver resets.
  rig.ring.Add({{kHeader, 16, false}, {kData, 512, true}, {kStatus, 1, true}});
  rig.drv->Notify(0);
  EXPECT(!rig.ring.HasUsed());
}

TEST_CASE("hostile ring: chain longer than the queue") {
  Rig rig(16, virtio::kFeatureIndirectDesc);
  // 16 distinct descriptors, each pointing to the next, the last one to the
  // first: a chain that is longer than the queue without revisiting early.
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  for (uint16_t i = 1; i < 16; i++) rig.ring.SetDesc(i, kData + 512 * i, 512, kDescFlagNext | kDescFlagWrite, (i + 1) % 16);
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: chain over 8 MiB") {
  // The walker's cap, which every device gets: nine 1 MiB buffers are
  // refused before anything is copied, eight are exactly the limit.
  GuestMemory mem({{0, kRam}});
  RingDriver ring(mem, kRing, 16);
  virtio::Queue q;
  q.max_size = q.size = 16;
  q.desc_table = ring.desc();
  q.avail_ring = ring.avail();
  q.used_ring = ring.used();
  q.ready = true;
  std::vector<Buf> nine;
  for (uint64_t i = 0; i < 9; i++) nine.push_back({kData + (i << 20), 1 << 20, true});
  ring.Add(nine);
  virtio::DescriptorChain chain;
  EXPECT(q.Pop(mem, virtio::ChainLimits{}, &chain) == virtio::PopResult::kBadChain);
  EXPECT(q.last_error.find("exceeds 8388608 bytes") != std::string::npos);
  nine.pop_back();
  ring.Add(nine);
  EXPECT(q.Pop(mem, virtio::ChainLimits{}, &chain) == virtio::PopResult::kChain);
  EXPECT_EQ(chain.writable_bytes, 8ull << 20);
  // Through virtio-blk: SEG_MAX x SIZE_MAX stays under the cap, so a driver
  // that respects them never meets it; a descriptor claiming 4 GiB is refused.
  Rig rig(16);
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, kData, 0xffffffff, kDescFlagNext | kDescFlagWrite, 2);
  rig.ring.SetDesc(2, kStatus, 1, kDescFlagWrite, 0);
  rig.ExpectRefused(0);
  EXPECT(uint64_t{blk::kSegMax} * blk::kSizeMax + 16 + 1 <= virtio::kDefaultMaxChainBytes);
}

TEST_CASE("hostile ring: a descriptor above blk's SIZE_MAX is refused") {
  Rig rig(16);
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, kData, blk::kSizeMax + 512, kDescFlagNext | kDescFlagWrite, 2);
  rig.ring.SetDesc(2, kStatus, 1, kDescFlagWrite, 0);
  rig.ExpectRefused(0);
  // Exactly SIZE_MAX is fine.
  rig.ring.SetDesc(1, kData, blk::kSizeMax, kDescFlagNext | kDescFlagWrite, 2);
  EXPECT(rig.mem.WriteObj<uint8_t>(kStatus, 0xff));
  rig.ring.Publish(0);
  rig.drv->Notify(0);
  EXPECT_EQ(rig.ring.PopUsed().len, blk::kSizeMax + 1);
}

TEST_CASE("hostile ring: zero-length buffers") {
  Rig rig;
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, kData, 0, kDescFlagNext | kDescFlagWrite, 2);
  rig.ring.SetDesc(2, kStatus, 1, kDescFlagWrite, 0);
  rig.ExpectRefused(0);
  rig.ring.SetDesc(0, kHeader, 0, kDescFlagNext, 2);  // empty header
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: readable descriptor after a writable one") {
  Rig rig;
  rig.ring.SetDesc(0, kHeader, 16, kDescFlagNext, 1);
  rig.ring.SetDesc(1, kData, 512, kDescFlagNext | kDescFlagWrite, 2);
  rig.ring.SetDesc(2, kData + 512, 512, kDescFlagNext, 3);  // readable after writable
  rig.ring.SetDesc(3, kStatus, 1, kDescFlagWrite, 0);
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: avail.idx claiming more than the queue size breaks the ring") {
  Rig rig;
  rig.ring.SetAvailIdx(17);  // 17 new entries in a queue of 16
  rig.drv->Notify(0);
  EXPECT(!rig.ring.HasUsed());
  EXPECT(rig.NeedsReset());
  EXPECT(rig.irq->count > 0);  // the configuration-change interrupt
  EXPECT_EQ(rig.drv->AckInterrupts() & 2u, 2u);
}

TEST_CASE("hostile ring: driver reset after DEVICE_NEEDS_RESET brings the device back") {
  Rig rig;
  rig.ring.SetAvailIdx(1000);
  rig.drv->Notify(0);
  EXPECT(rig.NeedsReset());
  RingDriver fresh(rig.mem, 0x4000, 16);
  EXPECT(rig.drv->Negotiate(rig.drv->DeviceFeatures()));  // writes Status 0 first
  EXPECT(!rig.NeedsReset());
  EXPECT_EQ(rig.drv->SetupQueue(0, fresh), 1u);
  rig.drv->DriverOk();
  EXPECT(rig.mem.WriteObj<uint8_t>(kStatus, 0xff));
  fresh.Add({{kHeader, 16, false}, {kData, 512, true}, {kStatus, 1, true}});
  rig.drv->Notify(0);
  EXPECT_EQ(fresh.PopUsed().len, 513u);
}

TEST_CASE("hostile ring: avail index wrap-around at 65536") {
  Rig rig(16);
  // 65536 + 40 requests in batches of 8: the 16-bit indexes wrap and every
  // request still completes once, in order.
  uint32_t done = 0;
  for (uint32_t batch = 0; done < 65536 + 40; batch++) {
    for (int i = 0; i < 4; i++)
      rig.ring.Add({{kHeader, 16, false}, {kData + 512 * i, 512, true}, {kStatus + i, 1, true}});
    rig.drv->Notify(0);
    for (int i = 0; i < 4; i++) {
      auto u = rig.ring.PopUsed();
      EXPECT_EQ(u.len, 513u);
      done++;
    }
    EXPECT(!rig.ring.HasUsed());
  }
  EXPECT(!rig.NeedsReset());
  EXPECT_EQ(rig.ring.UsedIdx(), static_cast<uint16_t>(done));
}

TEST_CASE("hostile ring: indirect descriptor abuse") {
  Rig rig;
  auto indirect = [&](uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    virtio::Descriptor d{addr, len, flags, next};
    EXPECT(rig.mem.WriteObj(kTable + 16ull * i, d));
  };
  // A good indirect chain first: header, data, status in a table of 3.
  indirect(0, kHeader, 16, kDescFlagNext, 1);
  indirect(1, kData, 512, kDescFlagNext | kDescFlagWrite, 2);
  indirect(2, kStatus, 1, kDescFlagWrite, 0);
  rig.ring.SetDesc(0, kTable, 48, kDescFlagIndirect, 0);
  EXPECT(rig.mem.WriteObj<uint8_t>(kStatus, 0xff));
  rig.ring.Publish(0);
  rig.drv->Notify(0);
  EXPECT_EQ(rig.ring.PopUsed().len, 513u);

  // Table length not a multiple of 16.
  rig.ring.SetDesc(0, kTable, 40, kDescFlagIndirect, 0);
  rig.ExpectRefused(0);
  // Empty table.
  rig.ring.SetDesc(0, kTable, 0, kDescFlagIndirect, 0);
  rig.ExpectRefused(0);
  // INDIRECT together with NEXT.
  rig.ring.SetDesc(0, kTable, 48, kDescFlagIndirect | kDescFlagNext, 1);
  rig.ExpectRefused(0);
  // Table outside RAM.
  rig.ring.SetDesc(0, kRam - 16, 48, kDescFlagIndirect, 0);
  rig.ExpectRefused(0);
  // A table larger than the queue.
  rig.ring.SetDesc(0, kTable, 16 * 17, kDescFlagIndirect, 0);
  rig.ExpectRefused(0);
  // Nested indirect.
  indirect(2, kTable, 48, kDescFlagIndirect, 0);
  rig.ring.SetDesc(0, kTable, 48, kDescFlagIndirect, 0);
  rig.ExpectRefused(0);
  // A loop inside the table.
  indirect(1, kData, 512, kDescFlagNext | kDescFlagWrite, 1);
  rig.ExpectRefused(0);
  // next outside the table.
  indirect(1, kData, 512, kDescFlagNext | kDescFlagWrite, 3);
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: indirect descriptors without the feature are refused") {
  Rig rig(16, virtio::kFeatureIndirectDesc);
  virtio::Descriptor t[3] = {{kHeader, 16, kDescFlagNext, 1}, {kData, 512, kDescFlagNext | kDescFlagWrite, 2}, {kStatus, 1, kDescFlagWrite, 0}};
  EXPECT(rig.mem.Write(kTable, t, sizeof t));
  rig.ring.SetDesc(0, kTable, 48, kDescFlagIndirect, 0);
  rig.ExpectRefused(0);
}

TEST_CASE("hostile ring: random descriptor garbage never escapes") {
  // Fill the table and avail ring with random values many times; whatever
  // happens, nothing outside RAM is touched (ASan-free proof: the
  // GuestMemory checks) and every step terminates.
  std::mt19937_64 rng(42);
  for (int round = 0; round < 200; round++) {
    Rig rig(16);
    for (uint16_t i = 0; i < 16; i++) {
      uint64_t addr = rng() % 3 == 0 ? rng() : rng() % kRam;
      uint32_t len = rng() % 4 == 0 ? static_cast<uint32_t>(rng()) : static_cast<uint32_t>(rng() % 8192);
      rig.ring.SetDesc(i, addr, len, static_cast<uint16_t>(rng() & 7), static_cast<uint16_t>(rng() % 20));
    }
    for (int i = 0; i < 8; i++) rig.ring.Publish(static_cast<uint16_t>(rng() % 18));
    rig.drv->Notify(0);
    // Either every published chain came back or the ring was declared broken.
    int used = 0;
    while (rig.ring.HasUsed()) {
      rig.ring.PopUsed();
      used++;
    }
    EXPECT(used == 8 || rig.NeedsReset());
  }
}

TEST_CASE("hostile ring: a guest rewriting the ring while the device walks it") {
  // One thread plays a second vCPU scribbling over the descriptor table and
  // avail ring; the device must neither crash nor hang nor step outside RAM.
  // (ThreadSanitizer reports these races, and only these: they are the point.)
  Rig rig(16);
  std::atomic<bool> stop{false};
  std::thread scribbler([&] {
    std::mt19937_64 rng(5);
    while (!stop) {
      uint64_t off = rng() % (16 * 16 + 6 + 2 * 16);
      uint8_t v = static_cast<uint8_t>(rng());
      // Byte writes through the accessor (the test's own racing "vCPU").
      (void)rig.mem.WriteObj(kRing + off, v);
    }
  });
  int notified = 0;
  for (; notified < 20000 && !rig.NeedsReset(); notified++) {
    rig.ring.Add({{kHeader, 16, false}, {kData, 512, true}, {kStatus, 1, true}});
    rig.drv->Notify(0);
  }
  stop = true;
  scribbler.join();
  std::fprintf(stderr, "scribbled ring: %d notifications before %s\n", notified,
               rig.NeedsReset() ? "DEVICE_NEEDS_RESET" : "the end");
  // Whatever state the scribbling left, a driver reset brings the device back.
  RingDriver fresh(rig.mem, 0x4000, 16);
  EXPECT(rig.drv->Negotiate(rig.drv->DeviceFeatures()));
  EXPECT_EQ(rig.drv->SetupQueue(0, fresh), 1u);
  rig.drv->DriverOk();
  EXPECT(rig.mem.WriteObj(kHeader, std::array<uint32_t, 4>{blk::kTypeIn, 0, 0, 0}));
  EXPECT(rig.mem.WriteObj<uint8_t>(kStatus, 0xff));
  fresh.Add({{kHeader, 16, false}, {kData, 512, true}, {kStatus, 1, true}});
  rig.drv->Notify(0);
  EXPECT_EQ(fresh.PopUsed().len, 513u);
  uint8_t s;
  EXPECT(rig.mem.ReadObj(kStatus, &s));
  EXPECT_EQ(s, blk::kStatusOk);
}
