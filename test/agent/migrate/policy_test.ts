import { MigrationOptions as MigrationOptionsPb } from "../../../agent/gen/flexcap/v1/migration.ts";
import assert from "node:assert/strict";
import { FailedPreconditionError } from "../../../agent/errors.ts";
import {
  capabilities,
  chooseMode,
  DEFAULT_DOWNTIME_LIMIT_MS,
  DEFAULT_TIMEOUT_MS,
  parseQemuVersion,
  resolveOptions,
  sourceParameters,
  switchoverDecision,
  UNCAPPED_BANDWIDTH,
} from "../../../agent/migrate/policy.ts";
import type { MigrationOptions } from "../../../agent/migrate/types.ts";

const DEBIAN_72 =
  "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022 Fabrice Bellard";
// What an all-zero MigrationOptions message decodes to.
const zero = MigrationOptionsPb.fromPartial({});
const opts = (o: Partial<MigrationOptions> = {}): MigrationOptions => ({
  maxBandwidthBytesS: 64 * 1024 * 1024,
  downtimeLimitMs: 500,
  autoConverge: true,
  allowPostcopy: true,
  timeoutMs: 60_000,
  gracePeriodMs: 5_000,
  ...o,
});

Deno.test("parseQemuVersion reads major.minor from `qemu --version` output", () => {
  assert.deepEqual(parseQemuVersion(DEBIAN_72), [7, 2]);
  assert.deepEqual(parseQemuVersion("QEMU emulator version 9.0.0"), [9, 0]);
  assert.deepEqual(parseQemuVersion("QEMU emulator version 10.1.2 (v10.1.2)"), [10, 1]);
  assert.equal(parseQemuVersion(""), undefined);
  assert.equal(parseQemuVersion("QEMU emulator"), undefined);
  assert.equal(parseQemuVersion("version x.y"), undefined);
});

Deno.test("chooseMode: kvm is iterative, tcg before 9.0 single-pass, tcg 9.0+ iterative, unknown single-pass", () => {
  assert.equal(chooseMode(DEBIAN_72, "kvm").mode, "iterative");
  assert.equal(chooseMode("garbage", "kvm").mode, "iterative");
  const old = chooseMode(DEBIAN_72, "tcg");
  assert.equal(old.mode, "single-pass");
  assert.match(old.why, /7\.2/);
  assert.equal(chooseMode("QEMU emulator version 8.2.2", "tcg").mode, "single-pass");
  assert.equal(chooseMode("QEMU emulator version 9.0.0", "tcg").mode, "iterative");
  assert.equal(chooseMode("QEMU emulator version 10.0.3", "tcg").mode, "iterative");
  const unknown = chooseMode("something else", "tcg");
  assert.equal(unknown.mode, "single-pass");
  assert.match(unknown.why, /unknown QEMU version/);
});

Deno.test("resolveOptions replaces zero values with the defaults", () => {
  for (const wire of [undefined, zero]) {
    for (const mode of ["single-pass", "iterative"] as const) {
      assert.deepEqual(resolveOptions(wire, mode, 7_000), {
        maxBandwidthBytesS: UNCAPPED_BANDWIDTH,
        downtimeLimitMs: DEFAULT_DOWNTIME_LIMIT_MS,
        autoConverge: false,
        allowPostcopy: false,
        timeoutMs: DEFAULT_TIMEOUT_MS,
        gracePeriodMs: 7_000,
      });
    }
  }
  assert.equal(DEFAULT_DOWNTIME_LIMIT_MS, 300);
  assert.equal(DEFAULT_TIMEOUT_MS, 120_000);
  assert.equal(UNCAPPED_BANDWIDTH, 10 * 1024 ** 3);
});

Deno.test("resolveOptions keeps given values; MiB/s become bytes/s", () => {
  const got = resolveOptions(
    {
      maxBandwidthMibS: 100,
      downtimeLimitMs: 50,
      autoConverge: true,
      allowPostcopy: true,
      timeoutMs: 9,
      gracePeriodMs: 4,
    },
    "iterative",
    7_000,
  );
  assert.deepEqual(got, {
    maxBandwidthBytesS: 100 * 1024 * 1024,
    downtimeLimitMs: 50,
    autoConverge: true,
    allowPostcopy: true,
    timeoutMs: 9,
    gracePeriodMs: 4,
  });
});

Deno.test("resolveOptions refuses post-copy in single-pass mode, naming options.allow_postcopy", () => {
  assert.throws(
    () => resolveOptions({ ...zero, allowPostcopy: true }, "single-pass", 1),
    (e: unknown) => e instanceof FailedPreconditionError && /options\.allow_postcopy/.test(e.message),
  );
  // auto-converge is not refused (it is just not enabled), post-copy is fine when iterative.
  assert.equal(resolveOptions({ ...zero, autoConverge: true }, "single-pass", 1).autoConverge, true);
  assert.equal(resolveOptions({ ...zero, allowPostcopy: true }, "iterative", 1).allowPostcopy, true);
});

Deno.test("capabilities: return-path, events and pause-before-switchover always; the rest only iterative", () => {
  const always = { "return-path": true, events: true, "pause-before-switchover": true };
  assert.deepEqual(capabilities("single-pass", opts()), {
    ...always,
    "auto-converge": false,
    "postcopy-ram": false,
  });
  assert.deepEqual(capabilities("iterative", opts()), { ...always, "auto-converge": true, "postcopy-ram": true });
  assert.deepEqual(capabilities("iterative", opts({ autoConverge: false, allowPostcopy: false })), {
    ...always,
    "auto-converge": false,
    "postcopy-ram": false,
  });
});

Deno.test("sourceParameters: single-pass forces downtime-limit 0; iterative uses the options", () => {
  const o = opts({ maxBandwidthBytesS: 12345, downtimeLimitMs: 400 });
  assert.deepEqual(sourceParameters("single-pass", o), { "max-bandwidth": 12345, "downtime-limit": 0 });
  assert.deepEqual(sourceParameters("iterative", o), { "max-bandwidth": 12345, "downtime-limit": 400 });
});

Deno.test("switchoverDecision: single-pass goes only after exactly one dirty sync; iterative always goes", () => {
  const s = (dirtySyncCount: number) => ({ dirtySyncCount, remaining: 50 * 1024 * 1024, bytesPerS: 100 * 1024 * 1024 });
  assert.deepEqual(switchoverDecision("single-pass", s(1)), { go: true, expectedMs: 500 });
  for (const n of [0, 2, 3, 17]) {
    const d = switchoverDecision("single-pass", s(n));
    assert.equal(d.go, false, `dirtySyncCount ${n}`);
    assert.ok(!d.go && /intermediate dirty sync/.test(d.reason) && d.reason.includes(`${n} syncs`));
    assert.equal(d.expectedMs, 500);
  }
  for (const n of [0, 1, 2, 17]) assert.equal(switchoverDecision("iterative", s(n)).go, true);
  // Unknown throughput: no estimate rather than a division by zero.
  assert.equal(switchoverDecision("iterative", { dirtySyncCount: 3, remaining: 10, bytesPerS: 0 }).expectedMs, 0);
});
