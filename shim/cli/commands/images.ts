import { Command, UsageError, humanBytes } from '../command';
import { ImageService } from '../../images/image-service';
import { formatPlatform } from '../../images/platform';

export const images: Command = {
  name: 'images',
  usage: '[--quiet | --json]',
  options: {
    quiet: { type: 'boolean', short: 'q' },
    json: { type: 'boolean' },
  },
  help: ['-q, --quiet   references only', '--json        full image records (config, layers) as JSON'],
  async run(values, positionals, ctx) {
    if (positionals.length > 0) throw new UsageError('images takes no arguments');
    const records = await new ImageService({ root: ctx.root }).list();
    if (values.json === true) {
      ctx.stdout.write(`${JSON.stringify(records, null, 2)}\n`);
    } else if (values.quiet === true) {
      for (const r of records) ctx.stdout.write(`${r.reference}\n`);
    } else {
      const rows = [['REFERENCE', 'PLATFORM', 'DIGEST', 'LAYERS', 'SIZE']];
      for (const r of records) {
        rows.push([r.reference, formatPlatform(r.platform), r.manifestDigest.slice(7, 19), String(r.layers.length),
          humanBytes(r.layers.reduce((n, l) => n + l.size, 0))]);
      }
      const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => row[c].length)));
      for (const row of rows) ctx.stdout.write(`${row.map((cell, c) => cell.padEnd(widths[c])).join('  ').trimEnd()}\n`);
    }
    return 0;
  },
};

