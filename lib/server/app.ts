/**
 * The OpenAI-compatible HTTP server around a {@link Detector}: chat and text completions
 * (streamed or not) with red-flag scores, moderations, the model list, health (readiness and liveness) and
 * Prometheus metrics. Create it with {@link createServer} (or {@link buildServer}, which also
 * gives its drain and metrics registry) and `listen` yourself, or let `serve` (serve.ts) do both.
 * @module
 */
import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';

import Fastify, { LogController, type FastifyInstance, type FastifyRequest } from 'fastify';
import type { Registry } from 'prom-client';

import { DEFAULT_MAX_TOKENS } from '../detect/detector.js';
import type { Detector } from '../detect/types.js';
import { RedflagError } from '../errors.js';
import { DISCARD_FACTOR, isBodyTooLarge, limitBody } from './body-limit.js';
import { completeChat, streamChat } from './chat.js';
import { COMPLETION_DEFAULT_MAX_TOKENS, complete, streamCompletion } from './completions.js';
import { ApiError, parseBody, toApiError } from './http-errors.js';
import { ServerLifecycle, type DrainResult, type ServerState } from './lifecycle.js';
import { ServerMetrics } from './metrics.js';
import { moderate } from './moderations.js';
import { RequestTrace } from './request-trace.js';
import { chatRequestSchema, completionRequestSchema, moderationRequestSchema, type RequestLimits } from './schemas.js';
import { unixSeconds } from './shapes.js';

export type { DrainResult, ServerState } from './lifecycle.js';

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
  /** Most completion and moderation requests in flight; more are answered 429. Default 64. */
  maxConcurrent?: number;
  /** The user turn that moderation strings answer when scored as responses. Default `'Continue.'`. */
  moderationPrompt?: string;
  /**
   * Logging (pino, JSON lines): one line per request (see README, Server) and server errors.
   * `true` writes to stdout; `{ stream }` to that stream. Default false.
   */
  logger?: boolean | { stream: { write(line: string): void } };
  /** Adds each request's prompt and answer to its log line. Default false: they may be personal or harmful. */
  logContent?: boolean;
}

/** A server not listening yet, with what `serve` needs to run it. */
export interface RedflagServer {
  app: FastifyInstance;
  /** The server's own Prometheus registry, served at `/metrics`. */
  registry: Registry;
  /** `loading` until the detector is ready, then `ok`; `draining` once a drain began; `failed` if loading failed. */
  readonly state: ServerState;
  /**
   * Stops taking new requests (503, `Connection: close`), lets running ones finish for up to `ms`
   * milliseconds, then cancels the rest. Does not close the server.
   */
  drain(ms: number): Promise<DrainResult>;
}

/** How long close() lets cancelled responses finish before it drops every connection. */
const CLOSE_GRACE_MS = 500;

/** Routes still answered while draining: probes and scrapes must see the drain. */
const ANSWERED_WHILE_DRAINING = new Set(['/health', '/health/live', '/metrics']);

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  const n = value ?? fallback;
  if (!Number.isInteger(n) || n < 1) throw new RedflagError('INVALID_ARGUMENT', `${name} must be an integer >= 1, got ${n}`);
  return n;
}

