/**
 * `POST /v1/chat/completions`: one detector generation answered as OpenAI's `chat.completion`,
 * or streamed as `chat.completion.chunk` server-sent events.
 * @module
 */
import type { FastifyReply } from 'fastify';

import type { Message } from '../data/records.js';
import { RedflagError } from '../errors.js';
import type { DetectGenerateOptions, DetectedToken, Detector, DetectionStream, DetectionSummary } from '../detect/types.js';
import { ApiError } from './http-errors.js';
import type { GenerationObserver } from './request-trace.js';
import { toMessages, type ChatRequest } from './schemas.js';
import { contentFilterResults, envelope, logprobEntry, usage, type LogprobEntry } from './shapes.js';
import { streamEvents } from './sse.js';

/** What a chat or text completion request needs besides its body. */
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

/**
 * The detector's options from the sampling fields chat and text completions share; `maxTokens`
 * null leaves the length to the detector's default.
 */
export function generateOptions(
  request: Pick<ChatRequest, 'temperature' | 'top_p' | 'seed' | 'stop'>,
  signal: AbortSignal,
  topLogprobs: number,
  maxTokens: number | null | undefined,
): DetectGenerateOptions {
  const options: DetectGenerateOptions = { signal, topLogprobs };
  // Absent fields are left to the detector's defaults (notably temperature 0, greedy, not OpenAI's 1).
  if (maxTokens != null) options.maxTokens = maxTokens;
  if (request.temperature != null) options.temperature = request.temperature;
  if (request.top_p != null) options.topP = request.top_p;
  if (request.seed != null) options.seed = request.seed;
  if (request.stop != null) options.stop = typeof request.stop === 'string' ? [request.stop] : request.stop;
  return options;
}

/** Starts a generation of a conversation or of raw prompt text. */
export function startGeneration(context: ChatContext, input: Message[] | string, options: DetectGenerateOptions): DetectionStream {
  const stream = context.detector.generate(input, options);
  // `done` rejects with the same error the iteration throws; that one is handled, this one must not go unhandled.
  stream.done.catch(() => {});
  return stream;
}

function startChat(request: ChatRequest, context: ChatContext): DetectionStream {
  const options = generateOptions(request, context.signal, topLogprobCount(request), request.max_completion_tokens ?? request.max_tokens);
  if (request.chat_template_kwargs != null) options.chatTemplateKwargs = request.chat_template_kwargs;
  try {
    return startGeneration(context, toMessages(request.messages), options);
  } catch (error) {
    // The detector names its option; the client sent the wire field.
    if (error instanceof RedflagError && error.code === 'INVALID_ARGUMENT' && error.message.startsWith('chatTemplateKwargs')) {
      throw new ApiError(400, error.message.replace(/^chatTemplateKwargs/, 'chat_template_kwargs'), { param: 'chat_template_kwargs', code: 'invalid_value' });
    }
    throw error;
  }
}

/**
 * Runs a generation to its end, the observer told of every token and `onToken` given each one
 * (a token that shows no text yet, the first part of a character, too: its log-prob entry has
 * empty text and no bytes, and the next token's entry has the whole character, so the entries
 * are one per token and their texts add up to the answer). Returns the summary.
 */
export async function generateToEnd(stream: DetectionStream, observer: GenerationObserver, onToken: (token: DetectedToken) => void): Promise<DetectionSummary> {
  for await (const token of stream) {
    observer.token();
    onToken(token);
  }
  const summary = await stream.done;
  observer.finished(summary);
  return summary;
}

/** Runs the generation to its end and returns the `chat.completion` object. */
export async function completeChat(request: ChatRequest, context: ChatContext) {
  const wantLogprobs = request.logprobs === true;
  const topCount = topLogprobCount(request);
  const logprobs: LogprobEntry[] = [];
  const summary = await generateToEnd(startChat(request, context), context.observer, (token) => {
    if (wantLogprobs) logprobs.push(logprobEntry(token, topCount));
  });
  return {
    ...envelope('chatcmpl', 'chat.completion', context.modelName),
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

/** Streams the generation as `chat.completion.chunk` server-sent events (sse.ts). */
export async function streamChat(request: ChatRequest, context: ChatContext, reply: FastifyReply): Promise<void> {
  const head = envelope('chatcmpl', 'chat.completion.chunk', context.modelName);
  const includeUsage = request.stream_options?.include_usage === true;
  const topCount = topLogprobCount(request);
  const chunk = (choices: unknown[], extra: Record<string, unknown> = {}): string =>
    JSON.stringify({ ...head, choices, ...(includeUsage ? { usage: null } : {}), ...extra });
  // Entries of tokens that showed no text yet ride with the next chunk that has text (or the last).
  let held: LogprobEntry[] = [];
  const logprobsWith = (entries: LogprobEntry[]) => (request.logprobs === true && entries.length > 0 ? { content: entries, refusal: null } : null);
  await streamEvents(startChat(request, context), context.observer, reply, {
    start: () => [chunk([{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }])],
    token: (token) => {
      if (request.logprobs === true) held.push(logprobEntry(token, topCount));
      if (token.text === '') return null;
      const logprobs = logprobsWith(held);
      held = [];
      return chunk([{ index: 0, delta: { content: token.text }, logprobs, finish_reason: null }]);
    },
    end: (summary) => [
      chunk([{ index: 0, delta: {}, logprobs: logprobsWith(held), finish_reason: summary.finishReason, content_filter_results: contentFilterResults(summary) }]),
      ...(includeUsage ? [chunk([], { usage: usage(summary) })] : []),
    ],
  });
}
