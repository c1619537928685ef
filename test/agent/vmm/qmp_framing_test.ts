import assert from "node:assert/strict";
import {
  encodeQmpCommand,
  parseQmpLine,
  type QmpDecoded,
  QmpDecoder,
  QmpProtocolError,
} from "../../../agent/vmm/qmp_framing.ts";
import { Code } from "../../../agent/errors.ts";

const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob"]}}\r\n';

function pushAll(d: QmpDecoder, chunks: (string | Uint8Array)[]): QmpDecoded[] {
  return chunks.flatMap((c) => d.push(c));
}

Deno.test("qmp decoder classifies a greeting", () => {
  const out = new QmpDecoder().push(GREETING);
  assert.deepEqual(out, [{
    kind: "greeting",
    version: { qemu: { major: 7, minor: 2, micro: 22 }, package: "Debian 1:7.2" },
    capabilities: ["oob"],
  }]);
});

Deno.test("qmp decoder classifies return, error and event", () => {
  const out = new QmpDecoder().push(
    '{"return": {"status": "prelaunch"}, "id": 1}\r\n' +
      '{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n' +
      '{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "STOP"}\r\n' +
      '{"event": "SHUTDOWN", "data": {"guest": false}, "timestamp": {"seconds": 1, "microseconds": 0}}\r\n' +
      '{"return": {}}\r\n',
  );
  assert.deepEqual(out, [
    { kind: "return", id: 1, value: { status: "prelaunch" } },
    { kind: "error", id: "x", errorClass: "CommandNotFound", desc: "The command nope has not been found" },
    { kind: "event", event: "STOP", data: {}, timestampMs: 1700000000123 },
    { kind: "event", event: "SHUTDOWN", data: { guest: false }, timestampMs: 1000 },
    { kind: "return", value: {} },
  ]);
});

Deno.test("qmp decoder reassembles messages split across chunks", () => {
  const d = new QmpDecoder();
  const text = '{"return": {"a": "héllo"}, "id": 7}\r\n';
  const bytes = new TextEncoder().encode(text);
  // One byte at a time, which also splits the two-byte "é" across chunks.
  const out = pushAll(d, [...bytes].map((b) => Uint8Array.of(b)));
  assert.deepEqual(out, [{ kind: "return", id: 7, value: { a: "héllo" } }]);
});

Deno.test("qmp decoder returns several messages from one chunk and keeps the tail", () => {
  const d = new QmpDecoder();
  const first = d.push('{"return": 1, "id": 1}\n{"return": 2, "id": 2}\r\n{"return": 3,');
  assert.deepEqual(first.map((m) => m.kind === "return" && m.value), [1, 2]);
  assert.deepEqual(d.push(' "id": 3}\r\n'), [{ kind: "return", id: 3, value: 3 }]);
});

Deno.test("qmp decoder does not retain the caller's reused buffer", () => {
  const d = new QmpDecoder();
  const buf = new TextEncoder().encode('{"return": "ab');
  assert.deepEqual(d.push(buf), []);
  buf.fill(0x20); // caller reuses its read buffer
  assert.deepEqual(d.push('c", "id": 1}\n'), [{ kind: "return", id: 1, value: "abc" }]);
});

Deno.test("qmp decoder skips blank and CR-only lines", () => {
  assert.deepEqual(new QmpDecoder().push('\r\n\n  \r\n{"return": null, "id": 1}\r\n'), [
    { kind: "return", id: 1, value: null },
  ]);
});

Deno.test("qmp decoder reports a malformed line and continues", () => {
  const out = new QmpDecoder().push('{"return": \r\n[1,2]\r\n{"foo": 1}\r\n{"return": true, "id": 2}\r\n');
  assert.equal(out.length, 4);
  const reasons = out.slice(0, 3).map((m) => {
    assert.equal(m.kind, "invalid");
    assert.ok(m.error instanceof QmpProtocolError);
    assert.equal(m.error.code, Code.INTERNAL);
    return m.error.reason;
  });
  assert.deepEqual(reasons, ["json", "schema", "schema"]);
  assert.deepEqual(out[3], { kind: "return", id: 2, value: true });
});

Deno.test("qmp decoder reports invalid UTF-8 and bad field types", () => {
  const bad = new QmpDecoder().push(Uint8Array.of(0x7b, 0xff, 0x7d, 0x0a));
  assert.equal(bad[0].kind === "invalid" && bad[0].error.reason, "encoding");
  for (
    const line of [
      '{"error": {"class": 1, "desc": "x"}, "id": 1}',
      '{"return": {}, "id": {"obj": 1}}',
      '{"event": 5}',
      '{"QMP": {"version": {}}}',
    ]
  ) {
    const m = parseQmpLine(line);
    assert.equal(m.kind, "invalid", line);
  }
});

Deno.test("qmp decoder rejects an oversize line and resyncs after it", () => {
  const d = new QmpDecoder({ maxLineBytes: 64 });
  const big = '{"return": "' + "x".repeat(100) + '", "id": 1}';
  // Oversize split over chunks: reported once, then the rest of the line is dropped.
  const out = pushAll(d, [
    big.slice(0, 50),
    big.slice(50, 90),
    big.slice(90) + '\r\n{"return": 2, "id": 2}\r\n',
  ]);
  assert.equal(out.length, 2);
  assert.equal(out[0].kind === "invalid" && out[0].error.reason, "oversize");
  assert.deepEqual(out[1], { kind: "return", id: 2, value: 2 });
  // Oversize in a single chunk, newline included.
  const one = d.push(big + "\n" + '{"return": 3, "id": 3}\n');
  assert.equal(one[0].kind === "invalid" && one[0].error.reason, "oversize");
  assert.deepEqual(one[1], { kind: "return", id: 3, value: 3 });
});

Deno.test("qmp decoder end flushes a final line without newline", () => {
  const d = new QmpDecoder();
  assert.deepEqual(d.push('{"return": 1, "id": 1}'), []);
  assert.deepEqual(d.end(), [{ kind: "return", id: 1, value: 1 }]);
  d.push('{"return": ');
  const out = d.end();
  assert.equal(out[0].kind === "invalid" && out[0].error.reason, "json");
  assert.deepEqual(d.end(), []);
});

Deno.test("qmp encodeQmpCommand writes one CRLF-terminated line", () => {
  const text = new TextDecoder().decode(encodeQmpCommand("stop", undefined, 4));
  assert.equal(text, '{"execute":"stop","id":4}\r\n');
  const withArgs = new TextDecoder().decode(encodeQmpCommand("device_del", { id: "d0" }, "a"));
  assert.deepEqual(JSON.parse(withArgs), { execute: "device_del", arguments: { id: "d0" }, id: "a" });
  assert.throws(() => encodeQmpCommand("x", { n: 1n }, 1), TypeError);
});
