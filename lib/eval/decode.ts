/**
 * Batched generation for evaluations, on the same fused native decode step the detector uses
 * (`model.step`: the token and p(`<rf>`) from the same logits), with what attacks need and the
 * detector's API does not offer: prompts given as token ids (an assistant turn already started
 * by a prefill attack), and `<rf>` banned from sampling (the suppression attack).
 *
 * Red-flag semantics follow the detector's `flag` mode: an answer is flagged at the first step
 * where the model picks `<rf>` or gives it p ≥ threshold; a picked `<rf>` goes into the context
 * (not into the text) and the answer goes on. Models without `<rf>` are never flagged.
 * @module
 */
import { abortError } from '../errors.js';
import type { Model, PickOptions, Sequence } from '../model/model.js';
import { createRng } from '../model/sampling.js';
import { IncrementalDecoder } from '../model/tokenizer.js';

/** One generation request. */
export interface DecodeRequest {
  /** The prompt's token ids (chat template applied, and any prefilled answer start). */
  prompt: number[];
  /** Sampling: temperature 0 is greedy. */
  pick: PickOptions;
}

/** Options of {@link decodeBatch}. */
export interface DecodeOptions {
  maxTokens: number;
  /** p(`<rf>`) at or above which a step is flagged. */
  threshold: number;
  /** The red-flag token, or null for a model without one (then nothing is flagged). */
  rfToken: number | null;
  /** Never pick `<rf>` (the suppression attack): when it would be picked, the next best token is. */
  banRedFlag?: boolean;
  /** Sequences advanced together. Default 16. */
  batchSize?: number;
  signal?: AbortSignal;
  /** Called after each finished request. */
  onDone?: (done: number, total: number) => void;
}

/** A finished generation. */
export interface DecodeResult {
  /** The answer's text (`<rf>` never appears in it). */
  text: string;
  /** Generated tokens, `<rf>` included when it was picked. */
  tokens: number;
  /** The answer's token ids (`<rf>` and the end token left out). */
  ids: number[];
  flagged: boolean;
  /** Index of the first flagged step, or -1. */
  flagIndex: number;
  maxPRf: number;
  /** Separate runs of flagged steps (a flag that fires, stops, and fires again counts 2). */
  flagEpisodes: number;
  /** Times `<rf>` was picked. */
  redFlagsEmitted: number;
  finishReason: 'stop' | 'length';
}

interface Running {
  index: number;
  sequence: Sequence;
  next: number[];
  decoder: IncrementalDecoder;
  text: string;
  tokens: number;
  ids: number[];
  flagIndex: number;
  maxPRf: number;
  episodes: number;
  inEpisode: boolean;
  emitted: number;
  budget: number;
  rng: () => number;
}

/**
 * When `<rf>` is banned and was picked: the best other token of the top list, or a draw from
 * the top list without `<rf>` renormalised at the request's temperature (exact for greedy; for
 * sampling, the distribution truncated to the top 64 tokens, which hold nearly all the mass of a
 * trained model).
 */
function replacement(topIds: Uint32Array, topLogprobs: Float32Array, from: number, topN: number, flags: ReadonlySet<number>, pick: PickOptions, rng: () => number): number {
  const ids: number[] = [];
  const lps: number[] = [];
  for (let j = 0; j < topN; j++) {
    const id = topIds[from + j]!;
    if (flags.has(id)) continue;
    ids.push(id);
    lps.push(topLogprobs[from + j]!);
  }
  const t = pick.temperature ?? 0;
  if (t === 0 || ids.length === 1) return ids[0]!;
  const max = Math.max(...lps);
  const weights = lps.map((lp) => Math.exp((lp - max) / t));
  let u = rng() * weights.reduce((a, b) => a + b, 0);
  for (let j = 0; j < ids.length; j++) {
    u -= weights[j]!;
    if (u <= 0) return ids[j]!;
  }
  return ids[ids.length - 1]!;
}

