/* Freestanding support: memory/string routines gcc may call, the 8250 console,
 * a small printf, CRC32, the seeded pattern shared with the host tests, a bump
 * allocator and the debug-exit port. */
#include <stdarg.h>
#include "tg.h"

u32 tg_pass, tg_fail;

void *memset(void *d, int c, usize n) {
  u8 *p = d;
  while (n--) *p++ = (u8)c;
  return d;
}

void *memcpy(void *d, const void *s, usize n) {
  u8 *dp = d;
  const u8 *sp = s;
  while (n--) *dp++ = *sp++;
  return d;
}

int memcmp(const void *a, const void *b, usize n) {
  const u8 *x = a, *y = b;
  for (; n; n--, x++, y++)
    if (*x != *y) return *x < *y ? -1 : 1;
  return 0;
}

usize strlen(const char *s) {
  usize n = 0;
  while (s[n]) n++;
  return n;
}

#define COM1 0x3f8
#define LSR_THRE 0x20

void serial_putc(char c) {
  /* Bounded: an absent UART reads all-ones (THRE set), a stuck one must not hang us. */
  for (int i = 0; i < 100000 && !(inb(COM1 + 5) & LSR_THRE); i++) cpu_relax();
  outb(COM1, (u8)c);
}

void serial_write(const char *s, usize n) {
  for (usize i = 0; i < n; i++) serial_putc(s[i]);
}

/* Lines are assembled in a buffer and written at once so an interrupt handler
 * can never interleave bytes into a half-written line. */
static char line[512];
static usize line_len;

static void emit(char c) {
  if (line_len < sizeof line) line[line_len++] = c;
}

static void emit_num(u64 v, unsigned base, int width, char pad) {
  char buf[24];
  int n = 0;
  do {
    unsigned d = (unsigned)(v % base);
    buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    v /= base;
  } while (v);
  while (n < width) buf[n++] = pad;
  while (n) emit(buf[--n]);
}

void tg_printf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  line_len = 0;
  for (const char *f = fmt; *f; f++) {
    if (*f != '%') { emit(*f); continue; }
    f++;
    char pad = ' ';
    int width = 0, longs = 0;
    if (*f == '0') { pad = '0'; f++; }
    while (*f >= '0' && *f <= '9') width = width * 10 + (*f++ - '0');
    while (*f == 'l') { longs++; f++; }
    switch (*f) {
      case 's': { const char *s = va_arg(ap, const char *); if (!s) s = "(null)"; while (*s) emit(*s++); break; }
      case 'c': emit((char)va_arg(ap, int)); break;
      case 'd': {
        i64 v = longs ? va_arg(ap, i64) : va_arg(ap, int);
        if (v < 0) { emit('-'); v = -v; }
        emit_num((u64)v, 10, width, pad);
        break;
      }
      case 'u': emit_num(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad); break;
      case 'x': emit_num(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad); break;
      case '%': emit('%'); break;
      default: emit('?'); break;
    }
  }
  va_end(ap);
  serial_write(line, line_len);
}

static u32 crc_table[256];

u32 crc32_update(u32 crc, const u8 *p, usize n) {
  if (!crc_table[1]) {
    for (u32 i = 0; i < 256; i++) {
      u32 c = i;
      for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      crc_table[i] = c;
    }
  }
  while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

/* The seeded pattern (README.md "Pattern"): 32-bit little-endian words,
 * word i of a stream = fmix32(seed + i * 0x9E3779B1). Cheap to compute in
 * TypeScript with Math.imul, addressable at any byte offset. */
static inline u32 pattern_word(u32 seed, u32 i) {
  u32 h = seed + i * 0x9E3779B1u;
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

void pattern_fill(u32 seed, u64 offset, u8 *p, usize n) {
  while (n && (offset & 3)) {
    *p++ = (u8)(pattern_word(seed, (u32)(offset >> 2)) >> (8 * (offset & 3)));
    offset++;
    n--;
  }
  while (n >= 4) {
    u32 w = pattern_word(seed, (u32)(offset >> 2));
    p[0] = (u8)w; p[1] = (u8)(w >> 8); p[2] = (u8)(w >> 16); p[3] = (u8)(w >> 24);
    p += 4; offset += 4; n -= 4;
  }
  while (n) {
    *p++ = (u8)(pattern_word(seed, (u32)(offset >> 2)) >> (8 * (offset & 3)));
    offset++;
    n--;
  }
}

static u64 heap_next, heap_end;

void tg_alloc_init(u64 start, u64 end) {
  heap_next = start;
  heap_end = end;
}

void *tg_alloc(usize size, usize align) {
  u64 p = (heap_next + align - 1) & ~(u64)(align - 1);
  if (p + size > heap_end) {
    tg_printf("TG error what=alloc size=%lu free=%lu reason=guest-RAM-exhausted\n", (u64)size, heap_end - heap_next);
    tg_exit(0x7d);
  }
  heap_next = p + size;
  memset((void *)p, 0, size);
  return (void *)p;
}

void tg_exit(u32 code) {
  outl(0xf4, code);
  /* Only reached if no debug-exit device is present. */
  for (;;) cpu_relax();
}

void tg_result(const char *check, int ok) {
  (void)check;
  if (ok) tg_pass++;
  else tg_fail++;
}
