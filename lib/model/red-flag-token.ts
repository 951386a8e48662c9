/**
 * The tokenizer side of adding the red-flag token `<rf>`: choosing its id and making the
 * tokenizer map `<rf>` to that id. The embedding side (giving the id a row) is done by
 * `addRedFlagToken` in red-flag.ts, using {@link RedFlagTokenChoice}.
 *
 * @module
 */
import { RedflagError } from '../errors.js';
import type { AddedTokenEntry, Tokenizer } from './tokenizer.js';

/** The red-flag token's text. */
export const RED_FLAG_TOKEN = '<rf>';

/** A risk category's flag token: `<rf:NAME>`. */
export function categoryFlagToken(category: string): string {
  return `<rf:${category}>`;
}

/** A risk category's flag token. */
export interface CategoryFlag {
  /** The category's name (the token is `<rf:NAME>`). */
  category: string;
  /** The token's id. */
  id: number;
}

/** A category name a flag token may carry: letters, digits, `_`, `-` and `.`, at most 64. */
export const CATEGORY_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/**
 * A data set's category as a flag category name: lower case, runs of anything but letters,
 * digits, `_`, `-` and `.` as one `_`, at most 64 characters (HarmBench's
 * `chemical_biological` stays itself; "Hate speech" becomes `hate_speech`). Null when nothing
 * is left.
 */
export function flagCategoryName(raw: string): string | null {
  const name = raw.trim().toLowerCase().replace(/[^a-z0-9_.-]+/g, '_').replace(/^_+|_+$/g, '').slice(0, 64);
  return CATEGORY_NAME.test(name) ? name : null;
}

/** The category of a `<rf:NAME>` token, or null for any other text. */
export function flagTokenCategory(content: string): string | null {
  const m = /^<rf:([^>]+)>$/.exec(content);
  return m !== null && CATEGORY_NAME.test(m[1]!) ? m[1]! : null;
}

/**
 * Names of tokens that model authors reserve for later use, most preferred first. Each
 * pattern's number orders candidates: the lowest unused one is taken.
 * - `<|reserved_special_token_N|>`: Llama 3.x (ids 128002..128255, untrained).
 * - `<|reserved_N|>`, `<|reserved_token_N|>`: generic variants used by several chat models.
 * - `<unusedN>`: Gemma. `[control_N]`: Mistral v3 SentencePiece tokenizers.
 */
export const RESERVED_TOKEN_PATTERNS: readonly RegExp[] = [
  /^<\|reserved_special_token_(\d+)\|>$/,
  /^<\|reserved_(\d+)\|>$/,
  /^<\|reserved_token_(\d+)\|>$/,
  /^<unused(\d+)>$/,
  /^\[control_(\d+)\]$/,
];

/** Options for {@link chooseRedFlagToken}. */
export interface ChooseRedFlagTokenOptions {
  /** The token's text. Default {@link RED_FLAG_TOKEN}. */
  token?: string;
  /**
   * Reuse an unused reserved special token when the tokenizer has one, keeping the vocabulary
   * (and embedding matrix) size. Default true.
   */
  reuseReserved?: boolean;
}

/** What {@link chooseRedFlagToken} did. */
export interface RedFlagTokenChoice {
  /** The red-flag token's id. */
  id: number;
  /** Its text (e.g. `<rf>`). */
  content: string;
  /** True when an existing id was used: the token already existed, or a reserved token was renamed. */
  reused: boolean;
  /** True when a new id was appended: the tokenizer's vocabulary grew by one. */
  added: boolean;
  /** The reserved token that was renamed to the red-flag token, or null. */
  replacedToken: string | null;
  /** {@link Tokenizer.vocabSize} before the change. */
  vocabSizeBefore: number;
  /** {@link Tokenizer.vocabSize} after the change (vocabSizeBefore + 1 exactly when `added`). */
  vocabSizeAfter: number;
}

/**
 * Tokens in use even if their names say "reserved": the special tokens the config names
 * (some fine-tunes make a reserved token their pad token) and any token the chat template
 * writes.
 */
function tokensInUse(tokenizer: Tokenizer): Set<string> {
  const used = new Set(Object.values(tokenizer.specialTokensMap));
  const template = tokenizer.chatTemplate;
  if (template !== null) {
    for (const token of tokenizer.addedTokens()) if (template.includes(token.content)) used.add(token.content);
  }
  return used;
}

/**
 * The reserved token to reuse: the first pattern of {@link RESERVED_TOKEN_PATTERNS} that
 * matches any added token, and among its matches the lowest number that is not in use.
 */
export function findReservedToken(tokenizer: Tokenizer): AddedTokenEntry | null {
  const used = tokensInUse(tokenizer);
  const added = tokenizer.addedTokens();
  for (const pattern of RESERVED_TOKEN_PATTERNS) {
    let best: { token: AddedTokenEntry; index: number } | null = null;
    for (const token of added) {
      const match = pattern.exec(token.content);
      if (match === null || used.has(token.content)) continue;
      const index = Number(match[1]);
      if (best === null || index < best.index) best = { token, index };
    }
    if (best !== null) return best.token;
  }
  return null;
}

/**
 * Makes the tokenizer map `token` (default `<rf>`) to one id, as a special token, and says how:
 * 1. if the token already exists, it is reused (and marked special);
 * 2. else, with `reuseReserved` (default), the lowest unused reserved token (Llama 3's
 *    `<|reserved_special_token_N|>`, see {@link RESERVED_TOKEN_PATTERNS}) is renamed to it in
 *    tokenizer.json and tokenizer_config.json: the vocabulary size is kept, so the embedding
 *    matrices keep their shape; the reserved token's embedding row is untrained, so the caller
 *    should initialise it as it would a new row;
 * 3. else a new special token is appended (id = previous vocabulary size).
 *
 * Afterwards `encode(token)` gives `[id]` (after any BOS) and `decode([id])` gives `token`.
 */
export function chooseRedFlagToken(tokenizer: Tokenizer, options: ChooseRedFlagTokenOptions = {}): RedFlagTokenChoice {
  const content = options.token ?? RED_FLAG_TOKEN;
  if (typeof content !== 'string' || content.length === 0 || content.trim() !== content) {
    throw new RedflagError('INVALID_ARGUMENT', `the red-flag token must be a non-empty string without surrounding whitespace, got ${JSON.stringify(content)}`);
  }
  const vocabSizeBefore = tokenizer.vocabSize;
  const result = (id: number, reused: boolean, replacedToken: string | null): RedFlagTokenChoice => ({
    id,
    content,
    reused,
    added: tokenizer.vocabSize > vocabSizeBefore,
    replacedToken,
    vocabSizeBefore,
    vocabSizeAfter: tokenizer.vocabSize,
  });

  if (tokenizer.tokenToId(content) !== undefined) return result(tokenizer.addSpecialToken(content), true, null);
  if (options.reuseReserved ?? true) {
    const reserved = findReservedToken(tokenizer);
    if (reserved !== null) {
      tokenizer.renameSpecialToken(reserved.id, content);
      return result(reserved.id, true, reserved.content);
    }
  }
  return result(tokenizer.addSpecialToken(content), false, null);
}
