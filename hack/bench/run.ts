// `npm run bench [filter ...]`: runs every compiled hack/bench/*.bench.js (or
// those whose file name contains one of the filters), one after the other so
// they never compete for the CPU. A benchmark module exports
// `run(): Promise<void>` and prints its own table, ours beside the peer's.
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

interface BenchModule {
  run(): Promise<void>;
}

async function main(): Promise<void> {
  const filters = process.argv.slice(2);
  const found = readdirSync(__dirname).filter((f) => f.endsWith('.bench.js')).sort();
  const chosen = found.filter((f) => filters.length === 0 || filters.some((x) => f.includes(x)));
  if (chosen.length === 0) {
    console.error(`bench: nothing matches ${JSON.stringify(filters)}; available: ${found.map((f) => f.replace(/\.bench\.js$/, '')).join(', ') || 'none (run npm run build)'}`);
    process.exitCode = 2;
    return;
  }
  let failed = 0;
  for (const f of chosen) {
    const name = f.replace(/\.bench\.js$/, '');
    console.log(`\n=== bench ${name} ===`);
    try {
      const mod = require(join(__dirname, f)) as Partial<BenchModule>;
      if (typeof mod.run !== 'function') throw new Error(`${f} does not export run(): Promise<void>`);
      await mod.run();
    } catch (e) {
      failed++;
      console.error(`bench ${name} failed: ${(e as Error).stack ?? String(e)}`);
    }
  }
  process.exitCode = failed ? 1 : 0;
}

void main();
