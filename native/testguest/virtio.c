/* A minimal virtio-mmio (version 2) driver core: device discovery from the
 * kernel command line, feature negotiation, split virtqueues. */
#include "tg.h"

struct virtio_dev tg_devs[VIRTIO_MAX_DEVICES];
int tg_ndevs;

#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_INTERRUPT_ACK 0x064
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

static const char *parse_num(const char *s, u64 *out) {
  u64 v = 0;
  if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    s += 2;
    for (;; s++) {
      char c = *s;
      if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
      else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v = v * 16 + (u64)(c - 'A' + 10);
      else break;
    }
  } else {
    while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
  }
  switch (*s) {
    case 'K': case 'k': v <<= 10; s++; break;
    case 'M': case 'm': v <<= 20; s++; break;
    case 'G': case 'g': v <<= 30; s++; break;
    default: break;
  }
  *out = v;
  return s;
}

/* Linux syntax: virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>] */
int virtio_add_from_cmdline(const char *value) {
  u64 size, addr, irq;
  const char *s = parse_num(value, &size);
  if (*s != '@') return -1;
  s = parse_num(s + 1, &addr);
  if (*s != ':') return -1;
  parse_num(s + 1, &irq);
  if (tg_ndevs >= VIRTIO_MAX_DEVICES || size < 0x100 || addr < 0xC0000000ull || addr + size > 0x100000000ull) return -1;
  struct virtio_dev *d = &tg_devs[tg_ndevs++];
  d->base = addr;
  d->size = size;
  d->gsi = (u32)irq;
  return 0;
}

