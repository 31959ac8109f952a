// Huge-page kernel text for restores (shim/sandbox/huge-text.ts): the .text
// range read from a vmlinux (synthetic ELFs, hostile ones, and the real guest
// kernel checked against readelf/nm), the text file cut from a memory file,
// and where the huge-page tmpfs comes from.
import { strict as assert } from 'node:assert';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureTextFile, hugeTextDir, isHugeTmpfs, kernelTextRange } from '../../shim/sandbox/huge-text';
import { findGuestKernel } from '../../shim/sandbox/guest';

const MiB = 1 << 20;

interface ElfShape {
  /** .text's virtual address and size, and its flags (6 = SHF_ALLOC|SHF_EXECINSTR). */
  text?: { addr: bigint; size: bigint; flags?: bigint };
  /** The one PT_LOAD: virtual and physical address and memory size. */
  load: { vaddr: bigint; paddr: bigint; memsz: bigint };
  machine?: number;
  elfClass?: number;
  /** Moves the section header table this far past the end of the file. */
  shoffPastEnd?: number;
}

/** A minimal ELF64: header, one program header, sections [null, .text?, .shstrtab], names. */
function elf(shape: ElfShape): Buffer {
  const names = Buffer.from('\0.text\0.shstrtab\0', 'latin1');
  const sections = shape.text ? 3 : 2;
  const phoff = 64, namesOff = phoff + 56, shoff = namesOff + names.length + 8;
  const b = Buffer.alloc(shoff + sections * 64);
  b.writeUInt32BE(0x7f454c46, 0);
  b[4] = shape.elfClass ?? 2;
  b[5] = 1;
  b[6] = 1;
  b.writeUInt16LE(2, 16);
  b.writeUInt16LE(shape.machine ?? 62, 18);
  b.writeBigUInt64LE(BigInt(phoff), 32);
  b.writeBigUInt64LE(BigInt(shoff + (shape.shoffPastEnd ?? 0)), 40);
  b.writeUInt16LE(64, 52);
  b.writeUInt16LE(56, 54);
  b.writeUInt16LE(1, 56);
  b.writeUInt16LE(64, 58);
  b.writeUInt16LE(sections, 60);
  b.writeUInt16LE(sections - 1, 62);
  b.writeUInt32LE(1, phoff); // PT_LOAD
  b.writeBigUInt64LE(shape.load.vaddr, phoff + 16);
  b.writeBigUInt64LE(shape.load.paddr, phoff + 24);
  b.writeBigUInt64LE(shape.load.memsz, phoff + 32);
  b.writeBigUInt64LE(shape.load.memsz, phoff + 40);
  names.copy(b, namesOff);
  let i = 1;
  if (shape.text) {
    const o = shoff + 64 * i++;
    b.writeUInt32LE(1, o); // ".text"
    b.writeUInt32LE(1, o + 4);
    b.writeBigUInt64LE(shape.text.flags ?? 6n, o + 8);
    b.writeBigUInt64LE(shape.text.addr, o + 16);
    b.writeBigUInt64LE(shape.text.size, o + 32);
  }
  const o = shoff + 64 * i;
  b.writeUInt32LE(7, o); // ".shstrtab"
  b.writeUInt32LE(3, o + 4);
  b.writeBigUInt64LE(BigInt(namesOff), o + 24);
  b.writeBigUInt64LE(BigInt(names.length), o + 32);
  return b;
}

