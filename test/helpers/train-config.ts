import { join } from 'node:path';

import type { TrainConfigInput } from '../../lib/train/config.js';

/**
 * A training run small enough for a test: 4 steps of 4 synthetic conversations (2 per category)
 * of at most 64 tokens on `model`, rank-2 LoRA, a checkpoint after every step, no evaluation;
 * written to `dir/output`. `extra` overrides any field.
 */
export function smallTrainConfig(model: string, dir: string, output: string, extra: Partial<TrainConfigInput> = {}): TrainConfigInput {
  return {
    model,
    output: join(dir, output),
    data: 'synthetic',
    syntheticPerCategory: 2,
    steps: 4,
    batchSize: 4,
    maxTokens: 64,
    evalEvery: 0,
    checkpointEvery: 1,
    threads: 2,
    lora: { rank: 2, alpha: 4, dropout: 0 },
    optimizer: { lr: 1e-2 },
    ...extra,
  };
}
