/* virtio-blk driver checks and benchmark loops. */
#include "tg.h"

#define VIRTIO_BLK_F_SIZE_MAX (1ull << 1)
#define VIRTIO_BLK_F_SEG_MAX (1ull << 2)
#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1ull << 6)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define BLK_MAX_SLOTS 32
#define STATUS_UNSET 0xee       /* never written by a device: shows a missing status write */

struct blk_req {
  u32 type;
  u32 reserved;
  u64 sector;
  u8 status;
};

struct blk {
  struct virtio_dev *dev;
  int index;
  struct virtq q;
  u64 capacity;               /* 512-byte sectors */
  u32 size_max, seg_max;
  int ro, flush, use_irq;
  u64 irq_seen;
  struct blk_req *reqs;       /* BLK_MAX_SLOTS */
};

static int blk_open(struct blk *b, struct virtio_dev *d, int index, int use_irq) {
  b->dev = d;
  b->index = index;
  b->use_irq = use_irq;
  u64 want = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
  int rc = virtio_negotiate(d, want);
  if (rc) return rc;
  u64 cfg = d->base + VIRTIO_MMIO_CONFIG;
  b->capacity = (u64)mmio_read32(cfg) | ((u64)mmio_read32(cfg + 4) << 32);
  b->size_max = (d->driver_features & VIRTIO_BLK_F_SIZE_MAX) ? mmio_read32(cfg + 8) : 0;
  b->seg_max = (d->driver_features & VIRTIO_BLK_F_SEG_MAX) ? mmio_read32(cfg + 12) : 0;
  b->ro = (d->driver_features & VIRTIO_BLK_F_RO) != 0;
  b->flush = (d->driver_features & VIRTIO_BLK_F_FLUSH) != 0;
  rc = virtq_setup(d, &b->q, 0, 128, use_irq);
  if (rc) return rc - 10;
  b->reqs = tg_alloc(sizeof(struct blk_req) * BLK_MAX_SLOTS, 64);
  if (use_irq && d->vector) b->irq_seen = irq_total();
  return virtio_driver_ok(d) ? -20 : 0;
}

/* Largest payload one request may carry given size_max/seg_max and the ring. */
static u64 blk_max_request(struct blk *b, u64 seg) {
  u64 segs = b->q.size - 2;
  if (b->seg_max && b->seg_max < segs) segs = b->seg_max;
  return seg * segs;
}

static u64 blk_segment(struct blk *b) {
  u64 seg = 1ull << 20;
  if (b->size_max && b->size_max < seg) seg = b->size_max & ~511ull;
  return seg ? seg : 512;
}

/* Queues one request (no notify). Returns the chain head or -1. */
static int blk_submit(struct blk *b, int slot, u32 type, u64 sector, void *buf, u64 len) {
  u64 seg = blk_segment(b);
  u16 nseg = (u16)(len ? (len + seg - 1) / seg : 0);
  int head = virtq_alloc_chain(&b->q, (u16)(nseg + 2));
  if (head < 0) return -1;
  struct blk_req *r = &b->reqs[slot];
  r->type = type;
  r->reserved = 0;
  r->sector = sector;
  r->status = STATUS_UNSET;
  u16 i = (u16)head;
  b->q.desc[i].addr = (u64)r;
  b->q.desc[i].len = 16;
  i = b->q.desc[i].next;
  for (u64 off = 0; off < len; off += seg) {
    b->q.desc[i].addr = (u64)buf + off;
    b->q.desc[i].len = (u32)(len - off < seg ? len - off : seg);
    if (type == VIRTIO_BLK_T_IN) b->q.desc[i].flags |= VIRTQ_DESC_F_WRITE;
    i = b->q.desc[i].next;
  }
  b->q.desc[i].addr = (u64)&r->status;
  b->q.desc[i].len = 1;
  b->q.desc[i].flags |= VIRTQ_DESC_F_WRITE;
  virtq_publish(&b->q, (u16)head);
  return head;
}

/* Waits for one completion; interrupt-driven when the device has a routed
 * vector, polled otherwise. Returns the used element or id=0xffffffff on timeout. */
