/**
 * Sizing a GPU's KV cache to the memory it has (`kvCacheBytes: 'auto'`), as vLLM sizes its own:
 * run the largest steps the scheduler will make once, so that the engine's scratch for them is
 * allocated, then give the KV cache what the device has left, less the share of its memory
 * (1 - gpuMemoryFraction) kept free for what redflag does not count (the CUDA context, cuBLASLt's
 * and the graphs' own allocations, other processes).
 * @module
 */
import { RedflagError } from '../errors.js';
import type { Model, Sequence } from '../model/model.js';

/** The scheduler's limits that bound one step. */
export interface StepLimits {
  maxBatch: number;
  maxStepTokens: number;
  prefillChunk: number;
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

/**
 * Runs the scheduler's largest steps on `model` (a GPU's) with a small pool, then sets the pool to
 * the rest of the device's memory, less (1 - fraction) of its total, in whole blocks; returns
 * the pool's bytes. OUT_OF_MEMORY when not one block is left.
 */
export async function sizeKvCache(model: Model, limits: StepLimits, fraction: number): Promise<number> {
  const blockBytes = model.kvBlockTokens * model.kvBytesPerPosition;
  const blocks = (positions: number) => Math.ceil(positions / model.kvBlockTokens);
  // The two largest steps: a prefill of the most tokens a step takes, in prompts of one chunk
  // (as long as the model's positions allow), and a decode step of the largest batch.
  const rows = Math.min(limits.maxStepTokens, limits.maxBatch * limits.prefillChunk);
  const chunk = Math.min(limits.prefillChunk, model.config.maxPositions);
  const prompts = Array.from({ length: Math.ceil(rows / chunk) }, (_, i) => Math.min(chunk, rows - i * chunk));
  const probeBlocks = prompts.reduce((n, p) => n + blocks(p), 0) + limits.maxBatch * blocks(1);
  const id = (i: number) => i % model.vocabSize;
  const run = async (lengths: number[]) => {
    const sequences: Sequence[] = [];
    try {
      for (const _ of lengths) sequences.push(model.newSequence());
      await model.step(
        sequences,
        lengths.map((n, s) => Array.from({ length: n }, (_, i) => id(s * chunk + i))),
        lengths.map(() => ({})),
        { topN: 20 },
      );
    } finally {
      for (const s of sequences) s.dispose();
    }
  };
  try {
    await model.runNative(() => model.engine.setKvPoolBytes(probeBlocks * blockBytes));
    await run(prompts);
    await run(Array.from({ length: limits.maxBatch }, () => 1));
  } catch (error) {
    if (!(error instanceof RedflagError && error.code === 'OUT_OF_MEMORY')) throw error;
    throw new RedflagError(
      'OUT_OF_MEMORY',
      `sizing the KV cache (kvCacheBytes 'auto'): a step of ${rows} tokens (maxStepTokens) and one of ${limits.maxBatch} sequences (maxBatch) do not fit on ${model.device.name} beside the weights: ${error.message}`,
      { cause: error },
    );
  }

  const m = model.deviceMemory();
  if (!m) throw new RedflagError('NATIVE', `cannot read ${model.device.name}'s free memory to size the KV cache: pass kvCacheBytes`);
  // The probe's pool is freed before the new one is allocated: its bytes count as free.
  const room = m.free + probeBlocks * blockBytes - (1 - fraction) * m.total;
  const n = Math.floor(room / blockBytes);
  if (n < 1) {
    throw new RedflagError(
      'OUT_OF_MEMORY',
      `no GPU memory is left for the KV cache on ${model.device.name}: with the weights and a step of ${rows} tokens held it has ${mib(m.free + probeBlocks * blockBytes)} free of ${mib(m.total)}, and gpuMemoryFraction ${fraction} keeps ${mib((1 - fraction) * m.total)} of it free: raise gpuMemoryFraction, lower maxStepTokens or maxBatch, use dtype bf16 or a smaller model`,
    );
  }
  await model.runNative(() => model.engine.setKvPoolBytes(n * blockBytes));
  return n * blockBytes;
}
