/* Interrupt plumbing driven from CPL3: 8259 masking, LAPIC enable, IOAPIC
 * routing of virtio GSIs to IDT vectors. The only CPL0 part is the stub in
 * entry.S that counts the vector and EOIs the LAPIC. */
#include "tg.h"

volatile u64 tg_irq_counts[256];

#define LAPIC_BASE 0xFEE00000ull
#define LAPIC_VERSION 0x30
#define LAPIC_SVR 0xF0
#define IOAPIC0_BASE 0xFEC00000ull
/* QEMU's microvm may add a second IOAPIC for GSIs 24..47. */
#define IOAPIC1_BASE 0xFEC10000ull
#define TG_VECTOR_FIRST 0x40
#define TG_VECTOR_LAST 0x4f

static u32 ioapic_read(u64 base, u32 reg) {
  mmio_write32(base, reg);
  return mmio_read32(base + 0x10);
}

static void ioapic_write(u64 base, u32 reg, u32 v) {
  mmio_write32(base, reg);
  mmio_write32(base + 0x10, v);
}

void irq_setup_chips(void) {
  /* Unprogrammed 8259s would deliver (e.g. a PIT tick) at vectors that alias
   * CPU exceptions; nothing here uses them. */
  outb(0x21, 0xff);
  outb(0xa1, 0xff);
  /* Software-enable the LAPIC; 0xff is the spurious vector (no EOI for it). */
  mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x1ff);
}

static int ioapic_pins(u64 base) {
  u32 ver = ioapic_read(base, 1);
  if (ver == 0xffffffffu) return 0;
  return (int)((ver >> 16) & 0xff) + 1;
}

int ioapic_route(u32 gsi, u8 vector) {
  u64 base = IOAPIC0_BASE;
  u32 pin = gsi;
  int pins = ioapic_pins(base);
  if ((int)pin >= pins) {
    pin -= (u32)(pins > 0 ? pins : 24);
    base = IOAPIC1_BASE;
    if ((int)pin >= ioapic_pins(base)) return -1;
  }
  /* Edge-triggered, active high, fixed delivery to LAPIC 0. Edge suits both a
   * KVM irqfd pulse and QEMU's level line as long as the driver ACKs
   * InterruptStatus before it waits for the next one, which ours does. */
  ioapic_write(base, 0x11 + 2 * pin, 0);
  ioapic_write(base, 0x10 + 2 * pin, vector);
  return 0;
}

u64 irq_total(void) {
  u64 n = 0;
  for (int v = TG_VECTOR_FIRST; v <= TG_VECTOR_LAST; v++) n += tg_irq_counts[v];
  return n;
}

int irq_wait_vector(u8 vector, u64 seen, u64 timeout_cycles) {
  u64 start = rdtsc();
  /* Halting (not spinning) so the host gets the CPU back; the LAPIC timer
   * backstop wakes us now and then to look at the clock. */
  while (tg_irq_counts[vector] == seen && rdtsc() - start < timeout_cycles) tg_halt_until_irq(vector, seen);
  return tg_irq_counts[vector] != seen;
}

u64 tg_irq_waits, tg_irq_missed;

#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3E0
#define TG_TIMER_VECTOR 0x50

/* One-shot, divide-by-1: KVM's LAPIC timer runs at 1 GHz, so ~10 ms there;
 * only a backstop for a lost device interrupt, never a clock. */
void lapic_backstop_timer(void) {
  mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIVIDE, 0xB);
  mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, TG_TIMER_VECTOR);
  mmio_write32(LAPIC_BASE + LAPIC_TIMER_INITIAL, 10000000);
}
