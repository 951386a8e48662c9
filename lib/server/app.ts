/**
 * The OpenAI-compatible HTTP server around a {@link Detector}: chat completions (streamed or
 * not) with red-flag scores, moderations, the model list and a health check. Create it with
 * {@link createServer} and `listen` yourself, or let `serve` (serve.ts) do both.
 * @module
 */
import { createHash, timingSafeEqual } from 'node:crypto';

import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';

import type { Detector } from '../detect/types.js';
import { RedflagError } from '../errors.js';
import { completeChat, streamChat } from './chat.js';
import { ApiError, parseBody, toApiError } from './http-errors.js';
import { moderate } from './moderations.js';
import { chatRequestSchema, moderationRequestSchema, type RequestLimits } from './schemas.js';
import { unixSeconds } from './shapes.js';

/** Options of {@link createServer}. */
export interface ServerOptions {
  /** The model id clients name and responses report. */
  modelName: string;
  /** When set, every request must carry `Authorization: Bearer <apiKey>`. Must not be empty. */
  apiKey?: string;
  /** Largest request body in bytes. Default 1 MiB. */
  bodyLimit?: number;
  /** Largest `max_tokens` / `max_completion_tokens` a request may ask for. Default 4096. */
  maxTokensLimit?: number;
  /** Most messages in a chat request, and most inputs in a moderation request. Default 256. */
  maxMessages?: number;
  /** Most chat and moderation requests in flight; more are answered 429. Default 64. */
  maxConcurrent?: number;
  /** The user turn moderation inputs are scored as answers to. Default `'Continue.'`. */
  moderationPrompt?: string;
  /** Fastify's request logging (pino, to stdout). Default false. */
  logger?: boolean;
}

/** How long close() lets cancelled responses finish before it drops every connection. */
const CLOSE_GRACE_MS = 500;

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  const n = value ?? fallback;
  if (!Number.isInteger(n) || n < 1) throw new RedflagError('INVALID_ARGUMENT', `${name} must be an integer >= 1, got ${n}`);
  return n;
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

/** Creates the server (not listening yet). */
export function createServer(detector: Detector, options: ServerOptions): FastifyInstance {
  if (typeof options.modelName !== 'string' || options.modelName === '') {
    throw new RedflagError('INVALID_ARGUMENT', 'modelName must be a non-empty string');
  }
  if (options.apiKey === '') throw new RedflagError('INVALID_ARGUMENT', 'apiKey must not be empty (omit it to serve without a key)');
  const limits: RequestLimits = {
    maxTokens: positiveInteger('maxTokensLimit', options.maxTokensLimit, 4096),
    maxMessages: positiveInteger('maxMessages', options.maxMessages, 256),
  };
  const maxConcurrent = positiveInteger('maxConcurrent', options.maxConcurrent, 64);
  const chatSchema = chatRequestSchema(limits);
  const moderationSchema = moderationRequestSchema(limits);
  const modelName = options.modelName;
  const created = unixSeconds();

  const app = Fastify({ logger: options.logger ?? false, bodyLimit: positiveInteger('bodyLimit', options.bodyLimit, 1024 * 1024) });

  app.setErrorHandler((error, request, reply) => {
    const apiError = toApiError(error);
    if (apiError.status >= 500 && apiError.status !== 503) request.log.error({ err: error }, 'request failed');
    if (apiError.status === 429) void reply.header('retry-after', '1');
    return reply.code(apiError.status).send(apiError.toBody());
  });
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0] ?? '';
    const error = new ApiError(404, `Unknown request URL: ${request.method} ${path}`, { code: 'unknown_url' });
    return reply.code(404).send(error.toBody());
  });

  if (options.apiKey !== undefined) {
    // Digests have equal lengths whatever was sent, so timingSafeEqual never short-cuts on length.
    const expected = sha256(options.apiKey);
    app.addHook('onRequest', async (request, reply) => {
      const given = /^Bearer\s+(.+)$/i.exec(request.headers.authorization ?? '')?.[1]?.trim() ?? '';
      if (timingSafeEqual(sha256(given), expected)) return;
      const error = new ApiError(401, 'Incorrect or missing API key: pass it as "Authorization: Bearer <key>"', { code: 'invalid_api_key' });
      return reply.code(401).send(error.toBody());
    });
  }

  // Every request that runs the model holds one of these; aborting it cancels that request's work.
  const inFlight = new Set<AbortController>();
  async function withSlot<T>(reply: FastifyReply, work: (signal: AbortSignal) => Promise<T>): Promise<T> {
    if (inFlight.size >= maxConcurrent) {
      throw new ApiError(429, `the server is busy (${maxConcurrent} requests in flight); retry later`, { code: 'rate_limit_exceeded' });
    }
    const controller = new AbortController();
    // 'close' also follows a completed response; only a response not yet finished means the client left.
    const onClose = (): void => {
      if (!reply.raw.writableFinished) controller.abort(new RedflagError('ABORTED', 'the client disconnected'));
    };
    inFlight.add(controller);
    reply.raw.on('close', onClose);
    try {
      return await work(controller.signal);
    } finally {
      reply.raw.off('close', onClose);
      inFlight.delete(controller);
    }
  }
  app.addHook('preClose', async () => {
    // Without this, close() would wait for every running generation to finish.
    for (const controller of inFlight) controller.abort(new RedflagError('DISPOSED', 'the server is shutting down'));
    // Node counts a connection that has not sent a request yet (clients open spares) as busy, not idle,
    // so close() would wait for the client to drop it; after a moment for the cancelled responses, cut them all.
    setTimeout(() => app.server.closeAllConnections(), CLOSE_GRACE_MS).unref();
  });

  app.post('/v1/chat/completions', async (request, reply) => {
    const body = parseBody(chatSchema, request.body);
    return withSlot(reply, async (signal) => {
      const context = { detector, modelName, signal };
      if (body.stream !== true) return completeChat(body, context);
      await streamChat(body, context, reply);
      return reply;
    });
  });

  app.post('/v1/moderations', async (request, reply) => {
    const body = parseBody(moderationSchema, request.body);
    const prompt = options.moderationPrompt ?? 'Continue.';
    return withSlot(reply, (signal) => moderate(body.input, { detector, modelName, prompt, signal }));
  });

  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: modelName, object: 'model', created, owned_by: 'redflag' }],
  }));

  app.get('/health', async () => ({ status: 'ok', ...detector.stats() }));

  return app;
}
