/**
 * Structured logging: one JSON object per line on stderr, so journald and log shippers
 * can parse it, with `msg` first for people reading it raw.
 */

export type Level = "debug" | "info" | "warn" | "error";
const order: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };
let threshold: Level = (Deno.env.get("FLEXCAP_LOG_LEVEL") as Level | undefined) ?? "info";
const encoder = new TextEncoder();

/** Sets the lowest level that is written. */
export function setLogLevel(level: Level): void {
  threshold = level;
}

/** A logger carrying fixed fields (component, capsule id…). */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  with(fields: Record<string, unknown>): Logger;
}

/** Creates a logger whose lines all carry `base`. */
export function logger(base: Record<string, unknown> = {}): Logger {
  const write = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (order[level] < order[threshold]) return;
    const line = { msg, level, time: new Date().toISOString(), ...base, ...fields };
    try {
      Deno.stderr.writeSync(encoder.encode(JSON.stringify(line, errorReplacer) + "\n"));
    } catch {
      // stderr gone (closed terminal): logging must never take the agent down.
    }
  };
  return {
    debug: (m, f) => write("debug", m, f),
    info: (m, f) => write("info", m, f),
    warn: (m, f) => write("warn", m, f),
    error: (m, f) => write("error", m, f),
    with: (f) => logger({ ...base, ...f }),
  };
}

function errorReplacer(_key: string, value: unknown): unknown {
  return value instanceof Error ? value.message : value;
}
