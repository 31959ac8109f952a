// virtio-vsock driven like a guest driver would, against real Unix sockets:
// connection set-up both ways, byte-exact streams, credit, shutdown and RST.
#include <dirent.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include "core/error.h"
#include "devices/vsock.h"
#include "virtio_test_driver.h"

using namespace vmlet;
using namespace vmlet::testing;
using vmlet::vsock::PacketHeader;

namespace {

constexpr uint64_t kGuestCid = 3;
constexpr uint64_t kRxRing = 0x10000, kTxRing = 0x14000, kEventRing = 0x18000;
constexpr uint64_t kRxBufs = 0x100000;
constexpr uint64_t kTxBufs = 0x800000;
constexpr uint32_t kRxBufSize = 44 + 4096;  // what Linux posts
constexpr uint16_t kRingSize = 64;
constexpr uint32_t kTxBufSize = 44 + 64 * 1024;

std::string TempSocketPath() {
  static int n = 0;
  return "/tmp/vmlet-vsock-" + std::to_string(getpid()) + "-" + std::to_string(n++);
}

int ListenUnix(const std::string& path) {
  unlink(path.c_str());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  EXPECT(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  EXPECT(listen(fd, 8) == 0);
  return fd;
}

int ConnectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  EXPECT(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

// Waits for fd to become readable; false on timeout.
bool WaitReadable(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, ms) == 1;
}

// Reads exactly n bytes (or until EOF/timeout) from a blocking socket.
std::vector<uint8_t> ReadN(int fd, size_t n, int timeout_ms = 5000) {
  std::vector<uint8_t> out;
  std::vector<uint8_t> buf(65536);
  while (out.size() < n) {
    if (!WaitReadable(fd, timeout_ms)) break;
    ssize_t r = read(fd, buf.data(), std::min(buf.size(), n - out.size()));
    if (r <= 0) break;
    out.insert(out.end(), buf.begin(), buf.begin() + r);
  }
  return out;
}

std::string ReadLine(int fd) {
  std::string s;
  char ch;
  while (WaitReadable(fd, 5000) && read(fd, &ch, 1) == 1 && ch != '\n') s += ch;
  return s;
}

std::vector<uint8_t> Pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 rng(seed);
  for (size_t i = 0; i < n; i += 4) {
    uint32_t x = rng();
    std::memcpy(&v[i], &x, std::min<size_t>(4, n - i));
  }
  return v;
}

struct Packet {
  PacketHeader h;
  std::vector<uint8_t> payload;
};

// The guest's side: rings, posted RX buffers, and a TX path.
struct Guest {
  std::string uds = TempSocketPath();
  GuestMemory mem{{{0, 32ull << 20}}};
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  std::shared_ptr<virtio::VirtioDevice> dev;
  std::unique_ptr<MmioTransport> transport;
  std::unique_ptr<MmioDriver> drv;
  RingDriver rx{mem, kRxRing, kRingSize}, tx{mem, kTxRing, kRingSize}, ev{mem, kEventRing, kRingSize};
  std::map<uint16_t, uint64_t> rx_addr;  // head -> buffer
  uint32_t next_rx_buf = 0, next_tx_buf = 0;

  // With a binder, notifies go through eventfds to the device's thread, as
  // with KVM_IOEVENTFD on a real VM, instead of the exit path.
  explicit Guest(uint32_t rx_buf_size = kRxBufSize, uint32_t connect_timeout_ms = 10000,
                 std::shared_ptr<EventFdBinder> notify_binder = nullptr)
      : binder(std::move(notify_binder)), rx_buf_size_(rx_buf_size) {
    dev = MakeVirtioVsock({kGuestCid, uds, connect_timeout_ms});
    transport = std::make_unique<MmioTransport>(dev, &mem, irq, binder);
    drv = std::make_unique<MmioDriver>(*transport);
    EXPECT(drv->Negotiate(virtio::kFeatureVersion1));
    EXPECT_EQ(drv->SetupQueue(0, rx), 1u);
    EXPECT_EQ(drv->SetupQueue(1, tx), 1u);
    EXPECT_EQ(drv->SetupQueue(2, ev), 1u);
    drv->DriverOk();
    for (int i = 0; i < kRingSize; i++) PostRx();
    Notify(0);
  }
  void Notify(uint32_t q) {
    if (binder) binder->Notify(*drv, q);
    else drv->Notify(q);
  }
  ~Guest() {
    dev->Shutdown();
    for (auto& p : extra_paths) unlink(p.c_str());
  }

  void PostRx() {
    uint64_t addr = kRxBufs + uint64_t(next_rx_buf++ % kRingSize) * 0x2000 * 4;
    uint16_t head = rx.Add({{addr, rx_buf_size_, true}});
    rx_addr[head] = addr;
  }

