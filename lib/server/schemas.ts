/**
 * The request bodies the server accepts, as zod schemas built from the server's limits.
 * Fields OpenAI defines that redflag does not use (penalties, `user`, `metadata`, ...) are
 * accepted and ignored, as OpenAI-compatible servers commonly do, so existing clients keep
 * working; `null` counts as absent because OpenAI's own clients send it. Fields whose request
 * an answer could not honour (tools, a JSON response format, logit biases) are refused by name:
 * ignoring them would answer another question with a 200.
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
  // OpenAI's `developer` is its newer name for `system` (what a chat template knows).
  role: z.enum(['system', 'developer', 'user', 'assistant'], { error: 'must be "system", "developer", "user" or "assistant" (tool messages are not supported)' }),
  content: z.union([z.string(), z.array(textPart)], {
    error: 'must be a string or an array of { type: "text", text } parts',
  }),
});

/** A field that must be absent (or null), or the request is refused naming it. */
const unsupported = (what: string) => z.null({ error: `${what} is not supported` }).optional();

/** A field that may only hold its "nothing asked" values (`accepts`), else the request is refused. */
const onlyDefault = (what: string, accepts: (value: unknown) => boolean) =>
  z.unknown().refine((value) => value === undefined || value === null || accepts(value), { error: `${what} is not supported` }).optional();

/** The sampling and streaming fields chat and text completions share. */
function generationFields(limits: RequestLimits) {
  return {
    model: z.string(),
    max_tokens: maxTokensField(limits),
    temperature: z.number().min(0).max(2).nullish(),
    top_p: z.number().gt(0).max(1).nullish(),
    seed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).nullish(),
    // Empty stop strings stop nothing: dropped, as OpenAI ignores them.
    stop: z
      .union([z.string(), z.array(z.string()).max(4)], { error: 'must be a string or an array of up to 4 strings' })
      .nullish()
      .transform((stop) => (stop == null ? stop : (typeof stop === 'string' ? [stop] : stop).filter((s) => s !== ''))),
    n: z.literal(1, { error: 'only n = 1 is supported' }).nullish(),
    stream: z.boolean().nullish(),
    stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
    logit_bias: onlyDefault('logit_bias', (v) => typeof v === 'object' && Object.keys(v as object).length === 0),
  };
}

function maxTokensField(limits: RequestLimits) {
  return z
    .number()
    .int()
    .min(1)
    .max(limits.maxTokens, { error: `must be at most ${limits.maxTokens} (the server's limit)` })
    .nullish();
}

/** The schema of a `POST /v1/chat/completions` body. */
export function chatRequestSchema(limits: RequestLimits) {
  return z.object({
    ...generationFields(limits),
    messages: z
      .array(message)
      .min(1, { error: 'must contain at least one message' })
      .max(limits.maxMessages, { error: `must contain at most ${limits.maxMessages} messages (the server's limit)` }),
    max_completion_tokens: maxTokensField(limits),
    logprobs: z.boolean().nullish(),
    top_logprobs: z.number().int().min(0).max(20).nullish(),
    // vLLM's extension: chat-template variables for this request (Qwen3's enable_thinking).
    chat_template_kwargs: z.record(z.string(), z.unknown()).nullish(),
    tools: onlyDefault('tools (function calling)', (v) => Array.isArray(v) && v.length === 0),
    tool_choice: onlyDefault('tool_choice', (v) => v === 'none' || v === 'auto'),
    functions: unsupported('functions (function calling)'),
    function_call: onlyDefault('function_call', (v) => v === 'none' || v === 'auto'),
    response_format: onlyDefault('response_format other than { "type": "text" }', (v) => typeof v === 'object' && (v as { type?: unknown }).type === 'text'),
    modalities: onlyDefault('modalities other than ["text"]', (v) => Array.isArray(v) && v.every((m) => m === 'text')),
    audio: unsupported('audio'),
    prediction: unsupported('prediction'),
    web_search_options: unsupported('web_search_options'),
  });
}

export type ChatRequest = z.infer<ReturnType<typeof chatRequestSchema>>;

/**
 * The schema of a `POST /v1/completions` body (OpenAI's legacy text completions): one prompt,
 * as a string or an array of one string; prompts of token ids, `suffix`, and `best_of` above 1
 * are refused by name rather than ignored, since ignoring them would answer another question.
 */
