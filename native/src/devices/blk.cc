// virtio-blk: one request queue, served by the device's I/O thread.
//
// Threads: once the transport binds the queue's notify to our eventfd
// (KVM_IOEVENTFD), a guest notify wakes the I/O thread without a userspace
// exit and the vCPU goes straight back to the guest; requests (FLUSH's
// fdatasync included) never block a vCPU. Without a binding (a host without
// ioeventfd, the device tests' plain transport) the notify exits and the
// vCPU serves the queue itself. Either way the queue is served under `mu_`,
// which also orders serving against Activate, Reset, AttachMedium and a
// snapshot's quiesce. Measured on the dev hosts' PVM /dev/kvm (bench vmm,
// 10 runs each, same hour): idle, QD1 59-65k IOPS on the thread against
// 33-35k on the exit path (QEMU 49-51k), because a userspace exit costs
// ~27 us there; with both cores busy the exit path is ahead (QD1 23k vs
// 20k, QEMU 10k), the hand-off to a second runnable thread costing more
// than the exit. Ahead of QEMU either way, so the thread is the default.
//
// Data moves between the file and guest RAM with preadv/pwritev straight
// into the chain's buffers: no bounce copy. Hazards: the request header is
// copied out once before it is checked (the guest may rewrite it under us);
// the status byte is written last, after the data, so a driver that sees
// the status also sees the data; sector arithmetic is overflow-checked.
#include "devices/blk.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

#include "core/error.h"

