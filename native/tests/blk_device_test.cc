// virtio-blk through the virtio-mmio transport, on hand-built rings: the
// bytes, used lengths and status codes virtio 1.x 5.2.6 requires.
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <random>

#include "core/error.h"
#include "devices/blk.h"
#include "snapshot/stream.h"
#include "virtio_test_driver.h"

using namespace vmlet;
using namespace vmlet::testing;
using vmlet::virtio::UsedElem;

namespace {

constexpr uint64_t kRing = 0x1000;
constexpr uint64_t kHeader = 0x8000;
constexpr uint64_t kStatus = 0x9000;
constexpr uint64_t kData = 0x100000;

struct TempDisk {
  std::string path;
  std::vector<uint8_t> bytes;
  explicit TempDisk(size_t size, uint32_t seed = 1) {
    char tmpl[] = "/tmp/vmlet-blk-XXXXXX";
    int fd = mkstemp(tmpl);
    EXPECT(fd >= 0);
    path = tmpl;
    bytes.resize(size);
    std::mt19937 rng(seed);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    EXPECT(write(fd, bytes.data(), size) == static_cast<ssize_t>(size));
    close(fd);
  }
  ~TempDisk() { unlink(path.c_str()); }
  std::vector<uint8_t> Contents() const {
    std::vector<uint8_t> out(bytes.size());
    int fd = open(path.c_str(), O_RDONLY);
    EXPECT(pread(fd, out.data(), out.size(), 0) == static_cast<ssize_t>(out.size()));
    close(fd);
    return out;
  }
};

struct BlkRig {
  TempDisk disk;
  GuestMemory mem{{{0, 32ull << 20}}};
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  MmioTransport transport;
  MmioDriver drv{transport};
  RingDriver ring;

  explicit BlkRig(size_t disk_bytes = 64 * 1024, bool read_only = false, uint64_t features = ~0ull,
                  uint16_t queue_size = 128)
      : disk(disk_bytes),
        transport(MakeVirtioBlk({disk.path, read_only, "vmlet-disk-0"}), &mem, irq),
        ring(mem, kRing, queue_size) {
    EXPECT(drv.Negotiate(drv.DeviceFeatures() & features));
    EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
    drv.DriverOk();
    EXPECT(drv.Status() & virtio::kStatusDriverOk);
  }

  void PutHeader(uint64_t at, uint32_t type, uint64_t sector) {
    struct __attribute__((packed)) {
      uint32_t type, reserved;
      uint64_t sector;
    } h{type, 0, sector};
    EXPECT(mem.WriteObj(at, h));
  }
  // header | data... | status, the layout Linux's virtblk uses.
  uint16_t Submit(uint32_t type, uint64_t sector, std::vector<Buf> data, uint64_t header_at = kHeader,
                  uint64_t status_at = kStatus) {
    PutHeader(header_at, type, sector);
    EXPECT(mem.WriteObj<uint8_t>(status_at, 0xff));
    std::vector<Buf> chain{{header_at, 16, false}};
    chain.insert(chain.end(), data.begin(), data.end());
    chain.push_back({status_at, 1, true});
    return ring.Add(chain);
  }
  UsedElem Complete() {
    drv.Notify(0);
    return ring.PopUsed();
  }
  uint8_t StatusByte(uint64_t at = kStatus) {
    uint8_t s = 0;
    EXPECT(mem.ReadObj(at, &s));
    return s;
  }
};

}  // namespace

TEST_CASE("blk: config space advertises capacity, SIZE_MAX, SEG_MAX, BLK_SIZE") {
  BlkRig rig(1 << 20);
  uint64_t features = rig.drv.DeviceFeatures();
  EXPECT(features & virtio::kFeatureVersion1);
  EXPECT(features & blk::kFeatureFlush);
  EXPECT(features & blk::kFeatureSegMax);
  EXPECT(features & blk::kFeatureSizeMax);
  EXPECT(features & blk::kFeatureBlkSize);
  EXPECT(!(features & blk::kFeatureRo));
  EXPECT_EQ(rig.drv.Read32(MmioTransport::kDeviceId), 2u);
  uint64_t capacity = rig.drv.Read32(0x100) | (static_cast<uint64_t>(rig.drv.Read32(0x104)) << 32);
  EXPECT_EQ(capacity, (1u << 20) / 512u);
  EXPECT_EQ(rig.drv.Read32(0x108), blk::kSizeMax);
  EXPECT_EQ(rig.drv.Read32(0x10c), blk::kSegMax);
  EXPECT_EQ(rig.drv.Read32(0x114), 512u);
}

