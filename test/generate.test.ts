// Generation: greedy equals the argmax of full-sequence logits, seeds reproduce, stop strings
// and EOS end it, an AbortSignal cancels it, and native work never blocks the event loop.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rm } from 'node:fs/promises';

import { RedflagError } from '../lib/errors.js';
import { loadModel, type Model } from '../lib/model/model.js';
import { tinyLlama } from './helpers/tiny-model.js';

let dir: string;
let model: Model;

/** The reference: first index of the largest logit in row [offset, offset + length). */
function argmax(logits: Float32Array, offset: number, length: number): number {
  let best = 0;
  for (let i = 1; i < length; i++) if (logits[offset + i]! > logits[offset + best]!) best = i;
  return best;
}

beforeAll(async () => {
  dir = await tinyLlama();
  model = await loadModel(dir, { threads: 2 });
});
afterAll(async () => {
  model.dispose();
  await rm(dir, { recursive: true, force: true });
});

async function collect(it: AsyncIterable<{ token: number; text: string }>) {
  const tokens: number[] = [];
  let text = '';
  for await (const t of it) {
    tokens.push(t.token);
    text += t.text;
  }
  return { tokens, text };
}

describe('generate', () => {
  it('greedy decoding picks the argmax of the full-sequence logits at every step', async () => {
    const prompt = model.tokenizer!.encode('The quick brown fox');
    const { tokens } = await collect(model.generate(prompt, { maxTokens: 12, temperature: 0, eosTokenIds: [] }));
    expect(tokens).toHaveLength(12);
    const all = [...prompt, ...tokens];
    const logits = await model.logits(all);
    const V = model.vocabSize;
    for (let i = 0; i < tokens.length; i++) {
      expect(argmax(logits, (prompt.length - 1 + i) * V, V)).toBe(tokens[i]);
    }
  });

  it('text equals decoding the generated tokens', async () => {
    const { tokens, text } = await collect(model.generate('Hello', { maxTokens: 16, eosTokenIds: [] }));
    expect(text).toBe(model.tokenizer!.decode(tokens, { skipSpecialTokens: true }));
  });

  it('the same seed gives the same sample; another seed differs', async () => {
    const opts = { maxTokens: 16, temperature: 1.5, topK: 50, topP: 0.95, eosTokenIds: [] };
    const a = await collect(model.generate('Once', { ...opts, seed: 7 }));
    const b = await collect(model.generate('Once', { ...opts, seed: 7 }));
    const c = await collect(model.generate('Once', { ...opts, seed: 8 }));
    expect(a.tokens).toEqual(b.tokens);
    expect(c.tokens).not.toEqual(a.tokens);
  });

  it('stops at EOS ids without yielding them', async () => {
    const greedy = await collect(model.generate('Hi', { maxTokens: 8, eosTokenIds: [] }));
    const stopAt = greedy.tokens[3]!;
    const first = greedy.tokens.indexOf(stopAt);
    const { tokens } = await collect(model.generate('Hi', { maxTokens: 8, eosTokenIds: [stopAt] }));
    expect(tokens).toEqual(greedy.tokens.slice(0, first));
  });

  it('stops at a stop string and leaves it out of the text', async () => {
    const greedy = await collect(model.generate('Hi', { maxTokens: 20, eosTokenIds: [] }));
    const stop = greedy.text.slice(10, 14);
    expect(stop.length).toBe(4);
    const { text } = await collect(model.generate('Hi', { maxTokens: 20, eosTokenIds: [], stop: [stop] }));
    expect(text).toBe(greedy.text.slice(0, greedy.text.indexOf(stop)));
  });

  it('maxTokens 0 yields nothing; bad options are rejected before native code', async () => {
    expect((await collect(model.generate('Hi', { maxTokens: 0 }))).tokens).toEqual([]);
    await expect(collect(model.generate('Hi', { temperature: -1 }))).rejects.toThrow(/temperature/);
    await expect(collect(model.generate('Hi', { topP: 0 }))).rejects.toThrow(/topP/);
    await expect(collect(model.generate([1, 99999999]))).rejects.toThrow(/not a token id/);
  });

  it('an AbortSignal cancels generation', async () => {
    const controller = new AbortController();
    const seen: number[] = [];
    const run = (async () => {
      for await (const t of model.generate('Hi', { maxTokens: 1000, eosTokenIds: [], signal: controller.signal })) {
        seen.push(t.token);
        if (seen.length === 3) controller.abort(new RedflagError('ABORTED', 'stopped by test'));
      }
    })();
    await expect(run).rejects.toThrow(/stopped by test/);
    expect(seen.length).toBe(3);
  });
});

