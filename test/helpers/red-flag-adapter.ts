// A tiny model with a red-flag adapter trained briefly on the synthetic set (lr high, flag from
// the first response positions), so p(<rf>) is raised on harmful answers: what the attack tests
// attack.
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { train } from '../../lib/train/trainer.js';
import { tinyLlama } from './tiny-model.js';

/** Writes the model into a new temporary directory and the adapter into `root/rf/adapter`. */
export async function tinyRedFlagModel(steps: number): Promise<{ base: string; root: string; adapter: string }> {
  const base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2 });
  const root = await mkdtemp(join(tmpdir(), 'redflag-attack-'));
  await train({
    model: base,
    output: join(root, 'rf'),
    data: 'synthetic',
    syntheticPerCategory: 4,
    steps,
    batchSize: 8,
    maxTokens: 96,
    evalEvery: 0,
    checkpointEvery: 0,
    threads: 2,
    lora: { rank: 4, alpha: 8, dropout: 0 },
    loss: { rfOffset: 1 },
    optimizer: { lr: 2e-2, warmupSteps: 2 },
  });
  return { base, root, adapter: join(root, 'rf', 'adapter') };
}
