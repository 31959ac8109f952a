/* virtio-vsock driver: stream connections both ways with credit accounting
 * (virtio 1.2 section 5.10), used by the check and bench modes. Polled: the
 * device's IOAPIC pin stays masked and the rings carry NO_INTERRUPT. */
#include "tg.h"

#define HOST_CID 2
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define SHUT_RCV 1
#define SHUT_SEND 2

struct vsock_hdr {
  u64 src_cid, dst_cid;
  u32 src_port, dst_port, len;
  u16 type, op;
  u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

#define HDR ((u32)sizeof(struct vsock_hdr))
/* 4 KiB payloads: what Linux and Firecracker use per packet. */
#define PAYLOAD 4096u
#define PKT (HDR + PAYLOAD)
#define RX_N 64
#define TX_N 64
#define EV_N 4
/* We consume every byte the moment it arrives, so the advertised buffer
 * (tg.vsock_buf, default 64 KiB: smaller than the 256 KiB of RX buffers, so
 * credit, not ring space, is what limits the peer) only paces the peer; half
 * of it consumed triggers an explicit credit update. */
#define OUR_BUF_ALLOC (tg_args.vsock_buf)

enum { C_UNUSED, C_LISTEN, C_CONNECTING, C_ESTABLISHED, C_CLOSING, C_CLOSED };

struct conn {
  const char *name;
  int state;
  u32 local_port, peer_port;
  u64 send_total, recv_total;
  u64 sent, recvd;
  u32 send_seed, recv_seed;
  u32 peer_buf_alloc, peer_fwd_cnt, fwd_reported;
  u32 sent_crc, recv_crc;
  u64 mismatches, first_mismatch;
  u64 credit_violations;      /* RW bytes beyond the credit we had granted */
  int credit_requested;
  int ignore_credit;          /* vsock-overrun mode: misbehave on purpose */
  u64 close_started;
  const char *close_how;
  const char *error;
  u64 t_begin, t_end;
};

struct vs {
  struct virtio_dev *dev;
  u64 cid;
  struct virtq rxq, txq, evq;
  u8 *rxbufs, *txbufs, *evbufs;
  int tx_pending, rx_pending;
  u64 credit_updates_sent, credit_requests_sent, pkts_rx, pkts_tx;
  u64 irq_waits, irq_wakeups;   /* idle waits, and those an interrupt ended */
};

static struct vs vs;
static int vs_opened;  /* by vsock_prepare_pause, before the blk checks */
static struct conn conns[2];
static int nconns;

static int vs_open(struct virtio_dev *d) {
  vs.dev = d;
  if (virtio_negotiate(d, 0)) return -1;
  u64 cfg = d->base + VIRTIO_MMIO_CONFIG;
  vs.cid = (u64)mmio_read32(cfg) | ((u64)mmio_read32(cfg + 4) << 32);
  int irq = d->vector != 0;
  if (virtq_setup(d, &vs.rxq, 0, RX_N, irq) || virtq_setup(d, &vs.txq, 1, TX_N, irq) || virtq_setup(d, &vs.evq, 2, EV_N, irq))
    return -2;
  vs.rxbufs = tg_alloc((usize)PKT * vs.rxq.size, 4096);
  vs.txbufs = tg_alloc((usize)PKT * vs.txq.size, 4096);
  vs.evbufs = tg_alloc(8ul * vs.evq.size, 64);
  /* One device-writable descriptor per rx buffer, header and payload together
   * (what Linux >= 6.2 posts); a device must not assume a framing. */
  for (u16 k = 0; k < vs.rxq.size; k++) {
    int h = virtq_alloc_chain(&vs.rxq, 1);
    vs.rxq.desc[h].addr = (u64)(vs.rxbufs + (u64)h * PKT);
    vs.rxq.desc[h].len = PKT;
    vs.rxq.desc[h].flags = VIRTQ_DESC_F_WRITE;
    virtq_publish(&vs.rxq, (u16)h);
  }
  for (u16 k = 0; k < vs.evq.size; k++) {
    int h = virtq_alloc_chain(&vs.evq, 1);
    vs.evq.desc[h].addr = (u64)(vs.evbufs + 8ul * (u64)h);
    vs.evq.desc[h].len = 8;
    vs.evq.desc[h].flags = VIRTQ_DESC_F_WRITE;
    virtq_publish(&vs.evq, (u16)h);
  }
  if (virtio_driver_ok(d)) return -3;
  virtq_kick(&vs.rxq);
  virtq_kick(&vs.evq);
  return 0;
}

static void tx_reap(void) {
  while (virtq_has_used(&vs.txq)) {
    struct virtq_used_elem e = virtq_pop_used(&vs.txq);
    virtq_free_chain(&vs.txq, (u16)e.id);
  }
}

/* Queues one packet; payload (len bytes) is generated from the pattern at
 * the connection's send offset. 0 on success, -1 when the tx ring is full. */
static int tx_packet(struct conn *c, u32 peer_port, u32 local_port, u16 op, u32 flags, u32 len) {
  int h = virtq_alloc_chain(&vs.txq, 1);
  if (h < 0) {
    tx_reap();
    h = virtq_alloc_chain(&vs.txq, 1);
    if (h < 0) return -1;
  }
  u8 *buf = vs.txbufs + (u64)h * PKT;
  struct vsock_hdr *hd = (struct vsock_hdr *)buf;
  hd->src_cid = vs.cid;
  hd->dst_cid = HOST_CID;
  hd->src_port = local_port;
  hd->dst_port = peer_port;
  hd->len = len;
  hd->type = TYPE_STREAM;
  hd->op = op;
  hd->flags = flags;
  hd->buf_alloc = OUR_BUF_ALLOC;
  hd->fwd_cnt = c ? (u32)c->recvd : 0;
  if (c) c->fwd_reported = hd->fwd_cnt;
  if (len) {
    pattern_fill(c->send_seed, c->sent, buf + HDR, len);
    c->sent_crc = crc32_update(c->sent_crc, buf + HDR, len);
    c->sent += len;
  }
  vs.txq.desc[h].addr = (u64)buf;
  vs.txq.desc[h].len = HDR + len;
  vs.txq.desc[h].flags = 0;
  virtq_publish(&vs.txq, (u16)h);
  vs.tx_pending = 1;
  vs.pkts_tx++;
  return 0;
}

/* Control packets that found the TX ring full wait here, in order, and go
 * before any data: nothing would send them again, and losing one breaks a
 * connection (a lost RESPONSE made the host reset the stream behind it).
 * A ring drained asynchronously (vhost-vsock, or our VMM's device thread
 * woken through KVM_IOEVENTFD) is often full when an RX packet asks for an
 * answer; one drained at every kick, as the exit path did, almost never. */
#define CTL_N 32
static struct ctl {
  struct conn *c;
  u32 peer_port, local_port, flags;
  u16 op;
} ctl_q[CTL_N];
static int ctl_n;
static u64 ctl_deferred;

static void tx_control(struct conn *c, u32 peer_port, u32 local_port, u16 op, u32 flags) {
  if (ctl_n == 0 && tx_packet(c, peer_port, local_port, op, flags, 0) == 0) return;
  if (ctl_n == CTL_N) {
    tg_printf("TG vsock-warn what=control-queue-full op=%u\n", op);
    return;
  }
  ctl_q[ctl_n++] = (struct ctl){c, peer_port, local_port, flags, op};
  ctl_deferred++;
}

/* Sends what tx_control kept; 1 when nothing waits any more. */
static int ctl_flush(void) {
  int k = 0;
  while (k < ctl_n && tx_packet(ctl_q[k].c, ctl_q[k].peer_port, ctl_q[k].local_port, ctl_q[k].op, ctl_q[k].flags, 0) == 0) k++;
  for (int i = k; i < ctl_n; i++) ctl_q[i - k] = ctl_q[i];
  ctl_n -= k;
  return ctl_n == 0;
}

static void conn_fail(struct conn *c, const char *why) {
  if (!c->error) c->error = why;
  if (c->state != C_CLOSED) tx_control(NULL, c->peer_port, c->local_port, OP_RST, 0);
  c->state = C_CLOSED;
  c->close_how = "error";
  c->t_end = rdtsc();
}

static u8 expect[PAYLOAD];

static void rx_data(struct conn *c, const u8 *p, u32 len) {
  /* The peer may have at most buf_alloc bytes beyond the fwd_cnt we last
   * told it in flight; fwd_reported is the newest we sent, so anything past
   * this bound broke the credit the peer could possibly have seen. */
  if (c->recvd + len - c->fwd_reported > OUR_BUF_ALLOC) c->credit_violations++;
  if (c->recvd + len > c->recv_total) {
    conn_fail(c, "peer-sent-too-much");
    return;
  }
  pattern_fill(c->recv_seed, c->recvd, expect, len);
  if (memcmp(p, expect, len) != 0) {
    for (u32 k = 0; k < len; k++)
      if (p[k] != expect[k]) {
        if (!c->mismatches) c->first_mismatch = c->recvd + k;
        c->mismatches++;
      }
  }
  c->recv_crc = crc32_update(c->recv_crc, p, len);
  c->recvd += len;
}

static struct conn *find_conn(u32 local_port, u32 peer_port) {
  for (int i = 0; i < nconns; i++)
    if (conns[i].local_port == local_port && conns[i].peer_port == peer_port &&
        conns[i].state != C_LISTEN && conns[i].state != C_UNUSED)
      return &conns[i];
  return NULL;
}

static void rx_packet(const u8 *buf, u32 used_len) {
  const struct vsock_hdr *h = (const struct vsock_hdr *)buf;
  vs.pkts_rx++;
  if (used_len < HDR || h->len > PAYLOAD || HDR + h->len > used_len) {
    tg_printf("TG vsock-warn what=bad-rx-packet used_len=%u hdr_len=%u op=%u\n", used_len, h->len, h->op);
    return;
  }
  if (h->type != TYPE_STREAM || h->dst_cid != vs.cid) {
    tg_printf("TG vsock-warn what=foreign-packet type=%u dst_cid=%lu op=%u\n", h->type, h->dst_cid, h->op);
    return;
  }
  struct conn *c = find_conn(h->dst_port, h->src_port);
  if (!c && h->op == OP_REQUEST) {
    for (int i = 0; i < nconns; i++)
      if (conns[i].state == C_LISTEN && conns[i].local_port == h->dst_port) c = &conns[i];
    if (!c) {
      tx_control(NULL, h->src_port, h->dst_port, OP_RST, 0);
      return;
    }
    c->peer_port = h->src_port;
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    c->state = C_ESTABLISHED;
    c->t_begin = rdtsc();
    tx_control(c, c->peer_port, c->local_port, OP_RESPONSE, 0);
    return;
  }
  if (!c) {
    if (h->op != OP_RST) tx_control(NULL, h->src_port, h->dst_port, OP_RST, 0);
    return;
  }
  /* A connection we already closed (our RST or theirs) has nothing left to say. */
  if (c->state == C_CLOSED) return;
  c->peer_buf_alloc = h->buf_alloc;
  c->peer_fwd_cnt = h->fwd_cnt;
  switch (h->op) {
    case OP_RESPONSE:
      if (c->state == C_CONNECTING) {
        c->state = C_ESTABLISHED;
        c->t_begin = rdtsc();
      }
      break;
    case OP_RW:
      if (c->state == C_ESTABLISHED || c->state == C_CLOSING) rx_data(c, buf + HDR, h->len);
      break;
    case OP_CREDIT_REQUEST:
      tx_control(c, c->peer_port, c->local_port, OP_CREDIT_UPDATE, 0);
      vs.credit_updates_sent++;
      break;
    case OP_CREDIT_UPDATE:
      c->credit_requested = 0;
      break;
    case OP_SHUTDOWN:
      if (c->state == C_CLOSING) {
        tx_control(c, c->peer_port, c->local_port, OP_RST, 0);
        c->state = C_CLOSED;
        c->close_how = "peer-shutdown";
        c->t_end = rdtsc();
      } else if ((h->flags & SHUT_SEND) && c->recvd < c->recv_total) {
        conn_fail(c, "peer-shutdown-before-all-data");
      } else if (c->sent >= c->send_total) {
        tx_control(c, c->peer_port, c->local_port, OP_RST, 0);
        c->state = C_CLOSED;
        c->close_how = "peer-shutdown";
        c->t_end = rdtsc();
      }
      break;
    case OP_RST:
      /* Both ends closed at once (our SHUTDOWN crossed the host's): the
       * connection is already gone here, so the RST is for nothing (Linux
       * ignores an RST without a socket too). */
      if (c->state == C_CLOSED) break;
      if (c->state == C_CLOSING) {
        c->state = C_CLOSED;
        c->close_how = "rst";
        c->t_end = rdtsc();
      } else {
        conn_fail(c, c->state == C_CONNECTING ? "connection-refused" : "reset-by-peer");
        c->state = C_CLOSED;
      }
      break;
    default:
      break;
  }
}

static void rx_drain(void) {
  while (virtq_has_used(&vs.rxq)) {
    struct virtq_used_elem e = virtq_pop_used(&vs.rxq);
    rx_packet(vs.rxbufs + (u64)e.id * PKT, e.len);
    /* Same descriptor back to the device: chains are one descriptor long. */
    vs.rxq.desc[e.id].len = PKT;
    virtq_publish(&vs.rxq, (u16)e.id);
    vs.rx_pending = 1;
  }
}

static int conn_pump(struct conn *c) {
  int progress = 0;
  if (c->state != C_ESTABLISHED) return 0;
  /* Not before the control packets kept for a full ring (this connection's
   * RESPONSE may be among them). */
  if (ctl_n) return 0;
  while (c->sent < c->send_total) {
    u32 inflight = (u32)c->sent - c->peer_fwd_cnt;
    u32 credit = c->peer_buf_alloc > inflight ? c->peer_buf_alloc - inflight : 0;
    if (c->ignore_credit) credit = PAYLOAD;
    if (credit == 0) {
      /* Only a request that made it into the ring is waited for: a full TX
       * ring (the device has not consumed it yet) means ask again next round. */
      if (!c->credit_requested && tx_packet(c, c->peer_port, c->local_port, OP_CREDIT_REQUEST, 0, 0) == 0) {
        vs.credit_requests_sent++;
        c->credit_requested = 1;
      }
      break;
    }
    u64 n = c->send_total - c->sent;
    if (n > PAYLOAD) n = PAYLOAD;
    if (n > credit) n = credit;
    if (tx_packet(c, c->peer_port, c->local_port, OP_RW, 0, (u32)n)) break;
    progress = 1;
  }
  if ((u32)c->recvd - c->fwd_reported >= OUR_BUF_ALLOC / 2) {
    tx_packet(c, c->peer_port, c->local_port, OP_CREDIT_UPDATE, 0, 0);
    vs.credit_updates_sent++;
  }
  /* The SHUTDOWN too: with the ring full of the last data packets it is sent
   * on a later round, after the kick below lets the device consume them (it
   * was lost, and the close waited out the forced-RST timeout). */
  if (c->sent >= c->send_total && c->recvd >= c->recv_total &&
      tx_packet(c, c->peer_port, c->local_port, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND, 0) == 0) {
    c->state = C_CLOSING;
    c->close_started = rdtsc();
    progress = 1;
  }
  return progress;
}

/* Runs every connection to completion; returns 0 when all closed in time. */
static int vs_run(void) {
  u64 last_progress = rdtsc();
  for (;;) {
    int open = 0, progress = 0;
    u64 before = vs.pkts_rx;
    rx_drain();
    if (vs.pkts_rx != before) progress = 1;
    tx_reap();
    if (ctl_n) {
      int waiting = ctl_n;
      ctl_flush();
      if (ctl_n != waiting) progress = 1;
    }
    for (int i = 0; i < nconns; i++) {
      struct conn *c = &conns[i];
      progress |= conn_pump(c);
      if (c->state == C_CLOSING && rdtsc() - c->close_started > TG_TIMEOUT_CYCLES / 2) {
        /* Spec 5.10.6.6: no RST from the peer in time, so force it. Not
         * sooner: an RST makes the device drop bytes it has not yet written
         * to the host socket (seen with four guests in the standard-KVM lab
         * when this was ~0.4 s); Linux waits 8 s. */
        tx_control(c, c->peer_port, c->local_port, OP_RST, 0);
        c->state = C_CLOSED;
        c->close_how = "forced-rst";
        c->t_end = rdtsc();
      }
      if (c->state != C_CLOSED) open++;
    }
    if (vs.rx_pending) { virtq_kick(&vs.rxq); vs.rx_pending = 0; }
    if (vs.tx_pending) { virtq_kick(&vs.txq); vs.tx_pending = 0; }
    /* Closed connections' last RSTs still go out. */
    if (!open && !ctl_n) return 0;
    u64 now = rdtsc();
    if (progress) last_progress = now;
    else if (vs.dev->vector && now - last_progress <= TG_TIMEOUT_CYCLES) {
      /* Idle: sleep until the device interrupts (it does so from its own
       * thread, so this is the VMM's asynchronous injection path). Order
       * matters: (1) ack InterruptStatus, since a device raises its line when
       * the status goes from clear to set and an un-acked status means no new
       * edge (this wait starved on standard KVM before); (2) sample the count;
       * (3) look at the rings once more; (4) sleep. A used entry written
       * after (1) either shows in (3) or raises a fresh interrupt. */
      u8 v = vs.dev->vector;
      virtio_ack_interrupt(vs.dev);
      u64 seen = tg_irq_counts[v];
      if (!virtq_has_used(&vs.rxq) && !virtq_has_used(&vs.txq)) {
        vs.irq_waits++;
        /* Until the device interrupts; the bound only matters while nothing
         * at all is happening (e.g. before the host connects). */
        if (irq_wait_vector(v, seen, TG_TIMEOUT_CYCLES / 20)) vs.irq_wakeups++;
      }
    } else if (now - last_progress > TG_TIMEOUT_CYCLES) {
      for (int i = 0; i < nconns; i++)
        if (conns[i].state != C_CLOSED) conn_fail(&conns[i], "timeout");
      if (vs.tx_pending) virtq_kick(&vs.txq);
      return -1;
    }
    else cpu_relax();
  }
}

static void conn_init(struct conn *c, const char *name, int state, u32 local, u32 peer, u64 send, u64 recv, u32 sseed, u32 rseed) {
  memset(c, 0, sizeof *c);
  c->name = name;
  c->state = state;
  c->local_port = local;
  c->peer_port = peer;
  c->send_total = send;
  c->recv_total = recv;
  c->send_seed = sseed;
  c->recv_seed = rseed;
  c->sent_crc = ~0u;
  c->recv_crc = ~0u;
  c->close_how = "none";
}

static int conn_report(struct conn *c) {
  int ok = !c->error && c->sent == c->send_total && c->recvd == c->recv_total && c->mismatches == 0 && c->credit_violations == 0;
  tg_printf("TG vsock-%s local_port=%u peer_port=%u sent=%lu sent_crc32=%08x recv=%lu recv_crc32=%08x mismatches=%lu first_mismatch=%lu credit_violations=%lu close=%s error=%s result=%s\n",
            c->name, c->local_port, c->peer_port, c->sent, ~c->sent_crc, c->recvd, ~c->recv_crc, c->mismatches,
            c->first_mismatch, c->credit_violations, c->close_how, c->error ? c->error : "none", ok ? "pass" : "fail");
  tg_result(c->name, ok);
  return ok;
}

#define LOCAL_CONNECT_PORT 50000

void vsock_check(void) {
  int di = tg_find_device(19, 0);
  if (di < 0) {
    tg_printf("TG vsock skipped=no-virtio-vsock-device\n");
    return;
  }
  if (!tg_args.vsock_port && !tg_args.vsock_listen) {
    tg_printf("TG vsock skipped=no-tg.vsock_port-or-tg.vsock_listen\n");
    return;
  }
  int rc = vs_opened ? 0 : vs_open(&tg_devs[di]);
  if (rc) {
    tg_printf("TG vsock error=setup rc=%d result=fail\n", rc);
    tg_result("vsock", 0);
    return;
  }
  u64 n = tg_args.vsock_bytes;
  nconns = 0;
  int handshake_irq = -1;
  if (tg_args.vsock_port) {
    struct conn *c = &conns[nconns++];
    conn_init(c, "connect", C_CONNECTING, LOCAL_CONNECT_PORT, tg_args.vsock_port, n, n, tg_args.seed + 1, tg_args.seed + 2);
    u8 v = vs.dev->vector;
    u64 before = v ? tg_irq_counts[v] : 0;
    tx_packet(c, c->peer_port, c->local_port, OP_REQUEST, 0, 0);
    if (v) {
      /* A deterministic interrupt-driven wait: the device answers the REQUEST
       * from its own thread (after connecting the host socket) and must
       * interrupt when it puts the RESPONSE in the RX used ring. The packet
       * stays there for vs_run. */
      virtq_kick(&vs.txq);
      vs.tx_pending = 0;
      u64 start = rdtsc();
      while (!(virtq_has_used(&vs.rxq) && tg_irq_counts[v] != before) && rdtsc() - start < TG_TIMEOUT_CYCLES / 4) {
        /* Ack first (see vs_run's idle wait): the tx completion may have set
         * InterruptStatus already, and the RESPONSE must raise a new edge. */
        virtio_ack_interrupt(vs.dev);
        u64 seen = tg_irq_counts[v];
        if (virtq_has_used(&vs.rxq) && seen != before) break;
        irq_wait_vector(v, seen, TG_TIMEOUT_CYCLES / 20);
      }
      handshake_irq = virtq_has_used(&vs.rxq) && tg_irq_counts[v] != before;
    }
  }
  if (tg_args.vsock_listen)
    conn_init(&conns[nconns++], "listen", C_LISTEN, tg_args.vsock_listen, 0, n, n, tg_args.seed + 3, tg_args.seed + 4);
  /* The host test connects to the listening port once it reads this line. */
  tg_printf("TG vsock cid=%lu bytes=%lu connect_port=%u listen_port=%u ready=1\n", vs.cid, n, tg_args.vsock_port, tg_args.vsock_listen);
  vs_run();
  for (int i = 0; i < nconns; i++) conn_report(&conns[i]);
  tg_printf("TG vsock-stats pkts_rx=%lu pkts_tx=%lu credit_updates=%lu credit_requests=%lu controls_deferred=%lu\n", vs.pkts_rx,
            vs.pkts_tx, vs.credit_updates_sent, vs.credit_requests_sent, ctl_deferred);
  if (vs.dev->vector) {
    u64 count = tg_irq_counts[vs.dev->vector];
    /* Evidence of the interrupt path: the handshake wait when there is one,
     * otherwise an idle wait the device ended. */
    int ok = count > 0 && (handshake_irq >= 0 ? handshake_irq == 1 : vs.irq_wakeups > 0);
    tg_printf("TG vsock-irq count=%lu handshake_irq=%d idle_waits=%lu woken_by_irq=%lu result=%s\n", count, handshake_irq, vs.irq_waits,
              vs.irq_wakeups, ok ? "pass" : "fail");
    tg_result("vsock-irq", ok);
  }
}

int vsock_prepare_pause(void) {
  int di = tg_find_device(19, 0);
  int rc = di < 0 ? -9 : vs_open(&tg_devs[di]);
  if (rc) {
    tg_printf("TG pause error=vsock-setup rc=%d result=fail\n", rc);
    tg_result("pause", 0);
    return -1;
  }
  vs_opened = 1;
  return 0;
}

/* The snapshot point: the host pauses and snapshots the VM while it spins
 * here (at CPL3, touching nothing but the event ring), and kills it. Only a
 * restore delivers VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which ends the wait;
 * the guest then re-reads its CID as the spec asks (5.10.6.4). */
void tg_pause_point(const char *name) {
  tg_printf("TG pause point=%s cid=%lu waiting=transport-reset\n", name, vs.cid);
  u64 start = rdtsc();
  while (!virtq_has_used(&vs.evq) && rdtsc() - start < TG_TIMEOUT_CYCLES) cpu_relax();
  int got = virtq_has_used(&vs.evq);
  u32 event = 0xffffffffu, len = 0;
  if (got) {
    struct virtq_used_elem e = virtq_pop_used(&vs.evq);
    len = e.len;
    memcpy(&event, vs.evbufs + 8ul * e.id, 4);
    virtq_publish(&vs.evq, (u16)e.id);
    virtq_kick(&vs.evq);
  }
  u64 old_cid = vs.cid, cfg = vs.dev->base + VIRTIO_MMIO_CONFIG;
  vs.cid = (u64)mmio_read32(cfg) | ((u64)mmio_read32(cfg + 4) << 32);
  int ok = got && len >= 4 && event == 0;
  tg_printf("TG vsock-reset point=%s event=%u len=%u old_cid=%lu cid=%lu result=%s\n", name, event, len, old_cid, vs.cid,
            ok ? "pass" : "fail");
  tg_result("vsock-reset", ok);
}

void vsock_bench(void) {
  int di = tg_find_device(19, 0);
  if (di < 0 || !tg_args.vsock_port) {
    tg_printf("TG bench-vsock error=%s result=fail\n", di < 0 ? "no-virtio-vsock-device" : "no-tg.vsock_port");
    tg_result("bench-vsock", 0);
    return;
  }
  if (vs_open(&tg_devs[di])) {
    tg_printf("TG bench-vsock error=setup result=fail\n");
    tg_result("bench-vsock", 0);
    return;
  }
  u64 bytes = (tg_args.mib ? tg_args.mib : 64) << 20;
  nconns = 1;
  struct conn *c = &conns[0];
  conn_init(c, "bench", C_CONNECTING, LOCAL_CONNECT_PORT, tg_args.vsock_port, bytes, 0, tg_args.seed + 5, 0);
  tg_printf("TG bench-vsock begin bytes=%lu\n", bytes);
  tx_packet(c, c->peer_port, c->local_port, OP_REQUEST, 0, 0);
  virtq_kick(&vs.txq);
  vs_run();
  serial_putc('\n');
  tg_printf("TG bench-vsock end bytes=%lu cycles=%lu\n", c->sent, c->t_end - c->t_begin);
  conn_report(c);
  tg_printf("TG vsock-stats pkts_rx=%lu pkts_tx=%lu credit_updates=%lu credit_requests=%lu peer_buf_alloc=%u\n", vs.pkts_rx, vs.pkts_tx,
            vs.credit_updates_sent, vs.credit_requests_sent, c->peer_buf_alloc);
}

/* A hostile guest: streams to tg.vsock_port ignoring the host's credit, to a
 * host that does not read. The device must reset the connection (RST) rather
 * than buffer without bound; anything else fails. */
void vsock_overrun(void) {
  int di = tg_find_device(19, 0);
  if (di < 0 || !tg_args.vsock_port || vs_open(&tg_devs[di])) {
    tg_printf("TG vsock-overrun error=%s result=fail\n", di < 0 ? "no-virtio-vsock-device" : !tg_args.vsock_port ? "no-tg.vsock_port" : "setup");
    tg_result("vsock-overrun", 0);
    return;
  }
  u64 bytes = tg_args.vsock_bytes;
  nconns = 1;
  struct conn *c = &conns[0];
  conn_init(c, "overrun", C_CONNECTING, LOCAL_CONNECT_PORT, tg_args.vsock_port, bytes, 0, tg_args.seed + 6, 0);
  c->ignore_credit = 1;
  tx_packet(c, c->peer_port, c->local_port, OP_REQUEST, 0, 0);
  virtq_kick(&vs.txq);
  vs_run();
  u32 granted = c->peer_buf_alloc;
  int reset = c->error && !memcmp(c->error, "reset-by-peer", 14);
  int ok = reset && c->sent < bytes;
  tg_printf("TG vsock-overrun sent=%lu of=%lu last_peer_buf_alloc=%u reset=%d error=%s result=%s\n", c->sent, bytes, granted, reset,
            c->error ? c->error : "none", ok ? "pass" : "fail");
  tg_result("vsock-overrun", ok);
}
