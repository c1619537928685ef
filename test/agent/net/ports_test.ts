import assert from "node:assert/strict";
import { decideExposure, resolvePorts } from "../../../agent/net/ports.ts";
import { FailedPreconditionError } from "../../../agent/errors.ts";

const free = () => true;

Deno.test("port resolution keeps fixed ports and fills auto ones from the range", () => {
  const got = resolvePorts(
    [{ guestPort: 80, hostPort: 8080, protocol: "tcp" }, { guestPort: 53, hostPort: 0, protocol: "udp" }],
    new Set(["20000/udp"]),
    "127.0.0.1",
    [20000, 20010],
    free,
  );
  assert.deepEqual(got.map((p) => p.hostPort), [8080, 20001]);
});

Deno.test("port resolution refuses ports held by capsules or host processes, naming the field", () => {
  assert.throws(
    () => resolvePorts([{ guestPort: 80, hostPort: 8080, protocol: "tcp" }], new Set(["8080/tcp"]), "h", [1, 2], free),
    /spec\.ports\[0\]\.host_port: 8080\/tcp is held by another capsule/,
  );
  assert.throws(
    () => resolvePorts([{ guestPort: 22, hostPort: 2222, protocol: "tcp" }], new Set(), "h", [1, 2], () => false),
    FailedPreconditionError,
  );
  assert.throws(
    () => resolvePorts([{ guestPort: 80, hostPort: 0, protocol: "tcp" }], new Set(), "h", [5, 6], () => false),
    /no free host port in 5-6/,
  );
});

Deno.test("port resolution probes the real host: a bound port is refused", () => {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (l.addr as Deno.NetAddr).port;
    assert.throws(
      () => resolvePorts([{ guestPort: 80, hostPort: port, protocol: "tcp" }], new Set(), "127.0.0.1", [1, 2]),
      /in use/,
    );
  } finally {
    l.close();
  }
});

const allowance = [
  { guestPort: 80, hostPort: 8080, protocol: "tcp" as const },
  { guestPort: 53, hostPort: 5353, protocol: "udp" as const },
];

Deno.test("exposure: only allowed listens are exposed; others are refused with the reason", () => {
  const got = decideExposure(
    [{ port: 80, protocol: "tcp" }, { port: 22, protocol: "tcp" }, { port: 80, protocol: "udp" }],
    allowance,
    [],
    () => false,
  );
  assert.deepEqual(got.exposed, [allowance[0]]);
  assert.deepEqual(got.refused.map((r) => `${r.port.port}/${r.port.protocol}`), ["22/tcp", "80/udp"]);
  assert.match(got.refused[0].reason, /not in spec\.ports/);
});

Deno.test("exposure: a host port a host process holds is refused, unless we already expose it", () => {
  const busy = () => true;
  const fresh = decideExposure([{ port: 80, protocol: "tcp" }], allowance, [], busy);
  assert.deepEqual(fresh.exposed, []);
  assert.match(fresh.refused[0].reason, /8080\/tcp is in use by a process/);
  // Once exposed, our own DNAT answers the port: the probe must not be asked (it would bind through it).
  const kept = decideExposure([{ port: 80, protocol: "tcp" }], allowance, [allowance[0]], busy);
  assert.deepEqual(kept.exposed, [allowance[0]]);
});

Deno.test("exposure: nothing listening exposes nothing", () => {
  assert.deepEqual(decideExposure([], allowance, [allowance[0]], () => false), { exposed: [], refused: [] });
});