static struct virtq_used_elem blk_wait_one(struct blk *b) {
  u64 start = rdtsc();
  while (!virtq_has_used(&b->q)) {
    if (rdtsc() - start > TG_TIMEOUT_CYCLES) {
      struct virtq_used_elem none = {0xffffffffu, 0};
      return none;
    }
    if (b->use_irq && b->dev->vector) {
      irq_wait_change(&b->irq_seen, TG_TIMEOUT_CYCLES / 8);
      virtio_ack_interrupt(b->dev);
    } else {
      cpu_relax();
    }
  }
  struct virtq_used_elem e = virtq_pop_used(&b->q);
  virtq_free_chain(&b->q, (u16)e.id);
  return e;
}

/* One synchronous request; returns the status byte (or 0x100 on timeout). */
static u32 blk_io(struct blk *b, u32 type, u64 sector, void *buf, u64 len) {
  u64 done = 0, seg = blk_segment(b);
  u64 maxreq = blk_max_request(b, seg);
  do {
    u64 n = len - done < maxreq ? len - done : maxreq;
    if (blk_submit(b, 0, type, sector + done / 512, (u8 *)buf + done, n) < 0) return 0x101;
    virtq_kick(&b->q);
    struct virtq_used_elem e = blk_wait_one(b);
    if (e.id == 0xffffffffu) return 0x100;
    barrier();
    if (b->reqs[0].status != 0) return b->reqs[0].status;
    done += n;
  } while (done < len);
  if (b->use_irq && b->dev->vector) virtio_ack_interrupt(b->dev);
  return 0;
}

#define CHUNK (64u << 10)

