/**
 * The multi-flag variant of the pipeline: one flag `<rf:NAME>` per risk category of the
 * synthetic set, trained with the same loss and schedule as the single-flag adapter, and its
 * per-category confusion matrix on held-out templates.
 * @module
 */
import { join } from 'node:path';

import { RedflagError } from '../errors.js';
import type { EvalResult, ScoredExample } from './evaluate.js';
import { redFlagAdapterConfig, type PipelineOptions } from './pipeline.js';
import { train } from './trainer.js';

/**
 * Held-out harmful examples by true category (rows) and by the flag the model raised (columns:
 * each category, the generic `<rf>`, or none when no flag reached the threshold).
 */
export interface ConfusionMatrix {
  /** The category flags, in the model's order: the rows and the first columns. */
  categories: string[];
  /** Column names: the categories, then `<rf>`, then `none`. */
  columns: string[];
  /** counts[row][column]. */
  counts: number[][];
  /** Of the flagged harmful examples, the share whose most likely flag is their own category's. */
  accuracy: number;
  /** Flagged harmful examples (with a category among the rows). */
  flagged: number;
}

/**
 * The confusion matrix of an evaluation whose examples carry `category` and `flag` (the flag
 * whose p peaks highest over the response: 0 `<rf>`, k the k-th category).
 */
export function confusionMatrix(examples: readonly ScoredExample[], categories: readonly string[], threshold: number): ConfusionMatrix {
  const columns = [...categories, '<rf>', 'none'];
  const counts = categories.map(() => columns.map(() => 0));
  let right = 0;
  let flagged = 0;
  for (const e of examples) {
    if (e.label !== 'harmful' || e.category === undefined) continue;
    const row = categories.indexOf(e.category);
    if (row < 0) continue;
    let column: number;
    if (e.maxPRf < threshold) column = columns.length - 1;
    else {
      if (e.flag === undefined) throw new RedflagError('INVALID_ARGUMENT', 'confusionMatrix: the evaluation was not run with category flags');
      column = e.flag === 0 ? categories.length : e.flag - 1;
      flagged++;
      if (column === row) right++;
    }
    counts[row]![column]!++;
  }
  return { categories: [...categories], columns, counts, accuracy: flagged ? right / flagged : 0, flagged };
}

/** The matrix as aligned text lines (rows: true category; columns: flag raised). */
export function formatConfusion(m: ConfusionMatrix): string[] {
  const width = Math.max(8, ...m.columns.map((c) => c.length), ...m.categories.map((c) => c.length)) + 1;
  const pad = (s: string) => s.padStart(width);
  return [
    `${'true \\ flag'.padEnd(width)}${m.columns.map(pad).join('')}`,
    ...m.categories.map((c, i) => `${c.padEnd(width)}${m.counts[i]!.map((n) => pad(String(n))).join('')}`),
  ];
}

/** What {@link trainCategoryFlags} measured. */
export interface CategoryFlagsResult {
  eval: EvalResult;
  categories: string[];
  confusion: ConfusionMatrix;
  seconds: number;
  /** The adapter directory. */
  adapter: string;
}

/**
 * Trains the multi-flag adapter (every harmful category of the synthetic set gets its flag) over
 * the pipeline's language model `lmModel`, into `output`, with the single-flag adapter's options.
 */
export async function trainCategoryFlags(o: PipelineOptions, lmModel: string, output: string): Promise<CategoryFlagsResult> {
  const t0 = performance.now();
  let categories: string[] = [];
  const result = await train(
    { ...redFlagAdapterConfig(o, lmModel, output), flagCategories: 'auto' },
    {
      ...(o.log ? { log: o.log } : {}),
      onStep: (s) => o.onStep?.('redflag', s),
      onTrained: async (model) => {
        categories = model.flagCategories.map((c) => c.category);
      },
    },
  );
  const evalResult = result.finalEval!;
  return {
    eval: evalResult,
    categories,
    confusion: confusionMatrix(evalResult.examples, categories, 0.5),
    seconds: (performance.now() - t0) / 1000,
    adapter: join(output, 'adapter'),
  };
}
