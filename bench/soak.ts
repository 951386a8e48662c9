/**
 * `npm run bench -- soak [--seconds 600] [--clients 64] [--seed 1]`: the server under a steady
 * mixed load over loopback, to catch what only time shows (leaks, stuck requests, answers that
 * drift under batching). `clients` concurrent clients each send one request after another until
 * the time is up, a seeded random mix of prompt lengths, `max_tokens`, streamed or not; 5% of the
 * requests disconnect mid-stream and 2% are malformed, invalid or oversized bodies (expected 4xx).
 * Reports requests served, errors by kind (expected 4xx vs anything else, which is a failure),
 * p50/p99 time to first token, memory after a warm-up and at the end (under the same load, after
 * a GC), KV caches still alive once the load stops, and whether every completed greedy answer
 * equals the detector's answer to the same request run alone. test/soak.test.ts runs a short
 * version.
 *
 * Memory is judged on live bytes: V8's heap in use plus the C allocator's bytes in use (glibc's
 * count, through the addon's memoryInfo()). Resident memory is reported too, but over a short
 * run it keeps creeping for minutes as the allocator's arenas and fragmentation settle (+5% in
 * 30 s, +1.4% over 600 s, with no leak), so it is a weak signal of a leak; live bytes are not.
 * @module
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

import { createDetector } from '../lib/detect/detector.js';
import type { Detector } from '../lib/detect/types.js';
import { loadModel } from '../lib/model/model.js';
import { loadNative } from '../lib/native.js';
import { writeRandomModel } from '../lib/model/random-model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { createRng } from '../lib/model/sampling.js';
import { serve } from '../lib/server/serve.js';
import { packagedTokenizer } from '../lib/train/pipeline.js';

export interface SoakOptions {
  /** Length of the load, warm-up included. */
  seconds: number;
  /** Concurrent clients. Default 64. */
  clients?: number;
  /** Seeds the prompts and every client's choices. Default 1. */
  seed?: number;
  /** Progress lines (to stderr in the bench). */
  onProgress?: (line: string) => void;
  /** Default 30. */
  progressEverySeconds?: number;
}

/** Distinct prompts (their lengths in words) and `max_tokens` values the requests mix. */
const PROMPT_WORDS = [2, 6, 12, 24, 48, 96, 160, 240];
const MAX_TOKENS = [1, 4, 16, 48];
const DISCONNECT_RATE = 0.05;
const BAD_BODY_RATE = 0.02;
const MODEL_NAME = 'soak';
/** A request that takes this long has hung: an unexpected error. */
const REQUEST_TIMEOUT_MS = 120_000;
const BODY_LIMIT = 1024 * 1024;
const WORDS = 'the river runs through a valley where birds sing and old stones keep the memory of rain while children count stars'.split(' ');

type Outcome =
  | { kind: 'completed'; text: string; finishReason: string; ttftMs: number | null }
  | { kind: 'disconnected' }
  | { kind: 'expected'; what: string }
  | { kind: 'unexpected'; what: string; detail: string };

interface Plan {
  prompt: number;
  maxTokens: number;
  stream: boolean;
  /** Content events to read before dropping the connection; 0: read to the end. */
  disconnectAfter: number;
  bad: 'malformed' | 'invalid' | 'oversized' | null;
}

/** The `--expose-gc` collector, also reachable without the flag (V8 accepts it at run time). */
function findGc(): (() => void) | null {
  const exposed = (globalThis as { gc?: () => void }).gc;
  if (exposed) return exposed;
  try {
    setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as () => void;
  } catch {
    return null;
  }
}

