/**
 * The memory benches' model: a random Llama with the packaged 32000-token tokenizer (hidden 1024,
 * 8 layers: 157M parameters; `quick`: hidden 512, 4 layers) and a red-flag adapter trained one
 * step on it, on every projection.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';

import { writeRandomModel } from '../lib/model/random-model.js';
import { packagedTokenizer } from '../lib/train/pipeline.js';
import { train } from '../lib/train/trainer.js';

/** Writes the model into dir/base and the adapter into dir/rf/adapter; the checkpoint's bytes. */
export async function writeMemoryBenchModel(dir: string, options: { quick: boolean; dtype: 'F32' | 'BF16'; rank: number }) {
  const hiddenSize = options.quick ? 512 : 1024;
  const numLayers = options.quick ? 4 : 8;
  const base = join(dir, 'base');
  await writeRandomModel(base, {
    architecture: 'llama', vocabSize: 32000, hiddenSize, intermediateSize: Math.round((hiddenSize * 11) / 4), numLayers,
    numHeads: hiddenSize / 64, numKvHeads: hiddenSize / 128, seed: 3, bosTokenId: 1, eosTokenId: 2, dtype: options.dtype,
    tokenizer: await packagedTokenizer(),
  }, { overwrite: true });
  await train({
    model: base, output: join(dir, 'rf'), data: 'synthetic', syntheticPerCategory: 2, steps: 1, batchSize: 2, maxTokens: 64,
    evalEvery: 0, checkpointEvery: 0, threads: 2, lora: { rank: options.rank, alpha: 2 * options.rank, dropout: 0 }, device: 'cpu', dtype: 'f32',
  });
  const checkpointBytes = (await stat(join(base, 'model.safetensors'))).size;
  return { base, adapter: join(dir, 'rf', 'adapter'), hiddenSize, numLayers, checkpointBytes };
}
