/**
 * Token-by-token generation on one sequence: prefill the prompt, then decode one token
 * per native call (the fused step that picks the token natively), streaming `{ token, text }`.
 * @module
 */
import { randomInt } from 'node:crypto';

import { RedflagError, abortError } from '../errors.js';
import { checkPickOptions, type Model, type PickOptions } from './model.js';
import { StopFilter } from './stop-filter.js';
import { IncrementalDecoder } from './tokenizer.js';

/**
 * Options of {@link Model.generate}: sampling (`temperature`, `topK`, `topP`, `seed`, as in
 * {@link PickOptions}; the seed defaults to a random one) and when to stop.
 */
export interface GenerateOptions extends PickOptions {
  /** Most tokens to generate. Default 128. */
  maxTokens?: number;
  /** Generation ends when the text contains one of these (it is not included). */
  stop?: string[];
  /** Token ids that end generation. Default: the model's EOS ids. */
  eosTokenIds?: number[];
  /** Cancels generation: the iterator then throws the signal's reason. */
  signal?: AbortSignal;
}

/** One generated token and the text it adds (may be empty while a character is incomplete). */
export interface GeneratedToken {
  token: number;
  text: string;
}

function checkOptions(options: GenerateOptions) {
  const maxTokens = options.maxTokens ?? 128;
  if (!Number.isInteger(maxTokens) || maxTokens < 0) {
    throw new RedflagError('INVALID_ARGUMENT', `generate: maxTokens must be a non-negative integer, got ${maxTokens}`);
  }
  const stop = options.stop ?? [];
  // Text that may be the start of a stop string is held back; a token is yielded only once
  // all of its text is decided. (The filter checks the stop strings.)
  const filter = new StopFilter<GeneratedToken>(stop, 'generate: stop');
  const pick = checkPickOptions({ ...options, seed: options.seed ?? randomInt(2 ** 31) }, 'generate');
  return { maxTokens, stop, filter, pick };
}

/** See {@link Model.generate}. */
export async function* generate(
  model: Model,
  prompt: Uint32Array | number[] | string,
  options: GenerateOptions = {},
): AsyncGenerator<GeneratedToken> {
  const opts = checkOptions(options);
  const { signal } = options;
  const tokenizer = model.tokenizer;
  if (typeof prompt === 'string' || opts.stop.length > 0) {
    if (!tokenizer) {
      throw new RedflagError('NO_TOKENIZER', `${model.dir} has no tokenizer.json: pass token ids and no stop strings`);
    }
  }
  const ids = typeof prompt === 'string' ? tokenizer!.encode(prompt) : Array.from(prompt);
  const eos = new Set(options.eosTokenIds ?? model.eosTokenIds);
  const decoder = tokenizer ? new IncrementalDecoder(tokenizer) : null;
  const sequence = model.newSequence();
  const { filter } = opts;
  try {
    if (opts.maxTokens === 0) return;
    let next: number[] = ids;
    for (let step = 0; step < opts.maxTokens; step++) {
      if (signal?.aborted) throw abortError(signal);
      // The fused native step: the token is picked where the logits are, none cross to JS.
      const token = (await model.step([sequence], [next], [opts.pick], { rfToken: -1, scores: false, signal })).tokens[0]!;
      if (eos.has(token)) break;
      const text = decoder ? decoder.push(token) : '';
      const { ready, stopped } = filter.push({ token, text }, decoder?.holding ?? false);
      yield* ready;
      if (stopped) return;
      next = [token];
    }
    // Generation ended (EOS or maxTokens): nothing can complete a stop string any more.
    yield* filter.flush(decoder ? decoder.flush() : '').ready;
  } finally {
    sequence.dispose();
  }
}