describe('huge-page kernel text: the range, the file, the tmpfs', function () {
  let work: string;
  before(() => {
    work = mkdtempSync(join(tmpdir(), 'vmlet-huge-text-'));
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  const write = (name: string, data: Buffer): string => {
    const p = join(work, name);
    writeFileSync(p, data);
    return p;
  };
  const kernelVirt = 0xffffffff81000000n;
  const load = { vaddr: kernelVirt, paddr: 16n * BigInt(MiB), memsz: 16n * BigInt(MiB) };

  it('.text shrunk to whole 2 MiB pages, at its physical address through its PT_LOAD', () => {
    // .text from 1 MiB into the segment (phys 17 MiB) for 9 MiB: whole pages 18..26 MiB.
    const p = write('k1', elf({ load, text: { addr: kernelVirt + BigInt(MiB), size: 9n * BigInt(MiB) } }));
    assert.deepEqual(kernelTextRange(p), { gpa: 18 * MiB, bytes: 8 * MiB });
    // Exactly aligned at both ends.
    const q = write('k2', elf({ load, text: { addr: kernelVirt, size: 4n * BigInt(MiB) } }));
    assert.deepEqual(kernelTextRange(q), { gpa: 16 * MiB, bytes: 4 * MiB });
  });

  it('no range: .text under one whole 2 MiB page, not executable, outside every PT_LOAD, or absent; not an x86_64 ELF64', () => {
    const small = write('small', elf({ load, text: { addr: kernelVirt + BigInt(MiB), size: 2n * BigInt(MiB) } }));
    assert.equal(kernelTextRange(small), null);
    assert.equal(kernelTextRange(write('noexec', elf({ load, text: { addr: kernelVirt, size: 4n * BigInt(MiB), flags: 2n } }))), null);
    assert.equal(kernelTextRange(write('outside', elf({ load, text: { addr: kernelVirt + 15n * BigInt(MiB), size: 4n * BigInt(MiB) } }))), null);
    assert.equal(kernelTextRange(write('notext', elf({ load }))), null);
    assert.equal(kernelTextRange(write('arm', elf({ load, machine: 183, text: { addr: kernelVirt, size: 4n * BigInt(MiB) } }))), null);
    assert.equal(kernelTextRange(write('elf32', elf({ load, elfClass: 1, text: { addr: kernelVirt, size: 4n * BigInt(MiB) } }))), null);
    assert.equal(kernelTextRange(write('short', Buffer.from('\x7fELF'))), null);
    assert.equal(kernelTextRange(write('bzimage-like', Buffer.alloc(4096, 0x4d))), null);
  });

  it('a section table past the end of the file is an error, not a range', () => {
    const p = write('hostile', elf({ load, text: { addr: kernelVirt, size: 4n * BigInt(MiB) }, shoffPastEnd: 1 << 20 }));
    assert.throws(() => kernelTextRange(p), /ELF header tables lie outside the file/);
    // Truncated after its header: the tables it names are gone.
    const whole = elf({ load, text: { addr: kernelVirt, size: 4n * BigInt(MiB) } });
    assert.throws(() => kernelTextRange(write('truncated', whole.subarray(0, 100))), /outside the file/);
  });

  it('the real guest kernel: the range readelf and nm give for _text.._etext', function () {
    const k = findGuestKernel();
    if ('missing' in k) {
      console.log(`      !!! SKIPPED (no guest kernel built: ${k.missing})`);
      this.skip();
    }
    const nm = execFileSync('nm', [k.vmlinux], { encoding: 'utf8', maxBuffer: 64 << 20 });
    const sym = (name: string) => BigInt('0x' + (nm.match(new RegExp(`^([0-9a-f]+) \\w ${name}$`, 'm')) ?? [])[1]);
    const loads = execFileSync('readelf', ['-lW', k.vmlinux], { encoding: 'utf8' }).split('\n').filter((l) => /^\s+LOAD/.test(l)).map((l) => l.trim().split(/\s+/));
    const text = sym('_text'), etext = sym('_etext');
    const seg = loads.find((f) => BigInt(f[2]) <= text && text < BigInt(f[2]) + BigInt(f[5]));
    assert.ok(seg, 'a PT_LOAD holds _text');
    const phys = (v: bigint) => Number(v - BigInt(seg[2]) + BigInt(seg[3]));
    const H = 2 * MiB;
    const gpa = Math.ceil(phys(text) / H) * H, end = Math.floor(phys(etext) / H) * H;
    assert.deepEqual(kernelTextRange(k.vmlinux), { gpa, bytes: end - gpa });
    assert.equal(kernelTextRange(k.bzImage), null, 'a bzImage has no sections');
  });

  it('the text file holds the memory file\'s bytes for the range; reused while that file stays; remade (the old one removed) when it is another', () => {
    const dir = join(work, 'texts');
    mkdirSync(dir);
    const memory = join(work, 'memory');
    const bytes = Buffer.alloc(8 * MiB);
    for (let i = 0; i < bytes.length; i += 4096) bytes.writeUInt32LE(i, i);
    writeFileSync(memory, bytes);
    const range = { gpa: 2 * MiB, bytes: 4 * MiB };
    const a = ensureTextFile(dir, 'k1', memory, range);
    assert.ok(readFileSync(a).equals(bytes.subarray(2 * MiB, 6 * MiB)));
    const mtime = statSync(a).mtimeMs;
    assert.equal(ensureTextFile(dir, 'k1', memory, range), a);
    assert.equal(statSync(a).mtimeMs, mtime, 'not written again');
    // The template made anew: a new memory file (another inode) with other bytes.
    rmSync(memory);
    bytes.fill(7);
    writeFileSync(memory, bytes);
    const b = ensureTextFile(dir, 'k1', memory, range);
    assert.notEqual(b, a);
    assert.ok(readFileSync(b).equals(bytes.subarray(2 * MiB, 6 * MiB)));
    assert.deepEqual(readdirSync(dir), [b.slice(dir.length + 1)], 'the old text of that key is gone, no temp file left');
    assert.throws(() => ensureTextFile(dir, 'k1', memory, { gpa: 6 * MiB, bytes: 4 * MiB }), /has no kernel text at/);
  });

  it('the tmpfs: VMLET_HUGE_TEXT=0 is none, a directory that is not a huge tmpfs is none, a huge tmpfs is used', function () {
    assert.equal(hugeTextDir({ VMLET_HUGE_TEXT: '0' }), null);
    assert.equal(isHugeTmpfs(work), false);
    assert.equal(hugeTextDir({ VMLET_HUGE_TEXT: work }), null);
    const mnt = join(work, 'huge');
    mkdirSync(mnt);
    const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'huge=always,size=16m', 'vmlet-test-huge', mnt], { encoding: 'utf8' });
    if (m.status !== 0) {
      console.log(`      !!! SKIPPED the huge tmpfs half (cannot mount here: ${m.stderr.trim()})`);
      return;
    }
    try {
      assert.equal(isHugeTmpfs(mnt), true);
      assert.equal(isHugeTmpfs(join(mnt, 'sub')), true, 'a path below the mount point');
      assert.equal(hugeTextDir({ VMLET_HUGE_TEXT: mnt }), mnt);
    } finally {
      spawnSync('umount', [mnt]);
    }
  });
});
