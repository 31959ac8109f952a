// Every `vmlet` subcommand, in help order: its name and one-line summary for
// the command list, and the module that implements it, loaded only when that
// command runs. Each module pulls in its own stack (the image stores and
// registry client, the VMM addon, the agent client); loading all of them for
// every invocation cost ~1 s of `vmlet run` in the lab. A new command is one
// file plus one line here.
import type { Command } from '../command';

export interface CommandEntry {
  name: string;
  summary: string;
  load(): Command;
}

/* eslint-disable @typescript-eslint/no-var-requires */
export const commands: CommandEntry[] = [
  { name: 'run', summary: 'run a command in a new microVM from a squashfs image, a directory or a stored image', load: () => (require('./run') as typeof import('./run')).run },
  { name: 'templates', summary: 'list or remove the VM templates vmlet run restores from', load: () => (require('./templates') as typeof import('./templates')).templates },
  { name: 'pull', summary: 'pull an image from a registry into the local stores', load: () => (require('./pull') as typeof import('./pull')).pull },
  { name: 'images', summary: 'list the images in the local store', load: () => (require('./images') as typeof import('./images')).images },
  { name: 'rmi', summary: 'remove images, then delete the blobs and layers no image uses any more', load: () => (require('./rmi') as typeof import('./rmi')).rmi },
  { name: 'load', summary: 'load images from an OCI layout directory or a docker-archive tar', load: () => (require('./load') as typeof import('./load')).load },
  { name: 'gc', summary: 'delete blobs and layers no image refers to, and leftovers of interrupted pulls', load: () => (require('./gc') as typeof import('./gc')).gc },
  { name: 'check', summary: 'boot a self-check microVM: KVM, virtio-blk (optionally an image\'s layers) and vsock, verified byte for byte', load: () => (require('./check') as typeof import('./check')).check },
];