namespace vmlet {

using namespace virtio;

namespace {

struct __attribute__((packed)) RequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
static_assert(sizeof(RequestHeader) == 16);

// The guest-visible config prefix we fill (5.2.4); later fields read as 0.
struct __attribute__((packed)) BlkConfigSpace {
  uint64_t capacity;
  uint32_t size_max;
  uint32_t seg_max;
  uint16_t cylinders;
  uint8_t heads;
  uint8_t sectors;
  uint32_t blk_size;
};

// preadv/pwritev take at most IOV_MAX iovecs and may transfer short; loop.
bool TransferAll(int fd, std::vector<iovec> iov, uint64_t offset, bool write) {
  size_t first = 0;
  while (first < iov.size()) {
    int cnt = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = write ? pwritev(fd, &iov[first], cnt, static_cast<off_t>(offset))
                      : preadv(fd, &iov[first], cnt, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // error, or end of file inside capacity (file shrank)
    offset += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (left) {
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return true;
}

class VirtioBlk : public VirtioDevice {
 public:
  VirtioBlk(int fd, uint64_t capacity_sectors, const BlkConfig& cfg)
      : fd_(fd), capacity_(capacity_sectors), read_only_(cfg.read_only), id_(cfg.id) {
    limits_.max_segment_bytes = blk::kSizeMax;
    limits_.max_segments = blk::kSegMax + 2;
  }
  // The notify eventfd outlives Shutdown: the transport unbinds it later.
  ~VirtioBlk() override {
    Shutdown();
    if (notify_fd_ >= 0) close(notify_fd_);
    if (fd_ >= 0) close(fd_);
  }

  uint32_t device_id() const override { return blk::kDeviceId; }
  uint64_t device_features() const override {
    uint64_t f = kFeatureVersion1 | kFeatureIndirectDesc | kFeatureEventIdx | blk::kFeatureSizeMax |
                 blk::kFeatureSegMax | blk::kFeatureBlkSize | blk::kFeatureFlush;
    return read_only_ ? f | blk::kFeatureRo : f;
  }
  std::vector<uint16_t> queue_max_sizes() const override { return {blk::kQueueSize}; }

  void ReadConfig(uint64_t offset, uint8_t* data, uint32_t len) override {
    BlkConfigSpace c{};
    c.capacity = capacity_.load();
    c.size_max = blk::kSizeMax;
    c.seg_max = blk::kSegMax;
    c.blk_size = blk::kSectorSize;
    std::memset(data, 0, len);
    if (offset >= sizeof c) return;
    std::memcpy(data, reinterpret_cast<const uint8_t*>(&c) + offset, std::min<uint64_t>(len, sizeof c - offset));
  }
  // Only `writeback` (with CONFIG_WCE) is writable in the spec; we offer neither.
  void WriteConfig(uint64_t, const uint8_t*, uint32_t) override {}

  // The guest has read the capacity and the read-only bit and sized its
  // caches and filesystems by them: a restore onto another disk shape is
  // refused rather than shown to a driver that will not look again. The one
  // exception is a disk that had 0 sectors (an empty slot): nothing of it can
  // be in the guest's caches, and its driver is told the new capacity by a
  // configuration-change interrupt once the transport re-activates it.
  void SaveState(snapshot::Writer& w) const override {
    w.U64(capacity_.load());
    w.Bool(read_only_);
    w.Str(id_);
  }
  void RestoreState(snapshot::Reader& r) override {
    uint64_t capacity = r.U64();
    bool ro = r.Bool();
    std::string id = r.Str(blk::kIdBytes);
    r.ExpectEnd();
    if (capacity == 0 && capacity_ != 0) {
      announce_capacity_ = true;
    } else if (capacity != capacity_)
      throw VmmError(ErrorKind::Snapshot, "restore virtio-blk",
                     "the snapshot's disk had " + std::to_string(capacity) + " sectors, the disk given now has " +
                         std::to_string(capacity_.load()) + ": pass a disk of the same size, in the same order");
    if (ro != read_only_)
      throw VmmError(ErrorKind::Snapshot, "restore virtio-blk",
                     std::string("the snapshot's disk was ") + (ro ? "read-only" : "writable") + ", the disk given now is " +
                         (read_only_ ? "read-only" : "writable") + ": pass the same readOnly");
    (void)id;  // the answer to GET_ID is the new config's: an id names the disk, not its contents
  }

  // An empty slot (no medium) takes `fd` while the VM may be running: the
  // capacity is published before the configuration change that makes the
  // driver read it. A slot that holds a medium never changes it: the guest
  // may have cached its blocks.
  void AttachMedium(int fd, uint64_t capacity_sectors, const std::string& path) {
    std::shared_ptr<InterruptSink> irq;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (fd_ >= 0) {
        close(fd);
        throw VmmError(ErrorKind::InvalidArgument, "attach virtio-blk medium",
                       "this disk already holds a medium; only an empty slot takes " + path);
      }
      fd_ = fd;
      capacity_.store(capacity_sectors);
      irq = irq_;
    }
    // Not activated yet: the driver reads the capacity when it probes.
    if (irq) irq->SignalConfigChange();
  }

  void Activate(GuestMemory* mem, std::vector<Queue*> queues, std::shared_ptr<InterruptSink> irq) override {
    std::lock_guard<std::mutex> lock(mu_);
    mem_ = mem;
    queue_ = queues.empty() ? nullptr : queues[0];
    irq_ = std::move(irq);
    // Linux's virtio_blk answers with a work item that reads the capacity
    // again and resizes the disk (virtblk_config_changed_work).
    if (announce_capacity_ && irq_) irq_->SignalConfigChange();
    announce_capacity_ = false;
  }

  void QueueNotify(uint16_t index) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (index != 0) return;
    ServeLocked();
  }

  int QueueNotifyFd(uint16_t index) override {
    if (index != 0) return -1;
    std::lock_guard<std::mutex> lock(mu_);
    if (notify_fd_ >= 0) return notify_fd_;
    // An empty slot answers every request with IOERR: the exit path does that
    // well enough, and a thread + eventfd per slot cost each restore of a
    // 16-slot template ~5-8 ms in the lab. AttachMedium's caller asks the
    // transport to bind again once the slot holds a medium.
    if (stopping_ || fd_ < 0) return -1;
    // Non-blocking: the thread waits in poll(), and a snapshot's quiesce
    // drains the counter without waiting.
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) return -1;  // the exit path keeps working
    try {
      thread_ = std::thread([this, efd] { Loop(efd); });
    } catch (const std::system_error&) {
      close(efd);
      return -1;
    }
    notify_fd_ = efd;
    pthread_setname_np(thread_.native_handle(), "vmlet-blk-io");
    return notify_fd_;
  }

  void Reset() override {
    std::lock_guard<std::mutex> lock(mu_);
    mem_ = nullptr;
    queue_ = nullptr;
    irq_.reset();
  }

  void Shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    if (!thread_.joinable()) return;
    Wake();
    thread_.join();
  }

  // Held from QuiesceForSnapshot to EndQuiesceForSnapshot: the I/O thread
  // cannot serve meanwhile. Whatever the guest queued is served first,
  // unconditionally: the thread may have consumed the eventfd's count and be
  // waiting for mu_, and the saved rings must not hold a request nobody will
  // kick again after a restore. An empty avail ring makes it a no-op.
  void QuiesceForSnapshot() override {
    quiesce_ = std::unique_lock<std::mutex>(mu_);
    if (notify_fd_ >= 0) {
      uint64_t n;
      (void)!read(notify_fd_, &n, sizeof n);
    }
    ServeLocked();
  }
  void EndQuiesceForSnapshot() override {
    if (quiesce_.owns_lock()) quiesce_.unlock();
  }

 private:
  void Wake() {
    uint64_t one = 1;
    // Fails only when the counter is saturated: the thread is awake anyway.
    (void)!write(notify_fd_, &one, sizeof one);
  }

