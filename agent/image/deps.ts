/**
 * Finds exactly the shared libraries an executable needs, searching the way glibc's ld.so
 * does on the build host, so the image builder can pack them into the guest under the same
 * paths. Not modelled: glibc-hwcaps/legacy hwcap subdirectories (Debian 12 ships none),
 * $PLATFORM (host-CPU specific), relative or empty RPATH entries (cwd-relative, meaningless
 * in the guest), DF_1_NODEFLIB, and LD_PRELOAD.
 */

import { exists } from "../state/exists.ts";
import { dirname, join, resolve } from "node:path";
import { Code, FlexError, NotFoundError } from "../errors.ts";
import { ELFCLASS64, ElfError, type ElfInfo, EM_X86_64, parseElf, readElfIdent } from "./elf.ts";

/** One library as the guest's loader will find it. */
export interface ResolvedLibrary {
  /** The DT_NEEDED name (or the interpreter's soname). */
  name: string;
  /** Where the loader finds it; the guest needs the file under this same path. */
  path: string;
  /** `path` with symlinks resolved: read the bytes from here. */
  realPath: string;
}

/** Result of resolveDependencies. */
export interface ResolvedDeps {
  /** Absolute path of the executable as given (symlinks not resolved). */
  executable: string;
  /** PT_INTERP of the executable; absent for static executables. */
  interpreter?: string;
  /** Every file to pack besides the executable, in load (BFS) order; includes the interpreter. */
  libraries: ResolvedLibrary[];
  /** Distinct directories of `libraries` paths, excluding the interpreter (the kernel maps it). */
  libraryDirs: string[];
}

/** A DT_NEEDED library was found in none of the search directories. */
export class MissingLibraryError extends FlexError {
  constructor(readonly library: string, readonly neededBy: string, readonly searched: string[]) {
    super(
      Code.FAILED_PRECONDITION,
      `shared library "${library}" needed by ${neededBy} not found (searched: ${searched.join(", ") || "none"})`,
    );
  }
}

/** Fallback dirs after the ld.so.conf dirs when resolving on the host. */
export const HOST_DEFAULT_DIRS = [
  "/lib/x86_64-linux-gnu",
  "/usr/lib/x86_64-linux-gnu",
  "/lib64",
  "/lib",
  "/usr/lib",
];

/**
 * Dirs Debian's x86_64 ld.so searches by default in the guest. The guest has no
 * /etc/ld.so.cache, so a library elsewhere needs RPATH/RUNPATH or LD_LIBRARY_PATH.
 */
export function guestDefaultLibraryDirs(): string[] {
  return ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib"];
}

/**
 * Value for the guest's LD_LIBRARY_PATH, or undefined when the default dirs suffice.
 * Conservative: also lists dirs that RPATH/RUNPATH reach, which is harmless (same files).
 */
export function guestLibraryPath(deps: ResolvedDeps): string | undefined {
  const defaults = new Set(guestDefaultLibraryDirs());
  const extra = deps.libraryDirs.filter((d) => !defaults.has(d));
  return extra.length ? extra.join(":") : undefined;
}

/** Directories listed in an ld.so.conf, following `include` globs (the host ld.so.cache's source). */
export async function readLdSoConf(file = "/etc/ld.so.conf", depth = 0): Promise<string[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return [];
    throw err;
  }
  const dirs: string[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    if (line === "" || /^hwcap\s/.test(line)) continue;
    const inc = /^include\s+(.*)$/.exec(line);
    if (!inc) {
      dirs.push(line.replace(/\/+$/, "") || "/");
      continue;
    }
    if (depth >= 8) continue; // include cycles: ldconfig would loop; we stop
    for (let pattern of inc[1].split(/\s+/)) {
      if (!pattern.startsWith("/")) pattern = join(dirname(file), pattern);
      for (const f of await glob(pattern)) dirs.push(...await readLdSoConf(f, depth + 1));
    }
  }
  return dirs;
}

