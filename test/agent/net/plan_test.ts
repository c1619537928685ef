import assert from "node:assert/strict";
import { parseConfig } from "../../../agent/config/load.ts";
import { bridgePlan, firstNameserver } from "../../../agent/net/plan.ts";
import { chooseBackend } from "../../../agent/net/select.ts";
import { formatCidr } from "../../../agent/net/cidr.ts";
import { InvalidArgumentError } from "../../../agent/errors.ts";

const net = (yaml: string) => parseConfig(`network:\n  backend: usermode\n${yaml}`, "test").network;

Deno.test("plan: defaults give slice 0 of 10.200.0.0/16 and the anycast gateway .1", () => {
  const p = bridgePlan(net(""), "nameserver 127.0.0.53\nnameserver 192.0.2.53\n");
  assert.equal(formatCidr(p.slice), "10.200.0.0/24");
  assert.equal(p.gateway, "10.200.0.1");
  assert.equal(p.gatewayMac, "02:fc:00:00:00:01");
  assert.equal(p.dns, "192.0.2.53", "loopback resolvers are unreachable from a capsule");
});

Deno.test("plan: node_index and slice pick this agent's part of the cluster", () => {
  assert.equal(formatCidr(bridgePlan(net("  node_index: 7\n"), "").slice), "10.200.7.0/24");
  assert.equal(formatCidr(bridgePlan(net("  slice: 10.200.64.0/20\n"), "").slice), "10.200.64.0/20");
});

Deno.test("plan: bad addressing is refused naming the key", () => {
  const bad = (yaml: string, key: string) => {
    assert.throws(() => bridgePlan(net(yaml), ""), (e: unknown) => {
      assert.ok(e instanceof InvalidArgumentError);
      assert.match((e as Error).message, new RegExp(`^${key.replaceAll(".", "\\.")}: `));
      return true;
    });
  };
  bad("  cluster_cidr: 10.200.0.1/16\n", "network.cluster_cidr");
  bad("  slice: 10.9.0.0/24\n", "network.slice");
  bad("  node_index: 256\n", "network.node_index");
  bad("  gateway: 10.9.0.1\n", "network.gateway");
  bad("  dns: nonsense\n", "network.dns");
});

Deno.test("plan: auto picks the bridge only for root", () => {
  const n = parseConfig("", "test").network;
  assert.equal(chooseBackend(n, 0).kind, "bridge");
  assert.equal(chooseBackend(n, 1000).kind, "usermode");
  assert.equal(chooseBackend({ ...n, backend: "usermode" }, 0).kind, "usermode");
});

Deno.test("plan: firstNameserver skips loopback and comments", () => {
  assert.equal(firstNameserver("# x\nnameserver 127.0.0.1\n nameserver 9.9.9.9 \n"), "9.9.9.9");
  assert.equal(firstNameserver("nameserver ::1\n"), undefined);
});
