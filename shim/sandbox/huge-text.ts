// The guest kernel's text in 2 MiB host pages for restored VMs.
//
// Why: between a restore and its agent's answer the guest touches ~230 pages
// of kernel text, and each first touch is a nested page fault (in the KVM lab
// an exit through L0 and L1: a third of the ~730 faults of a restore). Text is
// read and never written once the guest has booted, so if the host backs that
// range with 2 MiB page-cache pages, KVM maps it with 2 MiB stage-2 entries
// and the 230 faults become 4. The snapshot's memory file gives 4 KiB pages
// (its file system's page cache, on the 6.1 kernels this project runs on), so
// the text range is copied once per template into a file on a tmpfs mounted
// huge=always, and each restore maps that file over the range, copy-on-write
// like the rest of RAM (GuestMemory overlays, native/src/core/guest_memory.h).
// Every clone shares those huge pages; a clone that does write there (a
// static key flipped) gets its own 4 KiB copy of that page only.
//
// The range is the vmlinux's .text section, shrunk to whole 2 MiB pages: on
// x86_64 6.1 that is [16 MiB, 24 MiB). The rest of the kernel image is left
// alone on purpose: the 2 MiB pages around _etext and __end_rodata hold the
// gaps the kernel frees at boot (general memory, written any time), and a
// write there would split the huge page again.
import { closeSync, existsSync, fstatSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { templateLog } from './template-store';

const HUGE = 2 * 1024 * 1024;

/** Where the huge-page tmpfs is mounted unless VMLET_HUGE_TEXT names another directory. */
export const DEFAULT_HUGE_TEXT_DIR = '/run/vmlet/huge-text';
/** The tmpfs's size: room for the text of a few dozen templates (8 MiB each). */
const MOUNT_SIZE = '512m';

export interface TextRange {
  /** Guest-physical start, a 2 MiB multiple. */
  gpa: number;
  /** A 2 MiB multiple, at least one huge page. */
  bytes: number;
}

function readAt(fd: number, offset: number, length: number, what: string): Buffer {
  const b = Buffer.alloc(length);
  const n = readSync(fd, b, 0, length, offset);
  if (n !== length) throw new Error(`${what}: ${n} of ${length} bytes at offset ${offset} (truncated ELF)`);
  return b;
}

/**
 * The guest-physical range of `vmlinux`'s .text in whole 2 MiB pages, or null
 * when there is none: not an x86_64 ELF64 (a bzImage has no sections), no
 * .text, or .text spans no whole 2 MiB page. Throws on a malformed ELF.
 */
export function kernelTextRange(vmlinux: string): TextRange | null {
  const fd = openSync(vmlinux, 'r');
  try {
    const size = fstatSync(fd).size;
    if (size < 64) return null;
    const eh = readAt(fd, 0, 64, 'ELF header');
    // ELF64, little-endian, EM_X86_64.
    if (eh.readUInt32BE(0) !== 0x7f454c46 || eh[4] !== 2 || eh[5] !== 1 || eh.readUInt16LE(18) !== 62) return null;
    const phoff = Number(eh.readBigUInt64LE(32));
    const shoff = Number(eh.readBigUInt64LE(40));
    const phentsize = eh.readUInt16LE(54), phnum = eh.readUInt16LE(56);
    const shentsize = eh.readUInt16LE(58), shnum = eh.readUInt16LE(60), shstrndx = eh.readUInt16LE(62);
    if (phentsize < 56 || shentsize < 64 || shstrndx >= shnum || phoff + phnum * phentsize > size || shoff + shnum * shentsize > size)
      throw new Error(`${vmlinux}: ELF header tables lie outside the file`);
    const sections = readAt(fd, shoff, shnum * shentsize, 'section headers');
    const sh = (i: number) => {
      const o = i * shentsize;
      return { name: sections.readUInt32LE(o), flags: sections.readBigUInt64LE(o + 8), addr: sections.readBigUInt64LE(o + 16), offset: Number(sections.readBigUInt64LE(o + 24)), size: sections.readBigUInt64LE(o + 32) };
    };
    const strtab = sh(shstrndx);
    if (strtab.offset + Number(strtab.size) > size || Number(strtab.size) > 1 << 20) throw new Error(`${vmlinux}: section names lie outside the file`);
    const names = readAt(fd, strtab.offset, Number(strtab.size), 'section names');
    const nameOf = (off: number) => (off < names.length ? names.toString('latin1', off, Math.max(off, names.indexOf(0, off))) : '');
    let text: ReturnType<typeof sh> | undefined;
    for (let i = 0; i < shnum; i++) if (nameOf(sh(i).name) === '.text') text = sh(i);
    if (!text || (text.flags & 4n) === 0n) return null; // SHF_EXECINSTR
    // Its physical address: through the PT_LOAD segment that holds it.
    const phs = readAt(fd, phoff, phnum * phentsize, 'program headers');
    for (let i = 0; i < phnum; i++) {
      const o = i * phentsize;
      if (phs.readUInt32LE(o) !== 1) continue; // PT_LOAD
      const vaddr = phs.readBigUInt64LE(o + 16), paddr = phs.readBigUInt64LE(o + 24), memsz = phs.readBigUInt64LE(o + 40);
      if (text.addr < vaddr || text.addr + text.size > vaddr + memsz) continue;
      const start = Number(paddr + (text.addr - vaddr));
      const end = start + Number(text.size);
      const gpa = Math.ceil(start / HUGE) * HUGE;
      const last = Math.floor(end / HUGE) * HUGE;
      return last > gpa ? { gpa, bytes: last - gpa } : null;
    }
    return null;
  } finally {
    closeSync(fd);
  }
}

/** The mount options of the file system holding `dir` (its longest mountinfo prefix), or null. */
function superOptions(dir: string): { fstype: string; options: string[]; mountPoint: string } | null {
  let best: { fstype: string; options: string[]; mountPoint: string } | null = null;
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [left, right] = line.split(' - ');
    if (!right) continue;
    const mountPoint = left.split(' ')[4].replace(/\\040/g, ' ');
    if (!(dir === mountPoint || dir.startsWith(mountPoint.endsWith('/') ? mountPoint : mountPoint + '/'))) continue;
    if (best && best.mountPoint.length > mountPoint.length) continue;
    const [fstype, , opts] = right.split(' ');
    best = { fstype, options: (opts ?? '').split(','), mountPoint };
  }
  return best;
}

