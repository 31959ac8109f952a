// virtio-vsock host side (hybrid model, see vsock.h).
//
// Threads: host sockets are served by one epoll thread. Guest notifies reach
// it too, through eventfds the transport binds with KVM_IOEVENTFD, so the
// vCPU goes back to the guest at once while this thread copies; without that
// binding (a host without ioeventfd, device tests without a binder) guest TX
// is parsed on the vCPU thread that notifies. All take `mu_`, which guards
// everything below it; no socket call made under it blocks (all fds are
// non-blocking).
//
// Why the epoll thread and not the vCPU: in the standard-KVM lab (one CPU)
// the host reader, woken by each ~32 KiB socket buffer the sendmsg queues,
// preempted the vCPU thread (a CPU hog in the scheduler's eyes) after every
// one; a thread that mostly sleeps, as vhost's worker, is not preempted
// that way, and the guest's kick costs no userspace exit.
//
// Hazards this file is shaped by:
//  - Credit (virtio 1.x 5.10.6.3). We never send a guest more than
//    peer_buf_alloc - (tx_cnt - peer_fwd_cnt) bytes, and never more than the
//    RX buffer it posted: Linux sizes its receive skb from hdr.len and would
//    overrun it (the 4 KiB cap hazard in the seeds is this rule in disguise).
//    A guest that sends past the buf_alloc we advertised is reset.
//  - Level-triggered epoll on a socket we cannot serve (no credit, no RX
//    buffers, peer hung up) would spin: an fd is only in the epoll set while
//    there is something we are ready to do with it.
//  - EOF is latched: a host socket's end is reported to the guest once, as
//    one SHUTDOWN(SEND), after every byte before it.
//  - Control packets (RESPONSE, RST, CREDIT_*) are queued and delivered
//    before any data, so a connection's data never overtakes its RESPONSE.
//  - Linux closes a stream with SHUTDOWN(RCV|SEND) and waits for the peer's
//    RST; we answer with RST once our side is drained.
#include "devices/vsock.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "core/error.h"

namespace vmlet {

using namespace virtio;
using namespace vsock;

namespace {

constexpr uint64_t kTokenWake = 0;
constexpr uint64_t kTokenListener = 1;
// Queue notify eventfds: this bit plus the queue index (connection tokens count up from 2).
constexpr uint64_t kTokenNotify = 1ull << 63;
constexpr uint32_t kFirstHostPort = 1u << 30;  // host-initiated local ports, as Firecracker
constexpr size_t kConnectLineMax = 64;
// A guest (or local client) opening connections without end would exhaust
// the VMM's fds; a guest sending to unknown ports without posting RX buffers
// would grow the RST backlog without end. Both are bounded.
constexpr size_t kMaxConnections = 1024;
constexpr size_t kMaxQueuedUnknownRsts = 1024;
constexpr size_t kMaxBatchIovecs = 512;  // well under IOV_MAX (1024)
// Tell the guest about freed buffer space once a quarter of it is free again,
// so a sender blocked on credit restarts long before it drains.
constexpr uint32_t kCreditUpdateThreshold = kHostBufAlloc / 4;

uint64_t Key(uint32_t local_port, uint32_t peer_port) { return (uint64_t(local_port) << 32) | peer_port; }

enum class ConnState {
  kAwaitConnectLine,  // host client accepted, `CONNECT <port>\n` not yet read
  kAwaitResponse,     // REQUEST sent to the guest
  kEstablished,
};

struct Conn {
  uint64_t id = 0;  // epoll token
  int fd = -1;
  ConnState state = ConnState::kAwaitConnectLine;
  uint32_t local_port = 0;  // our port (the guest's dst_port)
  uint32_t peer_port = 0;   // the guest's port
  // Guest -> host bytes the socket has not taken yet (bounded by kHostBufAlloc).
  std::vector<uint8_t> pending_out;
  size_t pending_off = 0;
  uint32_t rx_cnt = 0;              // stream bytes received from the guest
  uint32_t fwd_cnt = 0;             // of those, written to the host socket
  uint32_t fwd_cnt_told = 0;        // fwd_cnt in the last packet the guest got
  uint32_t tx_cnt = 0;              // stream bytes sent to the guest
  uint32_t peer_buf_alloc = 0;
  uint32_t peer_fwd_cnt = 0;
  bool credit_requested = false;    // CREDIT_REQUEST sent, no credit change since
  bool credit_update_queued = false;
  bool host_eof = false;            // EOF latch
  bool guest_shut_send = false;     // the guest will send no more
  bool guest_shut_rcv = false;      // the guest will receive no more
  bool shut_wr_done = false;
  bool rx_starved = false;          // wanted to send, no RX buffer: wait for the guest's kick
  uint32_t epoll_events = 0;        // 0: not in the epoll set
  std::chrono::steady_clock::time_point since;  // accepted / REQUEST sent (host-initiated only)

