// Benchmark: pull a 5-layer image from a local docker-registry end to end (manifest, blobs,
// verification, layer → squashfs, image record) with `vmlet`'s ImageService, beside the peer
// pipeline run serially: `skopeo copy` into an OCI layout, then `tar2sqfs` per layer (same
// compressor, zstd at libsquashfs's default level, same 128 KiB block size, as many compressor
// jobs as our converter uses). Medians over repeated runs, from the same run of this program.
//
//   node dist/hack/bench/pull.bench.js [--runs N] [--layer-mb M]
//
// Not a test: numbers are printed, never asserted.
import { execFileSync } from 'node:child_process';
import { rmSync, readFileSync, statSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ImageService } from '../../shim/images/image-service';
import { startRegistry, OciLayout, populateBusybox, populateFiles, tempDir } from '../../test/helpers/registry';

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function mb(n: number): string {
  return (n / 1e6).toFixed(1);
}

export async function benchPull(runs: number, layerMb: number): Promise<void> {
  const work = tempDir('vmlet-bench-pull-');
  const registry = await startRegistry();
  try {
    // Base busybox + 4 layers, each of 1/4 incompressible 64 KiB files and 3/4 small 2 KiB files
    // by volume: a mix of large blocks and many inodes, as real application layers are.
    const layout = await OciLayout.create(join(work, 'layout'));
    await layout.newImage('empty');
    await layout.addLayer('empty', 'l1', populateBusybox);
    let prev = 'l1';
    for (let i = 2; i <= 5; i++) {
      const tag = `l${i}`;
      const bytes = layerMb * 1e6;
      await layout.addLayer(prev, tag, (rootfs) => {
        populateFiles(rootfs, `big${i}`, Math.max(1, Math.round(bytes / 4 / 65536)), 65536, `big${i}`);
        populateFiles(rootfs, `small${i}`, Math.max(1, Math.round((bytes * 3) / 4 / 2048)), 2048, `small${i}`);
      });
      prev = tag;
    }
    await layout.push('l5', registry, 'bench/five:v1');
    const ref = `${registry.host}/bench/five:v1`;
    const jobs = cpus().length;

    const ours: number[] = [];
    const peer: number[] = [];
    let oursSqfs = 0;
    let peerSqfs = 0;
    let blobBytes = 0;
    for (let r = 0; r < runs; r++) {
      // Alternate the order so neither side always gets the warmer page cache.
      for (const side of r % 2 === 0 ? ['ours', 'peer'] : ['peer', 'ours']) {
        const dir = tempDir('vmlet-bench-run-');
        try {
          if (side === 'ours') {
            const svc = new ImageService({ root: dir });
            const t0 = process.hrtime.bigint();
            const rec = await svc.pull(ref);
            ours.push(Number(process.hrtime.bigint() - t0) / 1e6);
            oursSqfs = rec.layers.reduce((n, l) => n + statSync(svc.layerPath(l.diffId)).size, 0);
            blobBytes = rec.layers.reduce((n, l) => n + l.size, 0);
          } else {
            const t0 = process.hrtime.bigint();
            execFileSync('skopeo', ['copy', '-q', '--src-tls-verify=false', `docker://${ref}`, `oci:${join(dir, 'oci')}:v1`]);
            const index = JSON.parse(readFileSync(join(dir, 'oci', 'index.json'), 'utf8')) as { manifests: { digest: string }[] };
            const blob = (d: string): string => join(dir, 'oci', 'blobs', 'sha256', d.slice(7));
            const manifest = JSON.parse(readFileSync(blob(index.manifests[0].digest), 'utf8')) as { layers: { digest: string }[] };
            let total = 0;
            manifest.layers.forEach((l, i) => {
              const out = join(dir, `layer${i}.sqfs`);
              execFileSync('sh', ['-c', 'exec tar2sqfs -q -f -c zstd -b 131072 -j "$1" "$2" < "$3"', 'sh', String(jobs), out, blob(l.digest)]);
              total += statSync(out).size;
            });
            peer.push(Number(process.hrtime.bigint() - t0) / 1e6);
            peerSqfs = total;
          }
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      }
    }
    const o = median(ours);
    const p = median(peer);
    console.log(`pull of a 5-layer image from a local docker-registry (${mb(blobBytes)} MB of gzip blobs), median of ${runs} runs`);
    console.log(`  vmlet ImageService.pull          ${o.toFixed(0).padStart(6)} ms   squashfs ${mb(oursSqfs)} MB   runs: ${ours.map((x) => x.toFixed(0)).join(' ')}`);
    console.log(`  skopeo copy + tar2sqfs (serial)  ${p.toFixed(0).padStart(6)} ms   squashfs ${mb(peerSqfs)} MB   runs: ${peer.map((x) => x.toFixed(0)).join(' ')}`);
    console.log(`  ratio vmlet/peer: ${(o / p).toFixed(2)} (below 1 = vmlet faster); output size ratio ${(oursSqfs / peerSqfs).toFixed(3)}`);
  } finally {
    await registry.stop();
    rmSync(work, { recursive: true, force: true });
  }
}

if (require.main === module) {
  const { values } = parseArgs({ options: { runs: { type: 'string' }, 'layer-mb': { type: 'string' } } });
  benchPull(Number(values.runs ?? 5), Number(values['layer-mb'] ?? 16)).catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  });
}
