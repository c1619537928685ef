import assert from "node:assert/strict";
import { contains, formatIp, parseCidr, parseIp, subnet, within } from "../../../agent/net/cidr.ts";
import { allocateIp, type IpPool } from "../../../agent/net/ipam.ts";
import { ResourceExhaustedError } from "../../../agent/errors.ts";

const cluster = parseCidr("10.200.0.0/16");
const pool = (index: number): IpPool => ({
  cluster,
  slice: subnet(cluster, 24, index),
  gateway: parseIp("10.200.0.1"),
});

Deno.test("cidr: parse, format and containment", () => {
  assert.equal(formatIp(parseIp("10.200.3.7")), "10.200.3.7");
  assert.throws(() => parseIp("10.200.3.256"), /not an IPv4 address/);
  assert.throws(() => parseCidr("10.200.0.1/16"), /host bits set; did you mean 10\.200\.0\.0\/16/);
  assert.ok(contains(cluster, parseIp("10.200.255.254")));
  assert.ok(!contains(cluster, parseIp("10.201.0.1")));
  assert.deepEqual(subnet(cluster, 24, 3), parseCidr("10.200.3.0/24"));
  assert.throws(() => subnet(cluster, 24, 256), /outside 10\.200\.0\.0\/16 \(it holds 256 \/24 slices\)/);
  assert.ok(within(parseCidr("10.200.9.0/24"), cluster));
  assert.ok(!within(parseCidr("10.0.0.0/8"), cluster));
});

Deno.test("ipam: never hands out the gateway, network or broadcast addresses", () => {
  assert.equal(allocateIp(pool(0), []), "10.200.0.2"); // .0 network, .1 gateway
  const tiny: IpPool = {
    cluster: parseCidr("10.9.0.0/28"),
    slice: parseCidr("10.9.0.0/28"),
    gateway: parseIp("10.9.0.1"),
  };
  const got: string[] = [];
  for (;;) {
    try {
      got.push(allocateIp(tiny, got));
    } catch (err) {
      assert.ok(err instanceof ResourceExhaustedError);
      assert.match((err as Error).message, /no free capsule address in 10\.9\.0\.0\/28/);
      break;
    }
  }
  assert.equal(got.length, 13); // 16 minus network, gateway, broadcast
  assert.ok(!got.includes("10.9.0.0") && !got.includes("10.9.0.1") && !got.includes("10.9.0.15"));
});

Deno.test("ipam: addresses in use (from any slice) are never reused; allocation moves on round-robin", () => {
  const inUse = ["10.200.1.1", "10.200.1.2", "10.200.0.9"];
  assert.equal(allocateIp(pool(1), inUse), "10.200.1.3");
  // After .3 was handed out and released, the next allocation does not take it again at once.
  assert.equal(allocateIp(pool(1), inUse, "10.200.1.3"), "10.200.1.4");
  // Wraps around the slice.
  assert.equal(allocateIp(pool(1), inUse, "10.200.1.254"), "10.200.1.3");
});

Deno.test("ipam: two agents with different node slices never collide", () => {
  const a = new Set<string>();
  const b = new Set<string>();
  for (let i = 0; i < 200; i++) {
    a.add(allocateIp(pool(4), a));
    b.add(allocateIp(pool(5), b));
  }
  for (const ip of a) assert.ok(!b.has(ip));
});