function percentile(sorted: number[], p: number): number | null {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

const round = (x: number, digits = 3) => Number(x.toPrecision(digits + 1));
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function makePrompts(seed: number): string[] {
  const rng = createRng(seed);
  return PROMPT_WORDS.map((n, i) => `Request ${i}: ${Array.from({ length: n }, () => WORDS[Math.floor(rng() * WORDS.length)]).join(' ')}`);
}

function planRequest(rng: () => number): Plan {
  const roll = rng();
  const prompt = Math.floor(rng() * PROMPT_WORDS.length);
  const maxTokens = MAX_TOKENS[Math.floor(rng() * MAX_TOKENS.length)]!;
  if (roll < BAD_BODY_RATE) {
    const bad = (['malformed', 'invalid', 'oversized'] as const)[Math.floor(rng() * 3)]!;
    return { prompt, maxTokens, stream: false, disconnectAfter: 0, bad };
  }
  if (roll < BAD_BODY_RATE + DISCONNECT_RATE) return { prompt, maxTokens, stream: true, disconnectAfter: 1 + Math.floor(rng() * 3), bad: null };
  return { prompt, maxTokens, stream: rng() < 0.5, disconnectAfter: 0, bad: null };
}

const key = (prompt: number, maxTokens: number) => `${prompt}/${maxTokens}`;

/** The detector's greedy answer to each (prompt, max_tokens), generated alone, one at a time. */
async function loneAnswers(detector: Detector, prompts: string[]): Promise<Map<string, { text: string; finishReason: string }>> {
  const answers = new Map<string, { text: string; finishReason: string }>();
  for (let p = 0; p < prompts.length; p++) {
    for (const maxTokens of MAX_TOKENS) {
      const stream = detector.generate([{ role: 'user', content: prompts[p]! }], { maxTokens, temperature: 0 });
      for await (const _ of stream);
      const { text, finishReason } = await stream.done;
      answers.set(key(p, maxTokens), { text, finishReason });
    }
  }
  return answers;
}

/** Reads an SSE body: content, finish reason, an error event if any, whether [DONE] came. */
async function readEvents(
  body: ReadableStream<Uint8Array>,
  onEvent: (count: number) => void,
): Promise<{ text: string; finishReason: string | null; error: string | null; done: boolean; firstEventMs: number | null }> {
  const decoder = new TextDecoder();
  let buffered = '';
  let text = '';
  let finishReason: string | null = null;
  let error: string | null = null;
  let done = false;
  let firstEventMs: number | null = null;
  let events = 0;
  for await (const bytes of body) {
    firstEventMs ??= performance.now();
    buffered += decoder.decode(bytes, { stream: true });
    for (let i; (i = buffered.indexOf('\n\n')) >= 0; ) {
      const data = buffered.slice(0, i).replace(/^data: /, '');
      buffered = buffered.slice(i + 2);
      if (data === '[DONE]') {
        done = true;
        continue;
      }
      const event = JSON.parse(data) as { error?: { code: string }; choices?: { delta?: { content?: string }; finish_reason?: string | null }[] };
      if (event.error) error = event.error.code;
      const choice = event.choices?.[0];
      text += choice?.delta?.content ?? '';
      finishReason = choice?.finish_reason ?? finishReason;
      onEvent(++events);
    }
  }
  return { text, finishReason, error, done, firstEventMs };
}

async function send(url: string, plan: Plan, prompts: string[], oversized: string): Promise<Outcome> {
  // One controller for both the planned disconnect and the hang guard (AbortSignal.timeout would
  // keep every request's signal alive for the whole timeout, which the memory figures would show).
  const controller = new AbortController();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    controller.abort();
  }, REQUEST_TIMEOUT_MS);
  const signal = controller.signal;
  let body: string;
  if (plan.bad === 'malformed') body = `{"model":"${MODEL_NAME}","messages":[{"role":"user","content":"unterminated`;
  else if (plan.bad === 'oversized') body = oversized;
  else if (plan.bad === 'invalid') body = JSON.stringify({ model: MODEL_NAME, messages: [{ role: 'user', content: 'hi' }], max_tokens: -3 });
  else {
    body = JSON.stringify({
      model: MODEL_NAME,
      messages: [{ role: 'user', content: prompts[plan.prompt] }],
      max_tokens: plan.maxTokens,
      temperature: 0,
      stream: plan.stream,
    });
  }
  const t0 = performance.now();
  try {
    const response = await fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body, signal });
    if (plan.bad) {
      await response.arrayBuffer();
      const expected = plan.bad === 'oversized' ? 413 : 400;
      return response.status === expected
        ? { kind: 'expected', what: `${response.status} ${plan.bad}` }
        : { kind: 'unexpected', what: `${plan.bad} answered ${response.status}`, detail: '' };
    }
    if (response.status !== 200) return { kind: 'unexpected', what: `status ${response.status}`, detail: (await response.text()).slice(0, 300) };
    if (!plan.stream) {
      const completion = (await response.json()) as { choices: { message: { content: string }; finish_reason: string }[] };
      const choice = completion.choices[0]!;
      return { kind: 'completed', text: choice.message.content, finishReason: choice.finish_reason, ttftMs: null };
    }
    const read = await readEvents(response.body!, (count) => {
      if (plan.disconnectAfter > 0 && count >= plan.disconnectAfter) controller.abort();
    });
    if (read.error) return { kind: 'unexpected', what: `stream error ${read.error}`, detail: '' };
    if (!read.done || read.finishReason === null) return { kind: 'unexpected', what: 'stream ended without [DONE]', detail: '' };
    return { kind: 'completed', text: read.text, finishReason: read.finishReason, ttftMs: read.firstEventMs === null ? null : read.firstEventMs - t0 };
  } catch (error) {
    if (timedOut) return { kind: 'unexpected', what: 'timeout', detail: `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` };
    if (controller.signal.aborted) return { kind: 'disconnected' };
    const e = error as Error & { cause?: { code?: string } };
    return { kind: 'unexpected', what: `network ${e.cause?.code ?? e.name}`, detail: e.message };
  } finally {
    clearTimeout(timer);
  }
}

