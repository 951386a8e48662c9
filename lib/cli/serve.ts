/**
 * `redflag serve`: loads the detector, serves it over HTTP until SIGINT/SIGTERM, then cancels
 * requests in flight, closes the server and frees the model.
 * @module
 */
import { basename, resolve } from 'node:path';

import { createDetector } from '../detect/detector.js';
import type { DetectorMode } from '../detect/types.js';
import { serve } from '../server/serve.js';

/** The flags of `redflag serve`, as commander parses them. */
export interface ServeFlags {
  model: string;
  adapter?: string;
  servedModelName?: string;
  host: string;
  port: number;
  apiKey?: string;
  threshold: number;
  mode: DetectorMode;
  dtype: 'f32' | 'bf16';
  threads?: number;
  maxConcurrent: number;
  kvCacheMb?: number;
}

const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost']);

function waitForSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolveSignal) => {
    const stop = (signal: NodeJS.Signals): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolveSignal(signal);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}

export async function runServe(flags: ServeFlags): Promise<void> {
  // An empty variable is how shells usually say "unset"; createServer refuses an empty key.
  const apiKey = flags.apiKey ?? (process.env['REDFLAG_API_KEY'] || undefined);
  if (!LOOPBACK.has(flags.host) && apiKey === undefined) {
    console.error(`redflag: warning: listening on ${flags.host} without an API key (set REDFLAG_API_KEY)`);
  }
  const detector = await createDetector({
    model: flags.model,
    ...(flags.adapter !== undefined ? { adapter: flags.adapter } : {}),
    threshold: flags.threshold,
    mode: flags.mode,
    dtype: flags.dtype,
    ...(flags.threads !== undefined ? { threads: flags.threads } : {}),
    ...(flags.kvCacheMb !== undefined ? { kvCacheBytes: flags.kvCacheMb * 2 ** 20 } : {}),
  });
  try {
    const modelName = flags.servedModelName ?? basename(resolve(flags.model));
    const server = await serve({
      detector,
      host: flags.host,
      port: flags.port,
      modelName,
      maxConcurrent: flags.maxConcurrent,
      ...(apiKey !== undefined ? { apiKey } : {}),
    });
    console.log(`redflag: serving "${modelName}" at ${server.url} (OpenAI base URL ${server.url}/v1)`);
    const signal = await waitForSignal();
    console.error(`redflag: ${signal}, shutting down`);
    await server.close();
  } finally {
    await detector.dispose();
  }
}
