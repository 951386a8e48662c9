// The held-out evaluation that training logs and the integration test's bounds rest on
// (lib/train/evaluate.ts), against the same figures computed here in float64 from the model's own
// logits: p(<rf>) per response position with the adapter on, KL(base ‖ adapted) with it off.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rm } from 'node:fs/promises';

import { encodeConversation, type EncodedConversation } from '../lib/data/encode.js';
import { generateSyntheticData } from '../lib/data/synthetic.js';
import { loadModel, type Model } from '../lib/model/model.js';
import { evaluateRedFlag } from '../lib/train/evaluate.js';
import { applyAdapter } from '../lib/train/export.js';
import { tinyRedFlagModel } from './helpers/red-flag-adapter.js';
import { logSoftmax } from './helpers/fixtures.js';

let base: string;
let root: string;
let model: Model;
let examples: EncodedConversation[];

beforeAll(async () => {
  let adapter: string;
  ({ base, root, adapter } = await tinyRedFlagModel(12));
  model = await loadModel(base, { threads: 2 });
  await applyAdapter(model, adapter);
  const { test } = generateSyntheticData({ seed: 5, perCategory: 4 });
  examples = test.slice(0, 12).map((c) => encodeConversation(model.tokenizer!, c, { maxTokens: 96 }));
}, 300_000);
afterAll(async () => {
  model?.dispose();
  if (base) await rm(base, { recursive: true, force: true });
  if (root) await rm(root, { recursive: true, force: true });
});

describe('evaluateRedFlag', () => {
  it("scores each response by its largest p(<rf>), and benign KL as KL(base ‖ adapted) per benign response token, as float64 from the model's logits", async () => {
    const rf = model.redFlagTokenId!;
    const V = model.vocabSize;
    const adapted: Float32Array[] = [];
    for (const e of examples) adapted.push(await model.logits(e.ids));
    await model.setAdapterEnabled(false);
    const reference: Float32Array[] = [];
    for (const e of examples) reference.push(await model.logits(e.ids));
    await model.setAdapterEnabled(true);
    // p(<rf>) per response position, and a threshold between the scores' middle two, so that both
    // sides of it are compared.
    const pRf = examples.map((e, n) => {
      const ps: number[] = [];
      for (let j = e.responseStart; j < e.responseEnd; j++) ps.push(Math.exp(logSoftmax(adapted[n]!.subarray((j - 1) * V, j * V))[rf]!));
      return ps;
    });
    const sorted = pRf.map((ps) => Math.max(...ps)).sort((a, b) => a - b);
    const threshold = (sorted[5]! + sorted[6]!) / 2;
    const result = await evaluateRedFlag(model, examples, { rfToken: rf, threshold, batchSize: 5 });

    let kl = 0;
    let tokens = 0;
    const expected = examples.map((e, n) => {
      if (e.label === 'benign') {
        for (let j = e.responseStart; j < e.responseEnd; j++) {
          const q = logSoftmax(adapted[n]!.subarray((j - 1) * V, j * V));
          const r = logSoftmax(reference[n]!.subarray((j - 1) * V, j * V));
          for (let v = 0; v < V; v++) kl += Math.exp(r[v]!) * (r[v]! - q[v]!);
          tokens++;
        }
      }
      return { label: e.label, maxPRf: Math.max(...pRf[n]!), firstFlag: pRf[n]!.findIndex((p) => p >= threshold) };
    });
    expect(result.examples).toHaveLength(examples.length);
    result.examples.forEach((s, n) => {
      expect(s.label).toBe(expected[n]!.label);
      expect(Math.abs(s.maxPRf - expected[n]!.maxPRf)).toBeLessThan(1e-6);
      expect(s.firstFlag).toBe(expected[n]!.firstFlag);
    });
    const rate = (label: string) => {
      const xs = expected.filter((x) => x.label === label);
      return xs.filter((x) => x.maxPRf >= threshold).length / xs.length;
    };
    expect([result.harmful, result.benign]).toEqual([expected.filter((x) => x.label === 'harmful').length, expected.filter((x) => x.label === 'benign').length]);
    expect(result.harmfulFlagRate).toBe(rate('harmful'));
    expect(result.benignFalseFlagRate).toBe(rate('benign'));
    // The adapter moved the benign distribution a little, and the direction of the KL shows.
    expect(kl / tokens).toBeGreaterThan(1e-6);
    expect(Math.abs(result.benignKl - kl / tokens)).toBeLessThan(1e-6 * (kl / tokens) + 1e-9);
    // Both classes and some variety in the scores, or the comparison above would say little.
    expect(result.harmful).toBeGreaterThan(0);
    expect(result.benign).toBeGreaterThan(0);
    expect(new Set(expected.map((x) => x.maxPRf >= threshold)).size).toBe(2);
  });
});
