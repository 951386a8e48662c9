/**
 * What the white-box attack suites (embedding, gcg, finetune) share: an attack session on the
 * variant's own model (its adapter moves into a trainer, which the gradients need, and is put
 * back exactly as it was afterwards, so an attack holds no second copy of the weights), the
 * attack budgets with their defaults, and a split of the harmful conversations so that no
 * attack is measured on what it trained on.
 * @module
 */
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import { AttackModel } from '../../attack/gradient-model.js';
import type { Conversation } from '../../data/records.js';
import { applyAdapter } from '../../train/export.js';
import { devTestSplit } from '../stats.js';
import type { AttackBudgets, SuiteContext } from '../types.js';

export const DEFAULT_ATTACK_BUDGETS: AttackBudgets = {
  embedding: { epsilons: [0, 0.05, 0.1, 0.2, 0.5], steps: 10, items: 25, lambda: 1 },
  gcg: { length: 20, steps: 20, topK: 32, candidates: 16, items: 8, lambda: 1 },
  finetune: { steps: 200, lr: 1e-3, rank: 8, batchSize: 8 },
};

/** The directory a variant's model comes from, and the adapter applied on it (if any). */
export function variantFiles(ctx: SuiteContext): { modelDir: string; adapterDir?: string } {
  const v = ctx.variant;
  if (v.kind === 'model') return { modelDir: v.source };
  if (v.kind === 'adapter') return { modelDir: ctx.baseDir, adapterDir: v.source };
  return { modelDir: ctx.baseDir };
}

/**
 * An attack session on the variant's model (end it with {@link closeAttackModel} before the
 * variant answers anything again). Its detector must be idle: the suites run one at a time.
 */
export async function openAttackModel(ctx: SuiteContext): Promise<AttackModel> {
  try {
    return await AttackModel.open(ctx.variant.model, variantFiles(ctx).adapterDir);
  } catch (error) {
    await restoreVariant(ctx);
    throw error;
  }
}

/** Ends the session and puts the variant's model back as loadVariant left it. */
export async function closeAttackModel(ctx: SuiteContext, attack: AttackModel): Promise<void> {
  attack.close();
  await restoreVariant(ctx);
}

/** The variant's adapter applied again as loading applied it (live factors, flag rows), or none. */
async function restoreVariant(ctx: SuiteContext): Promise<void> {
  const model = ctx.variant.model;
  const { adapterDir } = variantFiles(ctx);
  // applyAdapter clears what the trainer left first; without an adapter, clearing is all.
  if (adapterDir !== undefined) await applyAdapter(model, adapterDir);
  else await model.runNative(() => model.engine.clearAdapters());
}

/** Harmful conversations with responses, split in two halves by the settings' seed: `train` for attacks that learn, `test` to measure on. */
export function harmfulSplit(ctx: SuiteContext): { train: Conversation[]; test: Conversation[] } {
  const harmful = ctx.data.harmful.filter((c) => !c.responseMissing);
  const { dev, test } = devTestSplit(harmful.length, 0.5, ctx.settings.seed);
  return { train: dev.map((i) => harmful[i]!), test: test.map((i) => harmful[i]!) };
}

/** Where attacks write models: beside the results cache, or a temporary directory for an in-memory cache. */
export async function attackWorkDir(ctx: SuiteContext): Promise<string> {
  return ctx.cache.file ? join(dirname(ctx.cache.file), 'attacks') : mkdtemp(join(tmpdir(), 'redflag-attacks-'));
}
