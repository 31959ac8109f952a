// One logger per component of the runtime (images, templates, ...): winston,
// one line per message on stderr ("<time> <level> <component>: <message>"),
// stdout being the commands' output. Level: VMLET_LOG_LEVEL, default warn.
//
// winston itself is loaded only when a message passes the level: loading it
// costs ~30 ms per process on the host and over a second in the KVM lab (its
// ~100 modules), more than a template restore, and a plain `vmlet run` logs
// nothing at all.
import type { Logger } from 'winston';

// winston's default (npm) levels: a message is logged when its level's number is at most the logger's.
const LEVELS: Record<string, number> = { error: 0, warn: 1, info: 2, http: 3, verbose: 4, debug: 5, silly: 6 };

export class ComponentLog {
  private made?: Logger;
  private current: string;

  constructor(private readonly component: string, level = process.env.VMLET_LOG_LEVEL || 'warn') {
    this.current = level;
  }

  get level(): string {
    return this.current;
  }
  set level(level: string) {
    this.current = level;
    if (this.made) this.made.level = level;
  }

  /** The winston logger behind this component (made now if it was not), e.g. to listen to its 'data' events. */
  get logger(): Logger {
    if (!this.made) {
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      const winston = require('winston') as typeof import('winston');
      const component = this.component;
      this.made = winston.createLogger({
        level: this.current,
        format: winston.format.combine(
          winston.format.timestamp(),
          winston.format.printf((i) => `${String(i.timestamp)} ${i.level} ${component}: ${String(i.message)}`),
        ),
        transports: [new winston.transports.Console({ stderrLevels: Object.keys(LEVELS) })],
      });
    }
    return this.made;
  }

  error(message: string): void {
    this.log('error', message);
  }
  warn(message: string): void {
    this.log('warn', message);
  }
  info(message: string): void {
    this.log('info', message);
  }
  debug(message: string): void {
    this.log('debug', message);
  }

  private log(level: string, message: string): void {
    const threshold = LEVELS[this.current];
    // An unknown level name is winston's to judge.
    if (threshold !== undefined && LEVELS[level] > threshold) return;
    this.logger.log(level, message);
  }
}
