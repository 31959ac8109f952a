#!/usr/bin/env node
// `vmlet` command-line entry: global options, dispatch to commands/<name>.ts, error reporting.
// Output for people and scripts goes to stdout; progress and logs to stderr.
import { parseArgs } from 'node:util';
import { CommandEntry, commands } from './commands';
import { Command, CommandContext, UsageError } from './command';
import { ImageError } from '../images/errors';
import { defaultRoot } from '../images/root';
import { setImagesLogLevel } from '../images/log';

const GLOBAL_OPTIONS = {
  root: { type: 'string' },
  verbose: { type: 'boolean', short: 'v' },
  help: { type: 'boolean', short: 'h' },
} as const;
const GLOBAL_WITH_VALUE = new Set(['--root']);

function usage(entry?: CommandEntry, cmd?: Command): string {
  if (entry && cmd) {
    return [`usage: vmlet [--root DIR] [-v] ${cmd.name} ${cmd.usage}`.trimEnd(), '', entry.summary, '',
      ...cmd.help.map((h) => `  ${h}`)].join('\n').trimEnd();
  }
  const width = Math.max(...commands.map((c) => c.name.length));
  return [
    'usage: vmlet [--root DIR] [-v|--verbose] <command> [options]',
    '',
    'commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    'global options:',
    '  --root DIR      image and state root (default $VMLET_ROOT or /var/lib/vmlet)',
    '  -v, --verbose   debug logging to stderr',
    '',
    "run 'vmlet <command> --help' for a command's options",
  ].join('\n');
}

/** The first argument that is neither an option nor a global option's value names the command. */
function findCommand(args: string[]): number {
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (GLOBAL_WITH_VALUE.has(a)) {
      i++;
      continue;
    }
    if (!a.startsWith('-')) return i;
  }
  return -1;
}

export async function main(argv: string[], io: Pick<CommandContext, 'stdout' | 'stderr'> = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const at = findCommand(argv);
  const entry = at >= 0 ? commands.find((c) => c.name === argv[at]) : undefined;
  if (at < 0 || !entry) {
    const wantsHelp = argv.includes('--help') || argv.includes('-h');
    if (at >= 0) io.stderr.write(`vmlet: unknown command '${argv[at]}'\n\n`);
    (wantsHelp && at < 0 ? io.stdout : io.stderr).write(`${usage()}\n`);
    return wantsHelp && at < 0 ? 0 : 2;
  }
  const rest = [...argv.slice(0, at), ...argv.slice(at + 1)];
  const cmd = entry.load();
  try {
    const { values, positionals } = parseArgs({ args: rest, options: { ...GLOBAL_OPTIONS, ...cmd.options }, allowPositionals: true, strict: true });
    if (values.help === true) {
      io.stdout.write(`${usage(entry, cmd)}\n`);
      return 0;
    }
    const verbose = values.verbose === true;
    if (verbose) setImagesLogLevel('debug');
    const root = typeof values.root === 'string' ? values.root : defaultRoot();
    return await cmd.run(values, positionals, { root, verbose, ...io });
  } catch (e) {
    if (e instanceof UsageError || (e as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS')) {
      io.stderr.write(`vmlet ${cmd.name}: ${(e as Error).message}\n\n${usage(entry, cmd)}\n`);
      return 2;
    }
    if (e instanceof ImageError) {
      io.stderr.write(`vmlet ${cmd.name}: ${e.message}\n`);
      return 1;
    }
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'EACCES' || err.code === 'EPERM') {
      io.stderr.write(`vmlet ${cmd.name}: ${err.message}; the root needs write access (run as root, or pick another with --root)\n`);
      return 1;
    }
    io.stderr.write(`vmlet ${cmd.name}: unexpected failure: ${err.stack ?? String(e)}\n`);
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  }, (e: unknown) => {
    process.stderr.write(`vmlet: ${String(e)}\n`);
    process.exitCode = 1;
  });
}