/** Whether `dir` is on a tmpfs that gives its files huge pages. */
export function isHugeTmpfs(dir: string): boolean {
  const m = superOptions(dir);
  return m !== null && m.fstype === 'tmpfs' && m.options.some((o) => o === 'huge=always' || o === 'huge=within_size');
}

/**
 * What VMLET_HUGE_TEXT says, for both the restores (hugeTextDir) and prune
 * (removeTextFiles): null when it is 0 (off), else the directory and whether
 * the user named it (unset or empty: DEFAULT_HUGE_TEXT_DIR).
 */
function configuredTextDir(env: NodeJS.ProcessEnv): { dir: string; named: boolean } | null {
  const v = env.VMLET_HUGE_TEXT;
  if (v === '0') return null;
  return v !== undefined && v !== '' ? { dir: v, named: true } : { dir: DEFAULT_HUGE_TEXT_DIR, named: false };
}

/**
 * The directory for huge-page text files, or null (then restores map RAM from
 * the memory file alone). VMLET_HUGE_TEXT=0 turns it off; another value names
 * a directory that must be on a tmpfs mounted huge=always or huge=within_size.
 * Unset: DEFAULT_HUGE_TEXT_DIR, mounted here (tmpfs, huge=always, 512m, 0700)
 * when it is not yet and this process may mount; else null.
 */
