/* Shared declarations of the freestanding test guest (no libc).
 * Everything here runs at CPL3 unless marked otherwise. */
#ifndef TG_H
#define TG_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long usize;
#define NULL ((void *)0)

#define barrier() __asm__ volatile("" ::: "memory")
/* x86 is TSO: ordering between our ring writes and the device only needs the
 * compiler not to reorder; mfence where a store must be visible before a load. */
#define mb() __asm__ volatile("mfence" ::: "memory")

/* Always DX-addressed: entry.S emulates exactly these encodings when the
 * hypervisor denies CPL3 port access (see "exception:" there). */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "d"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "d"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "d"(port)); return v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
/* 1 when CPL3 really has IOPL=3 (standard KVM, QEMU TCG): port I/O is native
 * and IF stays 0 at CPL3, so interrupts are taken only inside the CPL0 halt of
 * tg_halt_until_irq. 0 under PVM, whose user mode always has IOPL=0 and
 * always takes interrupts: port I/O goes through entry.S's #GP emulation. */
extern int tg_iopl3;
static inline u64 read_rflags(void) { u64 f; __asm__ volatile("pushfq; popq %0" : "=r"(f)); return f; }

/* lib.c */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
void serial_putc(char c);
void serial_write(const char *s, usize n);
void tg_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
u32 crc32_update(u32 crc, const u8 *p, usize n);  /* IEEE 802.3, reflected; start and end with ~ */
void pattern_fill(u32 seed, u64 offset, u8 *p, usize n);
void *tg_alloc(usize size, usize align);          /* zeroed; dies when RAM runs out */
void tg_alloc_init(u64 start, u64 end);
void tg_exit(u32 code) __attribute__((noreturn));
void tg_result(const char *check, int ok);        /* counts pass/fail */
extern u32 tg_pass, tg_fail;
/* A generous bound for waits on devices. The TSC rate is unknown to the
 * guest, so it is in cycles: tg.timeout=<10^9 cycles>, default 100 (about
 * 30-50 s). Only failures wait that long; the standard-KVM lab (an L2 under
 * TCG, with four guests at once) needed more than the 7 s of 20 G cycles. */
extern u64 tg_timeout_cycles;
#define TG_TIMEOUT_CYCLES (tg_timeout_cycles)

/* irq.c */
extern volatile u64 tg_irq_counts[256];
void irq_setup_chips(void);                        /* mask the 8259s, enable the LAPIC */
int ioapic_route(u32 gsi, u8 vector);              /* 0 on success */
u64 irq_total(void);
/* Halts until vector's count moves past `seen` (1) or the timeout (0). */
int irq_wait_vector(u8 vector, u64 seen, u64 timeout_cycles);
extern u64 tg_irq_waits, tg_irq_missed;
void lapic_backstop_timer(void);
void tg_halt_until_irq(u8 vector, u64 seen);       /* main.c: hlt via CPL0 unless `vector` moved past `seen` */             /* interrupt-driven waits, and those that timed out */

/* virtio.c */
#define VIRTIO_MAX_DEVICES 16
struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct virtq_avail { u16 flags; u16 idx; u16 ring[]; };
struct virtq_used_elem { u32 id; u32 len; };
struct virtq_used { u16 flags; u16 idx; struct virtq_used_elem ring[]; };
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq {
  u16 index, size;
  struct virtq_desc *desc;
  struct virtq_avail *avail;
  volatile struct virtq_used *used;
  u16 avail_idx, last_used;
  u16 free_head, num_free;
  u64 base;                                        /* mmio window, for notify */
};

struct virtio_dev {
  u64 base, size;
  u32 gsi, device_id, version;
  u64 device_features, driver_features;
  u8 vector;                                       /* IDT vector of its IOAPIC pin, 0 if none */
  int ok;
};
extern struct virtio_dev tg_devs[VIRTIO_MAX_DEVICES];
extern int tg_ndevs;
int virtio_add_from_cmdline(const char *value);   /* "<size>@<addr>:<irq>" */
int virtio_probe(struct virtio_dev *d);            /* magic/version/id; 0 if a device is there */
int virtio_negotiate(struct virtio_dev *d, u64 wanted);
int virtq_setup(struct virtio_dev *d, struct virtq *q, u16 index, u16 max_size, int want_interrupts);
int virtio_driver_ok(struct virtio_dev *d);
u32 virtio_ack_interrupt(struct virtio_dev *d);
void virtq_kick(struct virtq *q);
int virtq_alloc_chain(struct virtq *q, u16 n);     /* head index or -1 */
void virtq_free_chain(struct virtq *q, u16 head);
void virtq_publish(struct virtq *q, u16 head);     /* avail ring, no notify */
int virtq_has_used(struct virtq *q);
struct virtq_used_elem virtq_pop_used(struct virtq *q);

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_CONFIG 0x100
#define VIRTIO_F_VERSION_1 (1ull << 32)

/* blk.c / vsock.c */
struct tg_args {
  const char *mode;
  u32 seed;
  u64 write_off, write_len;
  u32 vsock_port, vsock_listen;
  u64 vsock_bytes;
  u32 vsock_buf;  /* buf_alloc the guest advertises */
  u64 n;          /* bench iterations */
  u64 mib;        /* bench transfer size */
  u32 qd;         /* bench-blk: requests in flight for the second random-read phase */
  const char *pause;  /* check: a snapshot point ("after-blk0"), see README "Snapshot point" */
};
extern struct tg_args tg_args;
void blk_check_all(void);
void blk_bench(void);
void blk_hostile(void);
extern u64 tg_low_ram_end;                         /* end of the RAM region holding the image */
void vsock_check(void);
void vsock_bench(void);
void vsock_overrun(void);
int vsock_prepare_pause(void);                     /* opens vsock early; 0 on success */
void tg_pause_point(const char *name);             /* waits for the transport-reset event */
int tg_find_device(u32 device_id, int nth);

#endif
