// Binds the layer store to the native converter (native/ts/layer.ts, owned by the native side).
// Loaded lazily so that listing or removing images works on a machine whose addon is not built.
import { ImageError } from './errors';
import type { LayerConverter } from './layer-store';

export function loadConverter(): LayerConverter {
  let loaded: LayerConverter | undefined;
  return async (input, output, opts) => {
    if (!loaded) {
      try {
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        loaded = (require('../../native/ts/layer') as { convertLayer: LayerConverter }).convertLayer;
      } catch (e) {
        throw new ImageError('UNIMPLEMENTED',
          `the layer → squashfs converter is not available (${(e as Error).message}); build the native addon with npm run build`);
      }
    }
    return loaded(input, output, opts);
  };
}
