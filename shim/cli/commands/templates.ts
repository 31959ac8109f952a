// `vmlet templates list | prune`: the VM templates `vmlet run` restores from
// (shim/sandbox/template-store.ts). Each holds a guest's memory file (tens of
// MiB) and nothing else removes them: a changed image, --cpus or --memory, or
// a new kernel/agent/vmlet build leaves the old one behind.
import { Command, humanBytes, OptionValues, stringOpt, UsageError } from '../command';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { FILE_HASH_CACHE, pruneFileHashes } from '../../sandbox/template-pool';
import { removeTextFiles } from '../../sandbox/huge-text';
import { TemplateEntry, TemplateStore } from '../../sandbox/template-store';
import { templateRoot } from './run';

const DAY_MS = 24 * 60 * 60 * 1000;

export interface PruneRequest {
  /** Remove templates whose last use is older than this (ms since the epoch); 0 with --all. */
  unusedSinceMs: number;
  all: boolean;
}

export function parsePruneArgs(values: OptionValues, now = Date.now()): PruneRequest {
  const all = values.all === true;
  const older = stringOpt(values, 'older-than');
  if (all && older !== undefined) throw new UsageError('prune takes --all or --older-than DAYS, not both');
  if (!all && older === undefined) throw new UsageError('prune needs --all (every template) or --older-than DAYS (those not used for DAYS days)');
  if (all) return { all, unusedSinceMs: now };
  const days = /^\d+(\.\d+)?$/.test(older ?? '') ? Number(older) : NaN;
  if (!Number.isFinite(days)) throw new UsageError(`--older-than '${older}' is not a number of days (e.g. 7 or 0.5)`);
  return { all, unusedSinceMs: now - days * DAY_MS };
}

function layersOf(t: TemplateEntry): string {
  const layers = Array.isArray(t.manifest.meta.layers) ? (t.manifest.meta.layers as unknown[]).map(String) : [];
  const slots = Number(t.manifest.meta.diskSlots ?? 0);
  // A template with empty slots serves any image of up to that many layers.
  const slotNote = slots > 0 ? `any image (${slots} layer slots)` : '';
  if (layers.length === 0) return slotNote || '-';
  const fixed = layers.length === 1 ? layers[0] : `${layers[layers.length - 1]} (+${layers.length - 1} below)`;
  return slotNote ? `${fixed}, ${slotNote}` : fixed;
}

function age(ms: number, now: number): string {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 2 * 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

export function formatTemplates(entries: TemplateEntry[], now = Date.now()): string {
  const rows = [['KEY', 'VCPUS', 'MEMORY', 'ON DISK', 'LAST USED', 'MADE', 'ROOTFS']];
  for (const t of entries) {
    const inputs = t.manifest.inputs;
    rows.push([t.key, String(inputs.cpus ?? '?'), `${String(inputs.memoryMiB ?? '?')} MiB`, humanBytes(t.diskBytes), age(t.lastUsedMs, now), age(Date.parse(t.manifest.createdAt), now), layersOf(t)]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n') + '\n';
}

export const templates: Command = {
  name: 'templates',
  usage: 'list | prune (--all | --older-than DAYS)',
  options: {
    all: { type: 'boolean' },
    'older-than': { type: 'string' },
  },
  help: [
    'list                    every template: its key, vCPUs, memory, space on disk, last use, rootfs',
    'prune --all             remove every template (the next vmlet run of each makes it again)',
    'prune --older-than DAYS remove templates not used for DAYS days (fractions allowed)',
    '',
    'Templates live in $VMLET_TEMPLATE_DIR, else <root>/templates (/var/lib/vmlet/templates).',
    'A template another process is making right now is left alone (its lock is held); microVMs',
    'already restored from a removed template keep running. A removed template\'s kernel text',
    'copy on the huge-page tmpfs ($VMLET_HUGE_TEXT, else /run/vmlet/huge-text) goes with it.',
  ],
  async run(values, positionals, ctx) {
    const [sub, ...rest] = positionals;
    if (rest.length > 0) throw new UsageError(`templates ${sub} takes no arguments (got ${rest.join(' ')})`);
    const store = new TemplateStore({ root: templateRoot(ctx.root) });
    if (sub === 'list') {
      if (values.all !== undefined || values['older-than'] !== undefined) throw new UsageError('--all and --older-than go with prune, not list');
      ctx.stdout.write(formatTemplates(store.entries()));
      return 0;
    }
    if (sub === 'prune') {
      const req = parsePruneArgs(values);
      let removed = 0;
      let freed = 0;
      for (const t of store.entries()) {
        if (!req.all && t.lastUsedMs >= req.unusedSinceMs) continue;
        const outcome = store.remove(t.key, req.all ? 'vmlet templates prune --all' : `not used since ${new Date(t.lastUsedMs).toISOString()} (vmlet templates prune)`);
        if (outcome === 'removed') {
          removed++;
          freed += t.diskBytes;
          // Its kernel text copy on the huge-page tmpfs (shim/sandbox/huge-text.ts) goes with it: RAM, not disk.
          const text = removeTextFiles(t.key);
          const textNote = text > 0 ? `, ${humanBytes(text)} of kernel text from the huge-page tmpfs` : '';
          ctx.stdout.write(`removed ${t.key} (${humanBytes(t.diskBytes)}${textNote}, last used ${age(t.lastUsedMs, Date.now())})\n`);
        } else if (outcome === 'being-made') {
          ctx.stdout.write(`kept ${t.key}: another process is making it now\n`);
        }
      }
      // The hashes of the files templates were keyed by: all of them with --all, else those of files that changed.
      const hashes = join(store.root, FILE_HASH_CACHE);
      if (req.all) rmSync(hashes, { recursive: true, force: true });
      else pruneFileHashes(hashes);
      ctx.stdout.write(`removed ${removed} template(s), ${humanBytes(freed)} freed\n`);
      return 0;
    }
    throw new UsageError(sub === undefined ? 'templates needs list or prune' : `unknown templates command '${sub}': use list or prune`);
  },
};
