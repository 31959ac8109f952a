// A Writable that keeps what a command wrote (a CommandContext's stdout or
// stderr in the CLI tests), for asserting on its text afterwards.
import { Writable } from 'node:stream';

export function sink(): Writable & { text: () => string } {
  const chunks: Buffer[] = [];
  const w = new Writable({
    write(c: Buffer, _e, cb) {
      chunks.push(c);
      cb();
    },
  }) as Writable & { text: () => string };
  w.text = () => Buffer.concat(chunks).toString();
  return w;
}
