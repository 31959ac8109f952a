import { Command, UsageError } from '../command';
import { ImageService } from '../../images/image-service';

export const rmi: Command = {
  name: 'rmi',
  usage: '[--no-prune] reference|digest...',
  options: { 'no-prune': { type: 'boolean' } },
  help: ['--no-prune   only remove the image records; leave unused content for a later vmlet gc'],
  async run(values, positionals, ctx) {
    if (positionals.length === 0) throw new UsageError('rmi needs at least one image reference or digest');
    const svc = new ImageService({ root: ctx.root });
    for (const name of positionals) {
      for (const r of await svc.remove(name)) ctx.stdout.write(`removed ${r.reference}\n`);
    }
    if (values['no-prune'] !== true) {
      const gc = await svc.gc();
      if (gc.blobs.length + gc.layers.length > 0) {
        ctx.stdout.write(`deleted ${gc.blobs.length} blob(s), ${gc.layers.length} layer(s)\n`);
      }
    }
    return 0;
  },
};