export function hugeTextDir(env: NodeJS.ProcessEnv = process.env): string | null {
  const where = configuredTextDir(env);
  if (!where) return null;
  const { dir } = where;
  if (where.named) {
    if (!existsSync(dir) || !isHugeTmpfs(dir)) {
      templateLog.warn(`VMLET_HUGE_TEXT=${dir} is not a directory on a tmpfs mounted huge=always: restores map kernel text in 4 KiB pages`);
      return null;
    }
    return dir;
  }
  if (existsSync(dir) && isHugeTmpfs(dir)) return dir;
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (e) {
    templateLog.debug(`no huge-page text: cannot create ${dir}: ${(e as Error).message}`);
    return null;
  }
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `huge=always,size=${MOUNT_SIZE},mode=0700`, 'vmlet-huge-text', dir], { encoding: 'utf8' });
  // Another process may have mounted it meanwhile: what counts is what is there now.
  if (isHugeTmpfs(dir)) return dir;
  templateLog.debug(`no huge-page text: mount of a huge tmpfs at ${dir} failed (${(r.stderr ?? r.error?.message ?? '').trim() || `exit ${r.status}`})`);
  return null;
}

/**
 * Whether `name` is a finished text file of template `key`, as ensureTextFile()
 * names them (`<key>-<inode>-<mtime>-<gpa>-<bytes>.text`); a `.tmp` is one still
 * being written and belongs to its writer.
 */
function isTextFileOf(name: string, key: string): boolean {
  return name.startsWith(`${key}-`) && !name.endsWith('.tmp');
}

/**
 * Removes the huge-page text files of template `key` (what `vmlet templates
 * prune` calls for each template it removes) and returns the bytes freed.
 * Looks where hugeTextDir() would, but never mounts: nothing there, nothing to
 * do. A VM still mapping a removed file keeps its pages until it ends, as with
 * a removed template's memory file. Half-written files (.tmp) belong to a
 * writer that is still running and are left to it.
 */
export function removeTextFiles(key: string, env: NodeJS.ProcessEnv = process.env): number {
  const where = configuredTextDir(env);
  if (!where) return 0;
  const { dir } = where;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return 0;
  }
  let freed = 0;
  for (const name of names) {
    if (!isTextFileOf(name, key)) continue;
    const path = join(dir, name);
    try {
      freed += statSync(path).size;
      rmSync(path, { force: true });
    } catch {
      // Removed meanwhile by another prune or a remade template: gone either way.
    }
  }
  return freed;
}

/**
 * The file in `dir` holding bytes [range.gpa, range.gpa + range.bytes) of
 * `memoryFile`, written now (copy, then rename: a file present is whole) if
 * absent. Named by `key` and the memory file's inode and mtime, so a template
 * made anew gets a new file; older files of the same key are removed.
 */
export function ensureTextFile(dir: string, key: string, memoryFile: string, range: TextRange): string {
  const st = statSync(memoryFile);
  if (st.size < range.gpa + range.bytes) throw new Error(`${memoryFile} is ${st.size} bytes: it has no kernel text at ${range.gpa}+${range.bytes}`);
  const name = `${key}-${st.ino}-${Math.trunc(st.mtimeMs)}-${range.gpa.toString(16)}-${range.bytes.toString(16)}.text`;
  const path = join(dir, name);
  if (existsSync(path) && statSync(path).size === range.bytes) return path;
  const tmp = `${path}.${process.pid}.tmp`;
  const src = openSync(memoryFile, 'r');
  try {
    const dst = openSync(tmp, 'w', 0o600);
    try {
      const chunk = Buffer.alloc(HUGE);
      for (let off = 0; off < range.bytes; off += HUGE) {
        const n = readSync(src, chunk, 0, HUGE, range.gpa + off);
        if (n !== HUGE) throw new Error(`${memoryFile}: short read at ${range.gpa + off}`);
        writeSync(dst, chunk, 0, HUGE, off);
      }
    } finally {
      closeSync(dst);
    }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  } finally {
    closeSync(src);
  }
  for (const other of readdirSync(dir)) if (other !== name && isTextFileOf(other, key)) rmSync(join(dir, other), { force: true });
  return path;
}
