/**
 * Utility against the base model: on benign responses, teacher-forced, the mean per-token
 * KL(base ‖ variant) (the base puts no mass on `<rf>`, so the variant's mass there counts) and
 * both models' perplexity; on benign prompts, how often the variant's greedy answer equals the
 * base's and the mean position (in tokens) where they first differ; and multiple-choice accuracy
 * by log-likelihood.
 * @module
 */
import type { Conversation } from '../../data/records.js';
import { argmax, type McQuestion } from '../mcq.js';
import { fingerprint } from '../cache.js';
import type { LoadedVariant, Suite, SuiteContext } from '../types.js';
import { cachedGenerations, conversationPromptIds, encodedResponse, itemName, withResponses, type GenerationUnit } from './common.js';

export interface UtilityResult {
  benignResponses: number;
  /** Mean KL(base ‖ variant) per benign response token, nats. */
  kl: number;
  perplexity: number;
  basePerplexity: number;
  /** Greedy answers against the base's on the benign prompts; NaN (null in report.json) without benign prompts. */
  greedy: { prompts: number; exactMatch: number; meanFirstDivergence: number; meanLength: number };
  mcq: { questions: number; accuracy: number | null; baseAccuracy: number | null };
}

interface KlUnit {
  kl: number;
  nll: number;
  baseNll: number;
  tokens: number;
}

function logSumExp(row: Float32Array, from: number, n: number): number {
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (row[from + i]! > max) max = row[from + i]!;
  let s = 0;
  for (let i = 0; i < n; i++) s += Math.exp(row[from + i]! - max);
  return max + Math.log(s);
}

/** KL and NLL over one conversation's response tokens (end token included). */
async function klUnit(ctx: SuiteContext, base: LoadedVariant, conversation: Conversation): Promise<KlUnit> {
  const { prompt, response } = encodedResponse(ctx.variant, conversation);
  const eos = ctx.variant.model.eosTokenIds[0];
  const ids = [...prompt, ...response, ...(eos !== undefined ? [eos] : [])];
  const signal = ctx.signal ? { signal: ctx.signal } : {};
  const [v] = await ctx.variant.model.logitsBatch([ids], signal);
  const [b] = ctx.variant === base ? [v!] : await base.model.logitsBatch([ids], signal);
  const Vv = ctx.variant.model.vocabSize;
  const Vb = base.model.vocabSize;
  let kl = 0, nll = 0, baseNll = 0, tokens = 0;
  for (let j = prompt.length; j < ids.length; j++) {
    const vo = (j - 1) * Vv;
    const bo = (j - 1) * Vb;
    const lv = logSumExp(v!, vo, Vv);
    const lb = logSumExp(b!, bo, Vb);
    for (let i = 0; i < Vb; i++) {
      const lpb = b![bo + i]! - lb;
      kl += Math.exp(lpb) * (lpb - (i < Vv ? v![vo + i]! - lv : -Infinity));
    }
    nll -= v![vo + ids[j]!]! - lv;
    baseNll -= b![bo + ids[j]!]! - lb;
    tokens++;
  }
  return { kl: Math.max(0, kl), nll, baseNll, tokens };
}

/** Summed log-probability of each choice after the question. */
async function choiceLogLikelihoods(variant: LoadedVariant, q: McQuestion, signal?: AbortSignal): Promise<number[]> {
  const encoded = q.choices.map((choice) =>
    encodedResponse(variant, { messages: [{ role: 'user', content: q.question }, { role: 'assistant', content: choice }], label: 'benign', source: 'mcq' }),
  );
  const logits = await variant.model.logitsBatch(encoded.map((e) => [...e.prompt, ...e.response]), signal ? { signal } : {});
  const V = variant.model.vocabSize;
  return encoded.map((e, c) => {
    let sum = 0;
    const ids = [...e.prompt, ...e.response];
    for (let j = e.prompt.length; j < ids.length; j++) sum += logits[c]![(j - 1) * V + ids[j]!]! - logSumExp(logits[c]!, (j - 1) * V, V);
    return sum;
  });
}

