// Every `vmlet` subcommand, in help order. A new command is one file plus one line here.
import type { Command } from '../command';
import { pull } from './pull';
import { images } from './images';
import { rmi } from './rmi';
import { load } from './load';
import { gc } from './gc';
import { check } from './check';
import { run } from './run';
import { templates } from './templates';

export const commands: Command[] = [run, templates, pull, images, rmi, load, gc, check];
