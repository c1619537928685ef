import assert from "node:assert/strict";
import { parseFailpoints } from "../../../agent/migrate/failpoints.ts";

Deno.test("parseFailpoints reads name=sleep(ms) entries, ignoring blanks and spaces", () => {
  assert.deepEqual(parseFailpoints(""), new Map());
  assert.deepEqual(parseFailpoints(" , ,"), new Map());
  assert.deepEqual(
    parseFailpoints("source-pre-switchover=sleep(2000), target-after-load=sleep(0),"),
    new Map([["source-pre-switchover", 2000], ["target-after-load", 0]]),
  );
  // A repeated name: the last one wins.
  assert.deepEqual(parseFailpoints("a=sleep(1),a=sleep(2)"), new Map([["a", 2]]));
  assert.equal(parseFailpoints("x=sleep(999999)").get("x"), 999_999);
});

Deno.test("parseFailpoints throws on a malformed entry, quoting it", () => {
  for (
    const bad of [
      "x",
      "x=",
      "x=sleep()",
      "x=sleep(abc)",
      "x=sleep(-1)",
      "x=sleep(1000000)", // more than 6 digits
      "X=sleep(1)", // names are lowercase
      "a_b=sleep(1)",
      "x=panic(1)",
      "x=sleep(1)extra",
      "good=sleep(1),bad",
    ]
  ) {
    assert.throws(() => parseFailpoints(bad), /FLEXCAPD_FAILPOINTS: bad entry "/, bad);
  }
});