describe('the event loop', () => {
  it('keeps running timers during a long prefill', async () => {
    const big = await loadModel(dir, { threads: 1 });
    try {
      const ids = Array.from({ length: 1500 }, (_, i) => (i * 31) % 32000);
      const started = performance.now();
      const ticks: number[] = [started];
      const timer = setInterval(() => ticks.push(performance.now()), 5);
      // The teacher-forced pass: the whole prefill and LM head natively, with a few numbers per
      // token back (a [tokens x vocab] result would take the main thread a while to copy).
      const seq = big.newSequence();
      const { logprobs } = await big.teacherForced([seq], [ids]);
      seq.dispose();
      const ended = performance.now();
      clearInterval(timer);
      ticks.push(ended);
      const elapsed = ended - started;
      expect(logprobs.length).toBe(ids.length);
      // Had the prefill blocked the loop, no tick could fire until it returned: one gap as long
      // as the prefill. Judged by the longest gap rather than a tick count, since other work on
      // the machine (tests run two at a time) may slow every timer without blocking the loop.
      expect(elapsed).toBeGreaterThan(50);
      let longest = 0;
      for (let i = 1; i < ticks.length; i++) longest = Math.max(longest, ticks[i]! - ticks[i - 1]!);
      expect(ticks.length, `${ticks.length - 2} ticks in ${elapsed.toFixed(0)} ms`).toBeGreaterThan(7);
      expect(longest, `longest gap ${longest.toFixed(0)} ms of ${elapsed.toFixed(0)} ms`).toBeLessThan(elapsed / 2);
    } finally {
      big.dispose();
    }
  });

  it('reports progress per layer, and an AbortSignal stops a prefill between layers', async () => {
    const deepDir = await tinyLlama({ numLayers: 24, hiddenSize: 128, intermediateSize: 256 });
    const deep = await loadModel(deepDir, { threads: 2 });
    try {
      const ids = Array.from({ length: 1200 }, (_, i) => (i * 17) % 32000);
      const progress: number[] = [];
      await deep.logits(ids.slice(0, 8), { onProgress: (d) => progress.push(d) });
      expect(progress).toEqual(Array.from({ length: 24 }, (_, i) => i + 1));

      const controller = new AbortController();
      let reported = 0;
      const run = deep.logits(ids, {
        signal: controller.signal,
        onProgress: () => {
          reported++;
          controller.abort();
        },
      });
      await expect(run).rejects.toMatchObject({ name: 'AbortError' });
      expect(reported).toBeGreaterThan(0);
      expect(reported).toBeLessThan(24); // stopped early, not after the whole prefill
      // The model is usable afterwards, and an already-aborted signal rejects at once.
      expect((await deep.logits([1, 2, 3])).length).toBe(3 * deep.vocabSize);
      await expect(deep.logits([1], { signal: controller.signal })).rejects.toMatchObject({ name: 'AbortError' });
    } finally {
      deep.dispose();
      await rm(deepDir, { recursive: true, force: true });
    }
  });

  it('an onProgress callback that throws stops the prefill, which fails with its error', async () => {
    const deepDir = await tinyLlama({ numLayers: 24, hiddenSize: 128, intermediateSize: 256 });
    const deep = await loadModel(deepDir, { threads: 2 });
    try {
      const ids = Array.from({ length: 1200 }, (_, i) => (i * 17) % 32000);
      let calls = 0;
      const failing = deep.logits(ids, {
        onProgress: () => {
          calls++;
          throw new Error('the callback broke');
        },
      });
      await expect(failing).rejects.toThrow('the callback broke');
      expect(calls).toBe(1);
      expect((await deep.logits([1, 2, 3])).length).toBe(3 * deep.vocabSize);
    } finally {
      deep.dispose();
      await rm(deepDir, { recursive: true, force: true });
    }
  });

  it('an AbortSignal during the LM head of tokenScores leaves the sequence as it was', async () => {
    const dir = await tinyLlama({ numLayers: 1, hiddenSize: 64, maxPositions: 4096 });
    const model = await loadModel(dir, { threads: 1 });
    try {
      const seq = model.newSequence();
      const ids = Array.from({ length: 3000 }, (_, i) => (i * 7) % 32000);
      const controller = new AbortController();
      // The forward has appended the tokens once the length moves; the LM head's 3000 x 32000
      // logits then take far longer than the next poll.
      const poll = setInterval(() => {
        if (seq.length > 0) controller.abort();
      }, 1);
      await expect(model.tokenScores([seq], [ids], { rfToken: 5, signal: controller.signal })).rejects.toMatchObject({ name: 'AbortError' });
      clearInterval(poll);
      expect(seq.length).toBe(0);
      const again = await model.tokenScores([seq], [ids.slice(0, 10)], { rfToken: 5 });
      const fresh = model.newSequence();
      expect(again).toEqual(await model.tokenScores([fresh], [ids.slice(0, 10)], { rfToken: 5 }));
      fresh.dispose();
      seq.dispose();
    } finally {
      model.dispose();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
