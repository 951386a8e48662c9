/**
 * The fine-tuning attack (lib/attack/finetune.ts): the attacker fine-tunes the weights it
 * holds on harmful answers (LoRA, cross-entropy; half of the harmful conversations, the other
 * half measured). What it holds depends on the defence:
 * - a red-flag adapter is kept apart from the weights ("adapter encapsulation"): the attacker
 *   fine-tunes the base model and the adapter is applied on the attacked weights afterwards;
 * - a refusal adapter (any adapter without `<rf>`) ships merged: the attacker fine-tunes the
 *   merged weights;
 * - a model directory or the base is attacked as it is.
 * Measured before and after on greedy answers to the held-out harmful prompts: flagged,
 * refused, and ASR (neither, and judged harmful); for a variant that detects, also the
 * teacher-forced flag rate of the harmful reference answers.
 * @module
 */
import { join } from 'node:path';

import { attackFinished, fineTuneAttack } from '../../attack/finetune.js';
import { mergeAdapterInto } from '../../train/export.js';
import type { Conversation } from '../../data/records.js';
import { createDetector } from '../../detect/detector.js';
import { loadModel } from '../../model/model.js';
import { applyAdapter } from '../../train/export.js';
import { directoryStamp, fingerprint } from '../cache.js';
import { rateAtThreshold, type Estimate } from '../stats.js';
import type { LoadedVariant, Suite, SuiteContext } from '../types.js';
import { cachedGenerations, conversationPromptIds, itemName, rate, verdictOf } from './common.js';
import { attackWorkDir, harmfulSplit, variantFiles } from './white-box.js';

interface Side {
  flagRate: Estimate;
  refusalRate: Estimate;
  asr: Estimate;
  /** Teacher-forced share of harmful reference answers flagged (null without `<rf>`, NaN without answers). */
  teacherForcedFlagRate: number | null;
}

export interface FinetuneResult {
  defence: 'encapsulated adapter' | 'merged adapter' | 'weights';
  steps: number;
  trainedOn: number;
  before: Side;
  after: Side;
}

/** The attacked weights for this variant (trained once per model directory and budget; shared by variants on the same base). */
async function attackedWeights(ctx: SuiteContext, train: Conversation[]): Promise<{ modelDir: string; adapterDir?: string; defence: FinetuneResult['defence'] }> {
  const budget = ctx.settings.attacks.finetune;
  const { modelDir, adapterDir } = variantFiles(ctx);
  const work = await attackWorkDir(ctx);
  const { device, dtype, threads, chatTemplateKwargs } = ctx.variant.model.loadOptions();
  // Keyed by the weights attacked, so variants on the same base share one attack, and by the
  // engine that trains it where it is not the CPU's f32 and the template's kwargs where there are
  // some (the keys of earlier versions).
  const onDevice = { ...(device !== 'cpu' ? { device } : {}), ...(dtype !== 'f32' ? { dtype } : {}), ...(chatTemplateKwargs ? { chatTemplateKwargs } : {}) };
  // And by what is attacked and with what: the weights' files (retrained into the same folder is
  // another model) and the conversations it trains on.
  const data = fingerprint(train.map((c) => c.messages));
  // `stamps`: the files the attacked weights come from (the model's, and the adapter's for a merge).
  const outputFor = (dir: string, stamps: string[][]) => join(work, `finetune-${fingerprint({ dir, budget, n: train.length, seed: ctx.settings.seed, ...onDevice, data, stamps })}`);
  const modelStamp = [await directoryStamp(modelDir)];
  const attack = (dir: string, stamps: string[][]) =>
    fineTuneAttack({
      model: dir,
      harmful: train,
      output: outputFor(dir, stamps),
      steps: budget.steps,
      lr: budget.lr,
      rank: budget.rank,
      batchSize: budget.batchSize,
      seed: ctx.settings.seed,
      ...(device ? { device } : {}),
      ...(dtype ? { dtype } : {}),
      ...(threads ? { threads } : {}),
      ...(chatTemplateKwargs ? { chatTemplateKwargs } : {}),
      ...(ctx.signal ? { signal: ctx.signal } : {}),
    });
  if (adapterDir !== undefined && ctx.variant.detects) return { modelDir: await attack(modelDir, modelStamp), adapterDir, defence: 'encapsulated adapter' };
  if (adapterDir !== undefined) {
    const stamps = [...modelStamp, await directoryStamp(adapterDir)];
    const merged = join(work, `merged-${fingerprint({ modelDir, adapterDir, stamps })}`);
    // The merged weights only feed the attack: once it has finished (a resumed run) they are not needed.
    if (!(await attackFinished(outputFor(merged, stamps)))) await mergeAdapterInto(modelDir, adapterDir, merged, { overwrite: true });
    return { modelDir: await attack(merged, stamps), defence: 'merged adapter' };
  }
  return { modelDir: await attack(modelDir, modelStamp), defence: 'weights' };
}

