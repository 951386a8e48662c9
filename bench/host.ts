/**
 * `npm run bench -- host [--quick]`: the host's share of a decode step, the detector's
 * TypeScript work per generated token (handing picks to generations, decoding their text, stop
 * strings, scheduling) with the native step taken out, and what overlapping it with the device
 * gives (`overlapSteps`, the GPU default).
 *
 * The model is a one-layer random Llama with the packaged 32000-token tokenizer; its decode step
 * is replaced by a simulated device that answers after `deviceMs` of a timer (the JavaScript
 * thread is free meanwhile, as while a GPU computes) with tokens of ordinary English text, so the
 * text decoding does real work. At 1, 32 and 256 concurrent generations:
 *   - hostUsPerToken: host time per generated token with an instant device, one step after another;
 *   - with a `deviceMs` device: ms per step one step after another (device + host) and
 *     overlapped (the larger of the two, ideally), and the speedup.
 * The device time is an assumption, not a measurement of a GPU: 3 ms is about a Llama-3.2-1B
 * decode step of 64 to 256 sequences on an H100-class GPU; the host figures are this machine's.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { createDetector } from '../lib/detect/detector.js';
import { loadModel, type Model } from '../lib/model/model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { writeRandomModel } from '../lib/model/random-model.js';
import type { NativeModel } from '../lib/native.js';
import { packagedTokenizer } from '../lib/train/pipeline.js';

const round = (x: number, digits = 3) => Number(x.toPrecision(digits + 1));

const TEXT =
  ' The river runs through a quiet valley where old stone bridges cross it, and in spring the water rises with melted snow from the mountains.' +
  ' Farmers along its banks plant barley and beans, and children fish from the bridges on warm evenings while the swallows fly low.';

/** Replaces the model's native decode step by a simulated device (see the module description). */
function simulateDevice(model: Model, words: number[]): { deviceMs: number; steps: number; deviceSeconds: number } {
  const sim = { deviceMs: 0, steps: 0, deviceSeconds: 0 };
  const real = model.engine;
  const decodeStep: NativeModel['decodeStep'] = async (sequences, _flat, _counts, _params, _flags, topN) => {
    const t0 = performance.now();
    if (sim.deviceMs > 0) await new Promise((resolve) => setTimeout(resolve, sim.deviceMs));
    const n = sequences.length;
    const tokens = new Uint32Array(n);
    for (let i = 0; i < n; i++) tokens[i] = words[(sim.steps + 7 * i) % words.length]!;
    sim.steps++;
    sim.deviceSeconds += (performance.now() - t0) / 1000;
    return { tokens, logprobs: new Float32Array(n).fill(-1.5), pRf: new Float32Array(n).fill(0.001), topIds: new Uint32Array(n * topN), topLogprobs: new Float32Array(n * topN) };
  };
  // The engine's methods are read-only properties of a native object: a proxy answers for it.
  const engine = new Proxy(real, {
    get(target, key) {
      if (key === 'decodeStep') return decodeStep;
      const value = Reflect.get(target, key) as unknown;
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
    },
  });
  Object.defineProperty(model, 'engine', { value: engine });
  return sim;
}

/** Generations at once, each `maxTokens` long; seconds and steps of the whole run. */
async function generateAll(model: Model, streams: number, maxTokens: number, overlapSteps: boolean, sim: ReturnType<typeof simulateDevice>) {
  const detector = await createDetector({ model, mode: 'flag', maxBatch: streams, kvCacheBytes: 2 ** 30, overlapSteps });
  try {
    const steps0 = sim.steps;
    const device0 = sim.deviceSeconds;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: streams }, async (_, i) => {
        const stream = detector.generate([{ role: 'user', content: `Tell me about the river, part ${i}.` }], { maxTokens });
        for await (const _t of stream) {
          // consumed as a server would
        }
        await stream.done;
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    return { seconds, steps: sim.steps - steps0, deviceSeconds: sim.deviceSeconds - device0, tokens: streams * maxTokens };
  } finally {
    await detector.dispose();
  }
}

export async function benchHost(quick: boolean) {
  const dir = await mkdtemp(join(tmpdir(), 'redflag-bench-host-'));
  try {
    await writeRandomModel(dir, {
      architecture: 'llama', vocabSize: 32000, hiddenSize: 64, intermediateSize: 128, numLayers: 1, numHeads: 2, numKvHeads: 1,
      seed: 1, bosTokenId: 1, eosTokenId: 2, tokenizer: await packagedTokenizer(),
    }, { overwrite: true });
    const model = await loadModel(dir, { threads: 1 });
    try {
      await addRedFlagToken(model);
      const sim = simulateDevice(model, model.tokenizer!.encode(TEXT, { addSpecialTokens: false }));
      const deviceMs = 3;
      const maxTokens = quick ? 32 : 128;
      const results = [];
      for (const streams of [1, 32, 256]) {
        sim.deviceMs = 0;
        // Warm-up at full length (the JIT's optimized tiers), then the median of 5 host runs: a
        // single run after a short warm-up read up to 3x the steady cost at 32 streams.
        await generateAll(model, streams, maxTokens, false, sim);
        const hostRuns = [];
        for (let r = 0; r < 5; r++) hostRuns.push(await generateAll(model, streams, maxTokens, false, sim));
        const host = hostRuns.sort((a, b) => a.seconds / a.steps - b.seconds / b.steps)[2]!;
        sim.deviceMs = deviceMs;
        const sequential = await generateAll(model, streams, maxTokens, false, sim);
        const overlapped = await generateAll(model, streams, maxTokens, true, sim);
        const msPerStep = (r: typeof host) => (1000 * r.seconds) / r.steps;
        const hostMs = msPerStep(host);
        results.push({
          streams,
          hostMsPerStep: round(hostMs),
          hostUsPerToken: round((1e6 * host.seconds) / host.tokens),
          deviceMsPerStep: round((1000 * overlapped.deviceSeconds) / overlapped.steps),
          sequentialMsPerStep: round(msPerStep(sequential)),
          overlappedMsPerStep: round(msPerStep(overlapped)),
          overlappedSteps: overlapped.steps,
          sequentialSteps: sequential.steps,
          tokensPerSecondSequential: round(sequential.tokens / sequential.seconds),
          tokensPerSecondOverlapped: round(overlapped.tokens / overlapped.seconds),
          speedup: round(sequential.seconds / overlapped.seconds, 2),
        });
      }
      return {
        bench: 'host',
        label: 'the detector with a simulated device (a timer) on a one-layer Llama with the packaged 32000-token tokenizer',
        deviceMs,
        maxTokens,
        note: 'hostUsPerToken: the TypeScript side per generated token with an instant device; with a device of deviceMs a step, ms per step one step after another and overlapped (overlapSteps; its steps include one guess past each answer\'s end)',
        results,
      };
    } finally {
      model.dispose();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