export function completionRequestSchema(limits: RequestLimits) {
  return z.object({
    ...generationFields(limits),
    prompt: z.preprocess(
      (value) => (Array.isArray(value) && value.length === 1 && typeof value[0] === 'string' ? value[0] : value),
      z.string({
        error: (issue) =>
          Array.isArray(issue.input) && issue.input.length > 1 && issue.input.every((p) => typeof p === 'string')
            ? 'only one prompt per request is supported'
            : Array.isArray(issue.input) && issue.input.length > 0 && issue.input.every((p) => typeof p === 'number' || Array.isArray(p))
              ? 'prompts of token ids are not supported: send the text'
              : 'must be a string (or an array of one string)',
      }).min(1, { error: 'must not be empty' }),
    ),
    logprobs: z.number().int().min(0).max(20).nullish(),
    echo: z.boolean().nullish(),
    suffix: unsupported('suffix'),
    best_of: z.literal(1, { error: 'only best_of = 1 is supported' }).nullish(),
  });
}

export type CompletionRequest = z.infer<ReturnType<typeof completionRequestSchema>>;

/** How `/v1/moderations` scores an input: as a user request, as an assistant answer, or both. */
export const SCORE_AS = ['request', 'response', 'both'] as const;
export type ScoreAs = (typeof SCORE_AS)[number];

/** A moderation input: strings, or one conversation. */
export type ModerationInput = { texts: string[]; conversation?: never } | { conversation: Message[]; texts?: never };

/**
 * The schema of a `POST /v1/moderations` body. `input` is OpenAI's string or array of strings,
 * or its multimodal form (text parts of one input, joined by newlines; images refused), or (an
 * extension Llama Guard users know) one conversation: an array of chat messages, scored
 * over its last message in context. `score_as` (an extension) chooses the scores reported.
 */
export function moderationRequestSchema(limits: RequestLimits) {
  const texts = z
    .array(z.string(), { error: 'must be a string, an array of strings or an array of chat messages' })
    .min(1, { error: 'must contain at least one string' })
    .max(limits.maxMessages, { error: `must contain at most ${limits.maxMessages} strings (the server's limit)` });
  const conversation = z
    .array(message)
    .max(limits.maxMessages, { error: `must contain at most ${limits.maxMessages} messages (the server's limit)` })
    .refine((messages) => messages.at(-1)?.role !== 'system', { error: 'a conversation must end with a user or an assistant message' });
  const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);
  // OpenAI's multimodal input (omni-moderation): content parts, `{ type, ... }`, of one input.
  const isParts = (value: unknown) => Array.isArray(value) && isObject(value[0]) && 'type' in value[0] && !('role' in value[0]);
  const isConversation = (value: unknown) => Array.isArray(value) && isObject(value[0]);
  const parts = z.array(z.object({ type: z.literal('text', { error: 'only text parts can be scored (an image cannot)' }), text: z.string() }));
  return z.object({
    model: z.string().nullish(),
    // A single string is a one-element list. The input's shape picks its schema (an array whose
    // first element is an object is a conversation), so errors name the exact string or message
    // instead of a union's "invalid input".
    input: z.preprocess((value) => (typeof value === 'string' ? [value] : value), z.unknown()).transform((value, ctx): ModerationInput => {
      const forward = (issues: readonly z.core.$ZodIssue[]) => {
        for (const issue of issues) ctx.addIssue(issue as Parameters<typeof ctx.addIssue>[0]);
        return z.NEVER;
      };
      if (isParts(value)) {
        const result = parts.safeParse(value);
        return result.success ? { texts: [result.data.map((p) => p.text).join('\n')] } : forward(result.error.issues);
      }
      if (isConversation(value)) {
        const result = conversation.safeParse(value);
        return result.success ? { conversation: toMessages(result.data) } : forward(result.error.issues);
      }
      const result = texts.safeParse(value);
      return result.success ? { texts: result.data } : forward(result.error.issues);
    }),
    score_as: z.enum(SCORE_AS, { error: 'must be "request", "response" or "both"' }).nullish(),
  });
}

export type ModerationRequest = z.infer<ReturnType<typeof moderationRequestSchema>>;

/** OpenAI's message content, flattened to the text the chat template takes. */
export function toMessages(messages: ChatRequest['messages']): Message[] {
  return messages.map((entry) => ({
    role: entry.role === 'developer' ? 'system' : entry.role,
    // Parts joined by newlines, as vLLM does, so words of adjacent parts do not run together.
    content: typeof entry.content === 'string' ? entry.content : entry.content.map((part) => part.text).join('\n'),
  }));
}