  size_t PendingBytes() const { return pending_out.size() - pending_off; }
  uint32_t PeerCredit() const {
    uint32_t in_flight = tx_cnt - peer_fwd_cnt;
    return in_flight >= peer_buf_alloc ? 0 : peer_buf_alloc - in_flight;
  }
};

// A packet without payload, built when delivered so it carries current counters.
struct Control {
  uint32_t local_port;
  uint32_t peer_port;
  uint16_t op;
  uint32_t flags;
};

class VirtioVsock : public VirtioDevice {
 public:
  VirtioVsock(const VsockConfig& cfg, int listen_fd) : cfg_(cfg), listen_fd_(listen_fd) {
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (epoll_fd_ < 0 || wake_fd_ < 0) {
      auto e = SysError(ErrorKind::Device, "create virtio-vsock event loop");
      CloseFds();
      throw e;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kTokenWake;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
    ev.data.u64 = kTokenListener;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
    thread_ = std::thread([this] { Loop(); });
  }
  // The notify eventfds outlive Shutdown: the transport unbinds them later.
  ~VirtioVsock() override {
    Shutdown();
    for (int fd : notify_fds_)
      if (fd >= 0) close(fd);
  }

  uint32_t device_id() const override { return kDeviceId; }
  uint64_t device_features() const override { return kFeatureVersion1 | kFeatureEventIdx; }
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize, kQueueSize, kQueueSize}; }
  void ReadConfig(uint64_t offset, uint8_t* data, uint32_t len) override {
    // The guest re-reads its CID when it handles a transport reset: from
    // then on it answers with the new one, so held packets may go.
    if (await_cid_read_.exchange(false)) {
      uint64_t one = 1;
      (void)!write(wake_fd_, &one, sizeof one);
    }
    uint64_t cid = cfg_.guest_cid;
    std::memset(data, 0, len);
    if (offset < sizeof cid)
      std::memcpy(data, reinterpret_cast<const uint8_t*>(&cid) + offset, std::min<uint64_t>(len, sizeof cid - offset));
  }
  void WriteConfig(uint64_t, const uint8_t*, uint32_t) override {}  // guest_cid is read-only

  // Connections are not carried across a snapshot (their host sockets belong
  // to the old VM): the restore sends a transport reset instead, after which
  // the guest re-reads the CID, which may differ.
  void SaveState(snapshot::Writer& w) const override { w.U64(cfg_.guest_cid); }
  // The event loop touches rings and guest memory only under mu_: holding it
  // parks the loop (host sockets just queue meanwhile). A guest kick KVM
  // signalled before the vCPUs parked may still wait in its eventfd, or the
  // loop may have read its count already and be blocked on mu_. Either way
  // the rings are served here, unconditionally, as the exit path would have
  // before the vCPU parked: the saved rings must hold no kick that nobody
  // repeats after a restore. The eventfds are drained so the loop does not
  // wake for them again; a pass over rings with nothing new is a no-op.
  void QuiesceForSnapshot() override {
    quiesce_ = std::unique_lock<std::mutex>(mu_);
    for (uint16_t index : {kRxQueue, kTxQueue}) {
      if (notify_fds_[index] >= 0) {
        uint64_t v;
        (void)!read(notify_fds_[index], &v, sizeof v);
      }
      NotifyLocked(index);
    }
  }
  void EndQuiesceForSnapshot() override {
    if (quiesce_.owns_lock()) quiesce_.unlock();
  }
  void RestoreState(snapshot::Reader& r) override {
    r.U64();
    r.ExpectEnd();
  }

  void Activate(GuestMemory* mem, std::vector<Queue*> queues, std::shared_ptr<InterruptSink> irq) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (queues.size() < 3) return;
    mem_ = mem;
    rx_ = queues[kRxQueue];
    tx_ = queues[kTxQueue];
    event_ = queues[kEventQueue];
    irq_ = std::move(irq);
    active_ = rx_->ready && tx_->ready;
    // A driver may post RX buffers before DRIVER_OK and not kick again:
    // host CONNECTs queued meanwhile must not wait for a kick that never comes.
    if (active_) {
      FlushControl();
      FinishSignals();
    }
  }

  void QueueNotify(uint16_t index) override {
    std::lock_guard<std::mutex> lock(mu_);
    NotifyLocked(index);
  }

