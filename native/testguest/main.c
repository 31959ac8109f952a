/* Test guest main program, entered at CPL3 from entry.S. Reads its mode from
 * the PVH command line, runs it, prints "TG ..." lines on the 8250 and leaves
 * through the debug-exit port with the number of failed checks. */
#include "tg.h"

struct hvm_start_info {
  u32 magic, version, flags, nr_modules;
  u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
  u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
  u64 addr, size;
  u32 type, reserved;
};
#define HVM_START_MAGIC 0x336ec578u

extern u64 start_info_pa;
extern char __image_end[];
extern void tg_load_null_idt_and_fault(void) __attribute__((noreturn));

struct tg_args tg_args;
u64 tg_low_ram_end;
u64 tg_timeout_cycles = 100000000000ull;
static char cmdline[2048];

/* Set by CPL3 before it traps into CPL0 on purpose (see tg_trap). */
#define REQ_TRIPLE_FAULT 0x7f1
#define REQ_ENABLE_IF 0x7f2
#define REQ_HALT 0x7f3
#define REQ_EMUFAIL 0x7f4
#define UNBACKED_HOLE 0xC0000000ul
static volatile u32 tg_request;
static volatile u64 halt_seen;
static volatile u8 halt_vector;

struct trap_frame {
  u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
  u64 vector, error, rip, cs, rflags, rsp, ss;
};

/* CPL0, emulated on the dev machines: runs only for exceptions. A #GP from
 * CPL3 with a pending request is the guest asking for a privileged action
 * (an `int n` would do, but the emulator here cannot run it). */
void tg_trap(struct trap_frame *f) {
  if (f->vector == 13 && (f->cs & 3) == 3 && tg_request == REQ_TRIPLE_FAULT) tg_load_null_idt_and_fault();
  /* From CPL0 on purpose: standard KVM answers an instruction fetch it cannot
   * emulate at CPL3 by injecting #UD into the guest, and only at CPL0 with an
   * emulation-failure exit (KVM_EXIT_INTERNAL_ERROR) to the VMM. */
  if (f->vector == 13 && (f->cs & 3) == 3 && tg_request == REQ_EMUFAIL) ((void (*)(void))UNBACKED_HOLE)();
  if (f->vector == 13 && (f->cs & 3) == 3 && tg_request == REQ_HALT) {
    tg_request = 0;
    f->rip += 1;  /* the hlt that trapped */
    /* IF is clear here (interrupt gate): an interrupt that arrived since the
     * caller sampled the count is seen now, and sti's one-instruction shadow
     * covers the hlt, so no wake-up is lost between the check and the halt. */
    if (tg_irq_counts[halt_vector] == halt_seen) __asm__ volatile("sti; hlt; cli" ::: "memory");
    return;
  }
  if (f->vector == 13 && (f->cs & 3) == 3 && tg_request == REQ_ENABLE_IF) {
    tg_request = 0;
    f->rflags |= 0x200;
    f->rip += 1;  /* the hlt that trapped */
    return;
  }
  u64 cr2;
  __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
  tg_printf("TG FAULT vector=%lu error=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx rsp=0x%lx cr2=0x%lx result=fail\n", f->vector, f->error,
            f->rip, f->cs, f->rflags, f->rsp, cr2);
  tg_printf("TG DONE pass=%u fail=%u\n", tg_pass, tg_fail + 1);
  tg_exit(0x7e);
}

/* Gives the vCPU back to the host until an interrupt (hlt is CPL0-only, so
 * CPL3 asks the #GP handler), unless `vector` already moved past `seen`. A
 * one-shot LAPIC timer bounds the sleep in case a device never interrupts.
 * A spinning guest would take the CPU the VMM's device threads need on a
 * small host. */
void tg_halt_until_irq(u8 vector, u64 seen) {
  lapic_backstop_timer();
  halt_vector = vector;
  halt_seen = seen;
  tg_request = REQ_HALT;
  __asm__ volatile("hlt" ::: "memory");
}

int tg_find_device(u32 device_id, int nth) {
  for (int i = 0; i < tg_ndevs; i++)
    if (tg_devs[i].ok && tg_devs[i].device_id == device_id && nth-- == 0) return i;
  return -1;
}

static int streq_prefix(const char *s, const char *prefix, const char **rest) {
  usize n = strlen(prefix);
  if (memcmp(s, prefix, n) != 0) return 0;
  *rest = s + n;
  return 1;
}

static u64 parse_u64(const char *s) {
  u64 v = 0;
  if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    for (s += 2;; s++) {
      char c = *s;
      if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
      else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v = v * 16 + (u64)(c - 'A' + 10);
      else break;
    }
    return v;
  }
  while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
  if (*s == 'K' || *s == 'k') v <<= 10;
  if (*s == 'M' || *s == 'm') v <<= 20;
  return v;
}

