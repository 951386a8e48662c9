/**
 * The pieces of OpenAI's response objects the server builds from detector output.
 * @module
 */
import { randomUUID } from 'node:crypto';

import type { DetectedToken, DetectionSummary } from '../detect/types.js';

/** An id with OpenAI's prefix (`chatcmpl-`, `modr-`) and 32 random hex digits. */
export function responseId(prefix: string): string {
  return `${prefix}-${randomUUID().replaceAll('-', '')}`;
}

/** Seconds since the epoch, as OpenAI's `created` fields are. */
export function unixSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/**
 * OpenAI's fields around a completion's choices (`chat.completion`, `text_completion` and their
 * stream chunks): `id` with the API's prefix, `object`, `created`, `model`. Made once per answer,
 * so every chunk of a stream carries the same id and time.
 */
export function envelope(prefix: 'chatcmpl' | 'cmpl', object: string, model: string) {
  return { id: responseId(prefix), object, created: unixSeconds(), model, system_fingerprint: null };
}

export interface TokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
}

export interface LogprobEntry extends TokenLogprob {
  top_logprobs: TokenLogprob[];
}

function tokenLogprob(text: string, logprob: number): TokenLogprob {
  return { token: text, logprob, bytes: [...Buffer.from(text, 'utf8')] };
}

/** One `logprobs.content` entry; `topCount` trims what the detector returned to what was asked. */
export function logprobEntry(token: DetectedToken, topCount: number): LogprobEntry {
  return {
    ...tokenLogprob(token.text, token.logprob),
    top_logprobs: (token.topLogprobs ?? []).slice(0, topCount).map((top) => tokenLogprob(top.text, top.logprob)),
  };
}

/**
 * redflag's verdict on a choice, where Azure OpenAI puts its content filter's: `filtered` when the
 * answer was cut off by the flag, `detected` when the flag was raised at all, and the largest
 * p(`<rf>`) seen as the score. A model with category flags adds one entry per category (Azure's
 * shape: one object per category): `detected` for the category whose flag was the most likely
 * where the flag was raised, `filtered` when that cut the answer off, and the largest p of the
 * category's flag as its score.
 */
export function contentFilterResults(summary: DetectionSummary) {
  const filtered = summary.finishReason === 'content_filter';
  const out: Record<string, { filtered: boolean; detected: boolean; score: number }> = {
    red_flag: { filtered, detected: summary.flagged, score: summary.maxPRf },
  };
  for (const [category, score] of Object.entries(summary.categoryScores ?? {})) {
    const named = summary.category === category;
    out[category] = { filtered: filtered && named, detected: named, score };
  }
  return out;
}

export function usage(summary: DetectionSummary) {
  return {
    prompt_tokens: summary.promptTokens,
    completion_tokens: summary.completionTokens,
    total_tokens: summary.promptTokens + summary.completionTokens,
  };
}
