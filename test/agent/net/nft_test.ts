/**
 * The flexcap table against the real kernel, inside a namespace this test creates: what is
 * rendered is what the kernel holds, a replace leaves nothing of the old table, drift is
 * detected, and nothing outside `inet flexcap` is ever touched.
 */
import assert from "node:assert/strict";
import { applyBatch, compareTable, deleteTable, readTable } from "../../../agent/net/nft.ts";
import { type Redirect, renderTable, rules, type TableState } from "../../../agent/net/nft_render.ts";
import { netnsSupported } from "../../harness/netns.ts";

const supported = await netnsSupported();

async function sh(ns: string, cmd: string): Promise<string> {
  const r = await new Deno.Command("ip", { args: ["netns", "exec", ns, "bash", "-c", cmd], stderr: "piped" }).output();
  if (!r.success) throw new Error(`${cmd}: ${new TextDecoder().decode(r.stderr)}`);
  return new TextDecoder().decode(r.stdout);
}

async function withNs(fn: (ns: string, nft: string[]) => Promise<void>): Promise<void> {
  const ns = `fcnft${crypto.randomUUID().slice(0, 6)}`;
  await new Deno.Command("ip", { args: ["netns", "add", ns] }).output();
  try {
    await sh(
      ns,
      "ip link add fc0 type bridge && ip tuntap add dev fcaaaaaaaaaaaa mode tap && ip tuntap add dev fcbbbbbbbbbbbb mode tap",
    );
    await fn(ns, ["ip", "netns", "exec", ns, "nft"]);
  } finally {
    await new Deno.Command("ip", { args: ["netns", "del", ns] }).output();
  }
}

const state = (exposedA: number[]): TableState => ({
  bridge: "fc0",
  cluster: "10.200.0.0/16",
  capsules: [
    {
      id: "c-aaaaaaaaaaaa",
      tap: "fcaaaaaaaaaaaa",
      ip: "10.200.0.2",
      mac: "52:54:00:00:00:02",
      exposed: exposedA.map((p) => ({ hostPort: p, guestPort: 80, protocol: "tcp" as const })),
    },
    {
      id: "c-bbbbbbbbbbbb",
      tap: "fcbbbbbbbbbbbb",
      ip: "10.200.0.3",
      mac: "52:54:00:00:00:03",
      exposed: [{ hostPort: 6379, guestPort: 6379, protocol: "tcp" }],
    },
  ],
  allow: [{ from: "10.200.0.2", to: "10.200.0.3" }],
  redirects: [{ hostPort: 9000, protocol: "tcp", toAddress: "172.31.1.11", toPort: 9000, comment: "c-cccc grace" }],
});

Deno.test({
  name: "nft: the kernel holds exactly the rendered table; a replace leaves nothing of the old one",
  ignore: !supported,
  fn: () =>
    withNs(async (_ns, nft) => {
      const first = renderTable(state([8080, 8081]));
      await applyBatch(first, nft);
      assert.deepEqual(compareTable(first, (await readTable(nft))!).differences, []);
      const second = renderTable(state([8082]));
      await applyBatch(second, nft);
      const kernel = (await readTable(nft))!;
      assert.deepEqual(compareTable(second, kernel).differences, []);
      const text = JSON.stringify(kernel);
      assert.ok(!text.includes("8080") && !text.includes("8081"), "old DNAT rules are gone");
      assert.ok(text.includes("8082"));
      // The comparison is not vacuous: the first batch no longer matches.
      assert.notDeepEqual(compareTable(first, kernel).differences, []);
    }),
});

Deno.test({
  name: "nft: drift is detected — a foreign rule, a foreign chain, a missing rule",
  ignore: !supported,
  fn: () =>
    withNs(async (ns, nft) => {
      const batch = renderTable(state([8080]));
      await applyBatch(batch, nft);
      await sh(ns, "nft add rule inet flexcap input tcp dport 22 accept");
      let d = compareTable(batch, (await readTable(nft))!).differences;
      assert.ok(d.some((l) => /rule 3 of chain "input": expected \(none\)/.test(l)), d.join("\n"));
      await applyBatch(batch, nft);
      await sh(ns, "nft add chain inet flexcap sneaky");
      d = compareTable(batch, (await readTable(nft))!).differences;
      assert.ok(d.some((l) => l === 'chain "sneaky" is not in the state'), d.join("\n"));
      await applyBatch(batch, nft);
      const handle = JSON.parse(await sh(ns, "nft -j -a list chain inet flexcap to_capsules")).nftables
        .find((o: { rule?: { handle: number } }) => o.rule)?.rule.handle;
      await sh(ns, `nft delete rule inet flexcap to_capsules handle ${handle}`);
      d = compareTable(batch, (await readTable(nft))!).differences;
      assert.ok(d.some((l) => /chain "to_capsules"/.test(l)), d.join("\n"));
      assert.equal(compareTable(batch, []).differences[0], "table inet flexcap is missing");
    }),
});

