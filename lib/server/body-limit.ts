/**
 * Request bodies over the limit. Answering 413 while the client is still uploading and then
 * closing the connection makes many clients (fetch, the openai package) see a broken pipe or a
 * reset instead of the answer: the unread upload in the server's socket turns the close into
 * a TCP reset, which can overtake the response. So, as mature servers do, the rest of an
 * oversized body is read and thrown away (up to {@link DISCARD_FACTOR} times the limit) and only
 * then answered, with `Connection: close`. A body larger than that is answered at once and the
 * connection closed: the client may then see the reset, but the server never reads without end.
 * @module
 */
import type { Readable } from 'node:stream';
import { PassThrough } from 'node:stream';

import { ApiError } from './http-errors.js';

/**
 * How much of an oversized body is read and discarded, as a multiple of the limit: enough for
 * the usual mistake (a prompt a few times too long) to get its 413 cleanly, little enough that
 * a client cannot make the server read for long.
 */
export const DISCARD_FACTOR = 4;

function tooLarge(limit: number): ApiError {
  return new ApiError(413, `request body: larger than the server's limit of ${limit} bytes`, { code: 'request_too_large' });
}

/** Whether an error means the request body was too large (answered with `Connection: close`). */
export function isBodyTooLarge(error: ApiError): boolean {
  return error.status === 413;
}

/**
 * The request body as the parser should read it: itself while within `limit`; past it, the
 * rest is read and dropped, and the stream fails with a 413 at the body's end, or as soon as
 * it passes `limit * DISCARD_FACTOR` (reading then stops).
 */
export function limitBody(payload: Readable, limit: number): Readable {
  const cap = limit * DISCARD_FACTOR;
  const body = new PassThrough();
  let received = 0;
  const stop = (error: Error): void => {
    payload.off('data', onData);
    payload.off('end', onEnd);
    payload.off('error', onError);
    // The parser stops listening once it has failed; this keeps a late error from going unhandled.
    payload.on('error', () => {});
    body.destroy(error);
  };
  const onData = (chunk: Buffer): void => {
    received += chunk.length;
    if (received > cap) {
      payload.pause();
      stop(tooLarge(limit));
    } else if (received <= limit) {
      // Writes past the PassThrough's buffer size are held, never lost; they are bounded by `limit`.
      body.write(chunk);
    }
  };
  const onEnd = (): void => {
    if (received > limit) stop(tooLarge(limit));
    else body.end();
  };
  const onError = (error: Error): void => stop(error);
  payload.on('data', onData);
  payload.on('end', onEnd);
  payload.on('error', onError);
  return body;
}
