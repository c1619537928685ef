import assert from "node:assert/strict";
import { connect } from "../../../agent/cli/client.ts";
import { startTestAgent } from "../../harness/agent.ts";

async function sh(cmd: string, cwd: string) {
  const out = await new Deno.Command("bash", { args: ["-c", cmd], cwd, stderr: "piped" }).output();
  if (out.code !== 0) throw new Error(`${cmd}: ${new TextDecoder().decode(out.stderr)}`);
}

/** A throwaway CA with a server and a client certificate (server name flexcapd.test). */
async function makePki(dir: string) {
  const subj = (cn: string) => `-subj /CN=${cn}`;
  await sh(`openssl req -x509 -newkey rsa:2048 -nodes -days 1 ${subj("test-ca")} -keyout ca.key -out ca.crt`, dir);
  for (const name of ["server", "client"]) {
    await sh(`openssl req -newkey rsa:2048 -nodes ${subj(name)} -keyout ${name}.key -out ${name}.csr`, dir);
    await sh(
      `printf 'subjectAltName=DNS:flexcapd.test\\n' > ${name}.ext && openssl x509 -req -in ${name}.csr -CA ca.crt ` +
        `-CAkey ca.key -CAcreateserial -days 1 -extfile ${name}.ext -out ${name}.crt`,
      dir,
    );
  }
}

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

Deno.test({
  name: "tcp api requires tls and, with a ca, a client certificate",
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const pki = await Deno.makeTempDir();
  await makePki(pki);
  const port = freePort();
  const api = `tcp:127.0.0.1:${port}`;
  const agent = await startTestAgent({
    configYaml: `tls:\n  cert: ${pki}/server.crt\n  key: ${pki}/server.key\n  ca: ${pki}/ca.crt\n`,
    extraArgs: ["--api", api],
    ready: {
      api,
      tls: { ca: `${pki}/ca.crt`, cert: `${pki}/client.crt`, key: `${pki}/client.key`, serverName: "flexcapd.test" },
    },
  });
  try {
    const info = await agent.client.agent.getAgentInfo({});
    assert.match(info.accelerator, /^(kvm|tcg)$/);
    // Without a client certificate the handshake is refused.
    const anon = connect(api, { ca: `${pki}/ca.crt`, serverName: "flexcapd.test" });
    try {
      await assert.rejects(anon.agent.getAgentInfo({}), (e: { code: number }) => e.code === 14);
    } finally {
      anon.close();
    }
  } finally {
    await agent.cleanup();
    await Deno.remove(pki, { recursive: true });
  }
});
