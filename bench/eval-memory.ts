/**
 * `npm run bench -- eval-memory [--quick]`: what `redflag eval` holds in memory, in copies of
 * the model's weights. A random Llama (hidden 1024, 8 layers, vocabulary 32000: 610 MiB of f32
 * weights; `--quick`: hidden 512, 4 layers) and a red-flag adapter trained one step on it; then
 * `evaluate` over `base` and the adapter with the utility suite (which compares with the base)
 * and the embedding attack (which differentiates through the variant), while the process's RSS
 * is sampled every 20 ms. Reported: the peak RSS over the RSS before the run, divided by the
 * weights' bytes (about 1 when a run holds one copy beyond what is already loaded, 2 for two).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { evaluate } from '../lib/eval/evaluate.js';
import { writeMemoryBenchModel } from './memory-model.js';
import { measurePeakRss } from './rss.js';

const MiB = 2 ** 20;

export async function benchEvalMemory(quick: boolean) {
  const dir = await mkdtemp(join(tmpdir(), 'redflag-bench-eval-memory-'));
  try {
    const { base, adapter, hiddenSize, numLayers, checkpointBytes: weightBytes } = await writeMemoryBenchModel(dir, { quick, dtype: 'F32', rank: 4 });
    // In a process of its own, as merge-memory's: memory the model writer and the trainer freed
    // here would be reused by the evaluation without raising the RSS, hiding its peak.
    const argv = ['--expose-gc', '--import', 'tsx', fileURLToPath(import.meta.url), base, adapter, join(dir, 'eval')];
    const { stdout } = await promisify(execFile)(process.execPath, argv, { maxBuffer: 1 << 20 });
    const { beforeBytes: before, peakBytes: peak, seconds } = JSON.parse(stdout) as { beforeBytes: number; peakBytes: number; seconds: number };
    return {
      bench: 'eval-memory',
      model: { hiddenSize, numLayers, weightMiB: Math.round(weightBytes / MiB) },
      rssBeforeMiB: Math.round(before / MiB),
      peakRssMiB: Math.round(peak / MiB),
      peakOverBeforeInWeightCopies: Number(((peak - before) / weightBytes).toFixed(2)),
      seconds: Number(seconds.toFixed(1)),
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The measurement, in a process of its own: `eval-memory.ts BASE ADAPTER OUT`. */
async function measureOne(base: string, adapter: string, out: string) {
  return measurePeakRss((sample) => evaluate({
    model: base,
    variants: [{ name: 'base', source: 'base' }, { name: 'rf', source: adapter }],
    synthetic: { testPerCategory: 1, mcqCount: 2 }, limit: 2, suites: ['utility', 'embedding'], maxTokens: 4,
    bootstrapResamples: 10, threads: 2, out, png: false, dtype: 'f32',
    attacks: { embedding: { epsilons: [0, 0.3], steps: 1, items: 1 } },
  }, { onProgress: sample }));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [base, adapter, out] = process.argv.slice(2) as [string, string, string];
  const { beforeBytes, peakBytes, seconds } = await measureOne(base, adapter, out);
  process.stdout.write(JSON.stringify({ beforeBytes, peakBytes, seconds }));
}