  // The I/O thread. Each wake-up drains the eventfd counter and then the
  // whole avail ring, so notifications that came in together cost one pass.
  void Loop(int notify_fd) {
    for (;;) {
      pollfd p{notify_fd, POLLIN, 0};
      if (poll(&p, 1, -1) < 0 && errno != EINTR) {
        // Fails only on a programming error. The notify stays bound to this
        // fd, so the guest will see a hung disk: say why before stopping.
        std::fprintf(stderr, "vmlet: virtio-blk I/O thread stopped: poll on its eventfd failed: %s\n", std::strerror(errno));
        return;
      }
      uint64_t n;
      (void)!read(notify_fd, &n, sizeof n);
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      ServeLocked();
    }
  }

  void ServeLocked() {
    if (!queue_ || !queue_->ready) return;
    DescriptorChain chain;
    bool used = false;
    for (;;) {
      PopResult r = queue_->Pop(*mem_, limits_, &chain);
      if (r == PopResult::kEmpty) break;
      if (r == PopResult::kBrokenRing) {
        irq_->SignalNeedsReset();
        return;
      }
      uint32_t written = r == PopResult::kChain ? Serve(chain) : 0;
      // A refused chain is returned with nothing written: its buffers may
      // not even be ours to touch, so no status byte can be trusted.
      if (!queue_->AddUsed(*mem_, chain.head, written)) {
        irq_->SignalNeedsReset();
        return;
      }
      used = true;
    }
    if (used && queue_->NeedsInterrupt(*mem_)) irq_->SignalUsedBuffer();
  }

  // Returns used.len: bytes written into the chain, status byte included.
  uint32_t Serve(const DescriptorChain& chain) {
    RequestHeader h;
    // Without a header or a writable status byte the request cannot even be
    // failed properly; give it back with nothing written.
    if (chain.writable_bytes == 0 || !chain.ReadFrom(0, &h, sizeof h)) return 0;
    uint64_t status_at = chain.writable_bytes - 1;
    uint64_t data_out = chain.readable_bytes - sizeof h;  // bytes after the header
    uint64_t data_in = status_at;                         // writable bytes before the status
    uint32_t written = 0;
    uint8_t status = Execute(chain, h, data_out, data_in, &written);
    chain.WriteTo(status_at, &status, 1);
    return written + 1;
  }

  uint8_t Execute(const DescriptorChain& chain, const RequestHeader& h, uint64_t data_out, uint64_t data_in,
                  uint32_t* written) {
    switch (h.type) {
      case blk::kTypeIn: {
        // Device-readable data on a read means the buffers point the wrong
        // way: refuse rather than guess which part the driver meant.
        if (data_out != 0 || !InCapacity(h.sector, data_in)) return blk::kStatusIoErr;
        std::vector<iovec> iov;
        if (!DescriptorChain::Iovecs(chain.writable, 0, data_in, &iov)) return blk::kStatusIoErr;
        if (!TransferAll(fd_, std::move(iov), h.sector * blk::kSectorSize, false)) return blk::kStatusIoErr;
        *written = static_cast<uint32_t>(data_in);
        return blk::kStatusOk;
      }
      case blk::kTypeOut: {
        if (read_only_) return blk::kStatusIoErr;
        if (data_in != 0 || !InCapacity(h.sector, data_out)) return blk::kStatusIoErr;
        std::vector<iovec> iov;
        if (!DescriptorChain::Iovecs(chain.readable, sizeof(RequestHeader), data_out, &iov)) return blk::kStatusIoErr;
        if (!TransferAll(fd_, std::move(iov), h.sector * blk::kSectorSize, true)) return blk::kStatusIoErr;
        return blk::kStatusOk;
      }
      case blk::kTypeFlush:
        if (read_only_) return blk::kStatusOk;  // nothing of ours to make durable
        return fdatasync(fd_) == 0 ? blk::kStatusOk : blk::kStatusIoErr;
      case blk::kTypeGetId: {
        // 5.2.6.1: up to 20 bytes, NUL-padded only when shorter.
        uint8_t id[blk::kIdBytes] = {};
        std::memcpy(id, id_.data(), std::min<size_t>(id_.size(), sizeof id));
        uint64_t n = std::min<uint64_t>(data_in, sizeof id);
        if (data_out != 0 || n == 0) return blk::kStatusIoErr;
        chain.WriteTo(0, id, n);
        *written = static_cast<uint32_t>(n);
        return blk::kStatusOk;
      }
      default:
        return blk::kStatusUnsupported;
    }
  }