static void parse_cmdline(void) {
  tg_args.mode = "check";
  tg_args.seed = 1;
  tg_args.write_off = 4096;
  tg_args.write_len = 65536;
  tg_args.vsock_bytes = 1 << 20;
  tg_args.vsock_buf = 64 << 10;
  char *p = cmdline;
  while (*p) {
    while (*p == ' ') *p++ = 0;
    if (!*p) break;
    char *tok = p;
    while (*p && *p != ' ') p++;
    if (*p) *p++ = 0;
    const char *v;
    if (streq_prefix(tok, "virtio_mmio.device=", &v)) {
      if (virtio_add_from_cmdline(v)) tg_printf("TG warn what=bad-virtio_mmio.device value=%s\n", v);
    } else if (streq_prefix(tok, "tg.mode=", &v)) tg_args.mode = v;
    else if (streq_prefix(tok, "tg.seed=", &v)) tg_args.seed = (u32)parse_u64(v);
    else if (streq_prefix(tok, "tg.write_off=", &v)) tg_args.write_off = parse_u64(v);
    else if (streq_prefix(tok, "tg.write_len=", &v)) tg_args.write_len = parse_u64(v);
    else if (streq_prefix(tok, "tg.vsock_port=", &v)) tg_args.vsock_port = (u32)parse_u64(v);
    else if (streq_prefix(tok, "tg.vsock_listen=", &v)) tg_args.vsock_listen = (u32)parse_u64(v);
    else if (streq_prefix(tok, "tg.vsock_bytes=", &v)) tg_args.vsock_bytes = parse_u64(v);
    else if (streq_prefix(tok, "tg.vsock_buf=", &v)) tg_args.vsock_buf = (u32)parse_u64(v);
    else if (streq_prefix(tok, "tg.n=", &v)) tg_args.n = parse_u64(v);
    else if (streq_prefix(tok, "tg.mib=", &v)) tg_args.mib = parse_u64(v);
    else if (streq_prefix(tok, "tg.qd=", &v)) tg_args.qd = (u32)parse_u64(v);
    else if (streq_prefix(tok, "tg.pause=", &v)) tg_args.pause = v;
    else if (streq_prefix(tok, "tg.timeout=", &v) && parse_u64(v)) tg_timeout_cycles = parse_u64(v) * 1000000000ull;
  }
}

static int streq(const char *a, const char *b) { return strlen(a) == strlen(b) && memcmp(a, b, strlen(a)) == 0; }

/* Reads start_info: the command line and where RAM is for the allocator. */
static int read_start_info(void) {
  const struct hvm_start_info *si = (const struct hvm_start_info *)start_info_pa;
  if (!si || si->magic != HVM_START_MAGIC) return -1;
  if (si->cmdline_paddr) {
    const char *c = (const char *)si->cmdline_paddr;
    usize n = 0;
    while (c[n] && n < sizeof cmdline - 1) { cmdline[n] = c[n]; n++; }
    cmdline[n] = 0;
  }
  u64 start = ((u64)__image_end + 4095) & ~4095ull, end = 0;
  if (si->version >= 1 && si->memmap_paddr) {
    const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
      if (m[i].type == 1 && m[i].addr <= start && m[i].addr + m[i].size > start) end = m[i].addr + m[i].size;
  }
  /* No memory map (start_info version 0): assume the 16 MiB minimum we document. */
  if (!end) end = 16ull << 20;
  if (end > 0xC0000000ull) end = 0xC0000000ull;
  tg_low_ram_end = end;
  tg_alloc_init(start, end);
  return 0;
}

static void discover_devices(int route_irqs) {
  for (int i = 0; i < tg_ndevs; i++) {
    struct virtio_dev *d = &tg_devs[i];
    d->ok = virtio_probe(d) == 0;
    if (!d->ok) continue;
    /* check mode: blk completions and idle vsock waits are interrupt-driven.
     * Benchmarks poll with every pin masked. */
    if (route_irqs && (d->device_id == 2 || d->device_id == 19)) {
      d->vector = (u8)(0x40 + i);
      if (ioapic_route(d->gsi, d->vector)) d->vector = 0;
    }
    tg_printf("TG virtio index=%d addr=0x%lx irq=%u id=%u version=%u vector=%u\n", i, d->base, d->gsi, d->device_id, d->version, d->vector);
  }
}

/* What RAM the VMM announced, and whether its last byte below 3 GiB is really
 * there (backed, writable, reads back). */
static void check_memory(void) {
  const struct hvm_start_info *si = (const struct hvm_start_info *)start_info_pa;
  u64 ram = 0, top = 0;
  u32 n = si->version >= 1 && si->memmap_paddr ? si->memmap_entries : 0;
  const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
  for (u32 i = 0; i < n; i++) {
    if (m[i].type != 1) continue;
    ram += m[i].size;
    if (m[i].addr + m[i].size <= 0xC0000000ull && m[i].addr + m[i].size > top) top = m[i].addr + m[i].size;
  }
  int ok = 0;
  if (top >= 8u << 20) {
    volatile u64 *last = (volatile u64 *)(top - 8);
    u64 was = *last;
    *last = 0x7467746f70u ^ top;
    ok = *last == (0x7467746f70u ^ top);
    *last = was;
  }
  tg_printf("TG memory start_info_version=%u memmap_entries=%u ram_bytes=%lu low_ram_end=0x%lx top_rw=%d result=%s\n", si->version, n, ram,
            top, ok, ok ? "pass" : "fail");
  tg_result("memory", ok);
}

