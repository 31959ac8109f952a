// Binds the layer store to the native converter (native/ts/layer.ts, owned by the native side).
// The addon itself is loaded by layer.ts on first use, so listing or removing images works on a
// machine whose addon is not built; only a conversion then fails, naming the fix.
import { convertLayer } from '../../native/ts/layer';
import type { LayerConverter } from './layer-store';

export function loadConverter(): LayerConverter {
  return (input, output, opts) => convertLayer(input, output, opts);
}