/** Generates an answer to every request, `batchSize` sequences per decode step; results in request order. */
export async function decodeBatch(model: Model, requests: readonly DecodeRequest[], options: DecodeOptions): Promise<DecodeResult[]> {
  const tokenizer = model.tokenizer!;
  const eos = new Set(model.eosTokenIds);
  const rf = options.rfToken;
  // The model's own <rf> stands for all its flags (category flags too): any of them raises the flag.
  const flags = new Set(rf === null ? [] : model.flagTokensFor(rf));
  const ban = (options.banRedFlag ?? false) && rf !== null;
  const topN = ban ? 64 : 0;
  const batchSize = options.batchSize ?? 16;
  const results: DecodeResult[] = new Array(requests.length);
  let done = 0;
  let nextRequest = 0;
  const running: Running[] = [];
  const start = (index: number): Running => {
    const r = requests[index]!;
    const sequence = model.newSequence();
    const room = model.config.maxPositions - r.prompt.length;
    return {
      index,
      sequence,
      next: r.prompt,
      decoder: new IncrementalDecoder(tokenizer),
      text: '',
      tokens: 0,
      ids: [],
      flagIndex: -1,
      maxPRf: 0,
      episodes: 0,
      inEpisode: false,
      emitted: 0,
      budget: Math.max(0, Math.min(options.maxTokens, room)),
      rng: createRng((r.pick.seed ?? 0) ^ 0x5bd1e995),
    };
  };
  const finish = (s: Running, reason: 'stop' | 'length') => {
    s.text += s.decoder.flush();
    s.sequence.dispose();
    results[s.index] = {
      text: s.text,
      tokens: s.tokens,
      ids: s.ids,
      flagged: s.flagIndex >= 0,
      flagIndex: s.flagIndex,
      maxPRf: s.maxPRf,
      flagEpisodes: s.episodes,
      redFlagsEmitted: s.emitted,
      finishReason: reason,
    };
    done++;
    options.onDone?.(done, requests.length);
  };
  try {
    while (nextRequest < requests.length || running.length > 0) {
      if (options.signal?.aborted) throw abortError(options.signal);
      while (running.length < batchSize && nextRequest < requests.length) {
        const s = start(nextRequest++);
        running.push(s);
        if (s.budget === 0) {
          running.pop();
          finish(s, 'length');
        }
      }
      if (running.length === 0) continue;
      const r = await model.step(
        running.map((s) => s.sequence),
        running.map((s) => s.next),
        running.map((s) => requests[s.index]!.pick),
        { rfToken: rf ?? -1, topN, ...(options.signal ? { signal: options.signal } : {}) },
      );
      const still: Running[] = [];
      running.forEach((s, i) => {
        let token = r.tokens[i]!;
        const pRf = rf === null ? 0 : r.pRf[i]!;
        if (ban && flags.has(token)) token = replacement(r.topIds, r.topLogprobs, i * topN, topN, flags, requests[s.index]!.pick, s.rng);
        s.tokens++;
        if (pRf > s.maxPRf) s.maxPRf = pRf;
        const isFlag = flags.has(token);
        const raised = isFlag || (rf !== null && pRf >= options.threshold);
        if (raised && s.flagIndex < 0) s.flagIndex = s.tokens - 1;
        if (raised && !s.inEpisode) s.episodes++;
        s.inEpisode = raised;
        if (isFlag) s.emitted++;
        if (eos.has(token)) return finish(s, 'stop');
        if (!isFlag) {
          s.text += s.decoder.push(token);
          s.ids.push(token);
        }
        if (s.tokens >= s.budget) return finish(s, 'length');
        s.next = [token];
        still.push(s);
      });
      running.splice(0, running.length, ...still);
    }
  } finally {
    for (const s of running) if (!s.sequence.disposed) s.sequence.dispose();
  }
  return results;
}
