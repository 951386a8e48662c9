/**
 * Starts the HTTP server on a host and port.
 * @module
 */
import type { AddressInfo } from 'node:net';

import type { Detector } from '../detect/types.js';
import { buildServer, type DrainResult, type ServerOptions, type ServerState } from './app.js';

/** Options of {@link serve}. */
export interface ServeOptions extends ServerOptions {
  /**
   * The detector, or a promise of it: the server then listens at once and answers 503
   * (`model_loading`; `/health`: `{ status: 'loading' }`) until the promise resolves.
   */
  detector: Detector | PromiseLike<Detector>;
  /** Default `'127.0.0.1'`: only this machine can connect unless told otherwise. */
  host?: string;
  /** Default 8000; 0 picks a free port. */
  port?: number;
}

/** A listening server. */
export interface RunningServer {
  /** `http://host:port`, with the port actually bound. */
  url: string;
  /** `loading`, `ok`, `draining` or `failed`, as `/health` reports it. */
  readonly state: ServerState;
  /** Cancels requests in flight, stops listening and resolves when every connection is closed. */
  close(): Promise<void>;
  /**
   * Graceful shutdown: new requests get 503 (`Connection: close`) while running ones may finish
   * for up to `ms` milliseconds; those still running then are cancelled; then the server closes.
   * Resolves with how many finished and how many were cancelled.
   */
  drain(ms: number): Promise<DrainResult>;
}

/** Creates the server for `options.detector` and listens. The detector stays the caller's to dispose. */
export async function serve(options: ServeOptions): Promise<RunningServer> {
  const { detector, host = '127.0.0.1', port = 8000, ...serverOptions } = options;
  const server = buildServer(detector, serverOptions);
  const { app } = server;
  // The log line (with logging on) says where, not that the model serves: it may still be loading.
  await app.listen({ host, port, listenTextResolver: (address) => `listening on ${address}` });
  const address = app.server.address() as AddressInfo;
  const shownHost = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  // close() may come twice (a drain, then a signal's quick shutdown): Fastify's close runs once.
  let closing: Promise<void> | null = null;
  const close = (): Promise<void> => (closing ??= app.close());
  return {
    url: `http://${shownHost}:${address.port}`,
    get state() {
      return server.state;
    },
    close,
    async drain(ms) {
      const result = await server.drain(ms);
      await close();
      return result;
    },
  };
}
