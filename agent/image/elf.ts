/**
 * Minimal, bounds-checked ELF reader: just enough of ELF64 little-endian x86_64 to find the
 * program interpreter and the dynamic section (DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH).
 * Pure: takes bytes, does no I/O. Hostile or truncated input yields ElfError, never a
 * RangeError or a long loop (every loop is bounded by the input length).
 */

import { Code, FlexError } from "../errors.ts";

/** Malformed or unsupported ELF input; maps to INVALID_ARGUMENT. */
export class ElfError extends FlexError {
  constructor(message: string, options?: ErrorOptions) {
    super(Code.INVALID_ARGUMENT, message, options);
  }
}

/** What the image builder needs to know about one ELF file. */
export interface ElfInfo {
  type: "exec" | "dyn" | "other";
  /** e_machine; always EM_X86_64 (62) for files parseElf accepts. */
  machine: number;
  /** PT_INTERP path, e.g. "/lib64/ld-linux-x86-64.so.2". */
  interpreter?: string;
  needed: string[];
  soname?: string;
  rpath: string[];
  runpath: string[];
  /** True when no loader is involved: no PT_INTERP and no DT_NEEDED (static and static-pie). */
  isStatic: boolean;
}

export const EM_X86_64 = 62;
export const ELFCLASS64 = 2;
export const ELFDATA2LSB = 1;
const EHDR_SIZE = 64;
const PHDR_SIZE = 56;
const DYN_SIZE = 16;
const PT_LOAD = 1, PT_DYNAMIC = 2, PT_INTERP = 3;
const DT_NULL = 0n, DT_NEEDED = 1n, DT_STRTAB = 5n, DT_STRSZ = 10n, DT_SONAME = 14n;
const DT_RPATH = 15n, DT_RUNPATH = 29n;
const PN_XNUM = 0xffff;

/** The identification fields of an ELF header, read without validating the rest. */
export interface ElfIdent {
  elfClass: number;
  data: number;
  machine: number;
}

/** Reads e_ident class/data and e_machine; undefined if `head` is not an ELF header. */
export function readElfIdent(head: Uint8Array): ElfIdent | undefined {
  if (head.length < 20 || head[0] !== 0x7f || head[1] !== 0x45 || head[2] !== 0x4c || head[3] !== 0x46) {
    return undefined;
  }
  // e_machine is 16-bit in the byte order the header declares.
  const machine = head[5] === 2 ? (head[18] << 8) | head[19] : head[18] | (head[19] << 8);
  return { elfClass: head[4], data: head[5], machine };
}

