// The image subsystem's logger. The CLI raises it to debug with --verbose; by default only
// warnings reach stderr (stdout belongs to command output).
import { ComponentLog } from '../log';

export const imagesLog = new ComponentLog('images');

export function setImagesLogLevel(level: string): void {
  imagesLog.level = level;
}
