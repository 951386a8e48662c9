/**
 * `redflag serve`: listens at once (`/health` says `loading`, `/health/live` answers), loads the
 * detector, serves it over HTTP, and stops on a signal:
 * - SIGTERM drains: new requests get 503 while running generations may finish for
 *   `--drain-seconds`; the rest are cancelled; then the model is freed and the process exits 0;
 * - SIGINT (Ctrl-C) stops at once: requests in flight are cancelled.
 * A second signal during a drain stops at once too. One JSON log line per request goes to
 * stdout (without prompts and answers unless `--log-content`).
 * @module
 */
import { basename, resolve } from 'node:path';

import { createDetector } from '../detect/detector.js';
import type { Detector, DetectorMode } from '../detect/types.js';
import { loadModel, type Model } from '../model/model.js';
import { serve } from '../server/serve.js';
import { modelOptions, type EngineFlags } from './model-flags.js';

/** The flags of `redflag serve`, as commander parses them. */
export interface ServeFlags extends EngineFlags {
  model: string;
  adapter?: string;
  mergeAdapter?: boolean;
  servedModelName?: string;
  host: string;
  port: number;
  apiKey?: string;
  threshold: number;
  mode: DetectorMode;
  maxConcurrent: number;
  kvCacheMb?: number | 'auto';
  gpuMemoryFraction?: number;
  maxBatch?: number;
  maxStepTokens?: number;
  /** --overlap-steps / --no-overlap-steps; undefined: the device's default. */
  overlapSteps?: boolean;
  drainSeconds: number;
  /** False with `--no-request-log`. */
  requestLog: boolean;
  logContent?: boolean;
}

const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost']);

/** SIGINT and SIGTERM in the order they come, until `stop()`; meanwhile they do not kill the process. */
function listenForSignals(): { next(): Promise<NodeJS.Signals>; stop(): void } {
  const received: NodeJS.Signals[] = [];
  const waiting: ((signal: NodeJS.Signals) => void)[] = [];
  const onSignal = (signal: NodeJS.Signals): void => {
    const waiter = waiting.shift();
    if (waiter) waiter(signal);
    else received.push(signal);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    next: () => {
      const signal = received.shift();
      return signal ? Promise.resolve(signal) : new Promise((resolveSignal) => waiting.push(resolveSignal));
    },
    stop: () => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

/** Loads the model (cancellable by `signal`) and its detector; the model stays the caller's to free. */
async function loadDetector(flags: ServeFlags, signal: AbortSignal, loaded: (model: Model) => void): Promise<Detector> {
  const model = await loadModel(flags.model, { ...modelOptions(flags), signal });
  loaded(model);
  return createDetector({
    model,
    ...(flags.adapter !== undefined ? { adapter: flags.adapter } : {}),
    ...(flags.mergeAdapter ? { mergeAdapter: true } : {}),
    threshold: flags.threshold,
    mode: flags.mode,
    ...(flags.kvCacheMb !== undefined ? { kvCacheBytes: flags.kvCacheMb === 'auto' ? 'auto' : flags.kvCacheMb * 2 ** 20 } : {}),
    ...(flags.gpuMemoryFraction !== undefined ? { gpuMemoryFraction: flags.gpuMemoryFraction } : {}),
    ...(flags.maxBatch !== undefined ? { maxBatch: flags.maxBatch } : {}),
    ...(flags.maxStepTokens !== undefined ? { maxStepTokens: flags.maxStepTokens } : {}),
    ...(flags.overlapSteps !== undefined ? { overlapSteps: flags.overlapSteps } : {}),
  });
}

export async function runServe(flags: ServeFlags): Promise<void> {
  // An empty variable is how shells usually say "unset"; createServer refuses an empty key.
  const apiKey = flags.apiKey ?? (process.env['REDFLAG_API_KEY'] || undefined);
  if (!LOOPBACK.has(flags.host) && apiKey === undefined) {
    console.error(`redflag: warning: listening on ${flags.host} without an API key (set REDFLAG_API_KEY)`);
  }
  const modelName = flags.servedModelName ?? basename(resolve(flags.model));
  const signals = listenForSignals();
  const loading = new AbortController();
  let model: Model | undefined;
  const detectorLoad = loadDetector(flags, loading.signal, (m) => (model = m));
  // Settled below; until then the server reports the failure as `failed`, not the process as unhandled.
  detectorLoad.catch(() => {});
  let detector: Detector | undefined;
  try {
    const server = await serve({
      detector: detectorLoad,
      host: flags.host,
      port: flags.port,
      modelName,
      maxConcurrent: flags.maxConcurrent,
      logger: flags.requestLog,
      logContent: flags.logContent === true,
      ...(apiKey !== undefined ? { apiKey } : {}),
    });
    try {
      console.error(`redflag: listening at ${server.url}, loading the model (/health answers 503 "loading" until it is ready)`);
      const stop = signals.next();
      const first = await Promise.race([detectorLoad, stop]);
      if (typeof first === 'string') {
        console.error(`redflag: ${first} while loading, shutting down`);
        loading.abort();
        return;
      }
      detector = first;
      console.log(`redflag: serving "${modelName}" at ${server.url} (OpenAI base URL ${server.url}/v1)`);
      const signal = await stop;
      if (signal === 'SIGTERM') {
        console.error(`redflag: SIGTERM, draining: running requests may finish for ${flags.drainSeconds} s (another signal stops at once)`);
        // A second signal cancels what is left: close() aborts every request, which ends the drain.
        void signals.next().then(() => server.close());
        const { finished, cancelled } = await server.drain(flags.drainSeconds * 1000);
        console.error(`redflag: drained: ${finished} request(s) finished, ${cancelled} cancelled`);
      } else {
        console.error(`redflag: ${signal}, shutting down`);
      }
    } finally {
      await server.close();
    }
  } finally {
    signals.stop();
    // A load cut short by a signal rejects; one that finished after the server closed is freed here.
    detector ??= await detectorLoad.catch(() => undefined);
    await detector?.dispose();
    model?.dispose();
  }
}
