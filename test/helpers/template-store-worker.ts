// One process racing others to make the same template (test/unit/template-store):
//   node template-store-worker.js <root> <key> <makes-log> <make-ms>
// The maker appends its pid to <makes-log>, so the test counts how many ran;
// the process prints the template it got as JSON on stdout.
import { appendFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { TemplateStore } from '../../shim/sandbox/template-store';

async function main(): Promise<void> {
  const [root, key, makesLog, makeMs] = process.argv.slice(2);
  const store = new TemplateStore({ root, pollMs: 10 });
  const t = await store.ensure(key, { worker: 'race' }, async (dir) => {
    appendFileSync(makesLog, `${process.pid}\n`);
    writeFileSync(join(dir, 'state'), `made by ${process.pid}\n`);
    await new Promise((r) => setTimeout(r, Number(makeMs)));
    return { maker: process.pid };
  });
  process.stdout.write(JSON.stringify({ dir: t.dir, id: t.manifest.id }) + '\n');
}

main().catch((e: Error) => {
  process.stderr.write(`${e.message}\n`);
  process.exit(1);
});
