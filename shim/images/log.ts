// The image subsystem's logger. The CLI raises it to debug with --verbose; by default only
// warnings reach stderr (stdout belongs to command output).
import winston from 'winston';

export const imagesLog = winston.createLogger({
  level: process.env.VMLET_LOG_LEVEL ?? 'warn',
  format: winston.format.combine(
    winston.format.timestamp(),
    winston.format.printf((i) => `${String(i.timestamp)} ${i.level} images: ${String(i.message)}`),
  ),
  transports: [new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'] })],
});

export function setImagesLogLevel(level: string): void {
  imagesLog.level = level;
}
