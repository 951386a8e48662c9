/**
 * Adding the red-flag token `<rf>` to a loaded model: the tokenizer gains (or reuses) a
 * special token, and the input embedding and LM head gain a row for it, initialised so the
 * model's behaviour on existing text does not change.
 * @module
 */
import { RedflagError } from '../errors.js';
import type { Model } from './model.js';
import { CATEGORY_NAME, categoryFlagToken, chooseRedFlagToken, type CategoryFlag, type RedFlagTokenChoice } from './red-flag-token.js';
import { fromFloat32, rowsToFloat32, toFloat32, withRowsSet, type RawTensor } from './safetensors.js';
import type { Tokenizer } from './tokenizer.js';

/** How the new embedding row (and LM-head row, when untied) starts. */
export type RedFlagInit =
  /** The mean of the existing rows (default; what transformers' `mean_resizing` centres on). */
  | 'mean'
  /** All zeros. */
  | 'zeros'
  /** A copy of an existing token's row. */
  | { copyFrom: number };

/** Options of {@link addRedFlagToken}. */
export interface AddRedFlagTokenOptions {
  /** The token's text. Default `<rf>`. */
  token?: string;
  /** Reuse a reserved special token (e.g. Llama-3's `<|reserved_special_token_N|>`) instead of growing the vocabulary. Default true. */
  reuseReserved?: boolean;
  /** Initial embedding row. Default `'mean'`. */
  init?: RedFlagInit;
  /**
   * Risk categories that get a flag of their own, `<rf:NAME>` (e.g. `['cyber', 'weapons']`),
   * added after `<rf>` in this order; `<rf>` stays the flag of harmful content without a
   * category. Default none.
   */
  categories?: readonly string[];
}

export type { CategoryFlag } from './red-flag-token.js';

/** What {@link addRedFlagToken} did. */
export interface RedFlagTokenInfo {
  /** The red-flag token's id. */
  id: number;
  /** Its text. */
  content: string;
  /** True when an existing reserved token was renamed rather than a new one added. */
  reused: boolean;
  /** Vocabulary size (embedding rows) after the change. */
  vocabSize: number;
  /** The category flags, in order (empty without `categories`). */
  categories: CategoryFlag[];
}

/**
 * Builds the new embedding-like matrix: old rows, grown to `rows`, with rows `ids` initialised.
 * Only the rows read for the initial values are converted to f32 (a chunk at a time for the
 * mean); the others are copied bit for bit.
 */
function withRows(tensor: RawTensor, rows: number, ids: readonly number[], init: RedFlagInit): RawTensor {
  // An F64 checkpoint's matrix is kept as F32 from here on.
  const matrix = tensor.dtype === 'F64' ? fromFloat32(toFloat32(tensor), tensor.shape, 'F32') : tensor;
  const [oldRows, width] = matrix.shape as [number, number];
  let row: Float32Array = new Float32Array(width);
  if (init === 'mean') {
    // Mean over the original rows, excluding the rows being replaced when they are reused.
    const replaced = new Set(ids);
    const acc = new Float64Array(width);
    let n = 0;
    const chunk = 4096;
    for (let first = 0; first < oldRows; first += chunk) {
      const count = Math.min(chunk, oldRows - first);
      const values = rowsToFloat32(matrix, first, count);
      for (let r = 0; r < count; r++) {
        if (replaced.has(first + r)) continue;
        for (let j = 0; j < width; j++) acc[j]! += values[r * width + j]!;
        n++;
      }
    }
    row = Float32Array.from(acc, (v) => v / Math.max(n, 1));
  } else if (typeof init === 'object') {
    const from = init.copyFrom;
    if (!Number.isInteger(from) || from < 0 || from >= oldRows) {
      throw new RedflagError('INVALID_ARGUMENT', `init.copyFrom must be a token id below ${oldRows}, got ${from}`);
    }
    row = rowsToFloat32(matrix, from, 1);
  }
  const values = new Float32Array(ids.length * width);
  ids.forEach((_, k) => values.set(row, k * width));
  return withRowsSet(matrix, rows, ids, values);
}

