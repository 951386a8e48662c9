/**
 * Turning a batch of encoded conversations into what one native training step needs: the
 * trained sequences, the reference sequences (the base model's view), and the loss rows.
 *
 * Row r of a sequence's logits predicts token r + 1, so the loss on response token j uses
 * row j − 1. Objectives:
 * - `redflag` (the paper's): benign conversations add KL(π_ref ‖ π_θ) on every assistant
 *   token (each turn of a multi-turn one, `historySpans`, and the response); a harmful
 *   conversation samples a position i in its response (i ≥ start + rfOffset), inserts `<rf>`
 *   before token i, asks for `<rf>` at positions start + rfOffset … i
 *   (aggregated as the loss options say), and adds KL to π_ref on the text without `<rf>` for
 *   the response tokens after the flag. No row ever raises the likelihood of harmful text.
 *   With `rfSamples` S > 1 it samples S positions, one in each of S equal strata of the
 *   response, each with its own group (window), so every part of the answer is asked to flag;
 *   with `rfWindow` W > 0 a window is the W positions ending at its sampled position rather than
 *   everything from start + rfOffset (with `any` aggregation a window from the start is
 *   satisfied by one early flag, so later positions never learn to flag: the answer goes
 *   unflagged once an attacker has prefilled past its opener). `<rf>` is inserted at the
 *   latest sampled position; every window ends at or before it, so its rows see the text
 *   without `<rf>`. With `rfPosition: 'start'` (the paper's Fixed-Pos RF baseline) the flag is
 *   asked for at the first response position only, and `<rf>` inserted there.
 * - `refusal` (the baseline): harmful prompts get cross-entropy to a refusal answer (the
 *   examples carry it as their response); benign conversations the same KL as above.
 * - `lm`: cross-entropy on every response token (language-model training).
 * @module
 */
import type { EncodedConversation } from '../data/encode.js';
import { insertRedFlag } from '../data/encode.js';
import { RedflagError } from '../errors.js';

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
  /** Number of red-flag groups (one per window: `rfSamples` per harmful conversation). */
  groups: number;
  /** The harmful sequences given red-flag rows: their index in `batch` and prompt length (adversarial training perturbs the prompt). */
  flagged: { index: number; promptLength: number }[];
}

/** Rows of each loss term, as the native step averages over them: benign KL rows, red-flag groups, after-flag rows, cross-entropy rows. */
export interface TermCounts {
  benign: number;
  redFlag: number;
  after: number;
  ce: number;
}

/** The rows of each loss term in a step input (red-flag: its distinct groups). */
export function termCounts(input: StepInput): TermCounts {
  const counts: TermCounts = { benign: 0, redFlag: 0, after: 0, ce: 0 };
  const groups = new Set<number>();
  for (let i = 0; i < input.rows.length; i += 5) {
    const kind = input.rows[i]!;
    if (kind === RowKind.BenignKl) counts.benign++;
    else if (kind === RowKind.AfterKl) counts.after++;
    else if (kind === RowKind.Ce) counts.ce++;
    else if (kind === RowKind.RedFlag) groups.add(input.rows[i + 3]!);
  }
  counts.redFlag = groups.size;
  return counts;
}

/**
 * Each micro-batch's share of every term of an accumulated step: its rows over the step's (0
 * where the step has none). The native step averages each term over its own micro-batch's rows,
 * so weighting the term by this share makes the accumulated loss and gradient those of one
 * step on all the micro-batches together, whatever their sizes.
 */
export function accumulationShares(counts: readonly TermCounts[]): TermCounts[] {
  const total = { benign: 0, redFlag: 0, after: 0, ce: 0 };
  for (const c of counts) for (const k of Object.keys(total) as (keyof TermCounts)[]) total[k] += c[k];
  const share = (n: number, of: number) => (of > 0 ? n / of : 0);
  return counts.map((c) => ({ benign: share(c.benign, total.benign), redFlag: share(c.redFlag, total.redFlag), after: share(c.after, total.after), ce: share(c.ce, total.ce) }));
}

/** Whether a harmful example's response has a position at or after `rfOffset` to flag. */
export function flagFits(example: Pick<EncodedConversation, 'responseStart' | 'responseEnd'>, rfOffset: number): boolean {
  return example.responseStart + rfOffset <= example.responseEnd - 1;
}

/** Options of {@link buildStep}. */
export interface BuildStepOptions {
  objective: Objective;
  /** The red-flag token id (objective `redflag`). */
  rfToken?: number;
  /** The flag token a harmful example trains (one flag per risk category); default: rfToken for all. */
  flagOf?: (example: EncodedConversation) => number;
  /** The first response position where the flag may be asked for. */
  rfOffset?: number;
  /** Positions sampled per harmful conversation, one per stratum (integer ≥ 1). Default 1. */
  rfSamples?: number;
  /** Positions in each window, ending at its sampled position; 0 (default): from the first allowed position. */
  rfWindow?: number;
  /** `start`: the flag at the first response position only (Fixed-Pos RF); default `sampled`. */
  rfPosition?: 'sampled' | 'start';
  /** Uniform random numbers in [0, 1) for the flag position. */
  rng: () => number;
}