/** Rethrows a request too long for the model as a 400 naming the route's field (toApiError names chat's messages). */
function tooLongIs(param: string): (error: unknown) => never {
  return (error) => {
    if (error instanceof RedflagError && error.code === 'TOO_LARGE') throw new ApiError(400, error.message, { param, code: 'context_length_exceeded' });
    throw error;
  };
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

/** Creates the server (not listening yet). */
export function createServer(detector: Detector | PromiseLike<Detector>, options: ServerOptions): FastifyInstance {
  return buildServer(detector, options).app;
}

/**
 * Creates the server (not listening yet), with its drain and metrics. `detector` may be a
 * promise: the server can listen while the model loads, answering 503 `model_loading` on the
 * model's routes and `{ status: 'loading' }` on `/health` until it resolves.
 */
export function buildServer(detector: Detector | PromiseLike<Detector>, options: ServerOptions): RedflagServer {
  if (typeof options.modelName !== 'string' || options.modelName === '') {
    throw new RedflagError('INVALID_ARGUMENT', 'modelName must be a non-empty string');
  }
  if (options.apiKey === '') throw new RedflagError('INVALID_ARGUMENT', 'apiKey must not be empty (omit it to serve without a key)');
  const limits: RequestLimits = {
    maxTokens: positiveInteger('maxTokensLimit', options.maxTokensLimit, 4096),
    maxMessages: positiveInteger('maxMessages', options.maxMessages, 256),
  };
  const maxConcurrent = positiveInteger('maxConcurrent', options.maxConcurrent, 64);
  const bodyLimit = positiveInteger('bodyLimit', options.bodyLimit, 1024 * 1024);
  const chatSchema = chatRequestSchema(limits);
  const completionSchema = completionRequestSchema(limits);
  const moderationSchema = moderationRequestSchema(limits);
  const modelName = options.modelName;
  const logContent = options.logContent === true;
  const created = unixSeconds();

  const app = Fastify({
    logger: options.logger === true ? { level: 'info' } : options.logger ? { level: 'info', stream: options.logger.stream } : false,
    // Our own line per request (request-trace.ts) replaces Fastify's two; every line carries the request's `id`.
    logController: new LogController({ disableRequestLogging: true, requestIdLogLabel: 'id' }),
    genReqId: () => randomUUID(),
    // Fastify refuses at once only what is past the discard cap; limitBody answers the rest after reading it.
    bodyLimit: bodyLimit * DISCARD_FACTOR,
  });
  const lifecycle = new ServerLifecycle(detector, maxConcurrent, (error) => app.log.error({ err: error }, 'the model failed to load'));
  const metrics = new ServerMetrics(() => lifecycle.detector?.stats() ?? null);

  const traces = new WeakMap<FastifyRequest, RequestTrace>();
  const traceOf = (request: FastifyRequest): RequestTrace => {
    let trace = traces.get(request);
    if (!trace) traces.set(request, (trace = new RequestTrace(metrics)));
    return trace;
  };
  // First hook: every request is counted and logged, refused ones included. 'close' follows
  // the end of every response, complete or cut short (Fastify's onResponse misses the latter).
  app.addHook('onRequest', async (request, reply) => {
    const trace = traceOf(request);
    reply.raw.once('close', () => request.log.info(trace.end(request, reply, logContent), 'request'));
  });

  app.setErrorHandler((error, request, reply) => {
    const apiError = toApiError(error);
    traceOf(request).error = apiError.code;
    if ((apiError.status >= 500 && apiError.status !== 503) || apiError.code === 'out_of_memory' || apiError.code === 'device_failed') request.log.error({ err: error }, 'request failed');
    if (apiError.status === 429 || apiError.code === 'model_loading' || apiError.code === 'out_of_memory') void reply.header('retry-after', '1');
    // The body was read (or is past the cap): nothing more of this request is worth reading.
    if (isBodyTooLarge(apiError)) void reply.header('connection', 'close');
    return reply.code(apiError.status).send(apiError.toBody());
  });
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0] ?? '';
    const error = new ApiError(404, `Unknown request URL: ${request.method} ${path}`, { code: 'unknown_url' });
    traceOf(request).error = error.code;
    return reply.code(404).send(error.toBody());
  });

  if (options.apiKey !== undefined) {
    // Digests have equal lengths whatever was sent, so timingSafeEqual never short-cuts on length.
    const expected = sha256(options.apiKey);
    app.addHook('onRequest', async (request, reply) => {
      const given = /^Bearer\s+(.+)$/i.exec(request.headers.authorization ?? '')?.[1]?.trim() ?? '';
      if (timingSafeEqual(sha256(given), expected)) return;
      const error = new ApiError(401, 'Incorrect or missing API key: pass it as "Authorization: Bearer <key>"', { code: 'invalid_api_key' });
      traceOf(request).error = error.code;
      return reply.code(401).send(error.toBody());
    });
  }

  app.addHook('onRequest', async (request, reply) => {
    if (!lifecycle.draining || ANSWERED_WHILE_DRAINING.has(request.routeOptions.url ?? '')) return;
    const error = new ApiError(503, 'the server is shutting down', { code: 'unavailable' });
    traceOf(request).error = error.code;
    return reply.code(503).header('connection', 'close').send(error.toBody());
  });

  app.addHook('preParsing', async (_request, _reply, payload) => limitBody(payload, bodyLimit));

  app.addHook('preClose', async () => {
    // Without this, close() would wait for every running generation to finish.
    lifecycle.cancelAll('the server is shutting down');
    // Node counts a connection that has not sent a request yet (clients open spares) as busy, not idle,
    // so close() would wait for the client to drop it; after a moment for the cancelled responses, cut them all.
    setTimeout(() => app.server.closeAllConnections(), CLOSE_GRACE_MS).unref();
  });

  // A request for another model is refused, as OpenAI and vLLM do: a client pointed at the wrong
  // server learns it instead of being answered by a model it did not ask for.
  const modelNotFound = (model: string) =>
    new ApiError(404, `the model ${JSON.stringify(model)} does not exist: this server serves ${JSON.stringify(modelName)}`, { param: 'model', code: 'model_not_found' });
  const checkModel = (model: string): void => {
    if (model !== modelName) throw modelNotFound(model);
  };

  app.post('/v1/chat/completions', async (request, reply) => {
    const detector = lifecycle.requireDetector();
    const body = parseBody(chatSchema, request.body);
    checkModel(body.model);
    // No length asked: the detector's default, within the server's limit.
    if (body.max_tokens == null && body.max_completion_tokens == null) body.max_tokens = Math.min(DEFAULT_MAX_TOKENS, limits.maxTokens);
    const trace = traceOf(request);
    if (logContent) trace.prompt = body.messages;
    return lifecycle.withSlot(reply, async (signal) => {
      const context = { detector, modelName, signal, observer: trace };
      if (body.stream !== true) return completeChat(body, context);
      await streamChat(body, context, reply);
      return reply;
    });
  });

  app.post('/v1/completions', async (request, reply) => {
    const detector = lifecycle.requireDetector();
    const body = parseBody(completionSchema, request.body);
    checkModel(body.model);
    // OpenAI's default length for text completions, within the server's limit.
    body.max_tokens ??= Math.min(COMPLETION_DEFAULT_MAX_TOKENS, limits.maxTokens);
    const trace = traceOf(request);
    trace.api = 'text';
    if (logContent) trace.prompt = body.prompt;
    return lifecycle
      .withSlot(reply, async (signal) => {
        const context = { detector, modelName, signal, observer: trace };
        if (body.stream !== true) return complete(body, context);
        await streamCompletion(body, context, reply);
        return reply;
      })
      .catch(tooLongIs('prompt'));
  });

  app.post('/v1/moderations', async (request, reply) => {
    const detector = lifecycle.requireDetector();
    const body = parseBody(moderationSchema, request.body);
    const prompt = options.moderationPrompt ?? 'Continue.';
    if (logContent) traceOf(request).prompt = body.input;
    const result = await lifecycle.withSlot(reply, (signal) => moderate(body.input, body.score_as ?? 'both', { detector, modelName, prompt, signal })).catch(tooLongIs('input'));
    traceOf(request).moderationFlagged = result.results.some((r) => r.flagged);
    return result;
  });

  const modelObject = { id: modelName, object: 'model', created, owned_by: 'redflag' };
  app.get('/v1/models', async () => ({ object: 'list', data: [modelObject] }));
  // A wildcard: model ids may hold slashes (`meta-llama/Llama-3.2-1B`).
  app.get('/v1/models/*', async (request) => {
    const id = (request.params as { '*': string })['*'];
    if (id !== modelName) throw modelNotFound(id);
    return modelObject;
  });

  // Readiness: 200 only while the model serves; load balancers stop sending on 503.
  app.get('/health', async (_request, reply) => {
    const state = lifecycle.state;
    const stats = lifecycle.detector?.stats() ?? {};
    return reply.code(state === 'ok' ? 200 : 503).send({ status: state, ...stats });
  });
  // Liveness: the process answers HTTP (whatever the model does).
  app.get('/health/live', async () => ({ status: 'alive' }));

  app.get('/metrics', async (_request, reply) => reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()));

  return {
    app,
    registry: metrics.registry,
    get state() {
      return lifecycle.state;
    },
    drain: (ms) => lifecycle.drain(ms),
  };
}