TEST_CASE("blk: T_IN reads the file's bytes, used.len counts data and status") {
  BlkRig rig(1 << 20);
  // Two data buffers to check the scatter: 3 sectors + 5 sectors from sector 7.
  uint16_t head = rig.Submit(blk::kTypeIn, 7, {{kData, 3 * 512, true}, {kData + 0x10000, 5 * 512, true}});
  int irqs = rig.irq->count;
  UsedElem u = rig.Complete();
  EXPECT_EQ(u.id, head);
  EXPECT_EQ(u.len, 8u * 512 + 1);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusOk);
  std::vector<uint8_t> got(8 * 512);
  EXPECT(rig.mem.Read(kData, got.data(), 3 * 512));
  EXPECT(rig.mem.Read(kData + 0x10000, got.data() + 3 * 512, 5 * 512));
  EXPECT(std::memcmp(got.data(), rig.disk.bytes.data() + 7 * 512, got.size()) == 0);
  EXPECT(rig.irq->count > irqs);
  EXPECT_EQ(rig.drv.AckInterrupts() & 1u, 1u);
}

TEST_CASE("blk: T_OUT writes the guest's bytes to the file, FLUSH succeeds") {
  BlkRig rig(1 << 20);
  std::vector<uint8_t> pattern(4096);
  for (size_t i = 0; i < pattern.size(); i++) pattern[i] = static_cast<uint8_t>(i * 7 + 3);
  EXPECT(rig.mem.Write(kData, pattern.data(), pattern.size()));
  rig.Submit(blk::kTypeOut, 100, {{kData, 4096, false}});
  UsedElem u = rig.Complete();
  EXPECT_EQ(u.len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusOk);
  rig.Submit(blk::kTypeFlush, 0, {});
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusOk);
  auto file = rig.disk.Contents();
  EXPECT(std::memcmp(file.data() + 100 * 512, pattern.data(), pattern.size()) == 0);
  // Nothing else changed.
  EXPECT(std::memcmp(file.data(), rig.disk.bytes.data(), 100 * 512) == 0);
}

TEST_CASE("blk: T_GET_ID answers the configured id, unknown types are UNSUPP") {
  BlkRig rig;
  rig.Submit(blk::kTypeGetId, 0, {{kData, 20, true}});
  UsedElem u = rig.Complete();
  EXPECT_EQ(u.len, 21u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusOk);
  char id[21] = {};
  EXPECT(rig.mem.Read(kData, id, 20));
  EXPECT(std::string(id) == "vmlet-disk-0");
  rig.Submit(11 /* DISCARD: not offered */, 0, {{kData, 16, false}});
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusUnsupported);
}

TEST_CASE("blk: out-of-range sector is IOERR and touches nothing") {
  BlkRig rig(64 * 1024);  // 128 sectors
  EXPECT(rig.mem.Write(kData, std::vector<uint8_t>(1024, 0xab).data(), 1024));
  rig.Submit(blk::kTypeIn, 127, {{kData, 1024, true}});  // last sector + one past the end
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusIoErr);
  uint8_t b;
  EXPECT(rig.mem.ReadObj(kData, &b));
  EXPECT_EQ(b, 0xab);
  rig.Submit(blk::kTypeOut, ~0ull / 512, {{kData, 512, false}});  // sector*512 overflows
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusIoErr);
  rig.Submit(blk::kTypeIn, 0, {{kData, 100, true}});  // not whole sectors
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusIoErr);
  EXPECT(rig.disk.Contents() == rig.disk.bytes);
}

TEST_CASE("blk: read-only disk offers RO and answers writes with IOERR") {
  BlkRig rig(64 * 1024, true);
  EXPECT(rig.drv.DeviceFeatures() & blk::kFeatureRo);
  EXPECT(rig.mem.Write(kData, std::vector<uint8_t>(512, 0x55).data(), 512));
  rig.Submit(blk::kTypeOut, 0, {{kData, 512, false}});
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusIoErr);
  EXPECT(rig.disk.Contents() == rig.disk.bytes);
  rig.Submit(blk::kTypeIn, 0, {{kData, 512, true}});
  rig.Complete();
  EXPECT_EQ(rig.StatusByte(), blk::kStatusOk);
}

