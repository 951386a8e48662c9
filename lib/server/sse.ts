/**
 * A generation streamed as server-sent events, whatever the API's chunk shape: chat completions
 * and text completions render their own events and share the rest (the first token awaited
 * before the 200, back-pressure, the error event, cancelling on a failed write).
 * @module
 */
import type { ServerResponse } from 'node:http';

import type { FastifyReply } from 'fastify';

import type { DetectedToken, DetectionStream, DetectionSummary } from '../detect/types.js';
import { ApiError, toApiError } from './http-errors.js';
import type { GenerationObserver } from './request-trace.js';

/** How one API renders a generation's events (each a JSON text, or `null` for none). */
export interface EventRenderer {
  /** Events before the first token's (chat: the assistant role). */
  start(): string[];
  /** The event of one token, or null when it shows nothing (`<rf>`, part of a character). */
  token(token: DetectedToken): string | null;
  /** Events after the last token (the finish reason, usage), before `[DONE]`. */
  end(summary: DetectionSummary): string[];
}

/** Writes one server-sent event, waiting while the client reads slower than tokens come. */
async function writeEvent(res: ServerResponse, data: string): Promise<void> {
  if (res.destroyed || res.writableEnded) throw new ApiError(499, 'the client disconnected', { code: 'cancelled' });
  if (res.write(`data: ${data}\n\n`)) return;
  await new Promise<void>((resolve) => {
    const settle = (): void => {
      res.off('drain', settle);
      res.off('close', settle);
      resolve();
    };
    res.on('drain', settle);
    res.on('close', settle);
  });
}

/**
 * Streams the generation as server-sent events. The first token is awaited before the response
 * starts so that a refusal up front (queue full, prompt too long) still gets its status code;
 * a failure later can only be reported in the stream, as an `error` event, as OpenAI does.
 */
export async function streamEvents(stream: DetectionStream, observer: GenerationObserver, reply: FastifyReply, render: EventRenderer): Promise<void> {
  const tokens = stream[Symbol.asyncIterator]();
  let next = await tokens.next();
  if (!next.done) observer.token();

  reply.hijack();
  const res = reply.raw;
  // A write to a connection the client dropped errors asynchronously; the 'close' listener already cancelled the work.
  res.on('error', () => {});
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });

  try {
    for (const event of render.start()) await writeEvent(res, event);
    while (!next.done) {
      const event = render.token(next.value);
      if (event !== null) await writeEvent(res, event);
      next = await tokens.next();
      if (!next.done) observer.token();
    }
    const summary = await stream.done;
    observer.finished(summary);
    for (const event of render.end(summary)) await writeEvent(res, event);
    await writeEvent(res, '[DONE]');
    res.end();
  } catch (error) {
    // Stops a generation still running when the failure was ours (a write), not the detector's.
    stream.cancel();
    const apiError = toApiError(error);
    observer.failed(apiError.code);
    if (apiError.status >= 500 && apiError.status !== 503) reply.log.error({ err: error }, 'completion stream failed');
    if (res.destroyed || res.writableEnded) return;
    res.end(`data: ${JSON.stringify(apiError.toBody())}\n\n`);
  }
}