static void blk_check_one(struct virtio_dev *d, int index) {
  struct blk b;
  memset(&b, 0, sizeof b);
  int rc = blk_open(&b, d, index, 1);
  if (rc) {
    tg_printf("TG blk dev=%d addr=0x%lx error=setup rc=%d result=fail\n", index, d->base, rc);
    tg_result("blk", 0);
    return;
  }
  tg_printf("TG blk dev=%d addr=0x%lx capacity=%lu ro=%d flush=%d seg_max=%u size_max=%u queue=%u features=0x%lx\n",
            index, d->base, b.capacity, b.ro, b.flush, b.seg_max, b.size_max, b.q.size, d->driver_features);

  u8 *buf = tg_alloc(CHUNK, 4096);
  u64 bytes = b.capacity * 512;
  u32 crc = ~0u, st = 0;
  for (u64 off = 0; off < bytes && st == 0; off += CHUNK) {
    u64 n = bytes - off < CHUNK ? bytes - off : CHUNK;
    st = blk_io(&b, VIRTIO_BLK_T_IN, off / 512, buf, n);
    if (st == 0) crc = crc32_update(crc, buf, n);
  }
  tg_printf("TG blk-read dev=%d bytes=%lu crc32=%08x status=%u result=%s\n", index, bytes, ~crc, st, st == 0 ? "pass" : "fail");
  tg_result("blk-read", st == 0);

  if (!b.ro) {
    u64 off = tg_args.write_off & ~511ull, len = (tg_args.write_len + 511) & ~511ull;
    if (off >= bytes) off = 0;
    if (off + len > bytes) len = bytes - off;
    u32 wst = 0, fst = 0, bad = 0;
    u64 first_bad = 0;
    for (u64 o = off; o < off + len && wst == 0; o += CHUNK) {
      u64 n = off + len - o < CHUNK ? off + len - o : CHUNK;
      pattern_fill(tg_args.seed, o, buf, n);
      wst = blk_io(&b, VIRTIO_BLK_T_OUT, o / 512, buf, n);
    }
    if (wst == 0 && b.flush) fst = blk_io(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
    u8 *want = tg_alloc(CHUNK, 4096);
    for (u64 o = off; o < off + len && wst == 0 && fst == 0; o += CHUNK) {
      u64 n = off + len - o < CHUNK ? off + len - o : CHUNK;
      memset(buf, 0, n);
      u32 rst = blk_io(&b, VIRTIO_BLK_T_IN, o / 512, buf, n);
      pattern_fill(tg_args.seed, o, want, n);
      if (rst != 0 || memcmp(buf, want, n) != 0) {
        for (u64 k = 0; k < n; k++)
          if (buf[k] != want[k]) { first_bad = o + k; break; }
        bad = 1;
        break;
      }
    }
    int ok = wst == 0 && fst == 0 && !bad;
    tg_printf("TG blk-write dev=%d off=%lu len=%lu seed=%u write_status=%u flush_status=%u verify=%s first_bad=%lu result=%s\n",
              index, off, len, tg_args.seed, wst, fst, bad ? "mismatch" : "ok", first_bad, ok ? "pass" : "fail");
    tg_result("blk-write", ok);
  } else {
    u8 *before = tg_alloc(512, 512);
    u32 r1 = blk_io(&b, VIRTIO_BLK_T_IN, 0, before, 512);
    pattern_fill(tg_args.seed, 0, buf, 512);
    u32 wst = blk_io(&b, VIRTIO_BLK_T_OUT, 0, buf, 512);
    u32 r2 = blk_io(&b, VIRTIO_BLK_T_IN, 0, buf, 512);
    int unchanged = r1 == 0 && r2 == 0 && memcmp(before, buf, 512) == 0;
    /* VIRTIO_BLK_S_IOERR (1) is what the acceptance test expects. */
    int ok = wst == 1 && unchanged;
    tg_printf("TG blk-ro dev=%d write_status=%u unchanged=%d result=%s\n", index, wst, unchanged, ok ? "pass" : "fail");
    tg_result("blk-ro", ok);
  }
}

void blk_check_all(void) {
  for (int i = 0, n = 0; i < tg_ndevs; i++)
    if (tg_devs[i].ok && tg_devs[i].device_id == 2) blk_check_one(&tg_devs[i], n++);
}

static u64 xorshift64(u64 *s) {
  u64 x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

/* Benchmarks poll (no interrupts, VIRTQ_AVAIL_F_NO_INTERRUPT) so what is
 * measured is the VMM's request path, the same way under every VMM. */
void blk_bench(void) {
  int di = tg_find_device(2, 0);
  if (di < 0) {
    tg_printf("TG bench-blk error=no-virtio-blk-device result=fail\n");
    tg_result("bench-blk", 0);
    return;
  }
  struct blk b;
  memset(&b, 0, sizeof b);
  if (blk_open(&b, &tg_devs[di], 0, 0)) {
    tg_printf("TG bench-blk error=setup result=fail\n");
    tg_result("bench-blk", 0);
    return;
  }
  u64 sectors4k = b.capacity / 8;
  u64 n = tg_args.n ? tg_args.n : 20000;
  u32 qd = 1;
  u8 *small = tg_alloc(4096ul * BLK_MAX_SLOTS, 4096);
  u64 rng = 0x9E3779B97F4A7C15ull ^ tg_args.seed;
  u32 errors = 0;
  tg_printf("TG bench-blk-rand begin n=%lu qd=%u capacity=%lu\n", n, qd, b.capacity);
  u64 t0 = rdtsc();
  for (u64 i = 0; i < n; i++) {
    u64 s = (xorshift64(&rng) % sectors4k) * 8;
    if (blk_submit(&b, 0, VIRTIO_BLK_T_IN, s, small, 4096) < 0) { errors++; break; }
    virtq_kick(&b.q);
    struct virtq_used_elem e = blk_wait_one(&b);
    if (e.id == 0xffffffffu || b.reqs[0].status != 0) { errors++; break; }
  }
  u64 t1 = rdtsc();
  tg_printf("TG bench-blk-rand end n=%lu errors=%u cycles=%lu\n", n, errors, t1 - t0);

  u64 mib = tg_args.mib ? tg_args.mib : 256;
  u64 bytes = b.capacity * 512, step = 1ull << 20;
  u8 *big = tg_alloc(step, 4096);
  u64 seg = blk_segment(&b), maxreq = blk_max_request(&b, seg);
  if (maxreq < step) step = maxreq;
  tg_printf("TG bench-blk-seq begin bytes=%lu request=%lu\n", mib << 20, step);
  t0 = rdtsc();
  u64 off = 0;
  for (u64 done = 0; done < (mib << 20) && !errors; done += step) {
    if (off + step > bytes) off = 0;
    if (blk_submit(&b, 0, VIRTIO_BLK_T_IN, off / 512, big, step) < 0) { errors++; break; }
    virtq_kick(&b.q);
    struct virtq_used_elem e = blk_wait_one(&b);
    if (e.id == 0xffffffffu || b.reqs[0].status != 0) errors++;
    off += step;
  }
  t1 = rdtsc();
  tg_printf("TG bench-blk-seq end bytes=%lu errors=%u cycles=%lu\n", mib << 20, errors, t1 - t0);
  tg_result("bench-blk", errors == 0);
}