function count(map: Record<string, number>, what: string): void {
  map[what] = (map[what] ?? 0) + 1;
}

/** Runs the soak and returns its report (`passed`: no unexpected error, no answer mismatch, live memory growth under 5%, no KV cache left alive). */
export async function runSoak(options: SoakOptions) {
  const seconds = options.seconds;
  const clients = options.clients ?? 64;
  const seed = options.seed ?? 1;
  if (!(seconds > 0) || !Number.isInteger(clients) || clients < 1) throw new Error(`soak: seconds must be > 0 and clients an integer >= 1, got ${seconds}, ${clients}`);
  const progress = options.onProgress ?? (() => {});
  const gc = findGc();
  // Long enough for V8's heap and the allocator to reach their working size under this load.
  const warmupMs = Math.min(60, Math.max(5, seconds * 0.1)) * 1000;

  const dir = await mkdtemp(join(tmpdir(), 'redflag-soak-'));
  // The tests' tiny Llama (test/helpers/tiny-model.ts): small enough for 64 clients to make progress on 2 cores.
  await writeRandomModel(dir, {
    architecture: 'llama', vocabSize: 32000, hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2,
    seed: 3, bosTokenId: 1, eosTokenId: 2, tokenizer: await packagedTokenizer(),
  }, { overwrite: true });
  const model = await loadModel(dir, { threads: 2 });
  let detector: Detector | undefined;
  let server: Awaited<ReturnType<typeof serve>> | undefined;
  try {
    await addRedFlagToken(model);
    // Threshold 1: a random model never raises the flag, so answers run to EOS or max_tokens in every mode.
    detector = await createDetector({ model, threshold: 1, mode: 'flag' });
    const prompts = makePrompts(seed);
    const lone = await loneAnswers(detector, prompts);
    const sequencesBefore = loadNative().memoryInfo().liveSequences;
    // Twice the clients: a client that just disconnected may start its next request before the server has seen it leave.
    server = await serve({ detector, port: 0, modelName: MODEL_NAME, maxConcurrent: 2 * clients, bodyLimit: BODY_LIMIT });
    const oversized = JSON.stringify({ model: MODEL_NAME, messages: [{ role: 'user', content: 'x'.repeat(Math.round(1.5 * BODY_LIMIT)) }] });

    const served: Record<string, number> = {};
    const expected: Record<string, number> = {};
    const unexpected: Record<string, number> = {};
    const unexpectedExamples: string[] = [];
    const ttfts: number[] = [];
    const mismatches: { request: string; got: string; alone: string }[] = [];
    let compared = 0;

    const t0 = performance.now();
    const deadline = t0 + seconds * 1000;
    const client = async (c: number) => {
      const rng = createRng(seed * 1_000_003 + c);
      while (performance.now() < deadline) {
        const plan = planRequest(rng);
        const outcome = await send(server!.url, plan, prompts, oversized);
        if (outcome.kind === 'completed') {
          count(served, plan.stream ? 'streamed' : 'whole');
          if (outcome.ttftMs !== null) ttfts.push(outcome.ttftMs);
          const alone = lone.get(key(plan.prompt, plan.maxTokens))!;
          compared++;
          if (outcome.text !== alone.text || outcome.finishReason !== alone.finishReason) {
            mismatches.push({ request: key(plan.prompt, plan.maxTokens), got: outcome.text.slice(0, 200), alone: alone.text.slice(0, 200) });
          }
        } else if (outcome.kind === 'disconnected') {
          count(served, 'disconnected');
        } else if (outcome.kind === 'expected') {
          count(expected, outcome.what);
        } else {
          count(unexpected, outcome.what);
          if (unexpectedExamples.length < 5) unexpectedExamples.push(`${outcome.what}: ${outcome.detail}`);
        }
      }
    };
    const running = Array.from({ length: clients }, (_, c) => client(c));

    // RSS under load swings by tens of MiB with the requests in flight (a 1.5 MiB body and its
    // copies come and go), so one reading proves little. Once a second, after a GC, it is read;
    // the comparison is between the floors (lowest readings) of a window right after the warm-up
    // and of one at the end, both under the same load: a leak raises the floor, traffic does not.
    await sleep(warmupMs);
    const windowSize = Math.round(Math.min(30, Math.max(4, (seconds - warmupMs / 1000) * 0.15)));
    const readings: { rss: number; heapUsed: number; live: number | null }[] = [];
    const read = () => {
      gc?.();
      const m = process.memoryUsage();
      const malloc = loadNative().memoryInfo().mallocInUseBytes;
      readings.push({ rss: m.rss, heapUsed: m.heapUsed, live: malloc === null ? null : m.heapUsed + malloc });
    };
    read();
    const sampler = setInterval(read, 1000);
    progress(`soak: warmed up (${Object.values(served).reduce((a, b) => a + b, 0)} requests), RSS ${round(readings[0]!.rss / 2 ** 20)} MiB`);
    const ticker = setInterval(() => {
      const done = Object.values(served).reduce((a, b) => a + b, 0);
      progress(`soak: ${Math.round((performance.now() - t0) / 1000)} s, ${done} requests, ${Object.values(unexpected).reduce((a, b) => a + b, 0)} unexpected errors, RSS ${round(process.memoryUsage().rss / 2 ** 20)} MiB`);
    }, options.progressEverySeconds === undefined ? 30_000 : options.progressEverySeconds * 1000);
    await Promise.all(running);
    clearInterval(sampler);
    clearInterval(ticker);
    const elapsed = (performance.now() - t0) / 1000;
    // Every request has been answered or dropped by its client; the server frees a dropped
    // request's sequence when it notices the disconnect, so give it a moment to settle.
    const settleBy = performance.now() + 10_000;
    while ((detector.stats().active > 0 || detector.stats().queued > 0) && performance.now() < settleBy) await sleep(50);
    const liveSequences = loadNative().memoryInfo().liveSequences - sequencesBefore;
    // The last readings taken while every client was still busy: the final second winds down.
    const underLoad = readings.slice(0, Math.max(windowSize, readings.length - 1));
    const floor = (window: typeof readings) => ({
      rssMiB: round(Math.min(...window.map((r) => r.rss)) / 2 ** 20),
      heapUsedMiB: round(Math.min(...window.map((r) => r.heapUsed)) / 2 ** 20),
      liveMiB: window[0]!.live === null ? null : round(Math.min(...window.map((r) => r.live!)) / 2 ** 20),
    });
    const start = floor(underLoad.slice(0, windowSize));
    const end = floor(underLoad.slice(-windowSize));

    ttfts.sort((a, b) => a - b);
    const unexpectedCount = Object.values(unexpected).reduce((a, b) => a + b, 0);
    const rssGrowth = end.rssMiB / start.rssMiB - 1;
    const liveGrowth = start.liveMiB === null || end.liveMiB === null ? null : end.liveMiB / start.liveMiB - 1;
    // What the verdict uses: live bytes where the allocator reports them, resident memory elsewhere.
    const growth = liveGrowth ?? rssGrowth;
    const requests = Object.values(served).reduce((a, b) => a + b, 0) + Object.values(expected).reduce((a, b) => a + b, 0) + unexpectedCount;
    return {
      bench: 'soak',
      model: 'tiny Llama (2 layers, hidden 64, random weights, 32000-token Mistral tokenizer), f32, 2 threads',
      seconds: round(elapsed),
      clients,
      seed,
      requests: { total: requests, perSecond: round(requests / elapsed), ...served },
      errors: { expected, unexpected, unexpectedExamples },
      ttftMs: { streams: ttfts.length, p50: percentile(ttfts, 50) === null ? null : round(percentile(ttfts, 50)!), p99: percentile(ttfts, 99) === null ? null : round(percentile(ttfts, 99)!) },
      greedy: { compared, mismatches: mismatches.length, examples: mismatches.slice(0, 3) },
      memory: {
        warmupSeconds: warmupMs / 1000,
        gc: gc !== null,
        note: `floors of ${windowSize} readings (one a second, after a GC) right after the warm-up and at the end, both under load; live = V8 heap used + C allocator in use`,
        start,
        end,
        rssPeakMiB: round(Math.max(...readings.map((r) => r.rss)) / 2 ** 20),
        rssGrowth: round(rssGrowth),
        liveGrowth: liveGrowth === null ? null : round(liveGrowth),
        /** KV caches still alive after the load, beyond those alive before the server started: a leak if not 0. */
        liveSequences,
      },
      passed: unexpectedCount === 0 && mismatches.length === 0 && compared > 0 && growth < 0.05 && liveSequences === 0,
    };
  } finally {
    await server?.close();
    await detector?.dispose();
    model.dispose();
    await rm(dir, { recursive: true, force: true });
  }
}
