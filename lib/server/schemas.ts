/**
 * The request bodies the server accepts, as zod schemas built from the server's limits.
 * Fields OpenAI defines that redflag does not use (penalties, `user`, ...) are accepted and
 * ignored, as OpenAI-compatible servers commonly do, so existing clients keep working; `null`
 * counts as absent because OpenAI's own clients send it.
 * @module
 */
import { z } from 'zod';

import type { Message } from '../data/records.js';

/** The limits the schemas enforce. */
export interface RequestLimits {
  maxTokens: number;
  maxMessages: number;
}

const textPart = z.object({ type: z.literal('text'), text: z.string() });

const message = z.object({
  role: z.enum(['system', 'user', 'assistant']),
  content: z.union([z.string(), z.array(textPart)], {
    error: 'must be a string or an array of { type: "text", text } parts',
  }),
});

/** The schema of a `POST /v1/chat/completions` body. */
export function chatRequestSchema(limits: RequestLimits) {
  const maxTokens = z
    .number()
    .int()
    .min(1)
    .max(limits.maxTokens, { error: `must be at most ${limits.maxTokens} (the server's limit)` })
    .nullish();
  return z.object({
    model: z.string(),
    messages: z
      .array(message)
      .min(1, { error: 'must contain at least one message' })
      .max(limits.maxMessages, { error: `must contain at most ${limits.maxMessages} messages (the server's limit)` }),
    max_tokens: maxTokens,
    max_completion_tokens: maxTokens,
    temperature: z.number().min(0).max(2).nullish(),
    top_p: z.number().gt(0).max(1).nullish(),
    seed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).nullish(),
    stop: z.union([z.string(), z.array(z.string()).max(4)], { error: 'must be a string or an array of up to 4 strings' }).nullish(),
    logprobs: z.boolean().nullish(),
    top_logprobs: z.number().int().min(0).max(20).nullish(),
    n: z.literal(1, { error: 'only n = 1 is supported' }).nullish(),
    stream: z.boolean().nullish(),
    stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
  });
}

export type ChatRequest = z.infer<ReturnType<typeof chatRequestSchema>>;

/** The schema of a `POST /v1/moderations` body (text inputs only). */
export function moderationRequestSchema(limits: RequestLimits) {
  return z.object({
    model: z.string().nullish(),
    // A single string is a one-element list; normalising first keeps the list's own errors precise.
    input: z.preprocess(
      (value) => (typeof value === 'string' ? [value] : value),
      z
        .array(z.string(), { error: 'must be a string or an array of strings' })
        .min(1, { error: 'must contain at least one string' })
        .max(limits.maxMessages, { error: `must contain at most ${limits.maxMessages} strings (the server's limit)` }),
    ),
  });
}

/** OpenAI's message content, flattened to the text the chat template takes. */
export function toMessages(messages: ChatRequest['messages']): Message[] {
  return messages.map((entry) => ({
    role: entry.role,
    // Parts joined by newlines, as vLLM does, so words of adjacent parts do not run together.
    content: typeof entry.content === 'string' ? entry.content : entry.content.map((part) => part.text).join('\n'),
  }));
}