TEST_CASE("blk: data buffers pointing the wrong way are IOERR") {
  BlkRig rig;
  // A read whose data buffer is device-readable: nothing may be written there.
  EXPECT(rig.mem.Write(kData, std::vector<uint8_t>(512, 0x11).data(), 512));
  rig.Submit(blk::kTypeIn, 0, {{kData, 512, false}});
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusIoErr);
  uint8_t b;
  EXPECT(rig.mem.ReadObj(kData + 100, &b));
  EXPECT_EQ(b, 0x11);
  // A write whose data buffer is device-writable: the file is not written.
  rig.Submit(blk::kTypeOut, 0, {{kData, 512, true}});
  EXPECT_EQ(rig.Complete().len, 1u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusIoErr);
  EXPECT(rig.disk.Contents() == rig.disk.bytes);
}

TEST_CASE("blk: a device-readable status byte gets the chain refused, nothing written") {
  BlkRig rig;
  rig.PutHeader(kHeader, blk::kTypeIn, 0);
  EXPECT(rig.mem.WriteObj<uint8_t>(kStatus, 0x77));
  // Readable header, writable data, then a readable status: wrong order and direction.
  uint16_t head = rig.ring.Add({{kHeader, 16, false}, {kData, 512, true}, {kStatus, 1, false}});
  UsedElem u = rig.Complete();
  EXPECT_EQ(u.id, head);
  EXPECT_EQ(u.len, 0u);
  EXPECT_EQ(rig.StatusByte(), 0x77);
  // Without any writable byte there is no status to write: refused the same way.
  rig.ring.Add({{kHeader, 16, false}, {kStatus, 1, false}});
  EXPECT_EQ(rig.Complete().len, 0u);
  EXPECT_EQ(rig.StatusByte(), 0x77);
  // The queue keeps working.
  rig.Submit(blk::kTypeIn, 0, {{kData, 512, true}});
  EXPECT_EQ(rig.Complete().len, 513u);
  EXPECT_EQ(rig.StatusByte(), blk::kStatusOk);
}

TEST_CASE("blk: header and data may share descriptors in any split") {
  BlkRig rig(1 << 20);
  // One writable descriptor holding data and the status byte together.
  rig.PutHeader(kHeader, blk::kTypeIn, 2);
  rig.ring.Add({{kHeader, 8, false}, {kHeader + 8, 8, false}, {kData, 1025, true}});
  UsedElem u = rig.Complete();
  EXPECT_EQ(u.len, 1025u);
  uint8_t status;
  EXPECT(rig.mem.ReadObj(kData + 1024, &status));
  EXPECT_EQ(status, blk::kStatusOk);
  std::vector<uint8_t> got(1024);
  EXPECT(rig.mem.Read(kData, got.data(), got.size()));
  EXPECT(std::memcmp(got.data(), rig.disk.bytes.data() + 1024, 1024) == 0);
}

TEST_CASE("blk: a missing or unusable backing file is a DeviceError that names it") {
  try {
    MakeVirtioBlk({"/nonexistent/disk.img", false, ""});
    EXPECT(false);
  } catch (const VmmError& e) {
    EXPECT(e.kind() == ErrorKind::Device);
    EXPECT(std::string(e.what()).find("/nonexistent/disk.img") != std::string::npos);
    EXPECT(std::string(e.what()).find("does not exist") != std::string::npos);
    EXPECT_EQ(e.error_number(), ENOENT);
  }
  EXPECT_THROWS(MakeVirtioBlk({"", false, ""}));
  EXPECT_THROWS(MakeVirtioBlk({"/tmp", false, ""}));  // a directory
  TempDisk d(4096);
  EXPECT_THROWS(MakeVirtioBlk({d.path, false, "an-id-that-is-much-too-long"}));
}

namespace {

// One T_IN of `bytes` from `sector`: header at kHeader, data to kData,
// status byte (0xff until the device writes it) at kStatus.
void QueueRead(GuestMemory& mem, RingDriver& ring, uint64_t sector, uint32_t bytes) {
  struct __attribute__((packed)) {
    uint32_t type, reserved;
    uint64_t sector;
  } h{blk::kTypeIn, 0, sector};
  EXPECT(mem.WriteObj(kHeader, h));
  EXPECT(mem.WriteObj<uint8_t>(kStatus, 0xff));
  ring.Add({{kHeader, 16, false}, {kData, bytes, true}, {kStatus, 1, true}});
}

// Any blk device behind a transport whose driver is set up (DRIVER_OK, one
// queue), for the disk-slot tests: they move devices between transports.
struct Driven {
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  MmioTransport transport;
  MmioDriver drv{transport};
  RingDriver ring;

