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
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_ID_BYTES 20
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
    if (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID) b->q.desc[i].flags |= VIRTQ_DESC_F_WRITE;
    i = b->q.desc[i].next;
  }
  b->q.desc[i].addr = (u64)&r->status;
  b->q.desc[i].len = 1;
  b->q.desc[i].flags |= VIRTQ_DESC_F_WRITE;
  virtq_publish(&b->q, (u16)head);
  return head;
}

/* Polls for one completion. Returns the used element or id=0xffffffff on timeout. */
static struct virtq_used_elem blk_wait_one(struct blk *b) {
  u64 start = rdtsc();
  while (!virtq_has_used(&b->q)) {
    if (rdtsc() - start > TG_TIMEOUT_CYCLES) {
      struct virtq_used_elem none = {0xffffffffu, 0};
      return none;
    }
    cpu_relax();
  }
  struct virtq_used_elem e = virtq_pop_used(&b->q);
  virtq_free_chain(&b->q, (u16)e.id);
  return e;
}

/* One synchronous request; returns the status byte (or 0x100 on timeout).
 * With a routed vector every request waits for its own interrupt before it
 * looks at the used ring (the spec requires one per used-ring write when
 * NO_INTERRUPT is clear and EVENT_IDX is not negotiated); InterruptStatus is
 * acked before the next request so a level-triggered source (QEMU) makes a
 * fresh edge. A wait that times out is counted as a missed interrupt. */
static u32 blk_io(struct blk *b, u32 type, u64 sector, void *buf, u64 len) {
  u64 done = 0, seg = blk_segment(b);
  u64 maxreq = blk_max_request(b, seg);
  int irq = b->use_irq && b->dev->vector;
  do {
    u64 n = len - done < maxreq ? len - done : maxreq;
    u64 seen = irq ? tg_irq_counts[b->dev->vector] : 0;
    if (blk_submit(b, 0, type, sector + done / 512, (u8 *)buf + done, n) < 0) return 0x101;
    virtq_kick(&b->q);
    if (irq) {
      tg_irq_waits++;
      if (!irq_wait_vector(b->dev->vector, seen, TG_TIMEOUT_CYCLES / 4)) tg_irq_missed++;
      virtio_ack_interrupt(b->dev);
    }
    struct virtq_used_elem e = blk_wait_one(b);
    if (e.id == 0xffffffffu) return 0x100;
    barrier();
    if (b->reqs[0].status != 0) return b->reqs[0].status;
    done += n;
  } while (done < len);
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
  /* The serial the host gave the disk (5.2.6: 20 bytes, NUL-padded when shorter).
   * Printed with anything outside '!'..'~' as '?', so the line stays one token. */
  memset(buf, 0, VIRTIO_BLK_ID_BYTES + 1);
  u32 idst = blk_io(&b, VIRTIO_BLK_T_GET_ID, 0, buf, VIRTIO_BLK_ID_BYTES);
  char id[VIRTIO_BLK_ID_BYTES + 1];
  int idn = 0;
  for (; idn < VIRTIO_BLK_ID_BYTES && buf[idn]; idn++) id[idn] = buf[idn] > ' ' && buf[idn] <= '~' ? (char)buf[idn] : '?';
  id[idn] = 0;
  tg_printf("TG blk-id dev=%d status=%u id=%s\n", index, idst, id);
  u64 bytes = b.capacity * 512;
  u32 crc = ~0u, st = 0;
  for (u64 off = 0; off < bytes && st == 0; off += CHUNK) {
    u64 n = bytes - off < CHUNK ? bytes - off : CHUNK;
    st = blk_io(&b, VIRTIO_BLK_T_IN, off / 512, buf, n);
    if (st == 0) crc = crc32_update(crc, buf, n);
  }
  tg_printf("TG blk-read dev=%d bytes=%lu crc32=%08x status=%u result=%s\n", index, bytes, ~crc, st, st == 0 ? "pass" : "fail");
  tg_result("blk-read", st == 0);

  /* Requests a driver should never send: the device must refuse them with
   * IOERR (out of range) and UNSUPP (unknown type), not act on them. */
  u32 past_end = blk_io(&b, VIRTIO_BLK_T_IN, b.capacity, buf, 512);
  u32 straddle = blk_io(&b, VIRTIO_BLK_T_IN, b.capacity - 1, buf, 1024);
  u32 unsupported = blk_io(&b, 0x7fu, 0, buf, 512);
  int bounds_ok = past_end == 1 && straddle == 1 && unsupported == 2;
  tg_printf("TG blk-bounds dev=%d past_end_status=%u straddle_status=%u unknown_type_status=%u result=%s\n", index, past_end, straddle,
            unsupported, bounds_ok ? "pass" : "fail");
  tg_result("blk-bounds", bounds_ok);

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
    if (tg_devs[i].ok && tg_devs[i].device_id == 2) {
      blk_check_one(&tg_devs[i], n++);
      /* Between two disks' checks: the rest runs in the restored VM. */
      if (n == 1 && tg_args.pause) tg_pause_point("after-blk0");
    }
}

