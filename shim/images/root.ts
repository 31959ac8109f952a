// Where vmlet keeps images and state, in a module of its own: the CLI needs it
// for every command, the image stack behind image-service only for some.
export const DEFAULT_ROOT = '/var/lib/vmlet';

export function defaultRoot(): string {
  return process.env.VMLET_ROOT || DEFAULT_ROOT;
}