/** Minimal glob(3): `*`, `?`, `[...]` in any component; results sorted like glob(3). */
async function glob(pattern: string): Promise<string[]> {
  let paths = ["/"];
  for (const part of pattern.split("/").filter((p) => p !== "")) {
    const next: string[] = [];
    if (!/[*?[]/.test(part)) {
      for (const p of paths) next.push(join(p, part));
    } else {
      const re = new RegExp(
        "^" + part.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".").replace(
          /\[!/g,
          "[^",
        ) + "$",
      );
      for (const p of paths) {
        try {
          const names: string[] = [];
          for await (const e of Deno.readDir(p)) {
            if (re.test(e.name) && (!e.name.startsWith(".") || part.startsWith("."))) names.push(e.name);
          }
          for (const n of names.sort()) next.push(join(p, n));
        } catch { /* unreadable or not a directory: no matches, like glob(3) */ }
      }
    }
    paths = next;
  }
  const found: string[] = [];
  for (const p of paths) if (await exists(p)) found.push(p);
  return found;
}

interface LoadedObject {
  path: string;
  info: ElfInfo;
  origin: string; // for $ORIGIN: dir of the path it was opened by (main program: of its real path)
  loader?: LoadedObject; // the object whose DT_NEEDED loaded it (glibc's l_loader)
}

/** Resolves the executable's DT_NEEDED closure with glibc's search order and dedup rules. */
export async function resolveDependencies(
  executable: string,
  opts: { extraSearchDirs?: string[] } = {},
): Promise<ResolvedDeps> {
  const exePath = resolve(executable);
  const main: LoadedObject = { path: exePath, info: await readElf(exePath, "executable"), origin: "" };
  main.origin = dirname(await Deno.realPath(exePath));
  const result: ResolvedDeps = { executable: exePath, libraries: [], libraryDirs: [] };
  if (main.info.isStatic) return result;

  // Names already satisfied (requested names, sonames and paths), as glibc's _dl_name_match_p.
  const loadedNames = new Set<string>();
  const interp = main.info.interpreter;
  if (interp !== undefined) {
    result.interpreter = interp;
    const info = await readElf(interp, "interpreter");
    const base = interp.slice(interp.lastIndexOf("/") + 1);
    for (const n of [interp, base, info.soname]) if (n) loadedNames.add(n);
    result.libraries.push({ name: info.soname ?? base, path: interp, realPath: await Deno.realPath(interp) });
  }

  // ld.so.conf stands in for the host's ld.so.cache; dedupe keeps error messages short.
  const systemDirs = [...new Set([...await readLdSoConf(), ...HOST_DEFAULT_DIRS])];
  const extra = (opts.extraSearchDirs ?? []).map((d) => resolve(d));
  const walked = new Set<string>([await Deno.realPath(exePath), ...result.libraries.map((l) => l.realPath)]);
  const dirsSeen = new Set<string>();
  const queue: LoadedObject[] = [main];
  for (let i = 0; i < queue.length; i++) {
    const obj = queue[i];
    for (const name of obj.info.needed) {
      if (loadedNames.has(name)) continue;
      const dirs = name.includes("/") ? [] : searchDirs(obj, extra, systemDirs);
      const path = name.includes("/") ? await findDirect(name) : await findIn(dirs, name);
      if (path === undefined) throw new MissingLibraryError(name, obj.path, dirs);
      const realPath = await Deno.realPath(path);
      result.libraries.push({ name, path, realPath });
      loadedNames.add(name).add(path);
      if (!dirsSeen.has(dirname(path))) dirsSeen.add(dirname(path)), result.libraryDirs.push(dirname(path));
      // Same file under another name (glibc matches by inode): pack both paths, walk it once.
      if (walked.has(realPath)) continue;
      walked.add(realPath);
      const info = await readElf(path, "library");
      if (info.soname) loadedNames.add(info.soname);
      queue.push({ path, info, origin: dirname(path), loader: obj });
    }
  }
  return result;
}

/** glibc order: RPATH chain (only without RUNPATH), LD_LIBRARY_PATH (extra), RUNPATH, cache, defaults. */
function searchDirs(obj: LoadedObject, extra: string[], system: string[]): string[] {
  const dirs: string[] = [];
  if (obj.info.runpath.length === 0) {
    // Walk up the loader chain to the executable; an object's DT_RPATH is ignored when it
    // also has DT_RUNPATH (glibc get-dynamic-info.h).
    for (let l: LoadedObject | undefined = obj; l; l = l.loader) {
      if (l.info.runpath.length === 0) dirs.push(...expand(l.info.rpath, l));
    }
  }
  dirs.push(...extra, ...expand(obj.info.runpath, obj), ...system);
  return dirs;
}

/** A DT_NEEDED name containing "/" is opened as is (relative to the cwd), without searching. */
async function findDirect(name: string): Promise<string | undefined> {
  const path = resolve(name);
  return await findIn([dirname(path)], path.slice(path.lastIndexOf("/") + 1));
}

/** Expands $ORIGIN and $LIB; drops entries the guest cannot reproduce (see module doc). */
function expand(entries: string[], obj: LoadedObject): string[] {
  const out: string[] = [];
  for (const e of entries) {
    const x = e.replace(/\$(\{ORIGIN\}|ORIGIN\b)/g, obj.origin).replace(
      /\$(\{LIB\}|LIB\b)/g,
      "lib/x86_64-linux-gnu",
    );
    if (x.startsWith("/") && !x.includes("$")) out.push(x.replace(/\/+$/, "") || "/");
  }
  return out;
}

/** First `dir/name` that is a regular file of our ELF class and machine (others are skipped, as ld.so does). */
async function findIn(dirs: string[], name: string): Promise<string | undefined> {
  for (const dir of dirs) {
    const path = join(dir, name);
    let file: Deno.FsFile;
    try {
      if (!(await Deno.stat(path)).isFile) continue;
      file = await Deno.open(path);
    } catch {
      continue; // absent or unreadable: ld.so moves on to the next directory
    }
    const head = new Uint8Array(64);
    let n = 0;
    try {
      for (let r; n < head.length && (r = await file.read(head.subarray(n))) !== null;) n += r;
    } finally {
      file.close();
    }
    const ident = readElfIdent(head.subarray(0, n));
    if (!ident || n < 64) throw new ElfError(`${path}: invalid ELF header (needed library "${name}")`);
    if (ident.elfClass === ELFCLASS64 && ident.machine === EM_X86_64) return path;
  }
  return undefined;
}

async function readElf(path: string, kind: string): Promise<ElfInfo> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) throw new NotFoundError(kind, path);
    if (err instanceof Deno.errors.IsADirectory) {
      throw new FlexError(Code.INVALID_ARGUMENT, `${kind} ${path}: is a directory`);
    }
    throw err;
  }
  try {
    return parseElf(bytes);
  } catch (err) {
    if (err instanceof ElfError) throw new ElfError(`${kind} ${path}: ${err.message}`, { cause: err });
    throw err;
  }
}
