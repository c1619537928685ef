/**
 * The cluster's small PKI for tests and small clusters: one CA and a certificate per node,
 * issued for the node's name (CN and DNS SAN) and usable both to serve and to call
 * (serverAuth + clientAuth), since every agent is both. Made with the openssl CLI;
 * ECDSA P-256 keeps handshakes cheap.
 */
import { exists } from "../state/exists.ts";
import { execa } from "execa";
import { join } from "node:path";
import { InvalidArgumentError, UnavailableError } from "../errors.ts";

const NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

async function openssl(args: string[], cwd: string): Promise<void> {
  const r = await execa("openssl", args, { cwd, reject: false, stdin: "ignore" });
  if (r.exitCode !== 0) throw new UnavailableError(`openssl ${args[0]}: ${String(r.stderr).trim()}`);
}

/** Paths of one node's credentials in `dir`. */
export function nodeFiles(dir: string, name: string): { cert: string; key: string; ca: string } {
  return { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`), ca: join(dir, "ca.crt") };
}

/**
 * Makes `dir/ca.{crt,key}` unless present, then a certificate for each name (replacing an
 * existing one). Returns the files written. Keys are created 0600.
 */
export async function issueCerts(dir: string, names: string[], days = 825): Promise<string[]> {
  if (names.length === 0) throw new InvalidArgumentError("names", "give at least one node name");
  for (const n of names) if (!NAME.test(n)) throw new InvalidArgumentError("names", `"${n}" is not a valid node name`);
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  const written: string[] = [];
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  if (!await exists(join(dir, "ca.key"))) {
    await openssl(
      [
        "req",
        "-x509",
        ...ec,
        "-days",
        String(days),
        "-subj",
        "/CN=flexcap-cluster-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
      ],
      dir,
    );
    written.push(join(dir, "ca.crt"), join(dir, "ca.key"));
  }
  for (const n of names) {
    const ext = join(dir, `${n}.ext`);
    await Deno.writeTextFile(
      ext,
      `subjectAltName=DNS:${n}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n`,
    );
    try {
      await openssl(["req", ...ec, "-subj", `/CN=${n}`, "-keyout", `${n}.key`, "-out", `${n}.csr`], dir);
      await openssl([
        "x509",
        "-req",
        "-in",
        `${n}.csr`,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        String(days),
        "-extfile",
        ext,
        "-out",
        `${n}.crt`,
      ], dir);
    } finally {
      await Deno.remove(ext).catch(() => {});
      await Deno.remove(join(dir, `${n}.csr`)).catch(() => {});
    }
    await Deno.chmod(join(dir, `${n}.key`), 0o600);
    written.push(join(dir, `${n}.crt`), join(dir, `${n}.key`));
  }
  await Deno.chmod(join(dir, "ca.key"), 0o600);
  return written;
}
