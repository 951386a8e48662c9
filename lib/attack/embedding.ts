/**
 * The embedding-space attack: projected gradient descent on the prompt's input embeddings, each
 * prompt token's perturbation inside an l2 ball of radius ε·‖its embedding‖, minimising
 * p(`<rf>`) over the harmful answer while keeping the answer likely (the attacker's objective of
 * {@link AttackModel.loss}). The strongest white-box attacker short of changing weights: it is
 * not limited to real tokens. The answer's own embeddings are never perturbed.
 *
 * Each step moves every prompt token against its own gradient, by `stepSize`·radius along the
 * normalised gradient (a per-token normalised step, as l2 PGD does), then projects back onto the
 * ball. The best perturbation seen (lowest largest p(`<rf>`)) is kept, so more steps never make
 * the reported attack weaker.
 * @module
 */
import type { AttackModel, AttackTarget } from './gradient-model.js';

/** Options of {@link embeddingAttack}. */
export interface EmbeddingAttackOptions {
  /** Radius relative to each prompt token's embedding norm. */
  epsilon: number;
  /** PGD steps. Default 20. */
  steps?: number;
  /** Step length as a fraction of the radius. Default 0.25. */
  stepSize?: number;
  /** Weight of the red-flag term against the answer's cross-entropy. Default 1. */
  lambda?: number;
  signal?: AbortSignal;
}

/** The attack's outcome on one target. */
export interface EmbeddingAttackResult {
  /** Largest p(`<rf>`) over the answer without the attack, and with the best perturbation found. */
  maxPRfBefore: number;
  maxPRfAfter: number;
  /** The answer's mean cross-entropy before and after. */
  ceBefore: number;
  ceAfter: number;
  /** The best perturbation, [tokens × hidden] (zero on the answer). */
  delta: Float32Array;
  steps: number;
}

function maxOf(values: Float32Array): number {
  let m = 0;
  for (const v of values) m = Math.max(m, v);
  return m;
}

/** Scales each prompt token's row of `delta` back into its ball. */
function project(delta: Float32Array, radius: Float32Array, hidden: number): void {
  for (let t = 0; t < radius.length; t++) {
    const row = delta.subarray(t * hidden, (t + 1) * hidden);
    let sq = 0;
    for (const v of row) sq += v * v;
    const norm = Math.sqrt(sq);
    if (norm > radius[t]!) for (let i = 0; i < hidden; i++) row[i] = (row[i]! * radius[t]!) / norm;
  }
}

/** Runs the attack on one harmful conversation. */
export async function embeddingAttack(model: AttackModel, target: AttackTarget, options: EmbeddingAttackOptions): Promise<EmbeddingAttackResult> {
  const steps = options.steps ?? 20;
  const stepSize = options.stepSize ?? 0.25;
  const lambda = options.lambda ?? 1;
  const H = model.hidden;
  const promptLength = target.responseStart;
  const radius = await model.embeddingNorms(target.ids.slice(0, promptLength));
  for (let t = 0; t < radius.length; t++) radius[t] = radius[t]! * options.epsilon;

  const delta = new Float32Array(target.ids.length * H);
  const before = await model.loss(target, delta, lambda, options.signal);
  const maxPRfBefore = maxOf(await model.answerScores(target, delta, options.signal));
  let best = { delta: delta.slice(), maxPRf: maxPRfBefore, ce: before.ce };
  if (options.epsilon === 0) {
    return { maxPRfBefore, maxPRfAfter: maxPRfBefore, ceBefore: before.ce, ceAfter: before.ce, delta: best.delta, steps: 0 };
  }
  let grad = before.grad;
  for (let step = 0; step < steps; step++) {
    for (let t = 0; t < promptLength; t++) {
      const g = grad.subarray(t * H, (t + 1) * H);
      let sq = 0;
      for (const v of g) sq += v * v;
      const norm = Math.sqrt(sq);
      if (norm === 0) continue;
      const scale = (stepSize * radius[t]!) / norm;
      for (let i = 0; i < H; i++) delta[t * H + i] = delta[t * H + i]! - scale * g[i]!;
    }
    project(delta.subarray(0, promptLength * H), radius, H);
    const now = await model.loss(target, delta, lambda, options.signal);
    const maxPRf = maxOf(await model.answerScores(target, delta, options.signal));
    if (maxPRf < best.maxPRf) best = { delta: delta.slice(), maxPRf, ce: now.ce };
    grad = now.grad;
  }
  return { maxPRfBefore, maxPRfAfter: best.maxPRf, ceBefore: before.ce, ceAfter: best.ce, delta: best.delta, steps };
}
