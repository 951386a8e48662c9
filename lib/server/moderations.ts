/**
 * `POST /v1/moderations`: teacher-forced red-flag scores (the detector reads the text, it does
 * not generate). Two scores, because a red-flag model flags from the request as much as from
 * the answer:
 * - `red_flag/request`: p(`<rf>`) at the start of the answer, before any answer token, i.e. the
 *   flag the model would raise if asked this;
 * - `red_flag/response`: the largest p(`<rf>`) over the answer's tokens, after each of them.
 *
 * A string input is scored as a user request (alone in the conversation) and as an assistant
 * answer to a fixed user turn (`prompt`, "Continue."); a conversation input (an array of chat
 * messages) is scored in context: the request score after its last user turn, the response
 * score over its last message when that is the assistant's. `score_as` keeps one of the two.
 * `red_flag` is the largest score reported, and an input is flagged when it reaches the
 * detector's threshold.
 * @module
 */
import type { Message } from '../data/records.js';
import type { ClassifyResult, Detector } from '../detect/types.js';
import { ApiError } from './http-errors.js';
import type { ModerationInput, ScoreAs } from './schemas.js';
import { responseId } from './shapes.js';

export interface ModerationContext {
  detector: Detector;
  modelName: string;
  /** The user turn that string inputs answer when scored as responses. */
  prompt: string;
  signal: AbortSignal;
}

/** The scores of one input; a score that does not apply is absent. */
interface InputScores {
  request?: number;
  response?: number;
  /** With category flags: each category's largest flag p over the scores that apply. */
  categories?: Record<string, number>;
}

/** The request score: p(<rf>) right after the prompt, before the first answer token. */
function requestScore(p: Float32Array): number {
  return p[0] ?? 0;
}

/** The response score: the largest p(<rf>) after each answer token (absent for an empty answer). */
function responseScore(p: Float32Array): number | undefined {
  if (p.length < 2) return undefined;
  let max = 0;
  for (let i = 1; i < p.length; i++) max = Math.max(max, p[i]!);
  return max;
}

/** The category scores of the parts of results that apply (request: position 0; response: the rest). */
function categoryScores(parts: { result: ClassifyResult; request: boolean; response: boolean }[]): Record<string, number> | undefined {
  const first = parts[0]?.result.categoryScores;
  if (first === undefined) return undefined;
  const out: Record<string, number> = {};
  for (const name of Object.keys(first)) {
    let max = 0;
    for (const { result, request, response } of parts) {
      const p = result.categoryScores![name]!;
      if (request) max = Math.max(max, requestScore(p));
      if (response) max = Math.max(max, responseScore(p) ?? 0);
    }
    out[name] = max;
  }
  return out;
}

/** The conversations to classify for `input`, and how to read each input's scores from them. */
function plan(input: ModerationInput, scoreAs: ScoreAs, prompt: string): { conversations: Message[][]; read: (results: ClassifyResult[]) => InputScores[] } {
  const wantRequest = scoreAs !== 'response';
  const wantResponse = scoreAs !== 'request';
  if (input.conversation) {
    const messages = input.conversation;
    const answered = messages.at(-1)?.role === 'assistant';
    if (scoreAs === 'response' && !answered) {
      throw new ApiError(400, 'input: score_as "response" needs a conversation that ends with an assistant message', { param: 'score_as', code: 'invalid_value' });
    }
    return {
      conversations: [messages],
      read: ([result]) => {
        const categories = categoryScores([{ result: result!, request: wantRequest, response: wantResponse && answered }]);
        return [
          {
            ...(wantRequest ? { request: requestScore(result!.pRf) } : {}),
            ...(wantResponse && answered ? { response: responseScore(result!.pRf) ?? 0 } : {}),
            ...(categories ? { categories } : {}),
          },
        ];
      },
    };
  }
  const texts = input.texts;
  const conversations: Message[][] = [];
  if (wantRequest) for (const text of texts) conversations.push([{ role: 'user', content: text }]);
  if (wantResponse) {
    for (const text of texts) conversations.push([{ role: 'user', content: prompt }, { role: 'assistant', content: text }]);
  }
  return {
    conversations,
    read: (results) =>
      texts.map((_, i) => {
        const asRequest = wantRequest ? results[i]! : undefined;
        const asResponse = wantResponse ? results[(wantRequest ? texts.length : 0) + i]! : undefined;
        const categories = categoryScores([
          ...(asRequest ? [{ result: asRequest, request: true, response: false }] : []),
          ...(asResponse ? [{ result: asResponse, request: false, response: true }] : []),
        ]);
        return {
          ...(asRequest ? { request: requestScore(asRequest.pRf) } : {}),
          ...(asResponse ? { response: responseScore(asResponse.pRf) ?? 0 } : {}),
          ...(categories ? { categories } : {}),
        };
      }),
  };
}

export async function moderate(input: ModerationInput, scoreAs: ScoreAs, context: ModerationContext) {
  const { conversations, read } = plan(input, scoreAs, context.prompt);
  const results = await context.detector.classify(conversations, { signal: context.signal });
  const threshold = context.detector.threshold;
  return {
    id: responseId('modr'),
    model: context.modelName,
    results: read(results).map((scores) => {
      const categoryScores: Record<string, number> = {};
      if (scores.request !== undefined) categoryScores['red_flag/request'] = scores.request;
      if (scores.response !== undefined) categoryScores['red_flag/response'] = scores.response;
      const redFlag = Math.max(...Object.values(categoryScores));
      const categories: Record<string, boolean> = Object.fromEntries(Object.entries(categoryScores).map(([name, score]) => [name, score >= threshold]));
      const flagged = redFlag >= threshold;
      // Category flags: each category's largest p; a flagged input is put in the category whose
      // flag is the most likely (the one the model names; the total p decides whether it is flagged).
      if (scores.categories) {
        const entries = Object.entries(scores.categories);
        const top = entries.reduce<[string, number] | null>((best, e) => (best === null || e[1] > best[1] ? e : best), null);
        for (const [name, score] of entries) {
          categoryScores[name] = score;
          categories[name] = flagged && top !== null && top[0] === name && score > 0;
        }
      }
      return {
        flagged,
        categories: { red_flag: flagged, ...categories },
        category_scores: { red_flag: redFlag, ...categoryScores },
      };
    }),
  };
}