  // activate = false: a transport about to be restored (RestoreState re-activates it).
  Driven(GuestMemory& mem, std::shared_ptr<virtio::VirtioDevice> dev, bool activate = true)
      : transport(std::move(dev), &mem, irq), ring(mem, kRing, 128) {
    if (!activate) return;
    EXPECT(drv.Negotiate(drv.DeviceFeatures()));
    EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
    drv.DriverOk();
  }
  uint64_t Capacity() { return drv.Read32(0x100) | (static_cast<uint64_t>(drv.Read32(0x104)) << 32); }
  // One T_IN of `bytes` from `sector` into kData; the status byte.
  uint8_t Read(GuestMemory& mem, uint64_t sector, uint32_t bytes) {
    QueueRead(mem, ring, sector, bytes);
    drv.Notify(0);
    ring.PopUsed();
    uint8_t status = 0xff;
    EXPECT(mem.ReadObj(kStatus, &status));
    return status;
  }
  std::vector<uint8_t> Save() {
    snapshot::Writer w;
    transport.SaveState(w);
    return w.data();
  }
  void Restore(const std::vector<uint8_t>& state) {
    snapshot::Reader r(state.data(), state.size(), "virtio device 0");
    transport.RestoreState(r);
  }
};

bool SameBytes(GuestMemory& mem, const std::vector<uint8_t>& disk, uint64_t sector, size_t bytes) {
  std::vector<uint8_t> got(bytes);
  EXPECT(mem.Read(kData, got.data(), got.size()));
  return std::memcmp(got.data(), disk.data() + sector * 512, bytes) == 0;
}

// What a driver sees when a slot gets its medium: a configuration-change
// interrupt, a new config generation, the file's capacity, and its bytes.
void ExpectMediumAnnounced(GuestMemory& mem, Driven& d, uint32_t generation_before, const TempDisk& medium, uint64_t sector,
                           uint32_t len) {
  EXPECT(d.irq->count >= 1);
  EXPECT_EQ(d.drv.AckInterrupts() & 2u, 2u);
  EXPECT(d.drv.Read32(MmioTransport::kConfigGeneration) != generation_before);
  EXPECT_EQ(d.Capacity(), medium.bytes.size() / 512);
  EXPECT_EQ(d.Read(mem, sector, len), blk::kStatusOk);
  EXPECT(SameBytes(mem, medium.bytes, sector, len));
}

std::shared_ptr<virtio::VirtioDevice> EmptySlot() {
  BlkConfig slot;
  slot.read_only = true;
  slot.empty = true;
  return MakeVirtioBlk(slot);
}

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const VmmError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("blk: an empty slot is read-only with 0 sectors, answers reads with IOERR, and takes no path") {
  GuestMemory mem{{{0, 32ull << 20}}};
  Driven d(mem, EmptySlot());
  EXPECT(d.drv.DeviceFeatures() & blk::kFeatureRo);
  EXPECT_EQ(d.Capacity(), 0u);
  EXPECT_EQ(d.Read(mem, 0, 512), blk::kStatusIoErr);

  BlkConfig writable;
  writable.empty = true;
  EXPECT(ErrorOf([&] { MakeVirtioBlk(writable); }).find("set readOnly") != std::string::npos);
  TempDisk disk(4096);
  BlkConfig both;
  both.empty = true;
  both.read_only = true;
  both.path = disk.path;
  EXPECT(ErrorOf([&] { MakeVirtioBlk(both); }).find("leave out either") != std::string::npos);
}

TEST_CASE("blk: an empty slot restored onto a file tells the driver its capacity by a configuration change") {
  GuestMemory mem{{{0, 32ull << 20}}};
  std::vector<uint8_t> saved = Driven(mem, EmptySlot()).Save();
  TempDisk layer(64 * 1024, 7);
  Driven d(mem, MakeVirtioBlk({layer.path, true, ""}), /*activate=*/false);
  uint32_t generation = d.drv.Read32(MmioTransport::kConfigGeneration);
  d.Restore(saved);
  // The interrupt is raised as the transport re-activates the device. Nothing
  // was queued before the snapshot: the rig's fresh (zeroed) ring matches the
  // restored indexes, so the read goes through.
  ExpectMediumAnnounced(mem, d, generation, layer, 3, 1024);
}

TEST_CASE("blk: a disk with sectors restores only onto one of the same size, and an empty slot stays quiet when left empty") {
  GuestMemory mem{{{0, 32ull << 20}}};
  TempDisk small(8192), large(16384);
  std::vector<uint8_t> saved_disk = Driven(mem, MakeVirtioBlk({small.path, true, ""})).Save();
  std::vector<uint8_t> saved_slot = Driven(mem, EmptySlot()).Save();
  Driven onto_large(mem, MakeVirtioBlk({large.path, true, ""}), false);
  EXPECT(ErrorOf([&] { onto_large.Restore(saved_disk); }).find("pass a disk of the same size") != std::string::npos);
  Driven still_empty(mem, EmptySlot(), false);
  still_empty.Restore(saved_slot);
  EXPECT_EQ(still_empty.drv.Read32(MmioTransport::kInterruptStatus) & 2u, 0u);
}

TEST_CASE("blk: a medium attached to an empty slot in use: configuration change, new capacity, reads; never a second one") {
  GuestMemory mem{{{0, 32ull << 20}}};
  auto slot = EmptySlot();
  Driven d(mem, slot);
  uint32_t generation = d.drv.Read32(MmioTransport::kConfigGeneration);

  TempDisk tiny(100);
  EXPECT(ErrorOf([&] { BlkAttachMedium(*slot, tiny.path); }).find("less than one sector") != std::string::npos);
  EXPECT(ErrorOf([&] { BlkAttachMedium(*slot, "/nonexistent/layer.sqfs"); }).find("does not exist") != std::string::npos);
  EXPECT_EQ(d.irq->count.load(), 0);

  TempDisk layer(32 * 1024, 9);
  BlkAttachMedium(*slot, layer.path);
  ExpectMediumAnnounced(mem, d, generation, layer, 60, 2048);

  TempDisk other(8192);
  EXPECT(ErrorOf([&] { BlkAttachMedium(*slot, other.path); }).find("already holds a medium") != std::string::npos);
  auto disk = MakeVirtioBlk({other.path, true, ""});
  EXPECT(ErrorOf([&] { BlkAttachMedium(*disk, layer.path); }).find("already holds a medium") != std::string::npos);
}

namespace {

// A blk device whose transport binds its notify to an eventfd, as KVM_IOEVENTFD does in a VM.
struct ThreadedRig {
  TempDisk disk;
  GuestMemory mem{{{0, 32ull << 20}}};
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  std::shared_ptr<EventFdBinder> binder = std::make_shared<EventFdBinder>();
  std::shared_ptr<virtio::VirtioDevice> dev;
  MmioTransport transport;
  MmioDriver drv{transport};
  RingDriver ring;

