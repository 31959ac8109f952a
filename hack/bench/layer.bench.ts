// Benchmark: one generated layer (>= 500 MB of mixed small and large files, half of the bytes
// incompressible) converted to squashfs by our converter (convertLayer, the addon), beside
// `tar2sqfs` (squashfs-tools-ng) fed the same blob, and `mksquashfs` (squashfs-tools) run on the
// extracted tree. Same compressor (zstd at each tool's default level: libsquashfs' and
// mksquashfs' defaults are both 15), same 128 KiB block size, as many compressor threads as CPUs.
// Reports medians over the runs: seconds, MB/s of uncompressed tar input, CPU seconds (user +
// system, all threads: steadier than wall time on a shared machine), output size, and the ratios
// against tar2sqfs from the same run of this program.
//
//   node dist/hack/bench/layer.bench.js [--runs N] [--mb SIZE] [--input gzip|tar|both]
//
// Not a test: numbers are printed, never asserted.
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { convertLayer } from '../../native/ts/layer';

const BLOCK = 131072;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// Text-like data: zstd squeezes it, like binaries and configs in real layers.
const WORDS = 'the of layer squashfs block inode tar kernel guest overlay vmlet image zstd pod container runtime'.split(' ');
function textLike(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed | 1;
  let at = 0;
  while (at < n) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    const w = WORDS[(x >>> 0) % WORDS.length];
    at += b.write(`${w}${(x >>> 8) & 0xff} `, at);
  }
  return b;
}

/** The layer's tree: big files of 4-16 MiB and ~30,000 small ones of 0.5-16 KiB; half the bytes random. */
function generateTree(root: string, totalMb: number): number {
  const target = totalMb * 1e6;
  const bigShare = 0.7;
  let written = 0;
  let i = 0;
  mkdirSync(join(root, 'opt', 'big'), { recursive: true });
  while (written < target * bigShare) {
    const size = (4 + (i % 13)) << 20;
    const data = i % 2 === 0 ? randomFillSync(Buffer.alloc(size)) : textLike(size, i + 1);
    writeFileSync(join(root, 'opt', 'big', `blob-${i}.bin`), data);
    written += size;
    i++;
  }
  let j = 0;
  while (written < target) {
    const dir = join(root, 'usr', 'share', `pkg-${Math.floor(j / 300)}`);
    if (j % 300 === 0) mkdirSync(dir, { recursive: true });
    const size = 512 + ((j * 7919) % (16 * 1024 - 512));
    const data = j % 2 === 0 ? textLike(size, j + 7) : randomFillSync(Buffer.alloc(size));
    writeFileSync(join(dir, `file-${j}.dat`), data);
    written += size;
    j++;
  }
  return i + j;
}

interface Timing {
  wall: number;
  cpu: number;
}

