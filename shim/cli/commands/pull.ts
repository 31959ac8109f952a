import { Command, UsageError, stringOpt } from '../command';
import { ImageService } from '../../images/image-service';
import { DockerConfigCredentials } from '../../images/auth';
import { parsePlatform } from '../../images/platform';
import { PullProgressView } from '../progress';

export const pull: Command = {
  name: 'pull',
  usage: '[--plain-http] [--platform os/arch[/variant]] [--auth-config FILE] host[:port]/repository[:tag][@digest]',
  options: {
    'plain-http': { type: 'boolean' },
    platform: { type: 'string' },
    'auth-config': { type: 'string' },
    timeout: { type: 'string' },
    quiet: { type: 'boolean', short: 'q' },
  },
  help: [
    '--plain-http         talk HTTP, not HTTPS (loopback registries always use HTTP)',
    '--platform P         platform to pick from a multi-platform image (default linux/amd64)',
    '--auth-config FILE   Docker config.json with registry credentials (default $DOCKER_CONFIG/config.json or ~/.docker/config.json)',
    '--timeout SECONDS    give up on a registry that sends nothing for this long (default 30)',
    '-q, --quiet          no progress output',
  ],
  async run(values, positionals, ctx) {
    if (positionals.length !== 1) throw new UsageError('pull takes exactly one image reference');
    const platformText = stringOpt(values, 'platform');
    const timeoutText = stringOpt(values, 'timeout');
    const timeout = timeoutText === undefined ? undefined : Number(timeoutText);
    if (timeout !== undefined && !(timeout > 0)) throw new UsageError(`--timeout must be a positive number of seconds, got '${timeoutText}'`);
    const svc = new ImageService({
      root: ctx.root,
      registry: {
        plainHttp: values['plain-http'] === true,
        credentials: DockerConfigCredentials.load(stringOpt(values, 'auth-config')),
        ...(timeout !== undefined ? { timeoutMs: timeout * 1000 } : {}),
      },
    });
    const view = values.quiet === true ? undefined : new PullProgressView(ctx.stderr);
    try {
      const rec = await svc.pull(positionals[0], {
        platform: platformText === undefined ? undefined : parsePlatform(platformText),
        onProgress: (p) => view?.update(p),
      });
      view?.stop();
      ctx.stdout.write(`${rec.reference} ${rec.manifestDigest}\n`);
      return 0;
    } finally {
      view?.stop();
    }
  },
};

