/**
 * Starts the HTTP server on a host and port.
 * @module
 */
import type { AddressInfo } from 'node:net';

import type { Detector } from '../detect/types.js';
import { createServer, type ServerOptions } from './app.js';

/** Options of {@link serve}. */
export interface ServeOptions extends ServerOptions {
  detector: Detector;
  /** Default `'127.0.0.1'`: only this machine can connect unless told otherwise. */
  host?: string;
  /** Default 8000; 0 picks a free port. */
  port?: number;
}

/** A listening server. */
export interface RunningServer {
  /** `http://host:port`, with the port actually bound. */
  url: string;
  /** Cancels requests in flight, stops listening and resolves when every connection is closed. */
  close(): Promise<void>;
}

/** Creates the server for `options.detector` and listens. The detector stays the caller's to dispose. */
export async function serve(options: ServeOptions): Promise<RunningServer> {
  const { detector, host = '127.0.0.1', port = 8000, ...serverOptions } = options;
  const app = createServer(detector, serverOptions);
  await app.listen({ host, port });
  const address = app.server.address() as AddressInfo;
  const shownHost = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return {
    url: `http://${shownHost}:${address.port}`,
    close: () => app.close(),
  };
}