/** One red-flag group: `<rf>` is asked for at positions `from` … `to` (inclusive). */
export interface FlagWindow {
  from: number;
  to: number;
}

/**
 * The red-flag windows of one harmful response whose flag may be asked for at positions
 * `first` … `end − 1`: `samples` positions, the s-th drawn uniformly from the s-th of `samples`
 * equal strata of that range (strata that come out empty, when the range is shorter than
 * `samples`, are skipped), each ending a window of `window` positions (0: from `first`).
 * Ascending by end; one `rng()` draw per window, so `samples` 1 and `window` 0 draw as the
 * original single-position sampling did.
 */
export function sampleFlagWindows(first: number, end: number, options: { samples?: number; window?: number }, rng: () => number): FlagWindow[] {
  const samples = options.samples ?? 1;
  const window = options.window ?? 0;
  if (!Number.isInteger(samples) || samples < 1) throw new RedflagError('INVALID_ARGUMENT', `loss.rfSamples must be an integer ≥ 1, got ${String(samples)}`);
  if (!Number.isInteger(window) || window < 0) throw new RedflagError('INVALID_ARGUMENT', `loss.rfWindow must be an integer ≥ 0, got ${String(window)}`);
  const span = end - first;
  const out: FlagWindow[] = [];
  for (let s = 0; s < samples; s++) {
    const lo = first + Math.floor((s * span) / samples);
    const hi = first + Math.floor(((s + 1) * span) / samples);
    if (hi <= lo) continue;
    const to = lo + Math.floor(rng() * (hi - lo));
    out.push({ from: window > 0 ? Math.max(first, to - window + 1) : first, to });
  }
  return out;
}

/** Builds the native step input for a batch. */
export function buildStep(examples: readonly EncodedConversation[], options: BuildStepOptions): StepInput {
  const batch: number[][] = [];
  const reference: number[][] = [];
  const rows: number[] = [];
  let rowBase = 0;
  let refBase = 0;
  let groups = 0;
  const flaggedSeqs: StepInput['flagged'] = [];
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
      // Every assistant token: the earlier turns of a multi-turn conversation, then the response.
      for (const [from, to] of ex.historySpans ?? []) for (let j = from; j < to; j++) rows.push(RowKind.BenignKl, rowBase + j - 1, refBase + j - 1, -1, -1);
      for (let j = start; j < end; j++) rows.push(RowKind.BenignKl, rowBase + j - 1, refBase + j - 1, -1, -1);
      rowBase += ex.ids.length;
      refBase += ex.ids.length;
      continue;
    }
    // Harmful, objective redflag.
    if (options.rfToken === undefined) throw new Error('buildStep: the redflag objective needs rfToken');
    // A response too short for a position at or after the offset trains nothing: the flag is
    // never asked for before start + rfOffset.
    if (options.rfPosition !== 'start' && !flagFits(ex, rfOffset)) continue;
    const first = start + rfOffset;
    const windows =
      options.rfPosition === 'start'
        ? [{ from: start, to: start }]
        : sampleFlagWindows(first, end, { samples: options.rfSamples ?? 1, window: options.rfWindow ?? 0 }, options.rng);
    const i = windows[windows.length - 1]!.to;
    const flag = options.flagOf?.(ex) ?? options.rfToken;
    const flagged = insertRedFlag(ex, i - start, flag);
    flaggedSeqs.push({ index: batch.length, promptLength: start });
    batch.push(flagged.ids);
    reference.push(ex.ids);
    // <rf> wanted at each window's positions: row j - 1 predicts position j (rows up to the
    // flag at i see the same text as the original).
    for (const w of windows) {
      const group = groups++;
      for (let j = w.from; j <= w.to; j++) rows.push(RowKind.RedFlag, rowBase + j - 1, -1, group, flag);
    }
    // After the flag: row j of the flagged text and its aligned row in the original predict
    // the same response token; keep the text's distribution where it was.
    for (let j = flagged.rfIndex; j < flagged.ids.length - 1; j++) {
      const r = flagged.referenceRow[j]!;
      if (r >= 0 && r >= start - 1) rows.push(RowKind.AfterKl, rowBase + j, refBase + r, -1, -1);
    }
    rowBase += flagged.ids.length;
    refBase += ex.ids.length;
  }
  return { batch, reference, rows: Int32Array.from(rows), groups, flagged: flaggedSeqs };
}