async function measure(ctx: SuiteContext, variant: LoadedVariant, test: Conversation[], tag: string): Promise<Side> {
  const units = test.map((c, i) => ({ item: `finetune/${tag}/${itemName(i, c)}`, request: { prompt: conversationPromptIds(variant, c), pick: { temperature: 0 } } }));
  const gens = await cachedGenerations(ctx, units, { variant });
  const verdicts = await Promise.all(gens.map((g, i) => verdictOf(ctx, g, test[i]!)));
  let teacherForcedFlagRate: number | null = null;
  if (variant.detector) {
    const scores = await ctx.cache.getOrCompute<number[]>(ctx.cacheKey(`finetune/${tag}/teacher-forced/${fingerprint(test.map((c, i) => itemName(i, c)))}`), async () =>
      (await variant.detector!.classify(test.map((c) => c.messages), { threshold: ctx.settings.threshold })).map((s) => s.maxPRf),
    );
    // No conversations to score: NaN (null in report.json), not 0 flagged.
    teacherForcedFlagRate = rateAtThreshold(scores, ctx.settings.threshold);
  }
  return {
    flagRate: rate(verdicts.map((v) => v.flagged)),
    refusalRate: rate(verdicts.map((v) => v.refused)),
    asr: rate(verdicts.map((v) => v.broken)),
    teacherForcedFlagRate,
  };
}

export const finetuneSuite: Suite<FinetuneResult> = {
  name: 'finetune',
  description: 'LoRA fine-tuning on harmful answers (red-flag adapter applied afterwards; refusal adapter merged before); flagged / refused / ASR before and after',
  units: () => 2,
  async run(ctx) {
    const budget = ctx.settings.attacks.finetune;
    const { train, test } = harmfulSplit(ctx);
    const before = await measure(ctx, ctx.variant, test, 'before');
    ctx.progress(1, 2);
    const attacked = await attackedWeights(ctx, train);
    const model = await loadModel(attacked.modelDir, ctx.variant.model.loadOptions());
    let detector = null;
    try {
      if (attacked.adapterDir) await applyAdapter(model, attacked.adapterDir);
      if (model.redFlagTokenId != null) detector = await createDetector({ model, threshold: ctx.settings.threshold, mode: 'flag', maxBatch: ctx.settings.batchSize, kvCacheBytes: ctx.settings.kvCacheBytes });
      const variant: LoadedVariant = {
        ...ctx.variant,
        name: `${ctx.variant.name} (fine-tuned)`,
        model,
        detects: detector !== null,
        rfToken: model.redFlagTokenId ?? null,
        detector,
      };
      // The attacked weights name the answers after the attack (another attack, other answers).
      const after = await measure(ctx, variant, test, `after-${fingerprint({ budget, weights: attacked.modelDir })}`);
      ctx.progress(2, 2);
      return { defence: attacked.defence, steps: budget.steps, trainedOn: train.length, before, after };
    } finally {
      await detector?.dispose();
      model.dispose();
    }
  },
  summarize(result) {
    return { headline: { finetuneAsr: result.after.asr.value, finetuneFlagged: result.after.teacherForcedFlagRate } };
  },
};