  // RX and TX only: the event queue is the device's to fill, a driver's kick
  // there just posts buffers we look at when we need one.
  int QueueNotifyFd(uint16_t index) override {
    if (index != kRxQueue && index != kTxQueue) return -1;
    std::lock_guard<std::mutex> lock(mu_);
    int& fd = notify_fds_[index];
    if (fd >= 0) return fd;
    if (epoll_fd_ < 0) return -1;  // shut down
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) return -1;  // the exit path keeps working
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kTokenNotify | index;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, efd, &ev) != 0) {
      close(efd);
      return -1;
    }
    fd = efd;
    return fd;
  }

  void NotifyLocked(uint16_t index) {
    if (!active_) return;
    if (index == kTxQueue) ProcessTx();
    // New RX buffers (or replies just queued by TX): deliver what waits.
    if (index == kRxQueue || index == kTxQueue) {
      FlushControl();
      if (index == kRxQueue) ResumeStarved();
    }
    FinishSignals();
  }

  void Reset() override {
    std::lock_guard<std::mutex> lock(mu_);
    // The guest's sockets are gone with its driver: drop ours without RSTs.
    while (!conns_.empty()) Close(*conns_.begin()->second, false);
    control_.clear();
    active_ = false;
    mem_ = nullptr;
    rx_ = tx_ = event_ = nullptr;
    irq_.reset();
  }

  bool SendTransportReset() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!active_ || !event_ || !event_->ready) return false;
    ChainLimits limits;
    DescriptorChain chain;
    for (;;) {
      PopResult r = event_->Pop(*mem_, limits, &chain);
      if (r == PopResult::kEmpty) return false;
      if (r == PopResult::kBrokenRing) return Broken(), false;
      if (r == PopResult::kChain && chain.readable.empty() && chain.writable_bytes >= 4) break;
      if (!event_->AddUsed(*mem_, chain.head, 0)) return Broken(), false;
    }
    while (!conns_.empty()) Close(*conns_.begin()->second, false);
    control_.clear();
    uint32_t id = kEventTransportReset;
    chain.WriteTo(0, &id, sizeof id);
    if (!event_->AddUsed(*mem_, chain.head, sizeof id)) return Broken(), false;
    await_cid_read_ = true;
    if (event_->NeedsInterrupt(*mem_)) irq_->SignalUsedBuffer();
    return true;
  }

  void Shutdown() override {
    if (!thread_.joinable()) return;
    stop_ = true;
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
    thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    while (!conns_.empty()) Close(*conns_.begin()->second, false);
    active_ = false;
    CloseFds();
    unlink(cfg_.uds_path.c_str());
  }

 private:
  void CloseFds() {
    for (int* fd : {&listen_fd_, &epoll_fd_, &wake_fd_}) {
      if (*fd >= 0) close(*fd);
      *fd = -1;
    }
  }

  // ---- guest -> host -------------------------------------------------------

  // Data packets of one connection that follow each other in the ring are
  // written to its host socket with one sendmsg (TxBatch): one wake-up of
  // the host reader per notify instead of one per 4 KiB packet (in the lab
  // the reader was woken ~24,000 times per 128 MiB and the stream ran at half
  // of vhost-vsock's speed). Their buffers go back to the guest only after
  // that write, which copies them: until then the iovecs point into them.
  void ProcessTx() {
    ChainLimits limits;
    limits.max_total_bytes = sizeof(PacketHeader) + kMaxPayload;
    DescriptorChain& chain = tx_chain_;
    std::vector<uint16_t>& done = tx_done_;
    done.clear();
    bool broken = false;
    // A vCPU running beside this thread need not kick for packets this pass
    // finds anyway. The pass is bounded: the guest gets no descriptor back
    // before the batch is written, so it adds at most a ring's worth.
    bool quiet = tx_->DisableDriverNotifications(*mem_);
    for (;;) {
      PopResult r = tx_->Pop(*mem_, limits, &chain);
      if (r == PopResult::kEmpty) {
        if (!quiet) break;
        quiet = false;
        if (tx_->EnableDriverNotifications(*mem_)) continue;
        break;
      }
      if (r == PopResult::kBrokenRing) {
        broken = true;
        break;
      }
      if (r == PopResult::kChain) HandleTxPacket(chain);
      done.push_back(chain.head);
    }
    FlushTxBatch();
    for (uint16_t head : done) {
      if (!tx_->AddUsed(*mem_, head, 0)) return Broken();
    }
    if (broken) return Broken();
    if (!done.empty() && tx_->NeedsInterrupt(*mem_)) irq_->SignalUsedBuffer();
  }

  void HandleTxPacket(const DescriptorChain& chain) {
    PacketHeader h;
    // The header is copied once; only the copy is trusted from here on.
    if (!chain.ReadFrom(0, &h, sizeof h)) return;
    // Packets claiming another source or a destination other than the host
    // cannot belong to any connection of ours; Firecracker drops them too.
    if (h.src_cid != cfg_.guest_cid || h.dst_cid != kHostCid) return;
    Conn* c = Find(h.dst_port, h.src_port);
    // Anything but more data for the batched connection comes after the
    // batch's bytes (a SHUTDOWN must not overtake them); the flush may close
    // the connection, so it is looked up again.
    if (tx_batch_.conn && !(h.op == kOpRw && c == tx_batch_.conn)) {
      FlushTxBatch();
      c = Find(h.dst_port, h.src_port);
    }
    bool oversized = h.len > kMaxPayload || h.len > chain.readable_bytes - sizeof h;
    if (h.type != kTypeStream || oversized) {
      // A packet whose length lies about its buffer leaves the stream in an
      // unknown state: the connection cannot continue.
      if (c) return Close(*c, true);
      if (h.op != kOpRst) QueueUnknownRst(h.dst_port, h.src_port);
      return;
    }
    if (h.op == kOpRequest) return HandleRequest(h, c);
    if (!c) {
      if (h.op != kOpRst) QueueUnknownRst(h.dst_port, h.src_port);
      return;
    }
    uint32_t old_credit = c->PeerCredit();
    c->peer_buf_alloc = h.buf_alloc;
    c->peer_fwd_cnt = h.fwd_cnt;
    if (c->PeerCredit() != old_credit) c->credit_requested = false;
    switch (h.op) {
      case kOpResponse:
        if (c->state != ConnState::kAwaitResponse) return Close(*c, true);
        return Established(*c);
      case kOpRw:
        if (c->state != ConnState::kEstablished || c->guest_shut_send) return Close(*c, true);
        return ForwardToHost(*c, chain, h.len);
      case kOpShutdown:
        c->guest_shut_send |= (h.flags & kShutdownSend) != 0;
        c->guest_shut_rcv |= (h.flags & kShutdownRcv) != 0;
        return Progress(*c);
      case kOpRst:
        return Close(*c, false);
      case kOpCreditRequest:
        QueueCreditUpdate(*c);
        return UpdateInterest(*c);
      case kOpCreditUpdate:
        return UpdateInterest(*c);
      default:
        return Close(*c, true);
    }
  }

  void HandleRequest(const PacketHeader& h, Conn* existing) {
    if (existing) return Close(*existing, true);
    if (conns_.size() >= kMaxConnections) return QueueUnknownRst(h.dst_port, h.src_port);
    std::string path = cfg_.uds_path + "_" + std::to_string(h.dst_port);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    // Nobody listening, or a backlog so full that connect would block: the
    // guest's connect() fails with ECONNRESET, as with no listener on Linux.
    if (fd < 0 || path.size() >= sizeof addr.sun_path) {
      if (fd >= 0) close(fd);
      return QueueUnknownRst(h.dst_port, h.src_port);
    }
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      close(fd);
      return QueueUnknownRst(h.dst_port, h.src_port);
    }
    Conn& c = Add(fd);
    c.local_port = h.dst_port;
    c.peer_port = h.src_port;
    c.peer_buf_alloc = h.buf_alloc;
    c.peer_fwd_cnt = h.fwd_cnt;
    by_key_[Key(c.local_port, c.peer_port)] = c.id;
    c.state = ConnState::kEstablished;
    QueueControl(c.local_port, c.peer_port, kOpResponse, 0);
    UpdateInterest(c);
  }

  void ForwardToHost(Conn& c, const DescriptorChain& chain, uint32_t len) {
    if (len == 0) return UpdateInterest(c);
    // Our buffer is what the guest may fill without our reading: beyond it
    // the guest ignored the credit we advertised.
    if (static_cast<uint64_t>(c.rx_cnt - c.fwd_cnt) + len > kHostBufAlloc) return Close(c, true);
    c.rx_cnt += len;
    // Batched while the socket has nothing queued from us before it (bytes
    // keep their order) and the iovec array has room (IOV_MAX is 1024).
    if (c.PendingBytes() == 0 && (tx_batch_.conn == nullptr || tx_batch_.conn == &c) &&
        tx_batch_.iov.size() + chain.readable.size() <= kMaxBatchIovecs) {
      tx_batch_.conn = &c;
      DescriptorChain::Iovecs(chain.readable, sizeof(PacketHeader), len, &tx_batch_.iov);
      tx_batch_.bytes += len;
      return;
    }
    // The batch may be this connection's (its iovec array was full) and the
    // flush may close it: c is only touched again if it still exists.
    uint32_t local_port = c.local_port, peer_port = c.peer_port;
    FlushTxBatch();
    if (Find(local_port, peer_port) != &c) return;
    size_t sent = 0;
    if (c.PendingBytes() == 0) {
      std::vector<iovec>& iov = iov_;
      iov.clear();
      DescriptorChain::Iovecs(chain.readable, sizeof(PacketHeader), len, &iov);
      msghdr msg{};
      msg.msg_iov = iov.data();
      msg.msg_iovlen = iov.size();
      ssize_t n = sendmsg(c.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return Close(c, true);
      sent = n > 0 ? static_cast<size_t>(n) : 0;
      c.fwd_cnt += static_cast<uint32_t>(sent);
    }
    if (sent < len) {
      if (c.pending_off && c.pending_off == c.pending_out.size()) {
        c.pending_out.clear();
        c.pending_off = 0;
      }
      size_t at = c.pending_out.size();
      c.pending_out.resize(at + (len - sent));
      chain.ReadFrom(sizeof(PacketHeader) + sent, c.pending_out.data() + at, len - sent);
    }
    MaybeCreditUpdate(c);
    Progress(c);
  }

  // Writes the batch with one sendmsg; what the socket does not take is
  // copied to pending_out (the guest's buffers are returned after this).
  void FlushTxBatch() {
    if (!tx_batch_.conn) return;
    Conn& c = *tx_batch_.conn;
    tx_batch_.conn = nullptr;
    std::vector<iovec>& iov = tx_batch_.iov;
    size_t bytes = tx_batch_.bytes;
    tx_batch_.bytes = 0;
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = iov.size();
    ssize_t n = sendmsg(c.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      iov.clear();
      return Close(c, true);
    }
    size_t sent = n > 0 ? static_cast<size_t>(n) : 0;
    c.fwd_cnt += static_cast<uint32_t>(sent);
    if (sent < bytes) {
      // pending_out is empty: batching stops as soon as it is not.
      c.pending_out.resize(bytes - sent);
      size_t skip = sent, at = 0;
      for (const iovec& v : iov) {
        if (skip >= v.iov_len) {
          skip -= v.iov_len;
          continue;
        }
        std::memcpy(c.pending_out.data() + at, static_cast<const uint8_t*>(v.iov_base) + skip, v.iov_len - skip);
        at += v.iov_len - skip;
        skip = 0;
      }
      c.pending_off = 0;
    }
    iov.clear();
    MaybeCreditUpdate(c);
    Progress(c);
  }

  Conn* Find(uint32_t local_port, uint32_t peer_port) {
    auto it = by_key_.find(Key(local_port, peer_port));
    return it == by_key_.end() ? nullptr : conns_.at(it->second).get();
  }

  // Drains pending_out into the socket (EPOLLOUT).
  void WritePending(Conn& c) {
    while (c.PendingBytes()) {
      ssize_t n = send(c.fd, c.pending_out.data() + c.pending_off, c.PendingBytes(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n <= 0) return Close(c, true);
      c.pending_off += static_cast<size_t>(n);
      c.fwd_cnt += static_cast<uint32_t>(n);
    }
    if (!c.PendingBytes()) {
      c.pending_out.clear();
      c.pending_off = 0;
    }
    MaybeCreditUpdate(c);
    Progress(c);
  }

  void MaybeCreditUpdate(Conn& c) {
    if (c.fwd_cnt - c.fwd_cnt_told >= kCreditUpdateThreshold) QueueCreditUpdate(c);
  }
  void QueueCreditUpdate(Conn& c) {
    if (c.credit_update_queued) return;
    c.credit_update_queued = true;
    QueueControl(c.local_port, c.peer_port, kOpCreditUpdate, 0);
  }

  // Half-closes and closes as both sides finish; then refreshes epoll interest.
  void Progress(Conn& c) {
    if (c.PendingBytes() == 0 && c.guest_shut_send && !c.shut_wr_done) {
      shutdown(c.fd, SHUT_WR);
      c.shut_wr_done = true;
    }
    bool guest_done = c.guest_shut_send && c.PendingBytes() == 0;
    if (guest_done && (c.guest_shut_rcv || c.host_eof)) return Close(c, true);
    UpdateInterest(c);
  }

  // ---- host -> guest -------------------------------------------------------

  void Established(Conn& c) {
    // The client's answer goes before any stream byte; a fresh socket's
    // buffer always takes these few bytes at once.
    std::string ok = "OK " + std::to_string(c.local_port) + "\n";
    if (send(c.fd, ok.data(), ok.size(), MSG_NOSIGNAL | MSG_DONTWAIT) != static_cast<ssize_t>(ok.size()))
      return Close(c, true);
    c.state = ConnState::kEstablished;
    UpdateInterest(c);
  }

  void QueueControl(uint32_t local_port, uint32_t peer_port, uint16_t op, uint32_t flags) {
    control_.push_back(Control{local_port, peer_port, op, flags});
  }
  // An RST for a connection we never had is advisory: past the bound it is
  // dropped (the guest's connect then times out instead of failing fast).
  void QueueUnknownRst(uint32_t local_port, uint32_t peer_port) {
    if (control_.size() < kMaxQueuedUnknownRsts) QueueControl(local_port, peer_port, kOpRst, 0);
  }

  // Pops one RX chain able to hold a header. nullopt: none (or the ring broke).
  bool PopRx(DescriptorChain* chain) {
    ChainLimits limits;
    limits.max_total_bytes = sizeof(PacketHeader) + kMaxPayload + 4096;
    for (;;) {
      PopResult r = rx_->Pop(*mem_, limits, chain);
      if (r == PopResult::kEmpty) return false;
      if (r == PopResult::kBrokenRing) {
        Broken();
        return false;
      }
      if (r == PopResult::kChain && chain->readable.empty() && chain->writable_bytes >= sizeof(PacketHeader)) return true;
      // An RX buffer we cannot write a packet into is handed back empty.
      if (!rx_->AddUsed(*mem_, chain->head, 0)) {
        Broken();
        return false;
      }
      rx_used_ = true;
    }
  }

  PacketHeader Header(uint32_t local_port, uint32_t peer_port, uint16_t op, uint32_t flags, uint32_t len) {
    PacketHeader h{};
    h.src_cid = kHostCid;
    h.dst_cid = cfg_.guest_cid;
    h.src_port = local_port;
    h.dst_port = peer_port;
    h.len = len;
    h.type = kTypeStream;
    h.op = op;
    h.flags = flags;
    auto it = by_key_.find(Key(local_port, peer_port));
    if (it != by_key_.end()) {
      Conn& c = *conns_.at(it->second);
      h.buf_alloc = kHostBufAlloc;
      h.fwd_cnt = c.fwd_cnt;
      c.fwd_cnt_told = c.fwd_cnt;
    }
    return h;
  }

  // Delivers queued control packets; false if some are still waiting for RX buffers.
  bool FlushControl() {
    if (!active_) return control_.empty();
    // Hazard: after a transport reset a Linux guest may take an RX packet
    // (a host CONNECT's REQUEST) before its event work has read the new CID,
    // and answer from the old one, which we must drop: the host client would
    // wait out its whole connect timeout. So nothing goes to the guest until
    // it has read the CID (ReadConfig); host connections just wait for that.
    if (await_cid_read_) return control_.empty();
    while (!control_.empty()) {
      DescriptorChain& chain = rx_chain_;
      if (!PopRx(&chain)) return false;
      Control k = control_.front();
      control_.pop_front();
      auto it = by_key_.find(Key(k.local_port, k.peer_port));
      if (k.op == kOpCreditUpdate && it != by_key_.end()) conns_.at(it->second)->credit_update_queued = false;
      PacketHeader h = Header(k.local_port, k.peer_port, k.op, k.flags, 0);
      chain.WriteTo(0, &h, sizeof h);
      if (!rx_->AddUsed(*mem_, chain.head, sizeof h)) return Broken(), false;
      rx_used_ = true;
    }
    return true;
  }

  // Moves socket bytes into RX buffers while credit, buffers and data last.
  void DeliverData(Conn& c) {
    if (!FlushControl()) {
      c.rx_starved = true;
      return UpdateInterest(c);
    }
    while (c.state == ConnState::kEstablished && !c.host_eof && !c.guest_shut_rcv) {
      uint32_t credit = c.PeerCredit();
      if (credit == 0) {
        if (!c.credit_requested) {
          c.credit_requested = true;
          QueueControl(c.local_port, c.peer_port, kOpCreditRequest, 0);
          FlushControl();
        }
        break;
      }
      DescriptorChain& chain = rx_chain_;
      if (!PopRx(&chain)) {
        c.rx_starved = true;
        break;
      }
      uint64_t room = chain.writable_bytes - sizeof(PacketHeader);
      if (room == 0) {
        // A buffer with no payload room would be popped and put back forever.
        if (!rx_->AddUsed(*mem_, chain.head, 0)) return Broken();
        rx_used_ = true;
        continue;
      }
      uint32_t want = static_cast<uint32_t>(std::min<uint64_t>({uint64_t{credit}, room, uint64_t{kMaxPayload}}));
      std::vector<iovec>& iov = iov_;
      iov.clear();
      DescriptorChain::Iovecs(chain.writable, sizeof(PacketHeader), want, &iov);
      ssize_t n = readv(c.fd, iov.data(), static_cast<int>(iov.size()));
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        rx_->UndoPop();
        break;
      }
      if (n <= 0) {
        // EOF (or a dead socket): latched, told once, after all the data.
        rx_->UndoPop();
        c.host_eof = true;
        QueueControl(c.local_port, c.peer_port, kOpShutdown, kShutdownSend);
        FlushControl();
        return Progress(c);
      }
      PacketHeader h = Header(c.local_port, c.peer_port, kOpRw, 0, static_cast<uint32_t>(n));
      chain.WriteTo(0, &h, sizeof h);
      if (!rx_->AddUsed(*mem_, chain.head, static_cast<uint32_t>(sizeof h + n))) return Broken();
      rx_used_ = true;
      c.tx_cnt += static_cast<uint32_t>(n);
    }
    UpdateInterest(c);
  }

  void ResumeStarved() {
    for (auto& [id, c] : conns_) {
      if (!c->rx_starved) continue;
      c->rx_starved = false;
      UpdateInterest(*c);
    }
  }

  // ---- host clients (CONNECT <port>) ----------------------------------------

  void AcceptClients() {
    for (;;) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      if (conns_.size() >= kMaxConnections) {
        close(fd);
        continue;
      }
      Conn& c = Add(fd);
      c.state = ConnState::kAwaitConnectLine;
      c.since = std::chrono::steady_clock::now();
      UpdateInterest(c);
    }
  }

  void ReadConnectLine(Conn& c) {
    // Peek, then consume exactly the line: bytes after it are stream data
    // for the guest and must stay in the socket until the guest accepts.
    char buf[kConnectLineMax];
    ssize_t n = recv(c.fd, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) return Close(c, false);
    auto* nl = static_cast<char*>(std::memchr(buf, '\n', static_cast<size_t>(n)));
    if (!nl) {
      if (static_cast<size_t>(n) == sizeof buf) Close(c, false);  // no line in 64 bytes: not our protocol
      return;
    }
    size_t line_len = static_cast<size_t>(nl - buf) + 1;
    (void)!recv(c.fd, buf, line_len, MSG_DONTWAIT);
    std::string line(buf, line_len - 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    uint32_t port = 0;
    if (line.rfind("CONNECT ", 0) != 0 || !ParsePort(line.substr(8), &port)) {
      (void)!send(c.fd, "ERR bad request: expected CONNECT <port>\n", 41, MSG_NOSIGNAL | MSG_DONTWAIT);
      return Close(c, false);
    }
    uint32_t local = next_host_port_;
    while (by_key_.count(Key(local, port))) local = local + 1 < kFirstHostPort ? kFirstHostPort : local + 1;
    next_host_port_ = local + 1 < kFirstHostPort ? kFirstHostPort : local + 1;
    c.local_port = local;
    c.peer_port = port;
    c.state = ConnState::kAwaitResponse;
    c.since = std::chrono::steady_clock::now();
    by_key_[Key(local, port)] = c.id;
    QueueControl(local, port, kOpRequest, 0);
    FlushControl();
    UpdateInterest(c);
  }

  static bool ParsePort(const std::string& s, uint32_t* port) {
    if (s.empty() || s.size() > 10) return false;
    uint64_t v = 0;
    for (char ch : s) {
      if (ch < '0' || ch > '9') return false;
      v = v * 10 + static_cast<uint64_t>(ch - '0');
    }
    if (v > 0xffffffffull) return false;
    *port = static_cast<uint32_t>(v);
    return true;
  }

  // ---- bookkeeping ---------------------------------------------------------

  Conn& Add(int fd) {
    // Guest -> host bytes are credited back to the guest as soon as the host
    // socket takes them, so the socket's send buffer is how far a guest can
    // stream ahead of a host reader that is not scheduled (the default ~200 KiB
    // made the guest stop every ~77 KiB in the lab, three times as often as on
    // vhost-vsock, whose buffer is the 256 KiB it advertises). Raised past
    // net.core.wmem_max when we may (CAP_NET_ADMIN, as the shim runs), else as
    // far as the limit allows; a refusal only costs throughput.
    int want = static_cast<int>(kHostSocketSendBuf);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof want) != 0)
      (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
    auto c = std::make_unique<Conn>();
    c->id = next_id_++;
    c->fd = fd;
    Conn& ref = *c;
    conns_[ref.id] = std::move(c);
    return ref;
  }

  void Close(Conn& c, bool send_rst) {
    // A connection reset mid-batch loses the batch with its other bytes.
    if (tx_batch_.conn == &c) {
      tx_batch_.conn = nullptr;
      tx_batch_.iov.clear();
      tx_batch_.bytes = 0;
    }
    if (c.epoll_events) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    if (c.state != ConnState::kAwaitConnectLine) {
      by_key_.erase(Key(c.local_port, c.peer_port));
      if (send_rst) QueueControl(c.local_port, c.peer_port, kOpRst, 0);
    }
    conns_.erase(c.id);  // c is gone after this line
  }

  void UpdateInterest(Conn& c) {
    uint32_t want = 0;
    if (c.state == ConnState::kAwaitConnectLine) want = EPOLLIN;
    if (c.state == ConnState::kEstablished && active_ && !c.host_eof && !c.guest_shut_rcv && !c.rx_starved &&
        c.PeerCredit() > 0)
      want |= EPOLLIN;
    if (c.PendingBytes()) want |= EPOLLOUT;
    if (want == c.epoll_events) return;
    epoll_event ev{};
    ev.events = want;
    ev.data.u64 = c.id;
    // Out of the set when idle: EPOLLHUP is reported whatever we ask for.
    int op = want == 0 ? EPOLL_CTL_DEL : c.epoll_events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    epoll_ctl(epoll_fd_, op, c.fd, &ev);
    c.epoll_events = want;
  }

  void Broken() {
    if (irq_) irq_->SignalNeedsReset();
    active_ = false;
  }

  void FinishSignals() {
    if (rx_used_ && active_ && rx_->NeedsInterrupt(*mem_)) irq_->SignalUsedBuffer();
    rx_used_ = false;
  }

  // Host-initiated connections still in their handshake, oldest first, decide
  // how long the loop may sleep.
  int NextTimeoutMs() {
    std::lock_guard<std::mutex> lock(mu_);
    auto now = std::chrono::steady_clock::now();
    auto limit = std::chrono::milliseconds(cfg_.connect_timeout_ms);
    int64_t best = -1;
    for (auto& [id, c] : conns_) {
      if (c->state == ConnState::kEstablished) continue;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(c->since + limit - now).count();
      left = std::max<int64_t>(left, 0);
      best = best < 0 ? left : std::min<int64_t>(best, left);
    }
    return best < 0 ? -1 : static_cast<int>(best) + 1;
  }

  void ExpireHandshakes() {
    auto now = std::chrono::steady_clock::now();
    auto limit = std::chrono::milliseconds(cfg_.connect_timeout_ms);
    for (auto it = conns_.begin(); it != conns_.end();) {
      Conn& c = *it->second;
      ++it;  // Close erases c
      if (c.state != ConnState::kEstablished && now - c.since >= limit) {
        // The guest may still answer the REQUEST: an RST makes it forget it.
        bool requested = c.state == ConnState::kAwaitResponse;
        Close(c, requested);
      }
    }
  }

  void Loop() {
    epoll_event events[64];
    while (!stop_) {
      int n = epoll_wait(epoll_fd_, events, 64, NextTimeoutMs());
      if (n < 0) {
        if (errno == EINTR) continue;
        return;
      }
      std::lock_guard<std::mutex> lock(mu_);
      ExpireHandshakes();
      for (int i = 0; i < n && !stop_; i++) {
        uint64_t token = events[i].data.u64;
        if (token == kTokenWake) {
          uint64_t v;
          (void)!read(wake_fd_, &v, sizeof v);
          continue;
        }
        if (token == kTokenListener) {
          AcceptClients();
          continue;
        }
        if (token & kTokenNotify) {
          uint16_t index = static_cast<uint16_t>(token & 0xffff);
          uint64_t v;
          (void)!read(notify_fds_[index], &v, sizeof v);
          NotifyLocked(index);
          continue;
        }
        auto it = conns_.find(token);
        if (it == conns_.end()) continue;  // closed by an earlier event in this batch
        Conn& c = *it->second;
        uint32_t ev = events[i].events;
        if (c.state == ConnState::kAwaitConnectLine) {
          ReadConnectLine(c);
          continue;
        }
        if (ev & EPOLLOUT) {
          WritePending(c);
          if (!conns_.count(token)) continue;
        }
        if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
          if (active_) DeliverData(c);
          else UpdateInterest(c);
        }
      }
      if (active_) {
        FlushControl();
        FinishSignals();
      }
    }
  }

  VsockConfig cfg_;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  int notify_fds_[2] = {-1, -1};  // RX, TX; closed with the device
  std::atomic<bool> stop_{false};
  std::thread thread_;

  std::mutex mu_;
  std::unique_lock<std::mutex> quiesce_;  // held by a snapshot between Quiesce and EndQuiesce
  std::atomic<bool> await_cid_read_{false};  // a transport reset was sent; the guest has not re-read its CID
  bool active_ = false;
  GuestMemory* mem_ = nullptr;
  Queue* rx_ = nullptr;
  Queue* tx_ = nullptr;
  Queue* event_ = nullptr;
  std::shared_ptr<InterruptSink> irq_;
  bool rx_used_ = false;
  // Scratch reused for every packet (guarded by mu_): no allocation per packet.
  DescriptorChain tx_chain_, rx_chain_;
  std::vector<iovec> iov_;
  // Guest -> host data of one connection gathered during one ProcessTx.
  struct TxBatch {
    Conn* conn = nullptr;
    std::vector<iovec> iov;
    size_t bytes = 0;
  } tx_batch_;
  std::vector<uint16_t> tx_done_;  // TX chains handled, returned after the batch is written
  std::map<uint64_t, std::unique_ptr<Conn>> conns_;
  std::unordered_map<uint64_t, uint64_t> by_key_;
  std::deque<Control> control_;
  uint64_t next_id_ = 2;
  uint32_t next_host_port_ = kFirstHostPort;
};

