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
}

/** The request score: p(<rf>) right after the prompt, before the first answer token. */
function requestScore(result: ClassifyResult): number {
  return result.pRf[0] ?? 0;
}

/** The response score: the largest p(<rf>) after each answer token (absent for an empty answer). */
function responseScore(result: ClassifyResult): number | undefined {
  if (result.pRf.length < 2) return undefined;
  let max = 0;
  for (let i = 1; i < result.pRf.length; i++) max = Math.max(max, result.pRf[i]!);
  return max;
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
      read: ([result]) => [
        {
          ...(wantRequest ? { request: requestScore(result!) } : {}),
          ...(wantResponse && answered ? { response: responseScore(result!) ?? 0 } : {}),
        },
      ],
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
      texts.map((_, i) => ({
        ...(wantRequest ? { request: requestScore(results[i]!) } : {}),
        ...(wantResponse ? { response: responseScore(results[(wantRequest ? texts.length : 0) + i]!) ?? 0 } : {}),
      })),
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
      const categories = Object.fromEntries(Object.entries(categoryScores).map(([name, score]) => [name, score >= threshold]));
      const flagged = redFlag >= threshold;
      return {
        flagged,
        categories: { red_flag: flagged, ...categories },
        category_scores: { red_flag: redFlag, ...categoryScores },
      };
    }),
  };
}
