// The evaluation end to end on one device against the CPU: `node scripts/device-eval-e2e.mjs --device cuda`
// (the GPU machine's check, run by scripts/gpu-check.sh with a carried node and the production
// node_modules; it needs only dist/). On a random-weight Llama with the packaged tokenizer and a
// red-flag adapter trained on the CPU for a few steps, `evaluate` runs every suite twice, f32 on
// both engines: once on the CPU, once with `device` (so the variant, the attacked copies, the
// white-box attacks' gradients and the fine-tuning attack's training all run there). Checks:
//   - the device report says where it ran: settings.device, dtype f32;
//   - every figure of every suite equals the CPU's: numbers within 1e-3 relative (p(<rf>) of a
//     random model is about 5e-5, so relative), strings and counts exactly. Greedy and seeded
//     answers are the same tokens on both engines (the same counter-based draw), so rates and
//     examples match; the embedding attack and GCG follow gradients, the fine-tuning attack
//     trains two steps, all of them computed on the device;
//   - a cache entry written on the CPU is not read for the device (its own fingerprint): the
//     device run computes every unit.
// Against the CPU itself the second run writes to its own directory, so it checks that the
// evaluation is deterministic.
// Prints one JSON object; exits 1 when a check fails. `--device cpu` runs the harness against the
// CPU itself (how it is tested where no GPU is).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { evaluate, train } from '../dist/index.js';
import { checklist, deviceArg, deviceName, writeTinyLlama } from './e2e-common.mjs';

const device = deviceArg();
const { check, finish } = checklist();

/** Paths where `a` and `b` differ: numbers beyond `rel` relative (or 1e-9 absolute), anything else not equal. */
function differences(a, b, rel, path = '', out = []) {
  if (typeof a === 'number' && typeof b === 'number') {
    if (Math.abs(a - b) > Math.max(1e-9, rel * Math.max(Math.abs(a), Math.abs(b)))) out.push({ path, device: a, cpu: b });
  } else if (a !== null && b !== null && typeof a === 'object' && typeof b === 'object') {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    for (const k of keys) differences(a[k], b[k], rel, `${path}/${k}`, out);
  } else if (a !== b) {
    out.push({ path, device: a, cpu: b });
  }
  return out;
}

const dir = await mkdtemp(join(tmpdir(), 'redflag-device-eval-'));
const figures = {};
try {
  const model = join(dir, 'base');
  await writeTinyLlama(model);
  await train({
    model, output: join(dir, 'redflag'), data: 'synthetic', syntheticPerCategory: 3, steps: 4, batchSize: 4, maxTokens: 96,
    evalEvery: 0, checkpointEvery: 0, threads: 2, lora: { rank: 4, alpha: 8, dropout: 0 }, loss: { rfOffset: 1 },
    optimizer: { lr: 1e-2, warmupSteps: 1 }, device: 'cpu', dtype: 'f32',
  });
  const config = (dev, out) => ({
    model,
    variants: [{ name: 'redflag', source: join(dir, 'redflag', 'adapter') }],
    synthetic: { perCategory: 3, testPerCategory: 1, mcqCount: 4 },
    limit: 3,
    suites: ['detection', 'sampling', 'prefill', 'long-context', 'suppression', 'utility', 'embedding', 'gcg', 'finetune'],
    samples: 2, temperature: 1, maxTokens: 8, prefillK: [2], contextK: [0, 1], bootstrapResamples: 20, batchSize: 4,
    attacks: {
      embedding: { epsilons: [0, 0.1], steps: 2, items: 1 },
      gcg: { steps: 1, items: 1, candidates: 4, topK: 4, length: 4 },
      finetune: { steps: 2, batchSize: 2, rank: 2 },
    },
    threads: 2, png: false, out: join(dir, out), device: dev, dtype: 'f32',
  });
  // On a device, one output directory, so the device run sees the CPU run's cache and must not
  // use it; on the CPU, two, so the second run computes everything again (the same figures).
  let t0 = performance.now();
  const cpu = await evaluate(config('cpu', 'eval'));
  figures.cpuSeconds = (performance.now() - t0) / 1000;
  t0 = performance.now();
  const dev = await evaluate(config(device, device === 'cpu' ? 'eval-again' : 'eval'));
  figures.deviceSeconds = (performance.now() - t0) / 1000;
  figures.suiteSeconds = { cpu: cpu.seconds.redflag, device: dev.seconds.redflag };

  check(dev.settings.device === deviceName(device) && dev.settings.dtype === 'f32', 'the report says where it ran', { device: dev.settings.device, dtype: dev.settings.dtype });
  check(dev.cache.hits === 0 && dev.cache.computed > 0, device === 'cpu' ? 'the second CPU run computes every unit (its own output directory)' : 'the CPU run\'s cache entries are not read for the device', dev.cache);
  for (const suite of cpu.suites) {
    const diff = differences(dev.results.redflag[suite], cpu.results.redflag[suite], 1e-3);
    check(cpu.results.redflag[suite] !== undefined && diff.length === 0, `${suite}: the device's figures equal the CPU's`, diff.length ? { differences: diff.slice(0, 8) } : {});
  }
} catch (error) {
  check(false, 'ran without an error', { error: String(error?.stack ?? error) });
} finally {
  await rm(dir, { recursive: true, force: true });
}
finish('evalE2e', device, { figures });
