import assert from "node:assert/strict";
import { resolvePorts } from "../../../agent/net/usermode.ts";
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
