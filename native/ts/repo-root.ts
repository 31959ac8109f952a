// Where the checkout is, for the artefacts the build leaves in it (the agent,
// the test guest, hack/ scripts). Its own module because `vmlet run` needs only
// this from the test guest's module, which pulls in net, zlib and crypto: about
// 5 ms of start-up on the host and ~0.1 s in the lab, per run.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';

let found: string | undefined;

/** The repository root, found by walking up (works from dist/ and from a private build dir). */
export function repoRoot(): string {
  if (found !== undefined) return found;
  let dir = __dirname;
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'native', 'testguest'))) return (found = dir);
    const up = dirname(dir);
    if (up === dir) throw new Error(`cannot find the vmlet repository above ${__dirname}`);
    dir = up;
  }
}
