// Per-layer progress of a pull: cli-progress bars on a terminal, one line per finished layer
// otherwise (CI logs and pipes get no control characters).
import type cliProgress from 'cli-progress';
import type { PullProgress } from '../images/image-service';
import { humanBytes } from './command';

export class PullProgressView {
  private multibar?: cliProgress.MultiBar;
  private readonly bars = new Map<number, cliProgress.SingleBar>();
  private readonly finished = new Set<number>();
  private count = 0;

  constructor(private readonly out: NodeJS.WritableStream & { isTTY?: boolean }) {
    if (out.isTTY) {
      // Loaded here, for a pull on a terminal: every other vmlet command would pay for it (~0.5 s in the lab).
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      const bars = require('cli-progress') as typeof cliProgress;
      this.multibar = new bars.MultiBar({
        stream: out,
        clearOnComplete: false,
        hideCursor: true,
        format: '{layer} {phase} [{bar}] {done}/{size}',
        barsize: 30,
      }, bars.Presets.shades_classic);
    }
  }

  update(p: PullProgress): void {
    if (p.kind === 'resolved') {
      this.count = p.layers.length;
      if (this.multibar) {
        p.layers.forEach((l, i) => {
          this.bars.set(i, this.multibar!.create(Math.max(l.size, 1), 0, this.payload(i, l.digest, 'waiting', 0, l.size)));
        });
      }
      return;
    }
    const bar = this.bars.get(p.index);
    if (bar) bar.update(p.phase === 'done' ? Math.max(p.total, 1) : p.bytes, this.payload(p.index, p.digest, p.phase, p.bytes, p.total));
    else if (p.phase === 'done' && !this.finished.has(p.index)) {
      this.finished.add(p.index);
      this.out.write(`layer ${p.index + 1}/${this.count} ${p.digest.slice(7, 19)} done (${humanBytes(p.total)})\n`);
    }
  }

  private payload(i: number, digest: string, phase: string, bytes: number, total: number): Record<string, string> {
    return {
      layer: `layer ${i + 1}/${this.count} ${digest.slice(7, 19)}`,
      phase: phase.padEnd(11),
      done: humanBytes(phase === 'done' ? total : bytes),
      size: humanBytes(total),
    };
  }

  /** Idempotent: a second stop would redraw the bars below the command's output. */
  stop(): void {
    this.multibar?.stop();
    this.multibar = undefined;
    this.bars.clear();
  }
}