  // Whole sectors, entirely below capacity, without overflow.
  bool InCapacity(uint64_t sector, uint64_t bytes) const {
    if (bytes % blk::kSectorSize) return false;
    uint64_t sectors = bytes / blk::kSectorSize;
    uint64_t capacity = capacity_.load();
    return sector <= capacity && sectors <= capacity - sector;
  }

  int fd_;
  // Atomic: ReadConfig runs on vCPU threads without mu_, while AttachMedium
  // may fill an empty slot from the JS thread.
  std::atomic<uint64_t> capacity_;
  // Restored from an empty slot onto a medium: tell the driver at activation.
  bool announce_capacity_ = false;
  bool read_only_;
  std::string id_;
  ChainLimits limits_;
  std::mutex mu_;  // guards everything below
  GuestMemory* mem_ = nullptr;
  Queue* queue_ = nullptr;
  std::shared_ptr<InterruptSink> irq_;
  bool stopping_ = false;  // Shutdown: the I/O thread leaves and is not restarted
  int notify_fd_ = -1;     // created with the I/O thread; closed with the device
  std::thread thread_;
  std::unique_lock<std::mutex> quiesce_;  // held while a snapshot reads the rings
};

// The backing file or block device opened as cfg asks, and its size in bytes.
int OpenBacking(const BlkConfig& cfg, uint64_t* size_bytes) {
  const char* op = "open virtio-blk backing file";
  int fd = open(cfg.path.c_str(), (cfg.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd < 0) {
    const char* hint = errno == ENOENT   ? ": the file does not exist, create the disk image first"
                       : errno == EACCES ? (cfg.read_only ? ": not readable by this user"
                                                          : ": not writable by this user (or attach it read-only)")
                       : errno == EROFS  ? ": on a read-only file system, attach it read-only"
                                         : "";
    throw SysError(ErrorKind::Device, op, cfg.path + hint);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    auto e = SysError(ErrorKind::Device, "stat virtio-blk backing file", cfg.path);
    close(fd);
    throw e;
  }
  if (S_ISREG(st.st_mode)) {
    *size_bytes = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
      auto e = SysError(ErrorKind::Device, "size virtio-blk block device", cfg.path);
      close(fd);
      throw e;
    }
    *size_bytes = static_cast<uint64_t>(end);
  } else {
    close(fd);
    throw VmmError(ErrorKind::Device, op, cfg.path + " is neither a regular file nor a block device");
  }
  return fd;
}

}  // namespace

std::shared_ptr<VirtioDevice> MakeVirtioBlk(const BlkConfig& cfg) {
  const char* op = "open virtio-blk backing file";
  if (cfg.empty) {
    if (!cfg.path.empty())
      throw VmmError(ErrorKind::Device, "configure virtio-blk",
                     "an empty disk slot has no path, but '" + cfg.path + "' was given: leave out either empty or path");
    if (!cfg.read_only)
      throw VmmError(ErrorKind::Device, "configure virtio-blk",
                     "an empty disk slot is read-only (it takes image layers at restore): set readOnly");
    if (cfg.id.size() > blk::kIdBytes)
      throw VmmError(ErrorKind::Device, "configure virtio-blk", "id '" + cfg.id + "' is longer than 20 bytes: shorten it");
    return std::make_shared<VirtioBlk>(-1, 0, cfg);
  }
  if (cfg.path.empty()) throw VmmError(ErrorKind::Device, op, "no path given: set disks[].path to a disk image file");
  if (cfg.id.size() > blk::kIdBytes)
    throw VmmError(ErrorKind::Device, "configure virtio-blk",
                   "id '" + cfg.id + "' of " + cfg.path + " is longer than 20 bytes: shorten it");
  uint64_t bytes = 0;
  int fd = OpenBacking(cfg, &bytes);
  // A trailing partial sector is not addressable by the guest; it stays untouched.
  return std::make_shared<VirtioBlk>(fd, bytes / blk::kSectorSize, cfg);
}

void BlkAttachMedium(virtio::VirtioDevice& device, const std::string& path) {
  auto* blk = dynamic_cast<VirtioBlk*>(&device);
  if (!blk)
    throw VmmError(ErrorKind::InvalidArgument, "attach virtio-blk medium",
                   "device " + std::to_string(device.device_id()) + " is not virtio-blk");
  BlkConfig cfg;
  cfg.path = path;
  cfg.read_only = true;
  uint64_t bytes = 0;
  int fd = OpenBacking(cfg, &bytes);
  if (bytes < blk::kSectorSize) {
    close(fd);
    throw VmmError(ErrorKind::Device, "attach virtio-blk medium",
                   path + " is " + std::to_string(bytes) + " bytes, less than one sector: the slot would stay empty");
  }
  blk->AttachMedium(fd, bytes / blk::kSectorSize, path);
}

}  // namespace vmlet
