/**
 * Token-by-token generation on one sequence: prefill the prompt, then decode one token
 * per native call, streaming `{ token, text }`.
 * @module
 */
import { randomInt } from 'node:crypto';

import { RedflagError, abortError } from '../errors.js';
import type { Model } from './model.js';
import { createRng, sampleToken } from './sampling.js';
import { IncrementalDecoder } from './tokenizer.js';

/** Options of {@link Model.generate}. */
export interface GenerateOptions {
  /** Most tokens to generate. Default 128. */
  maxTokens?: number;
  /** 0 = greedy. Default 0. */
  temperature?: number;
  /** Sample from the k most likely tokens (0 = no limit). Default 0. */
  topK?: number;
  /** Nucleus sampling threshold in (0, 1]. Default 1. */
  topP?: number;
  /** Seed of the sampler; the same seed gives the same tokens. Default: random. */
  seed?: number;
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

function checkOptions(options: GenerateOptions): Required<Omit<GenerateOptions, 'signal' | 'eosTokenIds' | 'seed'>> & {
  seed: number;
} {
  const maxTokens = options.maxTokens ?? 128;
  const temperature = options.temperature ?? 0;
  const topK = options.topK ?? 0;
  const topP = options.topP ?? 1;
  const seed = options.seed ?? randomInt(2 ** 31);
  const stop = options.stop ?? [];
  const bad = (msg: string) => new RedflagError('INVALID_ARGUMENT', `generate: ${msg}`);
  if (!Number.isInteger(maxTokens) || maxTokens < 0) throw bad(`maxTokens must be a non-negative integer, got ${maxTokens}`);
  if (!(temperature >= 0) || !Number.isFinite(temperature)) throw bad(`temperature must be >= 0, got ${temperature}`);
  if (!Number.isInteger(topK) || topK < 0) throw bad(`topK must be a non-negative integer, got ${topK}`);
  if (!(topP > 0 && topP <= 1)) throw bad(`topP must be in (0, 1], got ${topP}`);
  if (!Number.isInteger(seed)) throw bad(`seed must be an integer, got ${seed}`);
  if (!Array.isArray(stop) || stop.some((s) => typeof s !== 'string' || s.length === 0)) {
    throw bad('stop must be an array of non-empty strings');
  }
  return { maxTokens, temperature, topK, topP, seed, stop };
}

/** Length of the longest suffix of text that is a proper prefix of some stop string. */
function heldBackLength(text: string, stops: string[]): number {
  let hold = 0;
  for (const s of stops) {
    for (let n = Math.min(s.length - 1, text.length); n > hold; n--) {
      if (text.endsWith(s.slice(0, n))) {
        hold = n;
        break;
      }
    }
  }
  return hold;
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
  const rng = createRng(opts.seed);
  const decoder = tokenizer ? new IncrementalDecoder(tokenizer) : null;
  const sequence = model.newSequence();
  // Tokens whose text is not shown yet: text that may be the start of a stop string is held
  // back, and a token is yielded only once all of its text is decided.
  const pending: GeneratedToken[] = [];
  try {
    if (opts.maxTokens === 0) return;
    let logits = await model.forward([sequence], [ids], { signal });
    for (let step = 0; step < opts.maxTokens; step++) {
      if (signal?.aborted) throw abortError(signal);
      const token = sampleToken(logits, opts, rng);
      if (eos.has(token)) break;
      pending.push({ token, text: decoder ? decoder.push(token) : '' });
      const text = pending.map((p) => p.text).join('');
      const hit = opts.stop.reduce((best, s) => {
        const i = text.indexOf(s);
        return i >= 0 && i < best ? i : best;
      }, Infinity);
      if (hit !== Infinity) {
        // Show what comes before the stop string; the tokens that spell it are not yielded.
        let budget = hit;
        while (pending.length > 0 && budget > 0) {
          const p = pending.shift()!;
          yield { token: p.token, text: p.text.slice(0, budget) };
          budget -= p.text.length;
        }
        pending.length = 0;
        return;
      }
      let budget = text.length - heldBackLength(text, opts.stop);
      while (pending.length > 0 && pending[0]!.text.length <= budget) {
        const p = pending.shift()!;
        budget -= p.text.length;
        yield p;
      }
      if (step + 1 < opts.maxTokens) logits = await model.forward([sequence], [[token]], { signal });
    }
    // Generation ended (EOS or maxTokens): nothing can complete a stop string any more.
    const rest = decoder ? decoder.flush() : '';
    if (rest && pending.length > 0) pending[pending.length - 1]!.text += rest;
    while (pending.length > 0) yield pending.shift()!;
  } finally {
    sequence.dispose();
  }
}