static u64 xorshift64(u64 *s) {
  u64 x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

/* 4 KiB reads at random 4 KiB-aligned offsets with `qd` requests in flight:
 * refill as completions arrive, one notify per refill batch. */
static u32 blk_bench_random(struct blk *b, const char *name, u64 n, u32 qd) {
  static u8 slot_of_head[256];
  u32 free_slots[BLK_MAX_SLOTS], nfree = 0;
  if (qd > BLK_MAX_SLOTS) qd = BLK_MAX_SLOTS;
  if (qd > (u32)b->q.size / 3) qd = b->q.size / 3;  /* 3 descriptors per request */
  for (u32 k = 0; k < qd; k++) free_slots[nfree++] = qd - 1 - k;
  u8 *bufs = tg_alloc(4096ul * qd, 4096);
  u64 sectors4k = b->capacity / 8, rng = 0x9E3779B97F4A7C15ull ^ tg_args.seed;
  u64 submitted = 0, completed = 0;
  u32 errors = 0;
  tg_printf("TG %s begin n=%lu qd=%u capacity=%lu\n", name, n, qd, b->capacity);
  u64 t0 = rdtsc();
  while (completed < n && !errors) {
    int queued = 0;
    while (nfree && submitted < n) {
      u32 slot = free_slots[--nfree];
      u64 sector = (xorshift64(&rng) % sectors4k) * 8;
      int head = blk_submit(b, (int)slot, VIRTIO_BLK_T_IN, sector, bufs + 4096ul * slot, 4096);
      if (head < 0) { errors++; break; }
      slot_of_head[head] = (u8)slot;
      submitted++;
      queued = 1;
    }
    if (queued) virtq_kick(&b->q);
    /* Reap every completion already there before refilling, so one notify
     * carries a whole batch (a synchronous device completes them all in it). */
    do {
      struct virtq_used_elem e = blk_wait_one(b);
      if (e.id == 0xffffffffu) { errors++; break; }
      u32 slot = slot_of_head[e.id];
      if (b->reqs[slot].status != 0) errors++;
      free_slots[nfree++] = slot;
      completed++;
    } while (virtq_has_used(&b->q));
  }
  u64 t1 = rdtsc();
  serial_putc('\n');  /* end marker: one byte, so the host timestamp is not skewed by a long line */
  tg_printf("TG %s end n=%lu errors=%u cycles=%lu\n", name, completed, errors, t1 - t0);
  return errors;
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
  u64 n = tg_args.n ? tg_args.n : 20000;
  u32 errors = blk_bench_random(&b, "bench-blk-rand", n, 1);
  if (tg_args.qd > 1 && !errors) errors = blk_bench_random(&b, "bench-blk-randqd", n, tg_args.qd);

  u64 mib = tg_args.mib ? tg_args.mib : 256;
  u64 bytes = b.capacity * 512, step = 1ull << 20;
  u8 *big = tg_alloc(step, 4096);
  u64 seg = blk_segment(&b), maxreq = blk_max_request(&b, seg);
  if (maxreq < step) step = maxreq;
  tg_printf("TG bench-blk-seq begin bytes=%lu request=%lu\n", mib << 20, step);
  u64 t0 = rdtsc();
  u64 off = 0;
  for (u64 done = 0; done < (mib << 20) && !errors; done += step) {
    if (off + step > bytes) off = 0;
    if (blk_submit(&b, 0, VIRTIO_BLK_T_IN, off / 512, big, step) < 0) { errors++; break; }
    virtq_kick(&b.q);
    struct virtq_used_elem e = blk_wait_one(&b);
    if (e.id == 0xffffffffu || b.reqs[0].status != 0) errors++;
    off += step;
  }
  u64 t1 = rdtsc();
  serial_putc('\n');
  tg_printf("TG bench-blk-seq end bytes=%lu errors=%u cycles=%lu\n", mib << 20, errors, t1 - t0);
  tg_result("bench-blk", errors == 0);
}

/* A hostile driver, one broken request per fresh device: the device must
 * refuse each (error status, DEVICE_NEEDS_RESET, or no completion) and never
 * report success; after a reset the same device must read correctly again. */
enum { H_OUTSIDE_RAM, H_STRADDLE_RAM_END, H_LOOP, H_WRITE_TO_READONLY, H_HUGE_LENGTH, H_COUNT };
static const char *const hostile_names[H_COUNT] = {"outside-ram", "straddles-ram-end", "descriptor-loop", "read-into-readonly-buffer",
                                                   "4GiB-length"};

static void blk_hostile_case(struct virtio_dev *d, int which, u8 *buf) {
  struct blk b;
  memset(&b, 0, sizeof b);
  if (blk_open(&b, d, 0, 0)) {
    tg_printf("TG blk-hostile case=%s error=setup result=fail\n", hostile_names[which]);
    tg_result("blk-hostile", 0);
    return;
  }
  int head = blk_submit(&b, 0, VIRTIO_BLK_T_IN, 0, buf, 4096);
  u16 data = b.q.desc[head].next, status = b.q.desc[data].next;
  switch (which) {
    case H_OUTSIDE_RAM: b.q.desc[data].addr = 0x200000000ull; break;  /* 8 GiB: past any RAM the tests give */
    case H_STRADDLE_RAM_END: b.q.desc[data].addr = tg_low_ram_end - 2048; break;
    case H_LOOP:
      b.q.desc[status].flags |= VIRTQ_DESC_F_NEXT;
      b.q.desc[status].next = (u16)head;
      break;
    case H_WRITE_TO_READONLY: b.q.desc[data].flags &= (u16)~VIRTQ_DESC_F_WRITE; break;
    case H_HUGE_LENGTH: b.q.desc[data].len = 0xfffff000u; break;
    default: break;
  }
  virtq_kick(&b.q);
  u64 start = rdtsc();
  const char *outcome = "ignored";
  u32 st = b.reqs[0].status;
  u32 dev_status = 0;
  while (rdtsc() - start < TG_TIMEOUT_CYCLES / 20) {
    barrier();
    if (virtq_has_used(&b.q)) {
      virtq_pop_used(&b.q);
      st = b.reqs[0].status;
      outcome = "completed";
      break;
    }
    dev_status = mmio_read32(d->base + VIRTIO_MMIO_STATUS);
    if (dev_status & 0x40) {
      outcome = "needs-reset";
      break;
    }
    cpu_relax();
  }
  dev_status = mmio_read32(d->base + VIRTIO_MMIO_STATUS);
  /* STATUS_UNSET means the device never wrote a status: fine unless it claimed completion. */
  int ok = !(outcome[0] == 'c' && st == 0);
  tg_printf("TG blk-hostile case=%s outcome=%s status=%u device_status=0x%x result=%s\n", hostile_names[which], outcome, st, dev_status,
            ok ? "pass" : "fail");
  tg_result("blk-hostile", ok);
  mmio_write32(d->base + VIRTIO_MMIO_STATUS, 0);  /* reset: the queue we broke is gone */
}

void blk_hostile(void) {
  int di = tg_find_device(2, 0);
  if (di < 0) {
    tg_printf("TG blk-hostile error=no-virtio-blk-device result=fail\n");
    tg_result("blk-hostile", 0);
    return;
  }
  struct virtio_dev *d = &tg_devs[di];
  u8 *before = tg_alloc(CHUNK, 4096), *after = tg_alloc(CHUNK, 4096), *buf = tg_alloc(4096, 4096);
  struct blk b;
  memset(&b, 0, sizeof b);
  u32 st0 = blk_open(&b, d, 0, 0) ? 0x102 : blk_io(&b, VIRTIO_BLK_T_IN, 0, before, CHUNK);
  mmio_write32(d->base + VIRTIO_MMIO_STATUS, 0);
  for (int k = 0; k < H_COUNT; k++) blk_hostile_case(d, k, buf);
  memset(&b, 0, sizeof b);
  u32 st1 = blk_open(&b, d, 0, 0) ? 0x102 : blk_io(&b, VIRTIO_BLK_T_IN, 0, after, CHUNK);
  int same = memcmp(before, after, CHUNK) == 0;
  int ok = st0 == 0 && st1 == 0 && same;
  tg_printf("TG blk-hostile-recovery read_before=%u read_after=%u same_data=%d result=%s\n", st0, st1, same, ok ? "pass" : "fail");
  tg_result("blk-hostile-recovery", ok);
}
