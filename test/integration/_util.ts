/**
 * Helpers shared by the integration tests (not a test file itself: no `_test` suffix).
 */
import assert from "node:assert/strict";
import type { ClientReadableStream, ServiceError } from "@grpc/grpc-js";
import type { FlexcapClient } from "../../agent/cli/client.ts";
import { waitFor } from "../harness/agent.ts";
import { CapsuleState } from "../../agent/gen/flexcap/v1/capsule.ts";

export { CapsuleState };

/** gRPC status codes the agent uses. */
export const Status = {
  INVALID_ARGUMENT: 3,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
} as const;

/** Awaits `p`, expects it to fail with gRPC `code` and a message matching every `patterns`. */
export async function rejectsWith(
  p: Promise<unknown>,
  code: number,
  ...patterns: (RegExp | string)[]
): Promise<ServiceError> {
  let err: ServiceError | undefined;
  try {
    await p;
  } catch (e) {
    err = e as ServiceError;
  }
  assert.ok(err, `expected gRPC code ${code}, but the call succeeded`);
  assert.equal(err.code, code, `expected gRPC code ${code}, got ${err.code}: ${err.details ?? err.message}`);
  const msg = err.details ?? err.message;
  for (const pat of patterns) {
    if (typeof pat === "string") {
      assert.ok(msg.includes(pat), `message ${JSON.stringify(msg)} lacks ${JSON.stringify(pat)}`);
    } else assert.match(msg, pat);
  }
  return err;
}

/** Name of a capsule state, for readable assertion messages. */
export function stateName(s: CapsuleState): string {
  return CapsuleState[s]?.replace("CAPSULE_STATE_", "") ?? String(s);
}

/** True while `pid` exists and is not a zombie. */
export function pidAlive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/** GET http://127.0.0.1:port/ with a timeout; returns the body. */
export async function httpGet(port: number, timeoutMs = 3_000): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/`, {
    signal: AbortSignal.timeout(timeoutMs),
    headers: { connection: "close" },
  });
  return await res.text();
}

/** The console text logged so far (from_start=true, follow=false). */
export async function consoleText(client: FlexcapClient, capsule: string): Promise<string> {
  const call = client.raw.capsules.streamConsole({ capsule, fromStart: true, follow: false });
  const dec = new TextDecoder();
  let out = "";
  for await (const m of call) out += dec.decode(m.data, { stream: true });
  return out + dec.decode();
}

/** Collects a server stream's messages in the background until cancel(). */
export function collect<T>(call: ClientReadableStream<T>): { items: T[]; error(): Error | undefined; cancel(): void } {
  const items: T[] = [];
  let error: Error | undefined;
  call.on("data", (m: T) => items.push(m));
  call.on("error", (e: ServiceError) => {
    if (e.code !== 1 /* CANCELLED */) error = e;
  });
  return { items, error: () => error, cancel: () => call.cancel() };
}

/** waitFor() with the value's type narrowed to its truthy part. */
export async function until<T>(what: string, fn: () => Promise<T> | T, timeoutMs = 60_000): Promise<NonNullable<T>> {
  return await waitFor(what, fn, timeoutMs) as NonNullable<T>;
}

/**
 * Config YAML giving an agent its own block of auto host ports (above the ephemeral range),
 * so parallel agents on this machine (default range 20000-29999) never hand out the same port.
 */
export function privatePortsConfig(): string {
  const base = 61_000 + Math.floor(Math.random() * 90) * 50;
  return `network:\n  port_range: [${base}, ${base + 49}]\n`;
}

/** The app's stdout and stderr logged so far, as text (streams interleaved in arrival order). */
export async function logsText(client: FlexcapClient, capsule: string): Promise<string> {
  const call = client.raw.capsules.streamLogs({ capsule, fromStart: true, follow: false });
  const dec = new TextDecoder();
  let out = "";
  for await (const m of call) out += dec.decode(m.chunk!.data, { stream: true });
  return out + dec.decode();
}