int Listen(const std::string& path) {
  const char* op = "create virtio-vsock host socket";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  // Guest-initiated connections go to `<path>_<port>`: leave room for the suffix.
  if (path.size() + 11 >= sizeof addr.sun_path)
    throw VmmError(ErrorKind::Device, op,
                   path + " is too long for a Unix socket with a _<port> suffix (at most " +
                       std::to_string(sizeof addr.sun_path - 12) + " bytes): choose a shorter vsock.udsPath");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    // A socket left by a VM that died is stale when nobody accepts on it.
    bool stale = false;
    if (S_ISSOCK(st.st_mode)) {
      int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      stale = probe >= 0 && connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 && errno == ECONNREFUSED;
      if (probe >= 0) close(probe);
    }
    if (!stale)
      throw VmmError(ErrorKind::Device, op, path + " already exists and is in use: choose another vsock.udsPath or stop its owner");
    unlink(path.c_str());
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw SysError(ErrorKind::Device, op, path);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const char* hint = errno == ENOENT ? ": its directory does not exist, create it first"
                       : errno == EACCES ? ": its directory is not writable by this user"
                                         : "";
    auto e = SysError(ErrorKind::Device, op, path + hint);
    close(fd);
    throw e;
  }
  if (listen(fd, 128) != 0) {
    auto e = SysError(ErrorKind::Device, op, path);
    close(fd);
    unlink(path.c_str());
    throw e;
  }
  return fd;
}

}  // namespace

bool VsockSendTransportReset(VirtioDevice& device) {
  auto* v = dynamic_cast<VirtioVsock*>(&device);
  if (!v)
    throw VmmError(ErrorKind::InvalidArgument, "send vsock transport reset",
                   "device " + std::to_string(device.device_id()) + " is not virtio-vsock");
  return v->SendTransportReset();
}

std::shared_ptr<VirtioDevice> MakeVirtioVsock(const VsockConfig& cfg) {
  if (cfg.guest_cid < 3 || cfg.guest_cid > 0xfffffffeull)
    throw VmmError(ErrorKind::Device, "configure virtio-vsock",
                   "guest CID " + std::to_string(cfg.guest_cid) + " is reserved or out of range: use 3 .. 4294967294");
  if (cfg.uds_path.empty())
    throw VmmError(ErrorKind::Device, "configure virtio-vsock", "no host socket path given: set vsock.udsPath");
  int fd = Listen(cfg.uds_path);
  try {
    return std::make_shared<VirtioVsock>(cfg, fd);
  } catch (...) {
    unlink(cfg.uds_path.c_str());
    throw;
  }
}

}  // namespace vmlet
