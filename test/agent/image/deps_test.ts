import assert from "node:assert/strict";
import {
  guestDefaultLibraryDirs,
  guestLibraryPath,
  MissingLibraryError,
  readLdSoConf,
  type ResolvedDeps,
  resolveDependencies,
} from "../../../agent/image/deps.ts";
import { ElfError } from "../../../agent/image/elf.ts";
import { Code, NotFoundError } from "../../../agent/errors.ts";

const REDIS = "/usr/bin/redis-server";
const dec = new TextDecoder();

async function run(cmd: string, args: string[], cwd?: string): Promise<{ ok: boolean; out: string }> {
  const r = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  return { ok: r.success, out: dec.decode(r.stdout) + dec.decode(r.stderr) };
}

/** ldd's view: soname -> path (null when "not found"); the interpreter line is keyed by basename. */
async function ldd(file: string): Promise<Map<string, string | null>> {
  const m = new Map<string, string | null>();
  for (const line of (await run("ldd", [file])).out.split("\n")) {
    let x;
    if ((x = /^\s+(\S+) => not found/.exec(line))) m.set(x[1], null);
    else if ((x = /^\s+(\S+) => (\/\S+) \(0x/.exec(line))) m.set(x[1], x[2]);
    else if ((x = /^\s+(\/\S+) \(0x/.exec(line))) m.set(x[1].slice(x[1].lastIndexOf("/") + 1), x[1]);
  }
  return m;
}

async function assertMatchesLdd(file: string, deps: ResolvedDeps) {
  const ref = await ldd(file);
  assert.deepEqual(deps.libraries.map((l) => l.name).sort(), [...ref.keys()].sort(), `names for ${file}`);
  for (const lib of deps.libraries) {
    assert.equal(lib.realPath, Deno.realPathSync(ref.get(lib.name)!), `${lib.name} of ${file}`);
  }
}

const hasGcc = (() => {
  try {
    return new Deno.Command("gcc", { args: ["--version"], stdout: "null", stderr: "null" }).outputSync()
      .success;
  } catch {
    return false;
  }
})();

/** Compiles C into `out` in `dir`; libraries get -shared -fPIC. */
async function cc(dir: string, out: string, src: string, flags: string[]) {
  await Deno.writeTextFile(`${dir}/${out}.c`, src);
  const shared = out.includes(".so") ? ["-shared", "-fPIC"] : [];
  const r = await run("gcc", [...shared, "-o", out, `${out}.c`, ...flags], dir);
  assert.ok(r.ok, r.out);
}

Deno.test("deps resolves redis-server like ldd", async () => {
  const deps = await resolveDependencies(REDIS);
  assert.equal(deps.executable, REDIS);
  assert.equal(deps.interpreter, "/lib64/ld-linux-x86-64.so.2");
  const names = deps.libraries.map((l) => l.name);
  assert.ok(names.includes("libc.so.6") && names.includes("ld-linux-x86-64.so.2"), `${names}`);
  assert.equal(new Set(names).size, names.length, "deduped");
  assert.deepEqual(deps.libraries.find((l) => l.name === "ld-linux-x86-64.so.2")?.path, deps.interpreter);
  await assertMatchesLdd(REDIS, deps);
  assert.deepEqual(await resolveDependencies(REDIS), deps, "deterministic");
  assert.ok(!deps.libraryDirs.includes("/lib64"), "interpreter dir excluded");
});

Deno.test("deps of a static executable are empty", async () => {
  const deps = await resolveDependencies("/bin/busybox");
  assert.deepEqual(deps, { executable: "/bin/busybox", libraries: [], libraryDirs: [] });
});

Deno.test("deps reports a missing library and who needs it", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp" });
  try {
    const bytes = Deno.readFileSync(REDIS);
    // Same-length rename of a DT_NEEDED string (also renames its .gnu.version_r reference).
    const from = new TextEncoder().encode("\0liblzf.so.1\0"),
      to = new TextEncoder().encode("\0libzzq.so.9\0");
    let hits = 0;
    for (let i = bytes.indexOf(0); i >= 0 && i + from.length <= bytes.length; i = bytes.indexOf(0, i + 1)) {
      if (from.every((b, k) => bytes[i + k] === b)) bytes.set(to, i), hits++;
    }
    assert.ok(hits > 0);
    const exe = `${dir}/redis-patched`;
    await Deno.writeFile(exe, bytes);
    await assert.rejects(resolveDependencies(exe), (e: unknown) => {
      assert.ok(e instanceof MissingLibraryError, `${e}`);
      assert.equal(e.code, Code.FAILED_PRECONDITION);
      assert.equal(e.library, "libzzq.so.9");
      assert.equal(e.neededBy, exe);
      assert.match(
        e.message,
        /"libzzq\.so\.9" needed by .*redis-patched not found \(searched: .*\/lib\/x86_64-linux-gnu/,
      );
      return true;
    });

    // extraSearchDirs acts like LD_LIBRARY_PATH; a 32-bit file of that name earlier is skipped.
    await Deno.mkdir(`${dir}/x32`);
    await Deno.mkdir(`${dir}/x64`);
    const elf32 = new Uint8Array(64);
    elf32.set([0x7f, 0x45, 0x4c, 0x46, 1, 1, 1]), elf32.set([3, 0], 18);
    await Deno.writeFile(`${dir}/x32/libzzq.so.9`, elf32);
    await Deno.copyFile("/usr/lib/x86_64-linux-gnu/liblzf.so.1", `${dir}/x64/libzzq.so.9`);
    const deps = await resolveDependencies(exe, { extraSearchDirs: [`${dir}/x32`, `${dir}/x64`] });
    assert.equal(deps.libraries.find((l) => l.name === "libzzq.so.9")?.path, `${dir}/x64/libzzq.so.9`);
    assert.equal(guestLibraryPath(deps), `${dir}/x64`);

    // A non-ELF file under the needed name is an error, as in ld.so ("invalid ELF header").
    await Deno.writeTextFile(`${dir}/x32/libzzq.so.9`, "INPUT(-lc)\n");
    await assert.rejects(resolveDependencies(exe, { extraSearchDirs: [`${dir}/x32`] }), ElfError);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deps of a missing executable is NotFoundError", async () => {
  await assert.rejects(resolveDependencies("/nonexistent/prog"), NotFoundError);
  await assert.rejects(resolveDependencies("/etc/hostname"), ElfError);
});

Deno.test({
  name: "deps follows $ORIGIN, RPATH inheritance and RUNPATH like ld.so",
  ignore: !hasGcc,
  async fn() {
    const dir = await Deno.makeTempDir({ dir: "/tmp" });
    try {
      await Deno.mkdir(`${dir}/lib`);
      await Deno.mkdir(`${dir}/lib2`);
      await Deno.mkdir(`${dir}/bin`);
      await cc(`${dir}/lib2`, "libd.so", "int d(void){return 4;}", ["-Wl,-soname,libd.so"]);
      await cc(`${dir}/lib`, "libb.so", "int b(void){return 2;}", ["-Wl,-soname,libb.so"]);
      // liba: RUNPATH $ORIGIN finds libb beside it; libd only via an RPATH inherited from main.
      await cc(`${dir}/lib`, "liba.so", "int b(void); int d(void); int a(void){return b()+d();}", [
        "-L.",
        "-L../lib2",
        "-lb",
        "-ld",
        "-Wl,--enable-new-dtags,-rpath,$ORIGIN",
      ]);
      const main = "int a(void); int main(void){return a();}";
      const link = ["-L../lib", "-la", "-Wl,--allow-shlib-undefined"];
      await cc(`${dir}/bin`, "rp", main, [
        ...link,
        "-Wl,--disable-new-dtags,-rpath,$ORIGIN/../lib:$ORIGIN/../lib2",
      ]);
      await cc(`${dir}/bin`, "rn", main, [
        ...link,
        "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib:$ORIGIN/../lib2",
      ]);

      // liba has RUNPATH, so main's RPATH is not consulted for liba's needs: libd is missing.
      await assert.rejects(resolveDependencies(`${dir}/bin/rp`), (e) => e instanceof MissingLibraryError);
      assert.equal((await ldd(`${dir}/bin/rp`)).get("libd.so"), null, "ldd agrees libd is not found");

      // Rebuild liba without RUNPATH: libb and libd both come from main's inherited RPATH.
      await cc(`${dir}/lib`, "liba.so", "int b(void); int d(void); int a(void){return b()+d();}", [
        "-L.",
        "-L../lib2",
        "-lb",
        "-ld",
      ]);
      const rp = await resolveDependencies(`${dir}/bin/rp`);
      await assertMatchesLdd(`${dir}/bin/rp`, rp);
      assert.equal(
        rp.libraries.find((l) => l.name === "libd.so")?.path,
        `${dir}/lib2/libd.so`,
        'normalized: the image writer rejects ".."',
      );
      // RUNPATH on main is not inherited by liba: libb and libd are not found.
      await assert.rejects(resolveDependencies(`${dir}/bin/rn`), (e) => e instanceof MissingLibraryError);
      assert.equal((await ldd(`${dir}/bin/rn`)).get("libb.so"), null);
      // ...unless the caller adds the dirs (LD_LIBRARY_PATH position).
      const rn = await resolveDependencies(`${dir}/bin/rn`, {
        extraSearchDirs: [`${dir}/lib`, `${dir}/lib2`],
      });
      assert.deepEqual(rn.libraries.map((l) => l.name).sort(), [
        "ld-linux-x86-64.so.2",
        "liba.so",
        "libb.so",
        "libc.so.6",
        "libd.so",
      ]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("deps reads ld.so.conf with include globs", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp" });
  try {
    await Deno.mkdir(`${dir}/conf.d`);
    await Deno.writeTextFile(
      `${dir}/ld.so.conf`,
      "# top\n/opt/first/\ninclude conf.d/*.conf\n/opt/last # end\n",
    );
    await Deno.writeTextFile(`${dir}/conf.d/b.conf`, "/opt/b\n");
    await Deno.writeTextFile(`${dir}/conf.d/a.conf`, "  /opt/a1\n\n/opt/a2\ninclude ../ld.so.conf\n");
    await Deno.writeTextFile(`${dir}/conf.d/c.txt`, "/opt/ignored\n");
    const dirs = await readLdSoConf(`${dir}/ld.so.conf`);
    // The self-include cycle is cut at a fixed depth instead of looping.
    assert.deepEqual(dirs.slice(0, 4), ["/opt/first", "/opt/a1", "/opt/a2", "/opt/first"]);
    assert.deepEqual(dirs.slice(-2), ["/opt/b", "/opt/last"]);
    assert.ok(!dirs.includes("/opt/ignored"));
    assert.ok((await readLdSoConf()).includes("/lib/x86_64-linux-gnu"));
    assert.deepEqual(await readLdSoConf(`${dir}/missing.conf`), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deps guest default dirs match the loader's system search path", async () => {
  // ld.so --help lists its compiled-in dirs; the guest has no ld.so.cache, so only these apply.
  const { out } = await run("/lib64/ld-linux-x86-64.so.2", ["--help"]);
  const system = [...out.matchAll(/^\s+(\/\S+) \(system search path\)/gm)].map((m) => m[1]);
  assert.deepEqual(guestDefaultLibraryDirs(), system);
  const none: ResolvedDeps = { executable: "/x", libraries: [], libraryDirs: ["/lib/x86_64-linux-gnu"] };
  assert.equal(guestLibraryPath(none), undefined);
});
