import assert from "node:assert/strict";
import { guestCmdline } from "../../../agent/capsule/launch.ts";

Deno.test("the guest's network and root device go on the kernel command line", () => {
  const net = { addressCidr: "10.0.2.15/24", gateway: "10.0.2.2", dns: "10.0.2.3" };
  assert.equal(guestCmdline(net, false), "flexcap.ip=10.0.2.15/24 flexcap.gw=10.0.2.2 flexcap.dns=10.0.2.3");
  assert.equal(
    guestCmdline({ ...net, gateway: "", dns: "" }, true),
    "flexcap.ip=10.0.2.15/24 flexcap.root=vda",
  );
});
