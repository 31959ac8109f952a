// The one place that loads the raw Node-API binding (native/build/Release/vmlet.node).
// Each facade (vmm.ts, layer.ts) types the part of it it uses; nothing else
// touches the binding.
import { join } from 'node:path';

/** This file runs from dist/native/ts/; the addon sits in native/build/Release/ at the repository root. */
export const addonPath = join(__dirname, '..', '..', '..', 'native', 'build', 'Release', 'vmlet.node');

let loaded: unknown;

/** Loads the addon once. A failure becomes the caller's own typed error, made by `error`. */
export function loadAddon<T>(error: (message: string) => Error): T {
  if (loaded === undefined) {
    try {
      loaded = require(addonPath);
    } catch (e) {
      throw error(`cannot load the vmlet native addon at ${addonPath}: run npm run build:native (${(e as Error).message})`);
    }
  }
  return loaded as T;
}
