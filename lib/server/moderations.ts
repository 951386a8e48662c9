/**
 * `POST /v1/moderations`: each input is scored as an assistant response to a fixed user prompt,
 * teacher-forced (the detector reads the text, it does not generate), and the largest p(`<rf>`)
 * over its tokens is the `red_flag` category score.
 * @module
 */
import type { Detector } from '../detect/types.js';
import { responseId } from './shapes.js';

export interface ModerationContext {
  detector: Detector;
  modelName: string;
  /** The user turn the inputs answer. */
  prompt: string;
  signal: AbortSignal;
}

export async function moderate(inputs: readonly string[], context: ModerationContext) {
  const conversations = inputs.map((text) => [
    { role: 'user' as const, content: context.prompt },
    { role: 'assistant' as const, content: text },
  ]);
  const scores = await context.detector.classify(conversations, { signal: context.signal });
  return {
    id: responseId('modr'),
    model: context.modelName,
    results: scores.map((score) => ({
      flagged: score.flagged,
      categories: { red_flag: score.flagged },
      category_scores: { red_flag: score.maxPRf },
    })),
  };
}