Deno.test({
  name: "nft: apply and delete never touch another table",
  ignore: !supported,
  fn: () =>
    withNs(async (ns, nft) => {
      await sh(
        ns,
        "nft add table inet other && nft add chain inet other c '{ type filter hook input priority 0; }' && nft add rule inet other c tcp dport 22 accept",
      );
      const before = await sh(ns, "nft list table inet other");
      await applyBatch(renderTable(state([8080])), nft);
      await applyBatch(renderTable(state([])), nft);
      assert.equal(await sh(ns, "nft list table inet other"), before);
      await deleteTable(nft);
      await deleteTable(nft); // idempotent
      assert.equal(await readTable(nft), undefined);
      assert.equal(await sh(ns, "nft list table inet other"), before);
    }),
});

Deno.test({
  name: "nft: a batch the kernel refuses changes nothing (one transaction)",
  ignore: !supported,
  fn: () =>
    withNs(async (_ns, nft) => {
      const good = renderTable(state([8080]));
      await applyBatch(good, nft);
      // The last command jumps to a chain that does not exist: the kernel refuses the batch after its delete.
      const bad = renderTable(state([9999]));
      bad.nftables.push({
        add: { rule: { family: "inet", table: "flexcap", chain: "input", expr: [{ jump: { target: "nochain" } }] } },
      });
      await assert.rejects(() => applyBatch(bad, nft), /nft refused the flexcap table/);
      assert.deepEqual(compareTable(good, (await readTable(nft))!).differences, [], "the old table is intact");
    }),
});

// Grace-period redirects of a moved capsule: old connections DNAT'ed to its address get a TCP reset.

const moved = (capsuleIp?: string): Redirect[] => [
  { hostPort: 9000, protocol: "tcp", toAddress: "172.31.1.11", toPort: 20001, comment: "c-cccc moved", capsuleIp },
  { hostPort: 9053, protocol: "udp", toAddress: "172.31.1.11", toPort: 20002, comment: "c-cccc moved", capsuleIp },
];
const resetRule = (ip: string) => ({
  family: "inet",
  table: "flexcap",
  chain: "forward",
  expr: [
    { match: { op: "==", left: { payload: { protocol: "ip", field: "daddr" } }, right: ip } },
    { match: { op: "==", left: { meta: { key: "l4proto" } }, right: "tcp" } },
    { reject: { type: "tcp reset" } },
  ],
  comment: "moved capsule: reset old connections",
});
const forwardRules = (s: TableState) => rules(s).filter((r) => r.chain === "forward");
const hasReject = (r: Record<string, unknown>) => JSON.stringify(r.expr).includes('"reject"');

Deno.test("nft render: a redirect with the moved capsule's address resets its old TCP connections, once per address", () => {
  const s: TableState = { ...state([]), redirects: moved("10.200.0.9") };
  const fwd = forwardRules(s);
  assert.deepEqual(fwd.filter(hasReject), [resetRule("10.200.0.9")], "one rule for both redirects of the capsule");
  // Before the jumps into the capsule chains, or established traffic would be accepted there first.
  assert.ok(hasReject(fwd[0]));
  assert.ok(fwd.slice(1).every((r) => !hasReject(r)));
  // Two moved capsules: one rule each.
  const two: TableState = {
    ...state([]),
    redirects: [...moved("10.200.0.9"), { ...moved("10.200.0.10")[0], hostPort: 9001 }],
  };
  assert.deepEqual(forwardRules(two).filter(hasReject), [resetRule("10.200.0.9"), resetRule("10.200.0.10")]);
});

Deno.test("nft render: no reset rule for a redirect without a capsule address, nor without redirects", () => {
  for (const redirects of [moved(undefined), moved(""), []]) {
    const s: TableState = { ...state([8080]), redirects };
    assert.deepEqual(rules(s).filter(hasReject), [], JSON.stringify(redirects));
    assert.ok(!JSON.stringify(renderTable(s)).includes("reject"));
  }
});

Deno.test({
  name: "nft: the kernel accepts the moved-capsule reset rule and compareTable reads it back without differences",
  ignore: !supported,
  fn: () =>
    withNs(async (_ns, nft) => {
      const batch = renderTable({ ...state([8080]), redirects: moved("10.200.0.9") });
      await applyBatch(batch, nft);
      const kernel = (await readTable(nft))!;
      assert.deepEqual(compareTable(batch, kernel).differences, []);
      const forward = kernel.filter((o) => (o.rule as { chain?: string } | undefined)?.chain === "forward");
      assert.ok(forward.some((o) => JSON.stringify(o).includes('"reject"')), JSON.stringify(forward));
      // And the comparison notices the rule missing.
      const without = renderTable({ ...state([8080]), redirects: moved(undefined) });
      assert.ok(compareTable(without, kernel).differences.some((l) => /chain "forward"/.test(l)));
    }),
});
