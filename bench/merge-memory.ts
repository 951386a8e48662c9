/**
 * `npm run bench -- merge-memory [--quick]`: what writing a merged model holds in memory, in
 * copies of the checkpoint. A random Llama stored in BF16, as released checkpoints are (hidden
 * 1024, 8 layers, vocabulary 32000: 305 MiB of BF16; `--quick`: hidden 512, 4 layers), and a red-flag
 * adapter trained one step on every projection (so the merge rewrites every layer's weights
 * and the grown embedding). Measured, each as the peak RSS over the RSS before it, divided by
 * the checkpoint's bytes:
 * - `mergeAdapterInto` (the files alone: what the fine-tuning attack merges, and a user's
 *   merge of a saved adapter);
 * - `saveMerged` on a loaded model with the adapter applied (what `redflag train --merge`
 *   writes), over the RSS with the model loaded.
 * Both stream the writes, tensor by tensor: about 0 when they hold no more than a tensor or two.
 * Each runs in a process of its own (`--expose-gc`), so neither inherits the other's garbage.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { loadModel } from '../lib/model/model.js';
import { applyAdapter, mergeAdapterInto, saveMerged } from '../lib/train/export.js';
import { writeMemoryBenchModel } from './memory-model.js';
import { measurePeakRss } from './rss.js';

const MiB = 2 ** 20;

export async function benchMergeMemory(quick: boolean) {
  const dir = await mkdtemp(join(tmpdir(), 'redflag-bench-merge-memory-'));
  try {
    const { base, adapter, hiddenSize, numLayers, checkpointBytes } = await writeMemoryBenchModel(dir, { quick, dtype: 'BF16', rank: 8 });
    const measure = async (how: 'files' | 'loaded') => {
      const argv = ['--expose-gc', '--import', 'tsx', fileURLToPath(import.meta.url), how, base, adapter, join(dir, `merged-${how}`)];
      const { stdout } = await promisify(execFile)(process.execPath, argv, { maxBuffer: 1 << 20 });
      const m = JSON.parse(stdout) as { beforeBytes: number; peakBytes: number; seconds: number };
      return {
        rssBeforeMiB: Math.round(m.beforeBytes / MiB),
        peakRssMiB: Math.round(m.peakBytes / MiB),
        peakOverBeforeInCheckpointCopies: Number(((m.peakBytes - m.beforeBytes) / checkpointBytes).toFixed(2)),
        seconds: Number(m.seconds.toFixed(1)),
      };
    };
    return {
      bench: 'merge-memory',
      model: { hiddenSize, numLayers, dtype: 'BF16', checkpointMiB: Math.round(checkpointBytes / MiB) },
      mergeAdapterInto: await measure('files'),
      saveMergedFromLoadedModel: await measure('loaded'),
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** One measurement, in a process of its own: `merge-memory.ts files|loaded BASE ADAPTER OUT`. */
async function measureOne(how: string, base: string, adapter: string, out: string) {
  if (how === 'files') return measurePeakRss(() => mergeAdapterInto(base, adapter, out));
  const model = await loadModel(base, { threads: 2, dtype: 'f32' });
  try {
    const applied = await applyAdapter(model, adapter);
    return await measurePeakRss(() => saveMerged(model, applied, out));
  } finally {
    model.dispose();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [how, base, adapter, out] = process.argv.slice(2) as [string, string, string, string];
  const { beforeBytes, peakBytes, seconds } = await measureOne(how, base, adapter, out);
  process.stdout.write(JSON.stringify({ beforeBytes, peakBytes, seconds }));
}
