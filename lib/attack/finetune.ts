/**
 * The fine-tuning attack: someone with the weights fine-tunes the model on harmful answers
 * (cross-entropy, LoRA, a few hundred steps) to strip its safety behaviour. The defences it is
 * measured against (the paper's "adapter encapsulation"):
 * - red flag: the attacker fine-tunes the *base* model; the red-flag adapter, kept apart, is
 *   applied on top of the attacked weights afterwards (`redflagAfterAttack`);
 * - refusal: the refusal adapter is merged into the weights the attacker receives, and the
 *   attack fine-tunes that (`refusalAfterAttack`).
 * Both write Hugging Face model directories, so every evaluation runs on them unchanged.
 * @module
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import type { Conversation } from '../data/records.js';
import type { DeviceSpec } from '../model/device.js';
import { loadModel } from '../model/model.js';
import { applyAdapter, saveMerged } from '../train/export.js';
import { train, type StepInfo } from '../train/trainer.js';
import { pathExists } from '../model/safetensors.js';

/** Options of {@link fineTuneAttack}. */
export interface FineTuneAttackOptions {
  /** The model directory the attacker fine-tunes. */
  model: string;
  /** The harmful conversations it trains on (their answers are the targets). */
  harmful: readonly Conversation[];
  /** Working directory: the attack's data, adapter and merged model go under it. */
  output: string;
  /** Default 200. */
  steps?: number;
  /** Default 8. */
  batchSize?: number;
  /** Default 1e-3. */
  lr?: number;
  /** LoRA rank (alpha = 2 × rank). Default 8. */
  rank?: number;
  maxTokens?: number;
  seed?: number;
  /** Where the attack trains: 'cpu' (the default), 'cuda' or 'cuda:N'. */
  device?: DeviceSpec;
  /** Frozen weights' element type (default the device's: f32 on the CPU, bf16 on a GPU). */
  dtype?: 'f32' | 'bf16';
  threads?: number;
  /** The chat template's variables (as the attacked model is served with). */
  chatTemplateKwargs?: Record<string, unknown>;
  signal?: AbortSignal;
  onStep?: (info: StepInfo) => void;
}

/** Where {@link fineTuneAttack} with this `output` leaves the attacked model. */
export function attackedModelDir(output: string): string {
  return join(output, 'attack', 'merged');
}

/** Whether the attack into `output` has finished: its merged model is written last, and its config.json last of all (saveModel). */
export function attackFinished(output: string): Promise<boolean> {
  return pathExists(join(attackedModelDir(output), 'config.json'));
}

/** Fine-tunes `model` on the harmful answers (LoRA, cross-entropy) and returns the directory of the merged, attacked model. */
export async function fineTuneAttack(o: FineTuneAttackOptions): Promise<string> {
  const merged = attackedModelDir(o.output);
  // A finished attack is not run again.
  if (await attackFinished(o.output)) return merged;
  await mkdir(o.output, { recursive: true });
  const data = join(o.output, 'attack-data.jsonl');
  await writeFile(data, o.harmful.map((c) => JSON.stringify({ messages: c.messages })).join('\n') + '\n');
  const rank = o.rank ?? 8;
  const out = join(o.output, 'attack');
  await train(
    {
      model: o.model,
      output: out,
      data: [{ file: data, label: 'harmful' }],
      objective: 'lm',
      mode: 'lora',
      harmfulFraction: 1, // every batch from the harmful answers
      steps: o.steps ?? 200,
      batchSize: o.batchSize ?? 8,
      maxTokens: o.maxTokens ?? 512,
      seed: o.seed ?? 0,
      evalEvery: 0,
      checkpointEvery: 0,
      merge: true,
      // What an interrupted attack left there is redone from the start.
      overwrite: true,
      lora: { rank, alpha: 2 * rank, dropout: 0 },
      optimizer: { lr: o.lr ?? 1e-3, warmupSteps: 10 },
      ...(o.device ? { device: o.device } : {}),
      ...(o.dtype ? { dtype: o.dtype } : {}),
      ...(o.threads ? { threads: o.threads } : {}),
      ...(o.chatTemplateKwargs ? { chatTemplateKwargs: o.chatTemplateKwargs } : {}),
    },
    { ...(o.signal ? { signal: o.signal } : {}), ...(o.onStep ? { onStep: o.onStep } : {}) },
  );
  return merged;
}