  explicit ThreadedRig(size_t disk_bytes = 1 << 20)
      : disk(disk_bytes, 3), dev(MakeVirtioBlk({disk.path, false, ""})), transport(dev, &mem, irq, binder), ring(mem, kRing, 128) {
    // Without EVENT_IDX every completion interrupts (this driver never moves used_event).
    EXPECT(drv.Negotiate(drv.DeviceFeatures() & ~virtio::kFeatureEventIdx));
    EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
    drv.DriverOk();
  }
  void Queue(uint64_t sector, uint32_t bytes) { QueueRead(mem, ring, sector, bytes); }
  // Waits (bounded) for `n` used entries: the I/O thread serves them.
  bool WaitUsed(int n) {
    for (int i = 0; i < 5000; i++) {
      int have = 0;
      while (have < n && ring.HasUsed()) {
        ring.PopUsed();
        have++;
      }
      n -= have;
      if (n == 0) return true;
      usleep(1000);
    }
    return false;
  }
};

}  // namespace

TEST_CASE("blk: a notify through its eventfd (KVM_IOEVENTFD) is served by the I/O thread: bytes, status, interrupt") {
  ThreadedRig rig;
  EXPECT_EQ(rig.transport.bound_notifiers(), 1u);
  for (int i = 0; i < 20; i++) {
    uint64_t sector = static_cast<uint64_t>(i) * 13;
    rig.Queue(sector, 4096);
    int irqs = rig.irq->count;
    EXPECT(rig.binder->Notify(rig.drv, 0));  // into the eventfd, not an exit
    EXPECT(rig.WaitUsed(1));
    uint8_t status = 0xff;
    EXPECT(rig.mem.ReadObj(kStatus, &status));
    EXPECT_EQ(status, blk::kStatusOk);
    EXPECT(SameBytes(rig.mem, rig.disk.bytes, sector, 4096));
    for (int w = 0; w < 1000 && rig.irq->count == irqs; w++) usleep(1000);
    EXPECT(rig.irq->count > irqs);
  }
  // A driver reset unbinds the notify; the device shuts its thread down with the transport.
  rig.drv.Write32(MmioTransport::kStatus, 0);
  EXPECT_EQ(rig.transport.bound_notifiers(), 0u);
}

// An empty slot gets no I/O thread and no eventfd (its requests all fail on
// the exit path); once it holds a medium, the transport binds its notify and
// the thread serves it, as on a disk that had a medium from the start.
TEST_CASE("blk: an empty slot starts its I/O thread only when it gets a medium") {
  GuestMemory mem{{{0, 32ull << 20}}};
  auto irq = std::make_shared<CountingIrq>();
  auto binder = std::make_shared<EventFdBinder>();
  auto slot = EmptySlot();
  int threads = CountEntries("/proc/self/task");
  MmioTransport transport(slot, &mem, irq, binder);
  MmioDriver drv{transport};
  RingDriver ring(mem, kRing, 128);
  EXPECT(drv.Negotiate(drv.DeviceFeatures() & ~virtio::kFeatureEventIdx));
  EXPECT_EQ(drv.SetupQueue(0, ring), 1u);
  drv.DriverOk();
  EXPECT_EQ(transport.bound_notifiers(), 0u);
  EXPECT_EQ(CountEntries("/proc/self/task"), threads);

  TempDisk layer(64 * 1024, 5);
  BlkAttachMedium(*slot, layer.path);
  transport.BindNewNotifiers();
  EXPECT_EQ(transport.bound_notifiers(), 1u);
  EXPECT_EQ(CountEntries("/proc/self/task"), threads + 1);
  transport.BindNewNotifiers();  // binds nothing twice
  EXPECT_EQ(transport.bound_notifiers(), 1u);

  QueueRead(mem, ring, 8, 4096);
  EXPECT(binder->Notify(drv, 0));  // into the eventfd: only the thread can serve it
  bool served = false;
  for (int i = 0; i < 5000 && !(served = ring.HasUsed()); i++) usleep(1000);
  EXPECT(served);
  uint8_t status = 0xff;
  EXPECT(mem.ReadObj(kStatus, &status));
  EXPECT_EQ(status, blk::kStatusOk);
  EXPECT(SameBytes(mem, layer.bytes, 8, 4096));
}

TEST_CASE("blk: a request kicked into the eventfd but not yet served is served by QuiesceForSnapshot, before the rings are saved") {
  ThreadedRig rig;
  uint64_t one = 1;
  {
    // The kick comes while quiesced: the I/O thread waits for the device
    // lock, and serves it once the quiesce ends.
    Quiesced q(*rig.dev);
    rig.Queue(5, 2048);
    EXPECT(write(rig.binder->bound.at(0), &one, sizeof one) == sizeof one);
  }
  EXPECT(rig.WaitUsed(1));
  // The kick comes before the quiesce (the thread may have consumed its
  // count and be waiting for the lock): the quiesce itself serves it, so the
  // saved rings never hold a request a restored guest will not kick again.
  rig.Queue(9, 1024);
  EXPECT(write(rig.binder->bound.at(0), &one, sizeof one) == sizeof one);
  {
    Quiesced q(*rig.dev);
    EXPECT(rig.ring.HasUsed());  // under the quiesce nothing else can serve
    if (rig.ring.HasUsed()) rig.ring.PopUsed();
    uint8_t status = 0xff;
    EXPECT(rig.mem.ReadObj(kStatus, &status));
    EXPECT_EQ(status, blk::kStatusOk);
    EXPECT(SameBytes(rig.mem, rig.disk.bytes, 9, 1024));
  }
}

TEST_CASE("blk: devices with I/O threads made and destroyed leave no thread or fd behind") {
  int fds = CountEntries("/proc/self/fd"), threads = CountEntries("/proc/self/task");
  for (int i = 0; i < 10; i++) {
    ThreadedRig rig(64 * 1024);
    rig.Queue(1, 512);
    EXPECT(rig.binder->Notify(rig.drv, 0));
    EXPECT(rig.WaitUsed(1));
  }
  EXPECT_EQ(CountEntries("/proc/self/fd"), fds);
  EXPECT_EQ(CountEntries("/proc/self/task"), threads);
}
