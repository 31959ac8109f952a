// virtio-vsock (virtio 1.x section 5.10), host side in the Firecracker
// "hybrid" model (DESIGN.md "Guest <-> host"):
//  - the guest connects to port P  -> we connect to the Unix socket `<uds_path>_P`;
//  - a host client connects to `<uds_path>` and writes `CONNECT <port>\n`
//    -> we send OP_REQUEST to guest port <port>; on OP_RESPONSE the client
//    reads `OK <host_port>\n` and the stream follows; on OP_RST it is closed.
// One epoll thread per device moves host-socket bytes and serves the guest's
// RX/TX kicks when the transport binds them to its eventfds (KVM_IOEVENTFD);
// otherwise guest TX is handled on the vCPU thread that notifies. Shutdown()
// joins the thread.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "virtio/device.h"

namespace vmlet {

struct VsockConfig {
  uint64_t guest_cid;    // >= 3 (0-2 are reserved: hypervisor, local, host)
  std::string uds_path;  // the host listener; `<uds_path>_<port>` for guest-initiated connections
  // A host client that sends no `CONNECT` line, or whose REQUEST the guest
  // neither accepts nor refuses, is closed after this long.
  uint32_t connect_timeout_ms = 10000;
};

// Creates the listening socket now (a bad path is reported at VM creation)
// and starts the device's event-loop thread. Throws VmmError(Device).
std::shared_ptr<virtio::VirtioDevice> MakeVirtioVsock(const VsockConfig& config);

// After a snapshot restore the guest's connections refer to host sockets that
// no longer exist: drops every connection and puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
// in the event queue, after which the guest driver resets its sockets and
// re-reads the CID. false when `device` is not live vsock or the guest has
// posted no event buffer. Throws VmmError(InvalidArgument) for another device type.
bool VsockSendTransportReset(virtio::VirtioDevice& device);

namespace vsock {
// Wire constants, shared with the tests (virtio 1.x 5.10.6).
inline constexpr uint32_t kDeviceId = 19;
inline constexpr uint64_t kHostCid = 2;
inline constexpr uint16_t kTypeStream = 1;
inline constexpr uint16_t kOpRequest = 1;
inline constexpr uint16_t kOpResponse = 2;
inline constexpr uint16_t kOpRst = 3;
inline constexpr uint16_t kOpShutdown = 4;
inline constexpr uint16_t kOpRw = 5;
inline constexpr uint16_t kOpCreditUpdate = 6;
inline constexpr uint16_t kOpCreditRequest = 7;
inline constexpr uint32_t kShutdownRcv = 1;   // the sender will receive no more
inline constexpr uint32_t kShutdownSend = 2;  // the sender will send no more
inline constexpr uint32_t kEventTransportReset = 0;
inline constexpr uint16_t kRxQueue = 0, kTxQueue = 1, kEventQueue = 2;
inline constexpr uint16_t kQueueSize = 256;
// Our receive buffer per connection, advertised as buf_alloc.
inline constexpr uint32_t kHostBufAlloc = 256 * 1024;
// SO_SNDBUF asked for on each host socket (the kernel doubles it for its
// bookkeeping and caps it at net.core.wmem_max without CAP_NET_ADMIN).
inline constexpr uint32_t kHostSocketSendBuf = 1024 * 1024;
// Largest payload we accept from or send to the guest in one packet
// (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). Toward the guest we also never
// exceed the RX buffer it posted: Linux sizes its receive skb by hdr.len and
// would overrun (skb_over_panic) on a payload larger than its buffer.
inline constexpr uint32_t kMaxPayload = 64 * 1024;

struct __attribute__((packed)) PacketHeader {
  uint64_t src_cid;
  uint64_t dst_cid;
  uint32_t src_port;
  uint32_t dst_port;
  uint32_t len;
  uint16_t type;
  uint16_t op;
  uint32_t flags;
  uint32_t buf_alloc;
  uint32_t fwd_cnt;
};
static_assert(sizeof(PacketHeader) == 44);
}  // namespace vsock

}  // namespace vmlet
