/**
 * The schema of a data file entry in the training and evaluation configs: the file and the
 * loader options it is read with (lib/data/loaders.ts `LoadOptions`).
 * @module
 */
import { z } from 'zod';

export const dataFileSchema = z.strictObject({
  /** Path of a .jsonl, .json or .csv file. */
  file: z.string().min(1),
  /** Label of every row; without it each row's `label` / `harmful` field (or the format's own labels). */
  label: z.enum(['harmful', 'benign']).optional(),
  format: z.enum(['jsonl', 'json', 'csv']).optional(),
  promptColumn: z.string().min(1).optional(),
  responseColumn: z.string().min(1).optional(),
  labelColumn: z.string().min(1).optional(),
  categoryColumn: z.string().min(1).optional(),
  /** The key of the array of rows in a JSON object file (e.g. `completions`). */
  recordsKey: z.string().min(1).optional(),
  /** A system message put first in every conversation of the file that has none. */
  systemPrompt: z.string().optional(),
});
