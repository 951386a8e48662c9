#!/usr/bin/env node
/**
 * The `redflag` executable.
 * @module
 */
import { buildProgram } from './cli/program.js';
import { RedflagError } from './errors.js';

async function main(): Promise<void> {
  try {
    await buildProgram().parseAsync(process.argv);
  } catch (error) {
    if (error instanceof RedflagError) {
      console.error(`redflag: ${error.message}`);
      process.exitCode = error.code === 'ABORTED' ? 130 : 1;
      return;
    }
    if ((error as Error)?.name === 'AbortError') {
      console.error('redflag: aborted');
      process.exitCode = 130;
      return;
    }
    throw error;
  }
}

await main();
