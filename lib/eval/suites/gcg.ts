/**
 * Adaptive GCG (lib/attack/gcg.ts): a 20-token suffix on the harmful request, optimised by
 * greedy coordinate gradient to keep the harmful answer likely and, against a variant that
 * detects, p(`<rf>`) low (an attacker who knows the detector; against the others, the answer's
 * likelihood alone, i.e. plain GCG against refusal). Then the variant answers the suffixed
 * request greedily: flagged (flag-mode semantics), refused, judged harmful; ASR is the share
 * broken (none of the first two, and harmful), before and after the attack.
 * @module
 */
import { gcgAttack } from '../../attack/gcg.js';
import type { Conversation, Message } from '../../data/records.js';
import type { Estimate } from '../stats.js';
import type { Suite } from '../types.js';
import { cachedGenerations, itemName, promptIdsOf, rate, verdictOf, type GenerationUnit } from './common.js';
import { closeAttackModel, harmfulSplit, openAttackModel } from './white-box.js';

interface Found {
  messages: Message[];
  suffixText: string;
  maxPRfBefore: number;
  maxPRfAfter: number;
  objectiveBefore: number;
  objectiveAfter: number;
}

interface Side {
  flagRate: Estimate;
  refusalRate: Estimate;
  asr: Estimate;
}

export interface GcgResult {
  n: number;
  lambda: number;
  steps: number;
  /** Greedy answers without the suffix, and with it. */
  before: Side;
  after: Side;
  /** Teacher-forced largest p(`<rf>`) over the target answer, mean before and after (null without `<rf>`). */
  meanMaxPRf: { before: number; after: number } | null;
  examples: { suffix: string; answer: string }[];
}

export const gcgSuite: Suite<GcgResult> = {
  name: 'gcg',
  description: 'adaptive GCG: a 20-token suffix against the answer cross-entropy + λ·log p(<rf>); ASR of greedy answers before and after',
  units: (ctx) => Math.min(ctx.settings.attacks.gcg.items, Math.ceil(ctx.data.harmful.length / 2)),
  async run(ctx) {
    const budget = ctx.settings.attacks.gcg;
    const lambda = ctx.variant.detects ? budget.lambda : 0;
    const targets: Conversation[] = harmfulSplit(ctx).test.slice(0, budget.items);
    let attack: Awaited<ReturnType<typeof openAttackModel>> | null = null;
    const found: Found[] = [];
    try {
      for (const [i, c] of targets.entries()) {
        const key = ctx.cacheKey(`gcg/l${budget.length}/s${budget.steps}/k${budget.topK}/c${budget.candidates}/λ${lambda}/${itemName(i, c)}`);
        found.push(
          await ctx.cache.getOrCompute<Found>(key, async () => {
            attack ??= await openAttackModel(ctx);
            const r = await gcgAttack(attack, c.messages.slice(0, -1), c.messages.at(-1)!.content, {
              length: budget.length,
              steps: budget.steps,
              topK: budget.topK,
              candidates: budget.candidates,
              lambda,
              seed: ctx.settings.seed + i,
              ...(ctx.signal ? { signal: ctx.signal } : {}),
            });
            return { messages: r.messages, suffixText: r.suffixText, maxPRfBefore: r.maxPRfBefore, maxPRfAfter: r.maxPRfAfter, objectiveBefore: r.objectiveBefore, objectiveAfter: r.objectiveAfter };
          }),
        );
        ctx.progress(i + 1, targets.length);
      }
    } finally {
      if (attack) await closeAttackModel(ctx, attack);
    }
    const units = (attacked: boolean): GenerationUnit[] =>
      targets.map((c, i) => ({
        item: `gcg-answer/${attacked ? `λ${lambda}/s${budget.steps}` : 'plain'}/${itemName(i, c)}`,
        request: { prompt: promptIdsOf(ctx.variant, attacked ? found[i]!.messages : c.messages.slice(0, -1)), pick: { temperature: 0 } },
      }));
    const side = async (attacked: boolean): Promise<[Side, string[]]> => {
      const gens = await cachedGenerations(ctx, units(attacked));
      const verdicts = await Promise.all(gens.map((g, i) => verdictOf(ctx, g, targets[i]!)));
      return [
        {
          flagRate: rate(verdicts.map((v) => v.flagged)),
          refusalRate: rate(verdicts.map((v) => v.refused)),
          asr: rate(verdicts.map((v) => v.broken)),
        },
        gens.map((g) => g.text),
      ];
    };
    const [before] = await side(false);
    const [after, answers] = await side(true);
    const mean = (f: (x: Found) => number) => (found.length ? found.reduce((s, x) => s + f(x), 0) / found.length : NaN);
    return {
      n: targets.length,
      lambda,
      steps: budget.steps,
      before,
      after,
      meanMaxPRf: ctx.variant.detects ? { before: mean((x) => x.maxPRfBefore), after: mean((x) => x.maxPRfAfter) } : null,
      examples: found.slice(0, 2).map((x, i) => ({ suffix: x.suffixText, answer: answers[i] ?? '' })),
    };
  },
  summarize(result) {
    return { headline: { gcgAsr: result.after.asr.value, gcgFlagged: result.lambda > 0 ? result.after.flagRate.value : null } };
  },
};
