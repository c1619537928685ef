/**
 * QMP wire framing, free of I/O: turns a byte stream from QEMU's monitor socket into
 * classified messages, and commands into bytes. QEMU ends every message with CRLF; a
 * line that does not parse is reported as an item, never thrown, so one bad line
 * cannot stall the reader that serves every other command.
 */

import { Code, FlexError } from "../errors.ts";

/** QEMU release triple from the greeting. */
export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
}

/** Id we attach to a command; QEMU echoes it back verbatim. */
export type QmpId = string | number;

/** An asynchronous QMP event (STOP, RESUME, SHUTDOWN…). */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** Server time of the event in ms since the epoch (local receive time if absent). */
  timestampMs: number;
}

/** One well-formed message from the server. */
export type QmpMessage =
  | { kind: "greeting"; version: { qemu: QmpVersion; package: string }; capabilities: string[] }
  | { kind: "return"; id?: QmpId; value: unknown }
  | { kind: "error"; id?: QmpId; errorClass: string; desc: string }
  | ({ kind: "event" } & QmpEvent);

/** Why a line was rejected. */
export type QmpProtocolErrorReason = "json" | "schema" | "encoding" | "oversize";

/** The server sent something that is not valid QMP (a broken or hostile peer). */
export class QmpProtocolError extends FlexError {
  constructor(readonly reason: QmpProtocolErrorReason, message: string, readonly excerpt = "") {
    super(Code.INTERNAL, `qmp protocol: ${message}`);
  }
}

/** A line that was not valid QMP; the stream continues after it. */
export interface QmpInvalid {
  kind: "invalid";
  error: QmpProtocolError;
}

/** One decoder output: a message or a reported bad line. */
export type QmpDecoded = QmpMessage | QmpInvalid;

/** Default cap on one line; QMP replies (e.g. query-qmp-schema) are far below it. */
export const DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024;

const NL = 0x0a;
const encoder = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Incremental decoder: push chunks split anywhere, get every complete message back. */
export class QmpDecoder {
  readonly maxLineBytes: number;
  #parts: Uint8Array[] = [];
  #partsLen = 0;
  // After an oversize line we drop bytes until its newline, so we resync on the next line.
  #discarding = false;

  constructor(opts: { maxLineBytes?: number } = {}) {
    this.maxLineBytes = opts.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
  }

  /** Feeds a chunk; returns the messages (and bad lines) it completed, in order. */
  push(chunk: Uint8Array | string): QmpDecoded[] {
    const bytes = typeof chunk === "string" ? encoder.encode(chunk) : chunk;
    const out: QmpDecoded[] = [];
    let start = 0;
    while (start < bytes.length) {
      const nl = bytes.indexOf(NL, start);
      const end = nl === -1 ? bytes.length : nl;
      this.#take(bytes.subarray(start, end), nl !== -1, out);
      start = end + 1;
    }
    return out;
  }

