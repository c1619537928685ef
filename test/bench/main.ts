/**
 * Benchmark dispatcher: `deno run -A test/bench/main.ts SUITE` (what `deno task bench SUITE`
 * runs) imports test/bench/SUITE.ts, awaits its exported `run()`, prints the result as ONE
 * JSON object on the last line of stdout and writes it, pretty-printed, to
 * bench-results/SUITE.json. Progress goes to stderr. Suites: lifecycle, memory, network, migration.
 */
import { main } from "./report.ts";

if (import.meta.main) await main(Deno.args[0]);
