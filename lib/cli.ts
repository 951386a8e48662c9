#!/usr/bin/env node
/**
 * The `redflag` executable.
 * @module
 */
import { buildProgram } from './cli/program.js';
import { RedflagError } from './errors.js';

/** An operating-system error (a file, a socket): its message names the call and the path. */
function isSystemError(error: unknown): error is NodeJS.ErrnoException {
  const e = error as NodeJS.ErrnoException | null;
  return e instanceof Error && typeof e.code === 'string' && /^E[A-Z]+$/.test(e.code) && typeof e.syscall === 'string';
}

async function main(): Promise<void> {
  // Output piped into a reader that stopped (`| head`): stop quietly, as Unix tools do.
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(0);
    throw error;
  });
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
    // A path that is a file, a port in use, a folder without permission: one line, no stack.
    if (isSystemError(error)) {
      console.error(`redflag: ${error.message}`);
      process.exitCode = 1;
      return;
    }
    throw error;
  }
}

await main();
