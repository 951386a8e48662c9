/**
 * Bodies over the limit get their 413 `request_too_large`, not a broken connection: the server
 * reads and drops the rest of the body (up to DISCARD_FACTOR times the limit) before it answers
 * and closes. With fetch and with the openai client (whose retries on connection errors would
 * show as extra requests on the server), declared lengths and chunked bodies; past the cap the
 * server answers at once and closes rather than read on.
 */
import { connect, type Socket } from 'node:net';

import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { DISCARD_FACTOR } from '../lib/server/body-limit.js';
import { serve, type RunningServer } from '../lib/server/serve.js';
import { FakeDetector } from './helpers/fake-detector.js';
import { metricValue, scrape } from './helpers/prometheus.js';

const LIMIT = 1024 * 1024;
const MODEL = 'redflag-test';
const ROUTE = { route: '/v1/chat/completions', method: 'POST' };
/** 2.2 MiB of prompt: over the 1 MiB limit, under the discard cap. */
const bigContent = 'x'.repeat(Math.round(2.2 * LIMIT));
const bigBody = JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: bigContent }] });

let server: RunningServer;
const detector = new FakeDetector();

beforeAll(async () => {
  server = await serve({ detector, port: 0, modelName: MODEL });
});
afterAll(async () => server.close());

async function answered413(): Promise<number> {
  return metricValue(await scrape(server.url), 'redflag_http_requests_total', { ...ROUTE, status: '413' });
}

async function routeRequests(): Promise<number> {
  return metricValue(await scrape(server.url), 'redflag_http_requests_total', ROUTE);
}

async function expectTooLarge(response: Response): Promise<void> {
  expect(response.status).toBe(413);
  expect(response.headers.get('connection')).toBe('close');
  const body = (await response.json()) as { error: { code: string; type: string; message: string } };
  expect(body.error).toMatchObject({ code: 'request_too_large', type: 'invalid_request_error' });
  expect(body.error.message).toContain(String(LIMIT));
}

/** Runs `count` tasks, `parallel` at a time. */
async function inBatches(count: number, parallel: number, task: (i: number) => Promise<void>): Promise<void> {
  for (let i = 0; i < count; i += parallel) {
    await Promise.all(Array.from({ length: Math.min(parallel, count - i) }, (_, j) => task(i + j)));
  }
}

function chunkedBody(bytes: string): ReadableStream<Uint8Array> {
  const data = new TextEncoder().encode(bytes);
  let offset = 0;
  return new ReadableStream({
    pull(controller) {
      if (offset >= data.length) return controller.close();
      controller.enqueue(data.subarray(offset, (offset += 64 * 1024)));
    },
  });
}

/** Opens a raw connection and resolves with what the server sent once it closed the connection. */
function rawExchange(onOpen: (socket: Socket) => void): Promise<{ received: string; error: string | null }> {
  return new Promise((resolve) => {
    const { port } = new URL(server.url);
    const socket = connect(Number(port), '127.0.0.1', () => onOpen(socket));
    let received = '';
    let error: string | null = null;
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    socket.on('error', (e: NodeJS.ErrnoException) => (error = e.code ?? e.message));
    socket.on('close', () => resolve({ received, error }));
  });
}

describe('oversized request bodies', () => {
  it('fetch: 50 of 50 bodies with a Content-Length over the limit get the 413 JSON', async () => {
    const before = await answered413();
    const failures: unknown[] = [];
    await inBatches(50, 5, async () => {
      try {
        const response = await fetch(`${server.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: bigBody });
        await expectTooLarge(response);
      } catch (error) {
        failures.push(error);
      }
    });
    expect(failures).toEqual([]);
    expect((await answered413()) - before).toBe(50);
  });

  it('openai client: 50 of 50 get a 413 APIError, each after exactly one request (no retry)', async () => {
    // Default retries (2): a connection error would be retried and counted again by the server.
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused' });
    const before = await routeRequests();
    const codes: unknown[] = [];
    await inBatches(50, 5, async () => {
      try {
        await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: bigContent }] });
        codes.push('no error');
      } catch (error) {
        codes.push(error instanceof OpenAI.APIError ? `${error.status} ${error.code}` : String(error));
      }
    });
    expect(codes).toEqual(Array(50).fill('413 request_too_large'));
    expect((await routeRequests()) - before).toBe(50);
  });

  it('a chunked body over the limit (no Content-Length) gets the 413 JSON', async () => {
    const before = await answered413();
    await inBatches(10, 5, async () => {
      const response = await fetch(`${server.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: chunkedBody(bigBody),
        duplex: 'half',
      } as RequestInit);
      await expectTooLarge(response);
    });
    expect((await answered413()) - before).toBe(10);
  });

  it('still answers bodies within the limit, on the same server', async () => {
    const response = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'y'.repeat(LIMIT - 1000) }] }),
    });
    expect(response.status).toBe(200);
  });

  it('past the discard cap: a declared length is answered at once and the connection closed', async () => {
    const declared = LIMIT * DISCARD_FACTOR + 1;
    const { received } = await rawExchange((socket) =>
      socket.write(`POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${declared}\r\n\r\n{"model":`),
    );
    expect(received).toMatch(/^HTTP\/1\.1 413 /);
    expect(received.toLowerCase()).toContain('connection: close');
    expect(received).toContain('request_too_large');
  });

  it('past the discard cap: a chunked upload is cut off instead of read without end', async () => {
    const cap = LIMIT * DISCARD_FACTOR;
    let sent = 0;
    const chunk = Buffer.alloc(256 * 1024, 'z');
    const frame = Buffer.concat([Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from('\r\n')]);
    const { received } = await rawExchange((socket) => {
      socket.write('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n');
      const pump = (): void => {
        // Keep writing (as a client that ignores the answer would) until the server closes; never past 64 times the cap.
        while (!socket.destroyed && sent < 64 * cap) {
          sent += frame.length;
          if (!socket.write(frame)) return void socket.once('drain', pump);
        }
        socket.end();
      };
      pump();
    });
    // The server stopped reading near the cap; what was sent past it sat in socket buffers at most.
    expect(sent).toBeLessThan(64 * cap);
    // The answer may be lost to the reset that closing an unread connection causes; when it arrived, it is the 413.
    if (received !== '') expect(received).toMatch(/^HTTP\/1\.1 413 /);
  });
});