/** Runs a peer under GNU time(1), which reports the CPU its threads used. */
function timedProcess(cmd: string, args: string[], stdin: number | 'ignore', cpuFile: string): Timing {
  const t = process.hrtime.bigint();
  const r = spawnSync('/usr/bin/time', ['-f', '%U %S', '-o', cpuFile, cmd, ...args], { stdio: [stdin, 'ignore', 'inherit'] });
  const wall = Number(process.hrtime.bigint() - t) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} failed (${r.status})`);
  const [u, sys] = readFileSync(cpuFile, 'utf8').trim().split(/\s+/).map(Number);
  return { wall, cpu: u + sys };
}

/** Our converter runs in this process (on libuv and libsquashfs threads), so this process's CPU is its CPU. */
async function timedInProcess(fn: () => Promise<unknown>): Promise<Timing> {
  const t = process.hrtime.bigint();
  const c = process.cpuUsage();
  await fn();
  const d = process.cpuUsage(c);
  return { wall: Number(process.hrtime.bigint() - t) / 1e9, cpu: (d.user + d.system) / 1e6 };
}

interface Side {
  name: string;
  input: string;
  run: (out: string) => Promise<Timing>;
  seconds: number[];
  cpu: number[];
  bytes: number[];
}

export async function benchLayer(runs: number, totalMb: number, inputs: ('gzip' | 'tar')[]): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'vmlet-bench-layer-'));
  const jobs = cpus().length;
  try {
    const tree = join(work, 'tree');
    mkdirSync(tree);
    console.log(`generating a ${totalMb} MB layer tree in ${tree} ...`);
    const files = generateTree(tree, totalMb);
    const tar = join(work, 'layer.tar');
    execFileSync('tar', ['--numeric-owner', '--sort=name', '--format=pax', '-C', tree, '-cf', tar, '.']);
    const tarBytes = statSync(tar).size;
    const gz = join(work, 'layer.tar.gz');
    if (inputs.includes('gzip')) {
      const fd = openSync(gz, 'w');
      try {
        const r = spawnSync('gzip', ['-c', '-6', tar], { stdio: ['ignore', fd, 'inherit'] });
        if (r.status !== 0) throw new Error('gzip failed');
      } finally {
        closeSync(fd);
      }
    }
    // Generating wrote ~1.5 GB: let writeback finish so it does not slow whichever side runs first.
    execFileSync('sync');
    console.log(
      `layer: ${files} files, tar ${(tarBytes / 1e6).toFixed(1)} MB` +
        (inputs.includes('gzip') ? `, gzip ${(statSync(gz).size / 1e6).toFixed(1)} MB` : '') +
        `; zstd, block ${BLOCK}, ${jobs} compressor threads; ${runs} runs, medians`,
    );

    const cpuFile = join(work, 'cpu.txt');
    const tar2sqfs = (blob: string) => async (out: string): Promise<Timing> => {
      const fd = openSync(blob, 'r');
      try {
        return timedProcess('tar2sqfs', ['-q', '-f', '-c', 'zstd', '-b', String(BLOCK), '-j', String(jobs), out], fd, cpuFile);
      } finally {
        closeSync(fd);
      }
    };
    const sides: Side[] = [];
    for (const input of inputs) {
      const blob = input === 'gzip' ? gz : tar;
      sides.push({
        name: 'vmlet convertLayer',
        input,
        run: (out) => timedInProcess(() => convertLayer(blob, out, { blockSize: BLOCK, workers: jobs })),
        seconds: [],
        cpu: [],
        bytes: [],
      });
      sides.push({ name: 'tar2sqfs', input, run: tar2sqfs(blob), seconds: [], cpu: [], bytes: [] });
    }
    sides.push({
      name: 'mksquashfs (tree)',
      input: 'files',
      run: async (out) =>
        timedProcess(
          'mksquashfs',
          [tree, out, '-comp', 'zstd', '-b', String(BLOCK), '-noappend', '-quiet', '-no-progress', '-processors', String(jobs)],
          'ignore',
          cpuFile,
        ),
      seconds: [],
      cpu: [],
      bytes: [],
    });

    for (let r = 0; r < runs; r++) {
      // Rotate the order so no side always runs first (cold caches) or last.
      const order = sides.map((_, k) => sides[(k + r) % sides.length]);
      for (const side of order) {
        const out = join(work, 'out.sqfs');
        rmSync(out, { force: true });
        const t = await side.run(out);
        side.seconds.push(t.wall);
        side.cpu.push(t.cpu);
        side.bytes.push(statSync(out).size);
        rmSync(out, { force: true });
        console.log(`  run ${r + 1}: ${side.name} (${side.input}) ${t.wall.toFixed(2)} s, CPU ${t.cpu.toFixed(2)} s`);
      }
    }

    console.log('\ntool                 input  median s   input MB/s   CPU s   output bytes   vs tar2sqfs (same input)');
    for (const side of sides) {
      const s = median(side.seconds);
      const cpu = median(side.cpu);
      const size = median(side.bytes);
      const peer = sides.find((p) => p.name === 'tar2sqfs' && (p.input === side.input || (side.input === 'files' && p.input === inputs[0])));
      let vs = '';
      if (peer && peer !== side) {
        const ps = median(peer.seconds);
        const pb = median(peer.bytes);
        const pc = median(peer.cpu);
        vs = `throughput x${(ps / s).toFixed(2)}, CPU x${(cpu / pc).toFixed(2)}, size ${(((size - pb) / pb) * 100).toFixed(2)} %`;
      }
      console.log(
        `${side.name.padEnd(20)} ${side.input.padEnd(6)} ${s.toFixed(2).padStart(8)} ${(tarBytes / 1e6 / s).toFixed(1).padStart(12)} ${cpu.toFixed(1).padStart(7)} ${String(size).padStart(14)}   ${vs}`,
      );
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (require.main === module) {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      mb: { type: 'string', default: '520' },
      input: { type: 'string', default: 'gzip' },
    },
  });
  const input = values.input === 'both' ? (['gzip', 'tar'] as const) : values.input === 'tar' ? (['tar'] as const) : (['gzip'] as const);
  benchLayer(Number(values.runs), Number(values.mb), [...input]).catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  });
}
