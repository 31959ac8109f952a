// The shape of one `vmlet` subcommand. Each lives in commands/<name>.ts and is listed once in
// commands/index.ts; vmlet.ts owns only global options and dispatch.
import type { ParseArgsConfig } from 'node:util';
import type { Writable } from 'node:stream';

export type OptionValues = Record<string, string | boolean | (string | boolean)[] | undefined>;

export interface CommandContext {
  /** image/state root (--root, VMLET_ROOT, default /var/lib/vmlet) */
  root: string;
  verbose: boolean;
  stdout: Writable & { isTTY?: boolean };
  stderr: Writable & { isTTY?: boolean };
}

export interface Command {
  name: string;
  /** argument synopsis after `vmlet <name>` */
  usage: string;
  options: NonNullable<ParseArgsConfig['options']>;
  /** option help lines, already formatted */
  help: string[];
  run(values: OptionValues, positionals: string[], ctx: CommandContext): Promise<number>;
}

/** Wrong command-line use: printed with the command's usage, exit status 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export function stringOpt(values: OptionValues, name: string): string | undefined {
  const v = values[name];
  return typeof v === 'string' ? v : undefined;
}

export function humanBytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = n;
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}