  PacketHeader Header(uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t len = 0, uint32_t flags = 0) {
    PacketHeader h{};
    h.src_cid = kGuestCid;
    h.dst_cid = vsock::kHostCid;
    h.src_port = src_port;
    h.dst_port = dst_port;
    h.len = len;
    h.type = vsock::kTypeStream;
    h.op = op;
    h.flags = flags;
    h.buf_alloc = buf_alloc;
    h.fwd_cnt = fwd_cnt;
    return h;
  }
  // Puts a packet in the TX ring without notifying (several then go with one
  // Kick()): header and payload as two descriptors, the way Linux 6.1 does.
  void Queue(const PacketHeader& h, const uint8_t* payload = nullptr, uint32_t payload_len = 0) {
    uint64_t addr = kTxBufs + uint64_t(next_tx_buf++ % 32) * 0x20000;
    EXPECT(mem.WriteObj(addr, h));
    std::vector<Buf> bufs{{addr, sizeof h, false}};
    if (payload_len) {
      EXPECT(mem.Write(addr + 0x1000, payload, payload_len));
      bufs.push_back({addr + 0x1000, payload_len, false});
    }
    tx.Add(bufs);
    tx_added++;
  }
  // One packet, notified at once.
  void Send(const PacketHeader& h, const uint8_t* payload = nullptr, uint32_t payload_len = 0) {
    Queue(h, payload, payload_len);
    Kick();
  }
  // Notifies TX; returns how many chains the device handed back.
  size_t Kick() {
    Notify(1);
    // The exit path parses TX before Notify returns; the device thread a moment later.
    for (int w = 0; binder && tx.UsedIdx() != tx_added && w < 100000; w++)
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    size_t n = 0;
    for (; tx.HasUsed(); n++) tx.PopUsed();
    return n;
  }
  std::optional<Packet> Recv(int timeout_ms = 2000) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!rx.HasUsed()) {
      if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    auto u = rx.PopUsed();
    uint64_t addr = rx_addr.at(static_cast<uint16_t>(u.id));
    Packet p;
    EXPECT(u.len >= sizeof(PacketHeader));
    EXPECT(mem.ReadObj(addr, &p.h));
    // The header's len and used.len must agree, and fit the posted buffer.
    EXPECT_EQ(u.len, sizeof(PacketHeader) + p.h.len);
    EXPECT(u.len <= rx_buf_size_);
    p.payload.resize(p.h.len);
    EXPECT(mem.Read(addr + sizeof(PacketHeader), p.payload.data(), p.h.len));
    EXPECT_EQ(p.h.src_cid, vsock::kHostCid);
    EXPECT_EQ(p.h.dst_cid, kGuestCid);
    PostRx();
    Notify(0);
    return p;
  }
  Packet Expect(uint16_t op) {
    auto p = Recv();
    EXPECT(p.has_value());
    if (p->h.op != op) {
      throw Failure("expected vsock op " + std::to_string(op) + ", got " + std::to_string(p->h.op));
    }
    return *p;
  }

  // A host listener on `<uds>_<port>`, where the device connects the guest's
  // streams to that port; its socket file goes with the Guest.
  int Listen(uint32_t port) {
    std::string path = uds + "_" + std::to_string(port);
    extra_paths.push_back(path);
    return ListenUnix(path);
  }

  std::shared_ptr<EventFdBinder> binder;
  uint16_t tx_added = 0;
  uint32_t buf_alloc = 256 * 1024;
  uint32_t fwd_cnt = 0;
  std::vector<std::string> extra_paths;
  uint32_t rx_buf_size_;
};

// Connects guest port 5000 to host port `port` whose listener the test owns.
int GuestConnect(Guest& g, int listener, uint32_t port, uint32_t guest_port = 5000) {
  g.Send(g.Header(guest_port, port, vsock::kOpRequest));
  auto resp = g.Expect(vsock::kOpResponse);
  EXPECT_EQ(resp.h.src_port, port);
  EXPECT_EQ(resp.h.dst_port, guest_port);
  EXPECT_EQ(resp.h.buf_alloc, vsock::kHostBufAlloc);
  EXPECT(WaitReadable(listener, 2000));
  int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  EXPECT(fd >= 0);
  return fd;
}

// Moves `out` from guest to host and `in` from host to guest at the same time,
// with the guest honouring the host's credit and granting its own.
void Stream(Guest& g, int host_fd, uint32_t gport, uint32_t hport, const std::vector<uint8_t>& out,
            const std::vector<uint8_t>& in, uint32_t chunk) {
  std::vector<uint8_t> host_got;
  std::thread host([&] {
    // The host writes `in` and reads `out` concurrently, through a blocking socket.
    std::thread writer([&] {
      size_t off = 0;
      while (off < in.size()) {
        ssize_t n = write(host_fd, in.data() + off, std::min<size_t>(in.size() - off, 100000));
        if (n <= 0) break;
        off += static_cast<size_t>(n);
      }
    });
    host_got = ReadN(host_fd, out.size());
    writer.join();
  });
  std::vector<uint8_t> guest_got;
  uint32_t host_buf_alloc = vsock::kHostBufAlloc, host_fwd_cnt = 0, tx_cnt = 0;
  uint32_t consumed_told = 0;
  size_t sent = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while ((sent < out.size() || guest_got.size() < in.size()) && std::chrono::steady_clock::now() < deadline) {
    // Send while the host's credit allows.
    while (sent < out.size()) {
      uint32_t credit = host_buf_alloc - (tx_cnt - host_fwd_cnt);
      uint32_t n = static_cast<uint32_t>(std::min<size_t>({out.size() - sent, size_t(chunk), size_t(credit)}));
      if (n == 0) break;
      g.Send(g.Header(gport, hport, vsock::kOpRw, n), out.data() + sent, n);
      sent += n;
      tx_cnt += n;
    }
    auto p = g.Recv(sent < out.size() ? 5 : 200);
    if (!p) continue;
    EXPECT_EQ(p->h.src_port, hport);
    EXPECT_EQ(p->h.dst_port, gport);
    host_buf_alloc = p->h.buf_alloc;
    host_fwd_cnt = p->h.fwd_cnt;
    if (p->h.op == vsock::kOpRw) {
      // Credit: the host may never have more in flight than we allowed.
      EXPECT(guest_got.size() + p->h.len - g.fwd_cnt <= g.buf_alloc);
      guest_got.insert(guest_got.end(), p->payload.begin(), p->payload.end());
      g.fwd_cnt = static_cast<uint32_t>(guest_got.size());  // the application read it at once
      if (g.fwd_cnt - consumed_told >= g.buf_alloc / 2) {
        g.Send(g.Header(gport, hport, vsock::kOpCreditUpdate));
        consumed_told = g.fwd_cnt;
      }
    } else if (p->h.op == vsock::kOpCreditRequest) {
      g.Send(g.Header(gport, hport, vsock::kOpCreditUpdate));
      consumed_told = g.fwd_cnt;
    } else {
      EXPECT_EQ(p->h.op, vsock::kOpCreditUpdate);
    }
  }
  host.join();
  EXPECT_EQ(host_got.size(), out.size());
  EXPECT(host_got == out);
  EXPECT_EQ(guest_got.size(), in.size());
  EXPECT(guest_got == in);
}

}  // namespace

