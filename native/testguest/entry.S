/* PVH entry, long-mode switch, descriptor tables and interrupt stubs.
 *
 * Everything in this file runs at CPL0, which the development machines' KVM
 * executes in its instruction emulator (~650 ns per instruction) while CPL3
 * runs natively: so the CPL0 path is straight-line and short, all tables are
 * built at link time, and the real work happens in C at CPL3 (main.c).
 * It must still be correct on standard KVM and real hardware, which check
 * segment attributes, TSS validity and canonical addresses strictly. */

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   0x1b   /* GDT index 3, RPL 3 */
#define USER_CS   0x23   /* GDT index 4, RPL 3 */
#define TSS_SEL   0x28
#define LAPIC_EOI 0xFEE000B0

/* XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit physical entry point. The
 * descriptor is 8 bytes because QEMU reads a size_t from it for 64-bit ELFs. */
  .section .note.Xen, "a", @note
  .balign 4
  .long 4, 8, 18
  .asciz "Xen"
  .balign 4
  .quad pvh_entry
  .balign 4

  .section .text.entry, "ax"
  .code32
  .globl pvh_entry
pvh_entry:
  /* The first thing the guest does: one byte on the 8250, so a host can time
   * VMM start -> first guest instruction by its arrival. */
  movw $0x3f8, %dx
  movb $'\n', %al
  outb %al, %dx
  cli
  movl %ebx, start_info_pa
  lgdt gdt_desc
  movl %cr4, %eax
  orl $0x20, %eax                 /* PAE */
  movl %eax, %cr4
  movl $pml4, %eax
  movl %eax, %cr3
  movl $0xC0000080, %ecx          /* EFER.LME */
  rdmsr
  orl $0x100, %eax
  wrmsr
  movl %cr0, %eax
  andl $0x9fffffff, %eax          /* caches on (CD = NW = 0), whatever the loader left */
  orl $0x80000001, %eax           /* PG | PE */
  movl %eax, %cr0
  ljmp $KERNEL_CS, $long_entry

  .code64
long_entry:
  movl $KERNEL_DS, %eax
  movl %eax, %ds
  movl %eax, %es
  movl %eax, %ss
  xorl %eax, %eax
  movl %eax, %fs
  movl %eax, %gs
  movq $kstack_top, %rsp
  lidt idt_desc
  movw $TSS_SEL, %ax
  ltr %ax
  /* Drop to CPL3 with IOPL=3 (port I/O, cli/sti allowed there) and IF=0. */
  pushq $USER_DS
  pushq $ustack_top
  pushq $0x3002
  pushq $USER_CS
  pushq $user_entry
  iretq

  .text
user_entry:
  andq $-16, %rsp
  call tg_main
1:
  jmp 1b

/* Used by main.c's triple-fault mode from the #GP handler at CPL0. */
  .globl tg_load_null_idt_and_fault
tg_load_null_idt_and_fault:
  lidt null_idt_desc
  ud2

/* 256 stubs, 16 bytes apart starting at isr_stubs (4 KiB aligned by the
 * linker script, so the gates' low 16 offset bits never carry). */
  .section .text.isr, "ax"
  .set vec, 0
  .rept 256
  .balign 16
  .if !(vec == 8 || vec == 10 || vec == 11 || vec == 12 || vec == 13 || vec == 14 || vec == 17 || vec == 21 || vec == 29 || vec == 30)
  pushq $0
  .endif
  pushq $vec
  jmp isr_common
  .set vec, vec + 1
  .endr

  .balign 16
isr_common:
  cmpq $32, (%rsp)
  jb exception
  /* Device interrupt: count it and EOI; the CPL3 code that waits (sti + pause)
   * does the rest. Kept to a handful of instructions because CPL0 is emulated. */
  pushq %rax
  movq 8(%rsp), %rax
  lock incq tg_irq_counts(, %rax, 8)
  cmpq $0xff, %rax                /* the spurious vector takes no EOI */
  je 2f
  movl $LAPIC_EOI, %eax
  movl $0, (%rax)
2:
  popq %rax
  addq $16, %rsp
  iretq

