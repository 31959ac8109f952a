// File-system idioms the stores share.
import { promises as fsp } from 'node:fs';

/** Removes a file; false when it was already gone (a concurrent GC or rmi may have won). */
export async function unlinkIfExists(path: string): Promise<boolean> {
  try {
    await fsp.unlink(path);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}