TEST_CASE("vsock: config holds the guest CID, three queues, VERSION_1") {
  Guest g;
  EXPECT_EQ(g.drv->Read32(MmioTransport::kDeviceId), 19u);
  EXPECT_EQ(g.drv->Read32(0x100), kGuestCid);
  EXPECT_EQ(g.drv->Read32(0x104), 0u);
  EXPECT(g.drv->DeviceFeatures() & virtio::kFeatureVersion1);
  g.drv->Write32(MmioTransport::kQueueSel, 2);
  EXPECT_EQ(g.drv->Read32(MmioTransport::kQueueNumMax), vsock::kQueueSize);
}

TEST_CASE("vsock: guest connects to <uds>_<port>, data both ways byte-exact") {
  Guest g;
  int listener = g.Listen(1234);
  int host = GuestConnect(g, listener, 1234);
  Stream(g, host, 5000, 1234, Pattern(300 * 1024 + 17, 1), Pattern(500 * 1024 + 5, 2), 4096);
  close(host);
  close(listener);
}

TEST_CASE("vsock: 10 MiB each way through the rings") {
  Guest g;
  int listener = g.Listen(77);
  int host = GuestConnect(g, listener, 77);
  auto t0 = std::chrono::steady_clock::now();
  Stream(g, host, 5000, 77, Pattern(10 << 20, 3), Pattern(10 << 20, 4), 64 * 1024);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "vsock device test: 20 MiB moved in %.3f s (%.0f MiB/s, test-driver bound)\n", s, 20 / s);
  close(host);
  close(listener);
}

