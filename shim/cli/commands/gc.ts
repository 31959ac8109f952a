import { Command, UsageError } from '../command';
import { ImageService } from '../../images/image-service';

export const gc: Command = {
  name: 'gc',
  usage: '',
  options: {},
  help: [],
  async run(_values, positionals, ctx) {
    if (positionals.length > 0) throw new UsageError('gc takes no arguments');
    const r = await new ImageService({ root: ctx.root }).gc();
    ctx.stdout.write(`deleted ${r.blobs.length} blob(s), ${r.layers.length} layer(s)\n`);
    return 0;
  },
};