/**
 * Adds `<rf>` and the category flags `<rf:NAME>` to a tokenizer, in that order (reusing a
 * reserved special token where `options.reuseReserved` allows): the ids the model's new rows get.
 */
export function addFlagTokens(
  tokenizer: Tokenizer,
  options: Pick<AddRedFlagTokenOptions, 'token' | 'categories' | 'reuseReserved'> = {},
): { choice: RedFlagTokenChoice; flags: CategoryFlag[] } {
  const categories = [...(options.categories ?? [])];
  for (const [i, c] of categories.entries()) {
    if (typeof c !== 'string' || !CATEGORY_NAME.test(c)) {
      throw new RedflagError('INVALID_ARGUMENT', `categories[${i}] must be 1-64 letters, digits, "_", "-" or ".", got ${JSON.stringify(c)}`);
    }
    if (categories.indexOf(c) !== i) throw new RedflagError('INVALID_ARGUMENT', `categories lists "${c}" twice`);
    // The server reports the overall verdict under this name.
    if (c === 'red_flag') throw new RedflagError('INVALID_ARGUMENT', 'categories: "red_flag" is reserved for the overall flag');
  }
  const reuse = options.reuseReserved !== undefined ? { reuseReserved: options.reuseReserved } : {};
  const choice = chooseRedFlagToken(tokenizer, { ...(options.token !== undefined ? { token: options.token } : {}), ...reuse });
  const flags: CategoryFlag[] = categories.map((category) => ({ category, id: chooseRedFlagToken(tokenizer, { token: categoryFlagToken(category), ...reuse }).id }));
  return { choice, flags };
}

/**
 * Adds `<rf>` (and with `options.categories` one `<rf:NAME>` per risk category) to the model
 * and its tokenizer. The new (or reused) embedding rows, and LM-head rows when the head is not
 * tied, are initialised by `options.init`; tied heads stay tied. The change lives in memory
 * until {@link Model.save} writes the model back in HF format.
 */
export async function addRedFlagToken(
  model: Model,
  tokenizer: Tokenizer | null = model.tokenizer,
  options: AddRedFlagTokenOptions = {},
): Promise<RedFlagTokenInfo> {
  if (!tokenizer) {
    throw new RedflagError('NO_TOKENIZER', `${model.dir} has no tokenizer.json; the red-flag token needs a tokenizer`);
  }
  const init = options.init ?? 'mean';
  if (init !== 'mean' && init !== 'zeros' && !(typeof init === 'object' && init !== null && 'copyFrom' in init)) {
    throw new RedflagError('INVALID_ARGUMENT', `init must be 'mean', 'zeros' or { copyFrom: id }`);
  }
  const { choice, flags } = addFlagTokens(tokenizer, options);
  const ids = [choice.id, ...flags.map((f) => f.id)];
  // Checkpoints often have more embedding rows than tokens (padding rows): a new token id
  // may already have a row, and then the matrices keep their size.
  const rows = Math.max(model.config.vocabSize, ...ids.map((id) => id + 1));
  const targets = [{ engine: 'embed', name: model.plan.embedName }];
  if (model.plan.lmHeadName) targets.push({ engine: 'lm_head', name: model.plan.lmHeadName });
  const grown = await Promise.all(
    targets.map(async (t) => ({ ...t, tensor: withRows(await model.readTensor(t.name), rows, ids, init) })),
  );
  for (const g of grown) model.overrides.set(g.name, g.tensor);
  model.setVocabSize(rows);
  for (const g of grown) await model.loadEngineTensor(g.engine, [g.name], false);
  model.redFlagTokenId = choice.id;
  model.flagCategories = flags;
  return { id: choice.id, content: choice.content, reused: choice.reused, vocabSize: rows, categories: flags };
}
