import { Command, UsageError, stringOpt } from '../command';
import { ImageService } from '../../images/image-service';
import { loadImages } from '../../images/loader';
import { parsePlatform } from '../../images/platform';

export const load: Command = {
  name: 'load',
  usage: '[--name host/repository[:tag]] [--platform os/arch[/variant]] PATH',
  options: {
    name: { type: 'string' },
    platform: { type: 'string' },
  },
  help: [
    '--name N       record the images under this repository (or this exact reference);',
    '               without it: names in the archive, or localhost/<file name>',
    '--platform P   platform to pick from a multi-platform image (default linux/amd64)',
  ],
  async run(values, positionals, ctx) {
    if (positionals.length !== 1) throw new UsageError('load takes exactly one path');
    const platformText = stringOpt(values, 'platform');
    const records = await loadImages(new ImageService({ root: ctx.root }), positionals[0], {
      name: stringOpt(values, 'name'),
      platform: platformText === undefined ? undefined : parsePlatform(platformText),
    });
    for (const r of records) ctx.stdout.write(`loaded ${r.reference} ${r.manifestDigest}\n`);
    return 0;
  },
};
