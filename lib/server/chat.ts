/**
 * `POST /v1/chat/completions`: one detector generation answered as OpenAI's `chat.completion`,
 * or streamed as `chat.completion.chunk` server-sent events.
 * @module
 */
import type { ServerResponse } from 'node:http';

import type { FastifyBaseLogger, FastifyReply } from 'fastify';

import type { DetectGenerateOptions, Detector, DetectionStream } from '../detect/types.js';
import { ApiError, toApiError } from './http-errors.js';
import type { GenerationObserver } from './request-trace.js';
import { toMessages, type ChatRequest } from './schemas.js';
import { contentFilterResults, logprobEntry, responseId, unixSeconds, usage, type LogprobEntry } from './shapes.js';

/** What a chat request needs besides its body. */
export interface ChatContext {
  detector: Detector;
  modelName: string;
  /** Aborted when the client disconnects or the server closes. */
  signal: AbortSignal;
  /** Hears each token and the summary (metrics, the request's log line). */
  observer: GenerationObserver;
}

/** How many top alternatives the request wants per token (0 when none, or when logprobs are off). */
function topLogprobCount(request: ChatRequest): number {
  if (request.top_logprobs != null && request.logprobs !== true) {
    throw new ApiError(400, 'top_logprobs: requires logprobs to be true', { param: 'top_logprobs', code: 'invalid_value' });
  }
  return request.logprobs === true ? (request.top_logprobs ?? 0) : 0;
}

function generateOptions(request: ChatRequest, signal: AbortSignal): DetectGenerateOptions {
  const options: DetectGenerateOptions = { signal, topLogprobs: topLogprobCount(request) };
  // Absent fields are left to the detector's defaults (notably temperature 0, greedy, not OpenAI's 1).
  const maxTokens = request.max_completion_tokens ?? request.max_tokens;
  if (maxTokens != null) options.maxTokens = maxTokens;
  if (request.temperature != null) options.temperature = request.temperature;
  if (request.top_p != null) options.topP = request.top_p;
  if (request.seed != null) options.seed = request.seed;
  if (request.stop != null) options.stop = typeof request.stop === 'string' ? [request.stop] : request.stop;
  return options;
}

function startGeneration(request: ChatRequest, context: ChatContext): DetectionStream {
  const stream = context.detector.generate(toMessages(request.messages), generateOptions(request, context.signal));
  // `done` rejects with the same error the iteration throws; that one is handled, this one must not go unhandled.
  stream.done.catch(() => {});
  return stream;
}

/** Runs the generation to its end and returns the `chat.completion` object. */
export async function completeChat(request: ChatRequest, context: ChatContext) {
  const stream = startGeneration(request, context);
  const wantLogprobs = request.logprobs === true;
  const topCount = topLogprobCount(request);
  const logprobs: LogprobEntry[] = [];
  for await (const token of stream) {
    context.observer.token();
    // Empty-text tokens (`<rf>`, part of a character) add nothing a user sees; their entries would not add up to the content.
    if (wantLogprobs && token.text !== '') logprobs.push(logprobEntry(token, topCount));
  }
  const summary = await stream.done;
  context.observer.finished(summary);
  return {
    id: responseId('chatcmpl'),
    object: 'chat.completion' as const,
    created: unixSeconds(),
    model: context.modelName,
    system_fingerprint: null,
    choices: [
      {
        index: 0,
        message: { role: 'assistant' as const, content: summary.text, refusal: null },
        logprobs: wantLogprobs ? { content: logprobs, refusal: null } : null,
        finish_reason: summary.finishReason,
        content_filter_results: contentFilterResults(summary),
      },
    ],
    usage: usage(summary),
  };
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
export async function streamChat(request: ChatRequest, context: ChatContext, reply: FastifyReply): Promise<void> {
  const stream = startGeneration(request, context);
  const tokens = stream[Symbol.asyncIterator]();
  let next = await tokens.next();
  if (!next.done) context.observer.token();

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

  const id = responseId('chatcmpl');
  const created = unixSeconds();
  const includeUsage = request.stream_options?.include_usage === true;
  const topCount = topLogprobCount(request);
  const chunk = (choices: unknown[], extra: Record<string, unknown> = {}): string =>
    JSON.stringify({
      id,
      object: 'chat.completion.chunk',
      created,
      model: context.modelName,
      system_fingerprint: null,
      choices,
      ...(includeUsage ? { usage: null } : {}),
      ...extra,
    });

  try {
    await writeEvent(res, chunk([{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]));
    while (!next.done) {
      const token = next.value;
      if (token.text !== '') {
        const logprobs = request.logprobs === true ? { content: [logprobEntry(token, topCount)], refusal: null } : null;
        await writeEvent(res, chunk([{ index: 0, delta: { content: token.text }, logprobs, finish_reason: null }]));
      }
      next = await tokens.next();
      if (!next.done) context.observer.token();
    }
    const summary = await stream.done;
    context.observer.finished(summary);
    await writeEvent(res, chunk([{
      index: 0,
      delta: {},
      logprobs: null,
      finish_reason: summary.finishReason,
      content_filter_results: contentFilterResults(summary),
    }]));
    if (includeUsage) await writeEvent(res, chunk([], { usage: usage(summary) }));
    await writeEvent(res, '[DONE]');
    res.end();
  } catch (error) {
    // Stops a generation still running when the failure was ours (a write), not the detector's.
    stream.cancel();
    reportStreamError(error, res, reply.log, context.observer);
  }
}

function reportStreamError(error: unknown, res: ServerResponse, log: FastifyBaseLogger, observer: GenerationObserver): void {
  const apiError = toApiError(error);
  observer.failed(apiError.code);
  if (apiError.status >= 500 && apiError.status !== 503) log.error({ err: error }, 'chat completion stream failed');
  if (res.destroyed || res.writableEnded) return;
  res.end(`data: ${JSON.stringify(apiError.toBody())}\n\n`);
}
