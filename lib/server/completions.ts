/**
 * `POST /v1/completions`: OpenAI's legacy text completions, the API serving benchmarks (vLLM's,
 * for one) speak. The prompt is raw text, continued without a chat template; the answer carries
 * the same red-flag verdict as a chat completion's.
 * @module
 */
import type { FastifyReply } from 'fastify';

import type { DetectedToken } from '../detect/types.js';
import { generateOptions, generateToEnd, startGeneration, type ChatContext } from './chat.js';
import { ApiError } from './http-errors.js';
import type { CompletionRequest } from './schemas.js';
import { contentFilterResults, envelope, usage } from './shapes.js';
import { streamEvents } from './sse.js';

/** OpenAI's default length for text completions (chat completions have none); the route applies it. */
export const COMPLETION_DEFAULT_MAX_TOKENS = 16;

/** The legacy `logprobs` object: one entry per shown token, in parallel arrays. */
interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: number[];
  /** Per token: the `logprobs` most likely alternatives' texts and log-probs, plus the chosen token's. */
  top_logprobs: Record<string, number>[];
  /** Per token: where its text starts in the choice's `text` (UTF-16 code units, as JavaScript counts). */
  text_offset: number[];
}

function checkRequest(request: CompletionRequest): void {
  if (request.echo === true && request.logprobs != null) {
    throw new ApiError(400, 'echo: prompt log-probs are not supported; leave out echo or logprobs', { param: 'echo', code: 'invalid_value' });
  }
}

function start(request: CompletionRequest, context: ChatContext) {
  checkRequest(request);
  const options = generateOptions(request, context.signal, request.logprobs ?? 0, request.max_tokens);
  return startGeneration(context, request.prompt, options);
}

/** Collects the legacy log-probs of the tokens shown, their offsets counted from `offset`. */
class LogprobsBuilder {
  readonly #top: number;
  #offset: number;

  constructor(top: number, offset: number) {
    this.#top = top;
    this.#offset = offset;
  }

  /** The entry of tokens that show text (`<rf>` and partial characters add none). */
  add(into: CompletionLogprobs, token: DetectedToken): void {
    const top: Record<string, number> = {};
    // Several ids may share a text; the first (likeliest) one's log-prob is kept.
    for (const alt of (token.topLogprobs ?? []).slice(0, this.#top)) if (!(alt.text in top)) top[alt.text] = alt.logprob;
    if (!(token.text in top)) top[token.text] = token.logprob;
    into.tokens.push(token.text);
    into.token_logprobs.push(token.logprob);
    into.top_logprobs.push(top);
    into.text_offset.push(this.#offset);
    this.#offset += token.text.length;
  }
}

const emptyLogprobs = (): CompletionLogprobs => ({ tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] });

/** Runs the generation to its end and returns the `text_completion` object. */
export async function complete(request: CompletionRequest, context: ChatContext) {
  const echo = request.echo === true ? request.prompt : '';
  const logprobs = request.logprobs != null ? emptyLogprobs() : null;
  const builder = new LogprobsBuilder(request.logprobs ?? 0, echo.length);
  const summary = await generateToEnd(start(request, context), context.observer, (token) => {
    if (logprobs !== null) builder.add(logprobs, token);
  });
  return {
    ...envelope('cmpl', 'text_completion', context.modelName),
    choices: [
      {
        index: 0,
        text: echo + summary.text,
        logprobs,
        finish_reason: summary.finishReason,
        content_filter_results: contentFilterResults(summary),
      },
    ],
    usage: usage(summary),
  };
}

/** Streams the generation as `text_completion` server-sent events (sse.ts). */
export async function streamCompletion(request: CompletionRequest, context: ChatContext, reply: FastifyReply): Promise<void> {
  const stream = start(request, context);
  const head = envelope('cmpl', 'text_completion', context.modelName);
  const includeUsage = request.stream_options?.include_usage === true;
  const echo = request.echo === true ? request.prompt : '';
  const builder = new LogprobsBuilder(request.logprobs ?? 0, echo.length);
  let held: CompletionLogprobs | null = null;
  const chunk = (choices: unknown[], extra: Record<string, unknown> = {}): string =>
    JSON.stringify({ ...head, choices, ...(includeUsage ? { usage: null } : {}), ...extra });
  await streamEvents(stream, context.observer, reply, {
    start: () => (echo === '' ? [] : [chunk([{ index: 0, text: echo, logprobs: null, finish_reason: null }])]),
    token: (token) => {
      // Tokens that showed no text yet are in the next chunk's log-probs (or the last's).
      if (request.logprobs != null) builder.add((held ??= emptyLogprobs()), token);
      if (token.text === '') return null;
      const logprobs = held;
      held = null;
      return chunk([{ index: 0, text: token.text, logprobs, finish_reason: null }]);
    },
    end: (summary) => [
      chunk([{ index: 0, text: '', logprobs: held, finish_reason: summary.finishReason, content_filter_results: contentFilterResults(summary) }]),
      ...(includeUsage ? [chunk([], { usage: usage(summary) })] : []),
    ],
  });
}
