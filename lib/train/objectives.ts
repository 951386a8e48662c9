/**
 * Turning a batch of encoded conversations into what one native training step needs: the
 * trained sequences, the reference sequences (the base model's view), and the loss rows.
 *
 * Row r of a sequence's logits predicts token r + 1, so the loss on response token j uses
 * row j − 1. Objectives:
 * - `redflag` (the paper's): benign conversations add KL(π_ref ‖ π_θ) on every response
 *   token; a harmful conversation samples a position i in its response (i ≥ start + rfOffset),
 *   inserts `<rf>` before token i, asks for `<rf>` at positions start + rfOffset … i
 *   (aggregated as the loss options say), and adds KL to π_ref on the text without `<rf>` for
 *   the response tokens after the flag. No row ever raises the likelihood of harmful text.
 * - `refusal` (the baseline): harmful prompts get cross-entropy to a refusal answer (the
 *   examples carry it as their response); benign conversations the same KL as above.
 * - `lm`: cross-entropy on every response token (language-model training).
 * @module
 */
import type { EncodedConversation } from '../data/encode.js';
import { insertRedFlag } from '../data/encode.js';

/** The loss kinds the native step understands (native/model/train.h LossRow::Kind). */
export const enum RowKind {
  BenignKl = 0,
  RedFlag = 1,
  AfterKl = 2,
  Ce = 3,
}

/** Which loss a training run optimises. */
export type Objective = 'redflag' | 'refusal' | 'lm';

/** One native step's input. */
export interface StepInput {
  /** Trained sequences. */
  batch: number[][];
  /** Reference sequences (base model, adapter off). */
  reference: number[][];
  /** Loss rows, 5 integers each: kind, row, reference row, group, target. */
  rows: Int32Array;
  /** Number of harmful conversations (red-flag groups). */
  groups: number;
}

/** Options of {@link buildStep}. */
export interface BuildStepOptions {
  objective: Objective;
  /** The red-flag token id (objective `redflag`). */
  rfToken?: number;
  /** The first response position where the flag may be asked for. */
  rfOffset?: number;
  /** Uniform random numbers in [0, 1) for the flag position. */
  rng: () => number;
}

/** Builds the native step input for a batch. */
export function buildStep(examples: readonly EncodedConversation[], options: BuildStepOptions): StepInput {
  const batch: number[][] = [];
  const reference: number[][] = [];
  const rows: number[] = [];
  let rowBase = 0;
  let refBase = 0;
  let groups = 0;
  const rfOffset = options.rfOffset ?? 0;

  for (const ex of examples) {
    const start = ex.responseStart;
    const end = ex.responseEnd;
    if (end <= start || start === 0) continue; // nothing to score (no response, or no token before it)

    if (options.objective === 'lm' || (options.objective === 'refusal' && ex.label === 'harmful')) {
      batch.push(ex.ids);
      for (let j = start; j < end; j++) rows.push(RowKind.Ce, rowBase + j - 1, -1, -1, ex.ids[j]!);
      rowBase += ex.ids.length;
      continue;
    }
    if (ex.label === 'benign') {
      batch.push(ex.ids);
      reference.push(ex.ids);
      for (let j = start; j < end; j++) rows.push(RowKind.BenignKl, rowBase + j - 1, refBase + j - 1, -1, -1);
      rowBase += ex.ids.length;
      refBase += ex.ids.length;
      continue;
    }
    // Harmful, objective redflag.
    if (options.rfToken === undefined) throw new Error('buildStep: the redflag objective needs rfToken');
    const first = Math.min(start + rfOffset, end - 1);
    const i = first + Math.floor(options.rng() * (end - first));
    const flagged = insertRedFlag(ex, i - start, options.rfToken);
    const group = groups++;
    batch.push(flagged.ids);
    reference.push(ex.ids);
    // <rf> wanted at positions first..i: row j - 1 predicts position j (rows before the flag
    // see the same text as the original).
    for (let j = first; j <= i; j++) rows.push(RowKind.RedFlag, rowBase + j - 1, -1, group, options.rfToken);
    // After the flag: row j of the flagged text and its aligned row in the original predict
    // the same response token; keep the text's distribution where it was.
    for (let j = flagged.rfIndex; j < flagged.ids.length - 1; j++) {
      const r = flagged.referenceRow[j]!;
      if (r >= 0 && r >= start - 1) rows.push(RowKind.AfterKl, rowBase + j, refBase + r, -1, -1);
    }
    rowBase += flagged.ids.length;
    refBase += ex.ids.length;
  }
  return { batch, reference, rows: Int32Array.from(rows), groups };
}