TEST_CASE("vsock: the host never sends past the guest's buf_alloc") {
  Guest g;
  g.buf_alloc = 10000;
  int listener = g.Listen(9);
  int host = GuestConnect(g, listener, 9);
  auto data = Pattern(50000, 9);
  EXPECT(write(host, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
  std::vector<uint8_t> got;
  bool asked = false;
  for (;;) {
    auto p = g.Recv(300);
    if (!p) break;
    if (p->h.op == vsock::kOpCreditRequest) {
      asked = true;
      continue;
    }
    EXPECT_EQ(p->h.op, vsock::kOpRw);
    got.insert(got.end(), p->payload.begin(), p->payload.end());
  }
  // Exactly the credit, no more, and the host asked for more.
  EXPECT_EQ(got.size(), 10000u);
  EXPECT(asked);
  // Granting credit (the application read 10000 bytes) lets the rest flow.
  g.fwd_cnt = 10000;
  g.buf_alloc = 1 << 20;
  g.Send(g.Header(5000, 9, vsock::kOpCreditUpdate));
  while (got.size() < data.size()) {
    auto p = g.Recv();
    EXPECT(p.has_value());
    if (p->h.op == vsock::kOpRw) got.insert(got.end(), p->payload.begin(), p->payload.end());
  }
  EXPECT(got == data);
  close(host);
  close(listener);
}

TEST_CASE("vsock: a payload never exceeds the RX buffer the guest posted") {
  Guest g(44 + 1000);  // small RX buffers
  int listener = g.Listen(10);
  int host = GuestConnect(g, listener, 10);
  auto data = Pattern(20000, 10);
  EXPECT(write(host, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
  std::vector<uint8_t> got;
  while (got.size() < data.size()) {
    auto p = g.Recv();  // Recv checks used.len <= buffer size
    EXPECT(p.has_value());
    EXPECT(p->h.len <= 1000);
    got.insert(got.end(), p->payload.begin(), p->payload.end());
  }
  EXPECT(got == data);
  close(host);
  close(listener);
}

TEST_CASE("vsock: host-initiated CONNECT <port>, OK <host_port>, data both ways") {
  Guest g;
  int client = ConnectUnix(g.uds);
  const char line[] = "CONNECT 52\n";
  EXPECT(write(client, line, sizeof line - 1) == static_cast<ssize_t>(sizeof line - 1));
  auto req = g.Expect(vsock::kOpRequest);
  EXPECT_EQ(req.h.dst_port, 52u);
  EXPECT(req.h.src_port >= (1u << 30));
  EXPECT_EQ(req.h.buf_alloc, vsock::kHostBufAlloc);
  uint32_t hport = req.h.src_port;
  g.Send(g.Header(52, hport, vsock::kOpResponse));
  EXPECT(ReadLine(client) == "OK " + std::to_string(hport));
  Stream(g, client, 52, hport, Pattern(70000, 5), Pattern(90000, 6), 4096);
  close(client);
}

TEST_CASE("vsock: CONNECT refused by the guest (RST) closes the client") {
  Guest g;
  int client = ConnectUnix(g.uds);
  EXPECT(write(client, "CONNECT 53\n", 11) == 11);
  auto req = g.Expect(vsock::kOpRequest);
  g.Send(g.Header(53, req.h.src_port, vsock::kOpRst));
  char b;
  EXPECT(WaitReadable(client, 2000));
  EXPECT_EQ(read(client, &b, 1), 0);
  close(client);
}

TEST_CASE("vsock: a malformed CONNECT line is answered and closed") {
  Guest g;
  int client = ConnectUnix(g.uds);
  EXPECT(write(client, "HELLO 1\n", 8) == 8);
  std::string reply = ReadLine(client);
  EXPECT(reply.rfind("ERR", 0) == 0);
  EXPECT(!g.Recv(100).has_value());  // the guest heard nothing
  close(client);
}

TEST_CASE("vsock: RST for a port with no listener and for unknown connections") {
  Guest g;
  g.Send(g.Header(6000, 4242, vsock::kOpRequest));  // nobody listens on <uds>_4242
  auto rst = g.Expect(vsock::kOpRst);
  EXPECT_EQ(rst.h.src_port, 4242u);
  EXPECT_EQ(rst.h.dst_port, 6000u);
  uint8_t data[10] = {};
  g.Send(g.Header(6001, 4243, vsock::kOpRw, 10), data, 10);  // no such connection
  rst = g.Expect(vsock::kOpRst);
  EXPECT_EQ(rst.h.dst_port, 6001u);
  g.Send(g.Header(6002, 4244, vsock::kOpRst));  // an RST is never answered
  EXPECT(!g.Recv(100).has_value());
}

TEST_CASE("vsock: oversized packet length (hdr.len beyond the buffer) resets the connection") {
  Guest g;
  int listener = g.Listen(11);
  int host = GuestConnect(g, listener, 11);
  uint8_t data[100];
  std::memset(data, 'x', sizeof data);
  g.Send(g.Header(5000, 11, vsock::kOpRw, 5000), data, sizeof data);  // claims 5000, carries 100
  g.Expect(vsock::kOpRst);
  char b;
  EXPECT(WaitReadable(host, 2000));
  EXPECT_EQ(read(host, &b, 1), 0);  // nothing of the bad packet reached the host
  close(host);
  close(listener);
}

TEST_CASE("vsock: a guest sending past the host's buf_alloc is reset") {
  Guest g;
  int listener = g.Listen(12);
  int host = GuestConnect(g, listener, 12);
  // The host application never reads: the socket buffer fills, then our
  // buffer, then the guest oversteps the credit.
  auto chunk = Pattern(64 * 1024, 12);
  bool reset = false;
  for (int i = 0; i < 200 && !reset; i++) {
    g.Send(g.Header(5000, 12, vsock::kOpRw, static_cast<uint32_t>(chunk.size())), chunk.data(),
           static_cast<uint32_t>(chunk.size()));
    while (auto p = g.Recv(5)) reset |= p->h.op == vsock::kOpRst;
  }
  EXPECT(reset);
  close(host);
  close(listener);
}

TEST_CASE("vsock: shutdown both ways: host EOF once, guest close answered with RST") {
  Guest g;
  int listener = g.Listen(13);
  int host = GuestConnect(g, listener, 13);
  EXPECT(write(host, "bye", 3) == 3);
  shutdown(host, SHUT_WR);
  auto rw = g.Expect(vsock::kOpRw);
  EXPECT(rw.payload == std::vector<uint8_t>({'b', 'y', 'e'}));
  auto sd = g.Expect(vsock::kOpShutdown);
  EXPECT_EQ(sd.h.flags, vsock::kShutdownSend);
  EXPECT(!g.Recv(100).has_value());  // EOF is reported once
  // The guest can still send after the host's half-close.
  g.Send(g.Header(5000, 13, vsock::kOpRw, 2), reinterpret_cast<const uint8_t*>("ok"), 2);
  EXPECT(ReadN(host, 2) == std::vector<uint8_t>({'o', 'k'}));
  // Linux's close(): SHUTDOWN(RCV|SEND), then it waits for our RST.
  g.Send(g.Header(5000, 13, vsock::kOpShutdown, 0, vsock::kShutdownRcv | vsock::kShutdownSend));
  g.Expect(vsock::kOpRst);
  char b;
  EXPECT(WaitReadable(host, 2000));
  EXPECT_EQ(read(host, &b, 1), 0);
  close(host);
  close(listener);
}

// Data packets queued before one notify go to the host socket in one write
// (the device gathers them); their order, the bytes a full socket could not
// take (kept by the device, then written on EPOLLOUT), and a SHUTDOWN queued
// right behind them (EOF only after every byte, then the RST) all hold.
TEST_CASE("vsock: packets of one notify: one ordered write, a full host socket, SHUTDOWN behind the data") {
  Guest g;
  int listener = g.Listen(21);
  int host = GuestConnect(g, listener, 21);
  // More than the host socket holds (its send buffer is raised to a few MiB at most).
  const std::vector<uint8_t> out = Pattern(12 << 20, 21);
  std::vector<uint8_t> got;
  std::thread reader([&] {
    // Late, so the socket fills and the device has to keep what it cannot write.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    got = ReadN(host, out.size() + 1, 20000);  // one more: stops at EOF
  });
  uint32_t host_fwd = 0, tx_cnt = 0;
  size_t sent = 0;
  constexpr uint32_t kChunk = 60 * 1024;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (sent < out.size() && std::chrono::steady_clock::now() < deadline) {
    size_t queued = 0;
    for (int i = 0; i < 8 && sent < out.size(); i++) {
      uint32_t credit = vsock::kHostBufAlloc - (tx_cnt - host_fwd);
      uint32_t n = static_cast<uint32_t>(std::min<size_t>({out.size() - sent, size_t(kChunk), size_t(credit)}));
      if (n == 0) break;
      g.Queue(g.Header(5000, 21, vsock::kOpRw, n), out.data() + sent, n);
      sent += n;
      tx_cnt += n;
      queued++;
    }
    // The last data packets and the close go in the same notify.
    if (sent == out.size()) {
      g.Queue(g.Header(5000, 21, vsock::kOpShutdown, 0, vsock::kShutdownRcv | vsock::kShutdownSend));
      queued++;
    }
    // Every chain comes back within its notify, written or kept by the device.
    if (queued) EXPECT_EQ(g.Kick(), queued);
    if (sent == out.size()) break;
    auto p = g.Recv(5000);
    EXPECT(p.has_value());
    EXPECT_EQ(p->h.op, vsock::kOpCreditUpdate);
    host_fwd = p->h.fwd_cnt;
  }
  EXPECT_EQ(sent, out.size());
  // Credit updates may still arrive while the socket drains; then the RST.
  for (;;) {
    auto p = g.Recv(10000);
    EXPECT(p.has_value());
    if (p->h.op == vsock::kOpRst) break;
    EXPECT_EQ(p->h.op, vsock::kOpCreditUpdate);
  }
  reader.join();
  EXPECT_EQ(got.size(), out.size());  // then EOF: nothing after the data
  EXPECT(got == out);
  close(host);
  close(listener);
}

TEST_CASE("vsock: bad configuration is a DeviceError that says what to do") {
  EXPECT_THROWS(MakeVirtioVsock({2, TempSocketPath()}));  // CID 2 is the host
  EXPECT_THROWS(MakeVirtioVsock({3, ""}));
  EXPECT_THROWS(MakeVirtioVsock({3, "/nonexistent-dir/vsock.sock"}));
  EXPECT_THROWS(MakeVirtioVsock({3, "/tmp/" + std::string(120, 'x')}));
  std::string path = TempSocketPath();
  auto first = MakeVirtioVsock({3, path});
  try {
    MakeVirtioVsock({4, path});  // live listener: in use
    EXPECT(false);
  } catch (const VmmError& e) {
    EXPECT(e.kind() == ErrorKind::Device);
    EXPECT(std::string(e.what()).find("in use") != std::string::npos);
  }
  first->Shutdown();
  EXPECT(access(path.c_str(), F_OK) != 0);  // the listener is removed on shutdown
}

TEST_CASE("vsock: shutdown joins the event thread with connections open") {
  auto g = std::make_unique<Guest>();
  std::string path = g->uds + "_14";
  int listener = ListenUnix(path);
  int host = GuestConnect(*g, listener, 14);
  int client = ConnectUnix(g->uds);
  g->dev->Shutdown();
  g->dev->Shutdown();  // idempotent
  char b;
  EXPECT(WaitReadable(host, 2000));
  EXPECT_EQ(read(host, &b, 1), 0);
  close(host);
  close(client);
  close(listener);
  unlink(path.c_str());
}

TEST_CASE("vsock: transport reset event drops connections and reaches the event queue") {
  Guest g;
  int listener = g.Listen(15);
  int host = GuestConnect(g, listener, 15);
  EXPECT(!VsockSendTransportReset(*g.dev));  // no event buffer posted yet
  EXPECT(g.mem.WriteObj<uint32_t>(0x20000, 0xffffffff));
  g.ev.Add({{0x20000, 8, true}});
  g.drv->Notify(2);
  EXPECT(VsockSendTransportReset(*g.dev));
  auto u = g.ev.PopUsed();
  EXPECT_EQ(u.len, 4u);
  uint32_t id = 1;
  EXPECT(g.mem.ReadObj(0x20000, &id));
  EXPECT_EQ(id, vsock::kEventTransportReset);
  char b;
  EXPECT(WaitReadable(host, 2000));
  EXPECT_EQ(read(host, &b, 1), 0);  // the host side of the connection is gone
  close(host);
  close(listener);
}

TEST_CASE("vsock: after a transport reset, nothing reaches the guest until it has re-read its CID") {
  Guest g;
  g.ev.Add({{0x20000, 8, true}});
  g.drv->Notify(2);
  EXPECT(VsockSendTransportReset(*g.dev));
  int client = ConnectUnix(g.uds);
  EXPECT(write(client, "CONNECT 61\n", 11) == 11);
  // A guest that has not handled the event yet would answer from its old CID.
  EXPECT(!g.Recv(300).has_value());
  uint8_t cid[8];
  g.transport->Read(MmioTransport::kConfig, cid, 4);  // what Linux's event handler does first
  auto req = g.Expect(vsock::kOpRequest);
  EXPECT_EQ(req.h.dst_port, 61u);
  close(client);
}

TEST_CASE("vsock: a host client the guest never answers, or that never sends CONNECT, is closed in time") {
  Guest g(kRxBufSize, 300);
  int silent = ConnectUnix(g.uds);  // never writes its CONNECT line
  int client = ConnectUnix(g.uds);
  EXPECT(write(client, "CONNECT 60\n", 11) == 11);
  auto req = g.Expect(vsock::kOpRequest);  // ... and the guest never answers it
  auto t0 = std::chrono::steady_clock::now();
  char b;
  EXPECT(WaitReadable(client, 3000));
  EXPECT_EQ(read(client, &b, 1), 0);
  EXPECT(WaitReadable(silent, 3000));
  EXPECT_EQ(read(silent, &b, 1), 0);
  EXPECT(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3));
  // The guest is told to forget the REQUEST it did not answer.
  auto rst = g.Expect(vsock::kOpRst);
  EXPECT_EQ(rst.h.src_port, req.h.src_port);
  EXPECT_EQ(rst.h.dst_port, 60u);
  close(client);
  close(silent);
}

TEST_CASE("vsock: hostile TX: short header, foreign CID and over-cap payload dropped; a broken ring stops the device") {
  Guest g;
  int listener = g.Listen(16);
  // A TX packet shorter than its header is dropped without reply.
  g.tx.Add({{kTxBufs, 20, false}});
  g.drv->Notify(1);
  EXPECT_EQ(g.tx.PopUsed().len, 0u);
  EXPECT(!g.Recv(100).has_value());
  // A TX header claiming a foreign source CID is dropped too.
  PacketHeader h = g.Header(5000, 16, vsock::kOpRequest);
  h.src_cid = 99;
  g.Send(h);
  EXPECT(!g.Recv(100).has_value());
  EXPECT(!WaitReadable(listener, 50));  // and no host connection was made
  // A TX payload of 64 KiB + 1 is over the packet cap: the chain is refused.
  std::vector<uint8_t> big(vsock::kMaxPayload + 1, 1);
  g.Send(g.Header(5000, 16, vsock::kOpRw, static_cast<uint32_t>(big.size())), big.data(), static_cast<uint32_t>(big.size()));
  EXPECT(!g.Recv(100).has_value());  // nothing of ours to reset: dropped
  int host = GuestConnect(g, listener, 16);
  // The connection still works after all that.
  EXPECT(write(host, "x", 1) == 1);
  auto p = g.Expect(vsock::kOpRw);
  EXPECT(p.payload == std::vector<uint8_t>({'x'}));
  // avail.idx jumping past the queue size breaks the TX ring: NEEDS_RESET.
  g.tx.SetAvailIdx(static_cast<uint16_t>(g.tx.UsedIdx() + kRingSize + 1));
  g.drv->Notify(1);
  EXPECT(g.drv->Status() & virtio::kStatusDeviceNeedsReset);
  close(host);
  close(listener);
}

TEST_CASE("vsock: RX buffers too small for a header are returned empty") {
  GuestMemory mem({{0, 8ull << 20}});
  auto irq = std::make_shared<CountingIrq>();
  std::string uds = TempSocketPath();
  auto dev = MakeVirtioVsock({kGuestCid, uds});
  MmioTransport t(dev, &mem, irq);
  MmioDriver drv(t);
  RingDriver rx(mem, kRxRing, 8), tx(mem, kTxRing, 8), ev(mem, kEventRing, 8);
  EXPECT(drv.Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(drv.SetupQueue(0, rx), 1u);
  EXPECT_EQ(drv.SetupQueue(1, tx), 1u);
  EXPECT_EQ(drv.SetupQueue(2, ev), 1u);
  drv.DriverOk();
  rx.Add({{0x100000, 16, true}});            // smaller than a header
  rx.Add({{0x101000, 44 + 100, false}});     // device-readable: wrong direction
  rx.Add({{0x102000, 44 + 4096, true}});     // a good one
  drv.Notify(0);
  // A REQUEST to a port nobody listens on makes the device send an RST.
  PacketHeader h{};
  h.src_cid = kGuestCid;
  h.dst_cid = vsock::kHostCid;
  h.src_port = 7;
  h.dst_port = 8;
  h.type = vsock::kTypeStream;
  h.op = vsock::kOpRequest;
  EXPECT(mem.WriteObj(0x200000, h));
  tx.Add({{0x200000, sizeof h, false}});
  drv.Notify(1);
  auto a = rx.PopUsed();
  auto b = rx.PopUsed();
  auto c = rx.PopUsed();
  EXPECT_EQ(a.len, 0u);
  EXPECT_EQ(b.len, 0u);
  EXPECT_EQ(c.len, sizeof(PacketHeader));
  PacketHeader got;
  EXPECT(mem.ReadObj(0x102000, &got));
  EXPECT_EQ(got.op, vsock::kOpRst);
  dev->Shutdown();
}

TEST_CASE("vsock: a driver reset drops host connections; the device works again after re-initialisation") {
  Guest g;
  int listener = g.Listen(17);
  int host = GuestConnect(g, listener, 17);
  g.drv->Write32(MmioTransport::kStatus, 0);
  char b;
  EXPECT(WaitReadable(host, 2000));
  EXPECT_EQ(read(host, &b, 1), 0);
  close(host);
  // Fresh rings, as a driver probing again would set up.
  RingDriver rx(g.mem, 0x40000, kRingSize), tx(g.mem, 0x44000, kRingSize), ev(g.mem, 0x48000, kRingSize);
  EXPECT(g.drv->Negotiate(virtio::kFeatureVersion1));
  EXPECT_EQ(g.drv->SetupQueue(0, rx), 1u);
  EXPECT_EQ(g.drv->SetupQueue(1, tx), 1u);
  EXPECT_EQ(g.drv->SetupQueue(2, ev), 1u);
  g.drv->DriverOk();
  rx.Add({{kRxBufs, kRxBufSize, true}});
  g.drv->Notify(0);
  PacketHeader h = g.Header(5001, 17, vsock::kOpRequest);
  EXPECT(g.mem.WriteObj(kTxBufs, h));
  tx.Add({{kTxBufs, sizeof h, false}});
  g.drv->Notify(1);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (!rx.HasUsed() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto u = rx.PopUsed();
  EXPECT_EQ(u.len, sizeof(PacketHeader));
  PacketHeader got;
  EXPECT(g.mem.ReadObj(kRxBufs, &got));
  EXPECT_EQ(got.op, vsock::kOpResponse);
  EXPECT(WaitReadable(listener, 2000));
  int again = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  EXPECT(again >= 0);
  close(again);
  close(listener);
}

TEST_CASE("vsock: random TX packets never crash or hang the device") {
  Guest g;
  int listener = g.Listen(18);
  int host = GuestConnect(g, listener, 18);
  std::mt19937_64 rng(7);
  std::vector<uint8_t> payload(8192, 0x42);
  for (int i = 0; i < 3000; i++) {
    PacketHeader h = g.Header(rng() % 3 == 0 ? 5000 : static_cast<uint32_t>(rng() % 8), rng() % 3 == 0 ? 18 : static_cast<uint32_t>(rng() % 8),
                              static_cast<uint16_t>(rng() % 9), static_cast<uint32_t>(rng() % 3 == 0 ? rng() : rng() % 9000),
                              static_cast<uint32_t>(rng() % 4));
    if (rng() % 4 == 0) h.type = static_cast<uint16_t>(rng());
    if (rng() % 8 == 0) h.buf_alloc = static_cast<uint32_t>(rng());
    if (rng() % 8 == 0) h.fwd_cnt = static_cast<uint32_t>(rng());
    uint32_t len = static_cast<uint32_t>(rng() % payload.size());
    g.Send(h, payload.data(), len);
    while (g.Recv(0)) {
    }
  }
  // Whatever happened to it, the device still answers a fresh REQUEST.
  while (g.Recv(50)) {
  }
  g.Send(g.Header(6123, 4242, vsock::kOpRequest));  // no listener: RST
  bool rst = false;
  while (auto p = g.Recv(500)) rst |= p->h.op == vsock::kOpRst && p->h.dst_port == 6123;
  EXPECT(rst);
  close(host);
  close(listener);
}

TEST_CASE("vsock: devices created and shut down leave no fds, threads or socket files behind") {
  int fds = CountEntries("/proc/self/fd"), threads = CountEntries("/proc/self/task");
  for (int i = 0; i < 30; i++) {
    // Every other one with its kicks bound to eventfds (closed with the device).
    Guest g(kRxBufSize, 10000, i % 2 ? std::make_shared<EventFdBinder>() : nullptr);
    int listener = g.Listen(19);
    int host = GuestConnect(g, listener, 19);
    int client = ConnectUnix(g.uds);  // a host client mid-handshake
    close(host);
    close(client);
    close(listener);
    EXPECT(access(g.uds.c_str(), F_OK) == 0);
    g.dev->Shutdown();
    EXPECT(access(g.uds.c_str(), F_OK) != 0);
  }
  EXPECT_EQ(CountEntries("/proc/self/fd"), fds);
  EXPECT_EQ(CountEntries("/proc/self/task"), threads);
}

TEST_CASE("vsock: RX/TX kicks through eventfds (KVM_IOEVENTFD) to the device thread: 4 MiB each way byte-exact; a reset unbinds") {
  auto binder = std::make_shared<EventFdBinder>();
  {
    Guest g(kRxBufSize, 10000, binder);
    EXPECT_EQ(g.transport->bound_notifiers(), 2u);
    // The event queue keeps the exit path: its kicks only post buffers.
    EXPECT(binder->bound.count(0) && binder->bound.count(1) && !binder->bound.count(2));
    int listener = g.Listen(88);
    int host = GuestConnect(g, listener, 88);
    Stream(g, host, 5000, 88, Pattern(4 << 20, 5), Pattern((4 << 20) + 3, 6), 64 * 1024);
    close(host);
    close(listener);
    // Idle again, the driver may notify: the device left NO_NOTIFY clear.
    EXPECT_EQ(g.tx.UsedFlags(), 0u);
    g.drv->Write32(MmioTransport::kStatus, 0);
    EXPECT_EQ(g.transport->bound_notifiers(), 0u);
    EXPECT_EQ(binder->unbinds, 2);
  }
  EXPECT(binder->bound.empty());
}

TEST_CASE("vsock: a host that refuses KVM_IOEVENTFD leaves every kick on the exit path; streams stay byte-exact") {
  auto binder = std::make_shared<EventFdBinder>();
  binder->refuse = true;
  Guest g(kRxBufSize, 10000, binder);
  EXPECT_EQ(g.transport->bound_notifiers(), 0u);
  int listener = g.Listen(89);
  int host = GuestConnect(g, listener, 89);
  Stream(g, host, 5000, 89, Pattern(1 << 20, 7), Pattern(1 << 20, 8), 64 * 1024);
  close(host);
  close(listener);
}

// A guest kick KVM has put in the eventfd, not yet served by the device
// thread when a snapshot quiesces the device, must not stay in the saved
// rings: the vCPU that wrote it has moved on and will not repeat it. The
// thread usually loses the race for the lock to QuiesceForSnapshot here,
// which is the case that needs the quiesce to serve it.
TEST_CASE("vsock: a kick waiting in its eventfd is served before QuiesceForSnapshot returns") {
  auto binder = std::make_shared<EventFdBinder>();
  Guest g(kRxBufSize, 10000, binder);
  int listener = g.Listen(90);
  int host = GuestConnect(g, listener, 90);
  const std::vector<uint8_t> out = Pattern(200 * 1000, 9);
  std::vector<uint8_t> got;
  std::thread reader([&] { got = ReadN(host, out.size(), 20000); });
  constexpr uint32_t kChunk = 1000;
  for (size_t sent = 0; sent < out.size(); sent += kChunk) {
    g.Queue(g.Header(5000, 90, vsock::kOpRw, kChunk), out.data() + sent, kChunk);
    EXPECT(binder->Notify(*g.drv, 1));
    {
      Quiesced q(*g.dev);
      // What a snapshot saves now: the packet consumed and handed back.
      EXPECT_EQ(g.tx.UsedIdx(), g.tx_added);
    }
    while (g.tx.HasUsed()) g.tx.PopUsed();
    // Credit updates (200 kB stays under the host's buf_alloc): posted back.
    while (g.Recv(0)) {
    }
  }
  reader.join();
  EXPECT(got == out);
  close(host);
  close(listener);
}

// The device thread may already have read a kick's count from the eventfd and
// be waiting for the device lock when a snapshot quiesces the device. The
// eventfd is then empty, yet the packet is in the ring: the quiesce serves the
// rings whatever the eventfd holds (a packet queued without a kick stands in
// for that count here).
TEST_CASE("vsock: QuiesceForSnapshot serves a packet whose kick the device thread already took") {
  auto binder = std::make_shared<EventFdBinder>();
  Guest g(kRxBufSize, 10000, binder);
  int listener = g.Listen(91);
  int host = GuestConnect(g, listener, 91);
  const std::vector<uint8_t> out = Pattern(3000, 4);
  g.Queue(g.Header(5000, 91, vsock::kOpRw, static_cast<uint32_t>(out.size())), out.data(), static_cast<uint32_t>(out.size()));
  {
    Quiesced q(*g.dev);
    EXPECT_EQ(g.tx.UsedIdx(), g.tx_added);
  }
  EXPECT(ReadN(host, out.size(), 2000) == out);
  close(host);
  close(listener);
}

// The device sets VIRTQ_USED_F_NO_NOTIFY while its thread drains TX; a driver
// honouring it leaves kicks out, and the device must still take every packet
// so left out (the narrow window after the last pop, where only the re-check
// finds it, is pinned by the virtio_queue NO_NOTIFY case). The driver only
// sees the flag while the device thread is in a pass, so the two run on
// different CPUs (the device thread inherits the affinity of the thread that
// makes it), and the stream is repeated until the driver did see it.
TEST_CASE("vsock: a driver that leaves out kicks while the device set NO_NOTIFY loses no packet") {
  cpu_set_t all;
  EXPECT(sched_getaffinity(0, sizeof all, &all) == 0);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; c++)
    if (CPU_ISSET(c, &all)) cpus.push_back(c);
  auto pin = [](int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    EXPECT(pthread_setaffinity_np(pthread_self(), sizeof one, &one) == 0);
  };
  struct Unpin {
    cpu_set_t all;
    ~Unpin() { pthread_setaffinity_np(pthread_self(), sizeof all, &all); }
  } unpin{all};
  if (cpus.size() >= 2) pin(cpus[0]);
  auto binder = std::make_shared<EventFdBinder>();
  Guest g(kRxBufSize, 10000, binder);
  if (cpus.size() >= 2) pin(cpus[1]);
  constexpr uint32_t kChunk = 4096;
  // Two descriptors per packet in a ring of 64, and 32 TX buffer slots.
  constexpr int kMaxInFlight = kRingSize / 2;
  int kicks = 0, left_out = 0, rounds = 0;
  for (; rounds < 8 && left_out == 0; rounds++) {
    uint32_t port = 91 + static_cast<uint32_t>(rounds);
    int listener = g.Listen(port);
    int host = GuestConnect(g, listener, port, 5000 + static_cast<uint32_t>(rounds));
    const std::vector<uint8_t> out = Pattern(4 << 20, 10 + static_cast<uint32_t>(rounds));
    std::vector<uint8_t> got;
    std::thread reader([&] {
      pthread_setaffinity_np(pthread_self(), sizeof all, &all);
      got = ReadN(host, out.size(), 30000);
    });
    uint32_t peer_buf_alloc = vsock::kHostBufAlloc, peer_fwd = 0, tx_cnt = 0;
    size_t sent = 0;
    int in_flight = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (sent < out.size() && std::chrono::steady_clock::now() < deadline) {
      while (g.tx.HasUsed()) {
        g.tx.PopUsed();
        in_flight--;
      }
      while (auto p = g.Recv(0)) {
        peer_buf_alloc = p->h.buf_alloc;
        peer_fwd = p->h.fwd_cnt;
      }
      uint32_t credit = peer_buf_alloc - (tx_cnt - peer_fwd);
      uint32_t n = static_cast<uint32_t>(std::min<size_t>({out.size() - sent, size_t(kChunk), size_t(credit)}));
      if (n == 0 || in_flight >= kMaxInFlight) {
        std::this_thread::yield();
        continue;
      }
      g.Queue(g.Header(5000 + static_cast<uint32_t>(rounds), port, vsock::kOpRw, n), out.data() + sent, n);
      sent += n;
      tx_cnt += n;
      in_flight++;
      // virtio 2.7.13.3: the avail index before the flags are read.
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (g.tx.UsedFlags() & 1) {
        left_out++;
        // No kick will follow: the pass that set the flag must take this
        // packet, or its re-check after clearing the flag must.
        auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
        while (g.tx.UsedIdx() != g.tx_added && std::chrono::steady_clock::now() < until) std::this_thread::yield();
        EXPECT_EQ(g.tx.UsedIdx(), g.tx_added);
      } else {
        binder->Notify(*g.drv, 1);
        kicks++;
      }
    }
    reader.join();
    EXPECT_EQ(sent, out.size());
    EXPECT(got == out);
    // Closed before the next round, whose handshake must not meet its SHUTDOWN.
    g.Send(g.Header(5000 + static_cast<uint32_t>(rounds), port, vsock::kOpRst));
    close(host);
    close(listener);
    while (g.Recv(50)) {
    }
  }
  std::printf("NO_NOTIFY streams: %d rounds of 4 MiB, %d kicks, %d left out\n", rounds, kicks, left_out);
  if (cpus.size() >= 2) {
    EXPECT(left_out > 0);
  } else {
    std::printf("NOT CHECKED: one CPU only, the driver cannot run during a device pass; only byte-exactness was checked\n");
  }
  EXPECT_EQ(g.tx.UsedFlags(), 0u);
}