exception:
  cmpq $13, (%rsp)
  jne slow
  testb $3, 24(%rsp)
  jz slow
  /* #GP from CPL3 on a port-I/O instruction: a hypervisor that cannot give
   * user mode IOPL=3 (the dev machines' PVM KVM forces IOPL=0 there) lands
   * here; do the access at CPL0 and step over it. Only the forms main.c
   * emits (DX-addressed 8/32-bit in/out). Standard KVM never takes this path. */
  pushq %rax
  pushq %rdx
  pushq %rsi
  movq 40(%rsp), %rsi
  movzbl (%rsi), %esi
  movq 16(%rsp), %rax
  cmpl $0xEE, %esi
  jne 3f
  outb %al, %dx
  jmp 8f
3:
  cmpl $0xEC, %esi
  jne 4f
  inb %dx, %al
  movb %al, 16(%rsp)
  jmp 8f
4:
  cmpl $0xEF, %esi
  jne 5f
  outl %eax, %dx
  jmp 8f
5:
  cmpl $0xED, %esi
  jne 6f
  inl %dx, %eax
  movq %rax, 16(%rsp)
  jmp 8f
6:
  popq %rsi
  popq %rdx
  popq %rax
  jmp slow
8:
  incq 40(%rsp)
  popq %rsi
  popq %rdx
  popq %rax
  addq $16, %rsp
  iretq

slow:
  pushq %rax
  pushq %rbx
  pushq %rcx
  pushq %rdx
  pushq %rsi
  pushq %rdi
  pushq %rbp
  pushq %r8
  pushq %r9
  pushq %r10
  pushq %r11
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, %rdi
  cld
  call tg_trap
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %r11
  popq %r10
  popq %r9
  popq %r8
  popq %rbp
  popq %rdi
  popq %rsi
  popq %rdx
  popq %rcx
  popq %rbx
  popq %rax
  addq $16, %rsp
  iretq

  .data
  .balign 8
  .globl start_info_pa
start_info_pa:
  .quad 0

  .balign 16
gdt:
  .quad 0
  .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
  .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
  .quad 0x00CFF2000000FFFF        /* 0x18 user data, DPL3 */
  .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit, DPL3 */
  .word 103                       /* 0x28 available 64-bit TSS, 16 bytes */
  .word __tss_lo16
  .byte __tss_mid8
  .byte 0x89
  .byte 0x00
  .byte __tss_hi8
  .long 0
  .long 0
gdt_end:

  .balign 8
gdt_desc:
  .word gdt_end - gdt - 1
  .quad gdt

  .balign 8
idt_desc:
  .word 256 * 16 - 1
  .quad idt
null_idt_desc:
  .word 0
  .quad 0

  .balign 16
  .globl tss64
tss64:
  .long 0
  .quad kstack_top                /* RSP0: where interrupts from CPL3 land */
  .quad 0, 0                      /* RSP1, RSP2 */
  .quad 0                         /* reserved */
  .quad 0, 0, 0, 0, 0, 0, 0       /* IST1..7 */
  .quad 0
  .word 0
  .word 104                       /* I/O bitmap offset past the limit: no bitmap (IOPL=3 rules) */

  .balign 16
idt:
  .set vec, 0
  .rept 256
  .word __isr_lo16 + vec * 16
  .word KERNEL_CS
  .byte 0
  .byte 0x8E                      /* present, DPL0, 64-bit interrupt gate */
  .word __isr_hi16
  .long 0
  .long 0
  .set vec, vec + 1
  .endr

/* Identity map of the low 4 GiB with 2 MiB pages, user-accessible (the CPL3
 * code drives RAM, virtio-mmio windows, IOAPIC and LAPIC directly). The top
 * GiB (MMIO: virtio windows, IOAPIC, LAPIC) is uncached. */
  .section .data.pagetables, "aw"
  .balign 4096
pml4:
  .quad pdpt + 0x7
  .fill 511, 8, 0
pdpt:
  .quad pd0 + 0x7
  .quad pd1 + 0x7
  .quad pd2 + 0x7
  .quad pd3 + 0x7
  .fill 508, 8, 0
pd0:
  .set addr, 0
  .rept 1536
  .quad addr + 0x87               /* P | RW | US | PS */
  .set addr, addr + 0x200000
  .endr
pd3:
  .rept 512
  .quad addr + 0x9f               /* P | RW | US | PWT | PCD | PS */
  .set addr, addr + 0x200000
  .endr
  .set pd1, pd0 + 4096
  .set pd2, pd0 + 8192

  .bss
  .balign 4096
kstack:
  .skip 16384
kstack_top:
  .balign 4096
ustack:
  .skip 65536
ustack_top:
  .section .note.GNU-stack, "", @progbits