static void mode_check(void) {
  check_memory();
  irq_setup_chips();
  discover_devices(1);
  /* The snapshot point waits on the vsock event queue, so vsock is live first. */
  if (tg_args.pause && vsock_prepare_pause()) tg_args.pause = 0;
  blk_check_all();
  vsock_check();
  /* The blk checks waited on their completions by interrupt; at least one
   * must have arrived through IOAPIC -> LAPIC -> IDT -> EOI. */
  int blk = tg_find_device(2, 0) >= 0;
  u64 n = irq_total();
  int ok = n > 0 && tg_irq_waits > 0 && tg_irq_missed == 0;
  tg_printf("TG irq count=%lu waits=%lu missed=%lu spurious=%lu result=%s\n", n, tg_irq_waits, tg_irq_missed, tg_irq_counts[0xff],
            !blk || ok ? "pass" : "fail");
  if (blk) tg_result("irq", ok);
}

static void mode_bench_mmio(void) {
  discover_devices(0);
  if (tg_ndevs == 0 || !tg_devs[0].ok) {
    tg_printf("TG bench-mmio error=no-virtio-device result=fail\n");
    tg_result("bench-mmio", 0);
    return;
  }
  u64 n = tg_args.n ? tg_args.n : 100000, base = tg_devs[0].base;
  u32 bad = 0;
  tg_printf("TG bench-mmio begin n=%lu\n", n);
  u64 t0 = rdtsc();
  for (u64 i = 0; i < n; i++)
    if (mmio_read32(base + VIRTIO_MMIO_MAGIC) != 0x74726976) bad++;
  u64 t1 = rdtsc();
  serial_putc('\n');  /* end marker (README "Benchmarks") */
  tg_printf("TG bench-mmio end n=%lu bad=%u cycles=%lu\n", n, bad, t1 - t0);
  tg_result("bench-mmio", bad == 0);
}

int tg_iopl3;

void tg_main(void) {
  tg_iopl3 = ((read_rflags() >> 12) & 3) == 3;
  if (!tg_iopl3) {
    /* No sti at CPL3 here: ask CPL0 to return with IF set, once. */
    tg_request = REQ_ENABLE_IF;
    __asm__ volatile("hlt" ::: "memory");
  }
  if (read_start_info()) {
    tg_printf("TG error what=start_info reason=bad-magic-in-EBX result=fail\nTG DONE pass=0 fail=1\n");
    tg_exit(1);
  }
  /* Tokenising overwrites the buffer; keep the original for the log line. */
  static char original[sizeof cmdline];
  memcpy(original, cmdline, sizeof cmdline);
  parse_cmdline();
  const char *m = tg_args.mode;
  if (streq(m, "hello")) {
    tg_printf("TG hello\n");
    tg_exit(0);
  }
  tg_printf("TG cmdline %s\n", original);
  tg_printf("TG start mode=%s seed=%u iopl=%d rflags=0x%lx\n", m, tg_args.seed, tg_iopl3 ? 3 : 0, read_rflags());
  if (streq(m, "check")) mode_check();
  else if (streq(m, "triplefault")) {
    tg_request = REQ_TRIPLE_FAULT;
    tg_printf("TG triplefault loading-null-idt=1\n");
    __asm__ volatile("hlt");  /* #GP at CPL3 -> tg_trap */
  } else if (streq(m, "emufail")) {
    tg_printf("TG emufail jump=0x%lx cpl=0\n", UNBACKED_HOLE);
    tg_request = REQ_EMUFAIL;
    __asm__ volatile("hlt");  /* #GP at CPL3 -> tg_trap, which jumps */
  } else if (streq(m, "serial")) {
    /* Numbered lines: the host checks every byte arrives, in order. */
    u64 n = tg_args.n ? tg_args.n : 100;
    for (u64 i = 0; i < n; i++) tg_printf("TG serial seq=%lu of=%lu\n", i, n);
    tg_result("serial", 1);
  } else if (streq(m, "bench-mmio")) mode_bench_mmio();
  else if (streq(m, "bench-blk")) { discover_devices(0); blk_bench(); }
  else if (streq(m, "bench-vsock")) { discover_devices(0); vsock_bench(); }
  else if (streq(m, "vsock-overrun")) { discover_devices(0); vsock_overrun(); }
  else if (streq(m, "blk-hostile")) { discover_devices(0); blk_hostile(); }
  else {
    tg_printf("TG error what=mode value=%s reason=unknown-mode result=fail\n", m);
    tg_result("mode", 0);
  }
  tg_printf("TG DONE pass=%u fail=%u\n", tg_pass, tg_fail);
  tg_exit(tg_fail);
}