static u32 rd(struct virtio_dev *d, u32 off) { return mmio_read32(d->base + off); }
static void wr(struct virtio_dev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

int virtio_probe(struct virtio_dev *d) {
  if (rd(d, VIRTIO_MMIO_MAGIC) != 0x74726976) return -1;
  d->version = rd(d, VIRTIO_MMIO_VERSION);
  d->device_id = rd(d, VIRTIO_MMIO_DEVICE_ID);
  if (d->version != 2 || d->device_id == 0) return -1;
  return 0;
}

int virtio_negotiate(struct virtio_dev *d, u64 wanted) {
  wr(d, VIRTIO_MMIO_STATUS, 0);
  for (int i = 0; i < 1000 && rd(d, VIRTIO_MMIO_STATUS) != 0; i++) cpu_relax();
  wr(d, VIRTIO_MMIO_STATUS, S_ACKNOWLEDGE);
  wr(d, VIRTIO_MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER);
  wr(d, R_DEVICE_FEATURES_SEL, 0);
  u64 f = rd(d, R_DEVICE_FEATURES);
  wr(d, R_DEVICE_FEATURES_SEL, 1);
  f |= (u64)rd(d, R_DEVICE_FEATURES) << 32;
  d->device_features = f;
  d->driver_features = f & (wanted | VIRTIO_F_VERSION_1);
  if (!(d->driver_features & VIRTIO_F_VERSION_1)) {
    wr(d, VIRTIO_MMIO_STATUS, S_FAILED);
    return -1;
  }
  wr(d, R_DRIVER_FEATURES_SEL, 0);
  wr(d, R_DRIVER_FEATURES, (u32)d->driver_features);
  wr(d, R_DRIVER_FEATURES_SEL, 1);
  wr(d, R_DRIVER_FEATURES, (u32)(d->driver_features >> 32));
  wr(d, VIRTIO_MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
  if (!(rd(d, VIRTIO_MMIO_STATUS) & S_FEATURES_OK)) {
    wr(d, VIRTIO_MMIO_STATUS, S_FAILED);
    return -2;
  }
  return 0;
}

int virtq_setup(struct virtio_dev *d, struct virtq *q, u16 index, u16 max_size, int want_interrupts) {
  wr(d, R_QUEUE_SEL, index);
  if (rd(d, R_QUEUE_READY) != 0) return -1;
  u32 max = rd(d, R_QUEUE_NUM_MAX);
  if (max == 0) return -2;
  u16 size = max_size;
  if (size > max) size = (u16)max;
  /* Split-ring sizes are powers of two (spec 2.7.10.1 for packed is free,
   * split is not); round down. */
  while (size & (size - 1)) size &= (u16)(size - 1);
  q->index = index;
  q->size = size;
  q->base = d->base;
  q->desc = tg_alloc(16ul * size, 4096);
  q->avail = tg_alloc(6 + 2ul * size, 4096);
  q->used = tg_alloc(6 + 8ul * size, 4096);
  for (u16 i = 0; i < size; i++) q->desc[i].next = (u16)(i + 1);
  q->free_head = 0;
  q->num_free = size;
  q->avail_idx = 0;
  q->last_used = 0;
  q->avail->flags = want_interrupts ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
  wr(d, R_QUEUE_NUM, size);
  wr(d, R_QUEUE_DESC, (u32)(u64)q->desc);
  wr(d, R_QUEUE_DESC + 4, (u32)((u64)q->desc >> 32));
  wr(d, R_QUEUE_DRIVER, (u32)(u64)q->avail);
  wr(d, R_QUEUE_DRIVER + 4, (u32)((u64)q->avail >> 32));
  wr(d, R_QUEUE_DEVICE, (u32)(u64)q->used);
  wr(d, R_QUEUE_DEVICE + 4, (u32)((u64)q->used >> 32));
  wr(d, R_QUEUE_READY, 1);
  return rd(d, R_QUEUE_READY) == 1 ? 0 : -3;
}

int virtio_driver_ok(struct virtio_dev *d) {
  wr(d, VIRTIO_MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  u32 s = rd(d, VIRTIO_MMIO_STATUS);
  return (s & S_DRIVER_OK) && !(s & (S_NEEDS_RESET | S_FAILED)) ? 0 : -1;
}

u32 virtio_ack_interrupt(struct virtio_dev *d) {
  u32 s = rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
  if (s) wr(d, R_INTERRUPT_ACK, s);
  return s;
}

void virtq_kick(struct virtq *q) {
  /* The avail index store must be visible before the device reads used->flags
   * (spec 2.7.10: a device that is still processing sets NO_NOTIFY and will
   * see the new entries itself). Each notify is a VM exit. */
  mb();
  if (q->used->flags & VIRTQ_USED_F_NO_NOTIFY) return;
  mmio_write32(q->base + VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_alloc_chain(struct virtq *q, u16 n) {
  if (n == 0 || q->num_free < n) return -1;
  u16 head = q->free_head, i = head;
  for (u16 k = 1; k < n; k++) {
    q->desc[i].flags = VIRTQ_DESC_F_NEXT;
    i = q->desc[i].next;
  }
  q->desc[i].flags = 0;
  q->free_head = q->desc[i].next;
  q->num_free = (u16)(q->num_free - n);
  return head;
}

void virtq_free_chain(struct virtq *q, u16 head) {
  u16 i = head, n = 1;
  while (q->desc[i].flags & VIRTQ_DESC_F_NEXT) {
    i = q->desc[i].next;
    n++;
  }
  q->desc[i].next = q->free_head;
  q->free_head = head;
  q->num_free = (u16)(q->num_free + n);
}

void virtq_publish(struct virtq *q, u16 head) {
  q->avail->ring[q->avail_idx % q->size] = head;
  barrier();
  q->avail_idx++;
  *(volatile u16 *)&q->avail->idx = q->avail_idx;
}

int virtq_has_used(struct virtq *q) {
  barrier();
  return q->used->idx != q->last_used;
}

struct virtq_used_elem virtq_pop_used(struct virtq *q) {
  barrier();
  struct virtq_used_elem e;
  e.id = q->used->ring[q->last_used % q->size].id;
  e.len = q->used->ring[q->last_used % q->size].len;
  q->last_used++;
  return e;
}