  /** Signals end of stream; reports a trailing line that had no newline. */
  end(): QmpDecoded[] {
    const out: QmpDecoded[] = [];
    if (this.#discarding) this.#discarding = false;
    else if (this.#partsLen > 0) this.#emit(this.#drain(new Uint8Array(0)), out);
    this.#parts = [];
    this.#partsLen = 0;
    return out;
  }

  #take(segment: Uint8Array, complete: boolean, out: QmpDecoded[]): void {
    if (this.#discarding) {
      if (complete) this.#discarding = false;
      return;
    }
    if (this.#partsLen + segment.length > this.maxLineBytes) {
      out.push(invalid("oversize", `line exceeds ${this.maxLineBytes} bytes`));
      this.#parts = [];
      this.#partsLen = 0;
      this.#discarding = !complete;
      return;
    }
    if (!complete) {
      // Copy: callers may reuse their read buffer for the next chunk.
      this.#parts.push(segment.slice());
      this.#partsLen += segment.length;
      return;
    }
    this.#emit(this.#drain(segment), out);
  }

  #drain(last: Uint8Array): Uint8Array {
    if (this.#parts.length === 0) return last;
    const line = new Uint8Array(this.#partsLen + last.length);
    let off = 0;
    for (const p of this.#parts) {
      line.set(p, off);
      off += p.length;
    }
    line.set(last, off);
    this.#parts = [];
    this.#partsLen = 0;
    return line;
  }

  #emit(line: Uint8Array, out: QmpDecoded[]): void {
    let text: string;
    try {
      text = strictUtf8.decode(line);
    } catch {
      out.push(invalid("encoding", "line is not valid UTF-8"));
      return;
    }
    if (text.trim() === "") return; // blank lines (or a lone CR) carry nothing
    out.push(parseQmpLine(text));
  }
}

/** Parses and classifies one complete line (without its newline). */
export function parseQmpLine(line: string): QmpDecoded {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (err) {
    return invalid("json", `invalid JSON: ${(err as Error).message}`, line);
  }
  if (!isObject(v)) return invalid("schema", "expected a JSON object", line);
  const id = v.id;
  if (id !== undefined && typeof id !== "string" && typeof id !== "number") {
    return invalid("schema", "expected id to be a string or number", line);
  }
  if ("QMP" in v) {
    const g = v.QMP;
    const ver = isObject(g) && isObject(g.version) ? g.version : undefined;
    const q = ver && isObject(ver.qemu) ? ver.qemu : undefined;
    if (!q || !isNum(q.major) || !isNum(q.minor) || !isNum(q.micro)) {
      return invalid("schema", "expected QMP.version.qemu.{major,minor,micro} numbers in greeting", line);
    }
    const caps = isObject(g) && Array.isArray(g.capabilities) ? g.capabilities : [];
    return {
      kind: "greeting",
      version: {
        qemu: { major: q.major, minor: q.minor, micro: q.micro },
        package: typeof ver!.package === "string" ? ver!.package : "",
      },
      capabilities: caps.filter((c): c is string => typeof c === "string"),
    };
  }
  if ("return" in v) {
    return id === undefined ? { kind: "return", value: v.return } : { kind: "return", id, value: v.return };
  }
  if ("error" in v) {
    const e = v.error;
    if (!isObject(e) || typeof e.class !== "string" || typeof e.desc !== "string") {
      return invalid("schema", "expected error.class and error.desc strings", line);
    }
    const err = { kind: "error", errorClass: e.class, desc: e.desc } as const;
    return id === undefined ? err : { ...err, id };
  }
  if ("event" in v) {
    if (typeof v.event !== "string") return invalid("schema", "expected event to be a string", line);
    if (v.data !== undefined && !isObject(v.data)) {
      return invalid("schema", "expected event data to be an object", line);
    }
    const ts = v.timestamp;
    const timestampMs = isObject(ts) && isNum(ts.seconds) && isNum(ts.microseconds)
      ? ts.seconds * 1000 + Math.floor(ts.microseconds / 1000)
      : Date.now();
    return { kind: "event", event: v.event, data: v.data ?? {}, timestampMs };
  }
  return invalid("schema", "expected one of QMP, return, error or event", line);
}

/** Serializes one command as a newline-terminated line; throws TypeError on unserializable args. */
export function encodeQmpCommand(
  command: string,
  args: Record<string, unknown> | undefined,
  id: QmpId,
): Uint8Array {
  const msg: Record<string, unknown> = { execute: command };
  if (args !== undefined) msg.arguments = args;
  msg.id = id;
  return encoder.encode(JSON.stringify(msg) + "\r\n");
}

function invalid(reason: QmpProtocolErrorReason, message: string, line = ""): QmpInvalid {
  const excerpt = line.length > 200 ? line.slice(0, 200) + "…" : line;
  return { kind: "invalid", error: new QmpProtocolError(reason, message, excerpt) };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isNum(v: unknown): v is number {
  return typeof v === "number" && Number.isFinite(v);
}
