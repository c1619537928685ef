import assert from "node:assert/strict";
import { parseConfig } from "../../../agent/config/load.ts";
import { InvalidArgumentError } from "../../../agent/errors.ts";

Deno.test("config defaults apply to an empty file", () => {
  const c = parseConfig("", "test");
  assert.equal(c.state_dir, "/var/lib/flexcap");
  assert.equal(c.api, "unix:/run/flexcap/flexcapd.sock");
  assert.equal(c.api_socket_mode, 0o600);
  assert.equal(c.accelerator, "auto");
  assert.equal(c.memory.overcommit_ratio, 1);
});

Deno.test("config file values and flag overrides merge, flags winning", () => {
  const c = parseConfig("state_dir: /srv/fc\nmemory:\n  reserve_mib: 64\n", "test", {
    state_dir: "/override",
    "memory.overcommit_ratio": 1.5,
  });
  assert.equal(c.state_dir, "/override");
  assert.equal(c.memory.reserve_mib, 64);
  assert.equal(c.memory.overcommit_ratio, 1.5);
});

Deno.test("config errors name the bad key and the source", () => {
  const cases: [string, RegExp][] = [
    ["memory:\n  overcommit_ratio: lots\n", /config x\.yaml.*memory\.overcommit_ratio/],
    ["state_dir: relative/path\n", /state_dir/],
    ["state_dir: /a,b\n", /state_dir/],
    ["api: http://x\n", /api/],
    ["acclerator: kvm\n", /acclerator|unrecognized/i],
    ["network:\n  port_range: [3000, 2000]\n", /network\.port_range/],
    ["api: tcp:0.0.0.0:7000\n", /tls/],
    ["- a list\n", /mapping/],
    ["key: [unclosed\n", /YAML/],
    ["node_name: Node_A\n", /node_name/],
    ["peering:\n  listen: 0.0.0.0:7443\n  cert: /c\n  key: /k\n  ca: /a\n", /peering\.listen/],
    ["peering:\n  listen: tcp:0.0.0.0:7443\n  cert: /c\n  key: /k\n", /peering\.ca/],
    [
      "peering:\n  listen: tcp:0.0.0.0:7443\n  cert: /c\n  key: /k\n  ca: /a\n  peers:\n    - name: b\n      address: b\n",
      /peering\.peers\.0\.address/,
    ],
    ["network:\n  backend: bridge\n  cluster_cidr: 10.0.0.1/8\n", /network\.cluster_cidr/],
  ];
  for (const [text, re] of cases) {
    assert.throws(() => parseConfig(text, "config x.yaml"), (err: unknown) => {
      assert.ok(err instanceof InvalidArgumentError, `${text}: ${err}`);
      assert.match(err.message, re, text);
      return true;
    });
  }
});