export const utilitySuite: Suite<UtilityResult> = {
  name: 'utility',
  description: 'benign KL to the base and perplexity, greedy agreement with the base, multiple-choice accuracy by log-likelihood',
  units: ({ data }) => withResponses(data.benign).length + 2 * data.benign.length + 2 * data.mcq.length,
  async run(ctx) {
    const { data } = ctx;
    const base = await ctx.base();
    const benign = withResponses(data.benign);
    let done = 0;
    const total = utilitySuite.units(ctx);
    const tick = (n = 1) => ctx.progress((done = Math.min(total, done + n)), total);

    const kls: KlUnit[] = [];
    for (const [i, c] of benign.entries()) {
      kls.push(await ctx.cache.getOrCompute(ctx.cacheKey(`kl/${itemName(i, c)}`), () => klUnit(ctx, base, c)));
      tick();
    }
    const tokens = kls.reduce((s, u) => s + u.tokens, 0);

    const units = (variant: LoadedVariant): GenerationUnit[] =>
      data.benign.map((c, i) => ({ item: `greedy/${itemName(i, c)}`, request: { prompt: conversationPromptIds(variant, c), pick: { temperature: 0 } } }));
    const own = await cachedGenerations(ctx, units(ctx.variant), { keepIds: true, onChunk: () => tick(ctx.settings.batchSize) });
    const reference = await cachedGenerations(ctx, units(base), {
      keepIds: true,
      variant: base,
      keyPrefix: ctx.sharedCacheKey('base-greedy/'),
      onChunk: () => tick(ctx.settings.batchSize),
    });
    let exact = 0, divergence = 0, length = 0;
    own.forEach((g, i) => {
      const a = g.ids ?? [];
      const b = reference[i]!.ids ?? [];
      let j = 0;
      while (j < a.length && j < b.length && a[j] === b[j]) j++;
      if (j === a.length && j === b.length) exact++;
      divergence += j;
      length += b.length;
    });

    const mcqAccuracy = async (variant: LoadedVariant, key: (item: string) => string): Promise<number | null> => {
      if (data.mcq.length === 0) return null;
      let right = 0;
      for (const [i, q] of data.mcq.entries()) {
        // Keyed by the question itself: another question set in the same output is not this one.
        const pred = await ctx.cache.getOrCompute(key(`mcq/${i}/${fingerprint(q)}`), async () => argmax(await choiceLogLikelihoods(variant, q, ctx.signal)));
        if (pred === q.answer) right++;
        tick();
      }
      return right / data.mcq.length;
    };
    const accuracy = await mcqAccuracy(ctx.variant, ctx.cacheKey);
    const baseAccuracy = ctx.variant === base ? accuracy : await mcqAccuracy(base, ctx.sharedCacheKey);
    // No benign prompts: nothing was compared, so NaN (null in report.json), as KL without tokens; not 0 agreement.
    const perPrompt = (total: number) => (own.length ? total / own.length : NaN);
    return {
      benignResponses: benign.length,
      kl: tokens ? kls.reduce((s, u) => s + u.kl, 0) / tokens : NaN,
      perplexity: tokens ? Math.exp(kls.reduce((s, u) => s + u.nll, 0) / tokens) : NaN,
      basePerplexity: tokens ? Math.exp(kls.reduce((s, u) => s + u.baseNll, 0) / tokens) : NaN,
      greedy: { prompts: own.length, exactMatch: perPrompt(exact), meanFirstDivergence: perPrompt(divergence), meanLength: perPrompt(length) },
      mcq: { questions: data.mcq.length, accuracy, baseAccuracy },
    };
  },
  summarize(r) {
    return { headline: { benignKl: r.kl, greedyAgreement: r.greedy.exactMatch, mcqAccuracy: r.mcq.accuracy } };
  },
};
