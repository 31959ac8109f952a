// Tiny guest images assembled in the test itself: a few bytes of machine code
// wrapped in a minimal ELF, so the VMM's boot paths and exits can be tested
// before (and independently of) the test guest. The code bytes are spelled
// out with their assembly beside them.
import { writeFileSync } from 'node:fs';

export const LOAD_ADDR = 0x100000;

export interface ElfOptions {
  /** ELF32 (i386) instead of ELF64 (x86-64). */
  elf32?: boolean;
  /** Leave out the PVH entry note (then 'auto' boots it with the Linux 64-bit protocol). */
  noPvhNote?: boolean;
}

/** An ELF with one PT_LOAD of `code` at 1 MiB and (unless told) a Xen PVH entry note pointing at it. */
export function elfImage(code: Buffer, opts: ElfOptions = {}): Buffer {
  const is64 = !opts.elf32;
  const ehsize = is64 ? 64 : 52;
  const phentsize = is64 ? 56 : 32;
  const phnum = opts.noPvhNote ? 1 : 2;
  const noteOff = ehsize + phnum * phentsize;
  const note = Buffer.alloc(20);
  note.writeUInt32LE(4, 0); // namesz
  note.writeUInt32LE(4, 4); // descsz
  note.writeUInt32LE(18, 8); // XEN_ELFNOTE_PHYS32_ENTRY
  note.write('Xen\0', 12, 'latin1');
  note.writeUInt32LE(LOAD_ADDR, 16);
  const codeOff = 0x100;
  const out = Buffer.alloc(codeOff + code.length);
  out.write('\x7fELF', 0, 'latin1');
  out[4] = is64 ? 2 : 1; // class
  out[5] = 1; // little-endian
  out[6] = 1; // version
  out.writeUInt16LE(2, 16); // ET_EXEC
  out.writeUInt16LE(is64 ? 62 : 3, 18);
  out.writeUInt32LE(1, 20);
  const ph = (i: number, type: number, off: number, addr: number, size: number): void => {
    const p = ehsize + i * phentsize;
    out.writeUInt32LE(type, p);
    if (is64) {
      out.writeUInt32LE(5, p + 4); // R+X
      out.writeBigUInt64LE(BigInt(off), p + 8);
      out.writeBigUInt64LE(BigInt(addr), p + 16);
      out.writeBigUInt64LE(BigInt(addr), p + 24);
      out.writeBigUInt64LE(BigInt(size), p + 32);
      out.writeBigUInt64LE(BigInt(size), p + 40);
    } else {
      out.writeUInt32LE(off, p + 4);
      out.writeUInt32LE(addr, p + 8);
      out.writeUInt32LE(addr, p + 12);
      out.writeUInt32LE(size, p + 16);
      out.writeUInt32LE(size, p + 20);
      out.writeUInt32LE(5, p + 24);
    }
  };
  if (is64) {
    out.writeBigUInt64LE(BigInt(LOAD_ADDR), 24); // e_entry
    out.writeBigUInt64LE(BigInt(ehsize), 32); // e_phoff
    out.writeUInt16LE(ehsize, 52);
    out.writeUInt16LE(phentsize, 54);
    out.writeUInt16LE(phnum, 56);
  } else {
    out.writeUInt32LE(LOAD_ADDR, 24);
    out.writeUInt32LE(ehsize, 28);
    out.writeUInt16LE(ehsize, 40);
    out.writeUInt16LE(phentsize, 42);
    out.writeUInt16LE(phnum, 44);
  }
  ph(0, 1, codeOff, LOAD_ADDR, code.length);
  if (!opts.noPvhNote) {
    ph(1, 4, noteOff, 0, note.length);
    note.copy(out, noteOff);
  }
  code.copy(out, codeOff);
  return out;
}

const u32 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];

// Code fragments; each is position-dependent only where it says so. They run
// in 32-bit protected mode (PVH) and, unchanged, in 64-bit mode (Linux entry).
export const asm = {
  /** Writes `text` to the UART at 0x3f8; the string sits right after the code at LOAD_ADDR + offset. */
  print(textAddr: number): number[] {
    return [
      0xbe, ...u32(textAddr), //     mov esi, text
      0x66, 0xba, 0xf8, 0x03, //     mov dx, 0x3f8
      0xac, //                 next: lodsb
      0x84, 0xc0, //                 test al, al
      0x74, 0x03, //                 jz done
      0xee, //                       out dx, al
      0xeb, 0xf8, //                 jmp next
    ]; //                      done:
  },
  /** Debug-exit with the value in EAX. */
  exitWithEax: [0x66, 0xba, 0xf4, 0x00, 0xef], //  mov dx, 0xf4; out dx, eax
  movEax: (v: number): number[] => [0xb8, ...u32(v)], // mov eax, imm32
  /** PVH: EAX = first dword of hvm_start_info (its magic), EBX holds its address. */
  loadStartInfoMagic: [0x8b, 0x03], //  mov eax, [ebx]
  /** Linux 64-bit: EAX = boot_params.e820_entries (RSI = zero page). */
  loadE820Count: [0x0f, 0xb6, 0x86, 0xe8, 0x01, 0x00, 0x00], //  movzx eax, byte [rsi+0x1e8]
  haltForever: [0xf4, 0xeb, 0xfd], //  hlt; jmp back to hlt
  spinForever: [0xeb, 0xfe], //  jmp $
  /** ud2 with the IDT limit 0 we boot with: #UD -> #GP -> #DF -> triple fault. */
  undefinedInstruction: [0x0f, 0x0b],
  /** Jumps into the MMIO hole where nothing is mapped: KVM cannot fetch or emulate there. */
  jumpToMmioHole: [0xb8, ...u32(0xd0800000), 0xff, 0xe0], //  mov eax, 0xd0800000; jmp eax
  /** i8042 "pulse reset line": what Linux reboot ends with. */
  resetViaI8042: [0xb0, 0xfe, 0xe6, 0x64], //  mov al, 0xfe; out 0x64, al
  /** Writes '\n' to the UART forever: a busy guest whose progress is visible in the log. */
  newlinesForever: [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x0a, 0xee, 0xeb, 0xfd], //  mov dx,0x3f8; mov al,10; L: out dx,al; jmp L
};

/** Code that prints `text` to the serial port, then exits with `code`. */
export function helloGuest(text: string, code: number): Buffer {
  const tail = [...asm.movEax(code), ...asm.exitWithEax, ...asm.haltForever];
  const printLen = asm.print(0).length;
  const textAddr = LOAD_ADDR + printLen + tail.length;
  return Buffer.from([...asm.print(textAddr), ...tail, ...Buffer.from(text + '\0', 'latin1')]);
}

export function writeImage(path: string, code: number[] | Buffer, opts: ElfOptions = {}): string {
  writeFileSync(path, elfImage(Buffer.from(code), opts));
  return path;
}