const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/** Parses the header, program headers and dynamic section of an ELF64 LE x86_64 file. */
export function parseElf(bytes: Uint8Array): ElfInfo {
  const ident = readElfIdent(bytes);
  if (!ident) {
    throw new ElfError(
      `not an ELF file (magic 7f454c46 expected, found ${hex(bytes.subarray(0, 4)) || "empty input"})`,
    );
  }
  if (ident.elfClass === 1) throw new ElfError("32-bit ELF not supported (ELFCLASS64 expected)");
  if (ident.elfClass !== ELFCLASS64) {
    throw new ElfError(`bad ELF class ${ident.elfClass} (ELFCLASS64 = 2 expected)`);
  }
  if (ident.data !== ELFDATA2LSB) {
    throw new ElfError(`big-endian or unknown ELF data encoding ${ident.data} (little-endian = 1 expected)`);
  }
  if (ident.machine !== EM_X86_64) {
    throw new ElfError(`ELF machine ${ident.machine} not supported (x86_64 = 62 expected)`);
  }
  if (bytes.length < EHDR_SIZE) {
    throw new ElfError(`truncated ELF header (${EHDR_SIZE} bytes expected, found ${bytes.length})`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const eType = view.getUint16(16, true);
  const phoff = toOffset(view.getBigUint64(32, true), "e_phoff");
  const phentsize = view.getUint16(54, true);
  let phnum = view.getUint16(56, true);
  if (phnum === PN_XNUM) {
    // The real count lives in section header 0's sh_info (offset 44 within a 64-byte Shdr).
    const shoff = toOffset(view.getBigUint64(40, true), "e_shoff");
    checkRange(bytes, shoff, 64, "section header 0 (for PN_XNUM)");
    phnum = view.getUint32(shoff + 44, true);
  }
  if (phnum > 0 && phentsize !== PHDR_SIZE) {
    throw new ElfError(`bad e_phentsize ${phentsize} (${PHDR_SIZE} expected)`);
  }
  checkRange(bytes, phoff, phnum * PHDR_SIZE, `program header table (${phnum} entries)`);

  const loads: { vaddr: bigint; offset: bigint; filesz: bigint }[] = [];
  let interpreter: string | undefined;
  let dynamic: { offset: number; size: number } | undefined;
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * PHDR_SIZE;
    const type = view.getUint32(p, true);
    const offset = view.getBigUint64(p + 8, true);
    const vaddr = view.getBigUint64(p + 16, true);
    const filesz = view.getBigUint64(p + 32, true);
    if (type === PT_LOAD) loads.push({ vaddr, offset, filesz });
    else if (type === PT_INTERP && interpreter === undefined) {
      const off = toOffset(offset, "PT_INTERP p_offset");
      const size = toOffset(filesz, "PT_INTERP p_filesz");
      checkRange(bytes, off, size, "PT_INTERP");
      interpreter = readCString(bytes, off, off + size, "PT_INTERP");
    } else if (type === PT_DYNAMIC && dynamic === undefined) {
      const off = toOffset(offset, "PT_DYNAMIC p_offset");
      const size = toOffset(filesz, "PT_DYNAMIC p_filesz");
      checkRange(bytes, off, size, "PT_DYNAMIC");
      dynamic = { offset: off, size };
    }
  }

  const info: ElfInfo = {
    type: eType === 2 ? "exec" : eType === 3 ? "dyn" : "other",
    machine: ident.machine,
    needed: [],
    rpath: [],
    runpath: [],
    isStatic: false,
  };
  if (interpreter !== undefined) info.interpreter = interpreter;
  if (dynamic) readDynamic(bytes, view, dynamic, loads, info);
  info.isStatic = interpreter === undefined && info.needed.length === 0;
  return info;
}

/** Fills needed/soname/rpath/runpath from the dynamic section. */
function readDynamic(
  bytes: Uint8Array,
  view: DataView,
  dyn: { offset: number; size: number },
  loads: { vaddr: bigint; offset: bigint; filesz: bigint }[],
  info: ElfInfo,
): void {
  let strtab: bigint | undefined;
  let strsz: bigint | undefined;
  const refs: { tag: bigint; val: bigint }[] = [];
  const count = Math.floor(dyn.size / DYN_SIZE);
  for (let i = 0; i < count; i++) {
    const e = dyn.offset + i * DYN_SIZE;
    const tag = view.getBigInt64(e, true);
    const val = view.getBigUint64(e + 8, true);
    if (tag === DT_NULL) break;
    if (tag === DT_STRTAB) strtab = val;
    else if (tag === DT_STRSZ) strsz = val;
    else if (tag === DT_NEEDED || tag === DT_SONAME || tag === DT_RPATH || tag === DT_RUNPATH) {
      refs.push({ tag, val });
    }
  }
  if (refs.length === 0) return;
  if (strtab === undefined) throw new ElfError("dynamic section has string references but no DT_STRTAB");
  // DT_STRTAB is a virtual address; translate it through the PT_LOAD segment that maps it.
  const seg = loads.find((l) => l.vaddr <= strtab! && strtab! - l.vaddr < l.filesz);
  if (!seg) throw new ElfError(`DT_STRTAB 0x${strtab.toString(16)} is not inside any PT_LOAD segment`);
  const start = toOffset(seg.offset + (strtab - seg.vaddr), "DT_STRTAB file offset");
  if (start >= bytes.length) {
    throw new ElfError(`DT_STRTAB offset ${start} beyond end of file (${bytes.length})`);
  }
  const segEnd = seg.offset + seg.filesz;
  let end = segEnd < BigInt(bytes.length) ? Number(segEnd) : bytes.length;
  if (strsz !== undefined && strsz < BigInt(end - start)) end = start + Number(strsz);
  for (const { tag, val } of refs) {
    if (val >= BigInt(end - start)) {
      throw new ElfError(`dynamic string offset ${val} beyond string table (size ${end - start})`);
    }
    const s = readCString(bytes, start + Number(val), end, "dynamic string table");
    if (tag === DT_NEEDED) info.needed.push(s);
    else if (tag === DT_SONAME) info.soname ??= s;
    else if (tag === DT_RPATH) info.rpath.push(...splitPath(s));
    else info.runpath.push(...splitPath(s));
  }
}

function splitPath(s: string): string[] {
  return s.split(":").filter((p) => p !== "");
}

function toOffset(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ElfError(`${what} 0x${v.toString(16)} is out of range`);
  return Number(v);
}

function checkRange(bytes: Uint8Array, off: number, size: number, what: string): void {
  if (off > bytes.length || size > bytes.length - off) {
    throw new ElfError(
      `${what} at offset ${off} size ${size} exceeds file size ${bytes.length} (truncated?)`,
    );
  }
}

function readCString(bytes: Uint8Array, start: number, end: number, what: string): string {
  const nul = bytes.subarray(start, end).indexOf(0);
  if (nul < 0) throw new ElfError(`unterminated string in ${what} at offset ${start}`);
  return new TextDecoder().decode(bytes.subarray(start, start + nul));
}
