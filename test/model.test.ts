// The native engine against golden logits from the PyTorch reference (test/reference/),
// which follows transformers' modeling code; plus KV-cache and batching consistency.
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';

import { loadModel } from '../lib/model/model.js';
import { FIXTURES, FIXTURE_NAMES, readReference, relL2 } from './helpers/fixtures.js';

// f32: the engine agrees with the float64 reference to ~5e-7 relative L2 (accumulation order
// differs). The issue asks for 1e-4; 1e-5 keeps a 20x margin and also catches the subtlest
// bug the fixtures target (erf GELU instead of gelu_new moves GPT-2 logits by ~1.6e-4; every
// other moves them by > 1e-3, see test/fixtures/models/README.md).
const F32_TOLERANCE = 1e-5;
// bf16: weights rounded to 8 mantissa bits (and, on AVX-512 BF16, activations too): 5e-3 to 1.1e-2 seen.
const BF16_TOLERANCE = 2e-2;

describe.each(FIXTURE_NAMES)('%s', (fixture) => {
  const dir = join(FIXTURES, fixture);

  it('f32 logits match the reference for every case', async () => {
    const { cases } = await readReference(fixture);
    const model = await loadModel(dir, { dtype: 'f32', threads: 2 });
    try {
      for (const c of cases) {
        const logits = await model.logits(c.ids);
        expect(logits.length).toBe(c.ids.length * model.vocabSize);
        expect(relL2(logits, c.logits), `case ${c.name}`).toBeLessThan(F32_TOLERANCE);
      }
    } finally {
      model.dispose();
    }
  });

  // The same logits seen through the teacher-forced path (no [tokens x vocab] leaves native
  // memory): each next token's log-probability against a float64 log-softmax of the reference's
  // logits (their ~1e-5 relative error moves a log-probability by well under 1e-3).
  it('teacher-forced next-token log-probabilities match the reference', async () => {
    const { cases } = await readReference(fixture);
    const model = await loadModel(dir, { dtype: 'f32', threads: 2 });
    try {
      for (const c of cases) {
        const seq = model.newSequence();
        const { pRf, logprobs } = await model.teacherForced([seq], [c.ids]);
        seq.dispose();
        const V = model.vocabSize;
        expect(logprobs).toHaveLength(c.ids.length);
        expect(pRf.every((p) => p === 0)).toBe(true);
        for (let t = 0; t + 1 < c.ids.length; t++) {
          const row = c.logits.subarray(t * V, (t + 1) * V);
          let max = -Infinity;
          for (const z of row) max = Math.max(max, z);
          let sum = 0;
          for (const z of row) sum += Math.exp(z - max);
          const want = row[c.ids[t + 1]!]! - max - Math.log(sum);
          expect(Math.abs(logprobs[t]! - want), `case ${c.name} position ${t}`).toBeLessThan(1e-3);
        }
        expect(logprobs[c.ids.length - 1]).toBeNaN();
      }
    } finally {
      model.dispose();
    }
  });

  it('bf16 logits are within 2e-2 of the reference', async () => {
    const { cases } = await readReference(fixture);
    const model = await loadModel(dir, { dtype: 'bf16', threads: 2 });
    try {
      for (const c of cases) {
        expect(relL2(await model.logits(c.ids), c.logits), `case ${c.name}`).toBeLessThan(BF16_TOLERANCE);
      }
    } finally {
      model.dispose();
    }
  });

  it('KV-cache decode equals full prefill at every step, and batched prefill equals single', async () => {
    const { cases } = await readReference(fixture);
    const longest = cases.reduce((a, b) => (b.ids.length > a.ids.length ? b : a));
    const model = await loadModel(dir, { threads: 1 });
    try {
      const V = model.vocabSize;
      const full = await model.logits(longest.ids);
      const seq = model.newSequence();
      const prefix = 5;
      const rows = [await model.forward([seq], [longest.ids.slice(0, prefix)], { all: true })];
      for (let t = prefix; t < longest.ids.length; t++) rows.push(await model.forward([seq], [[longest.ids[t]!]]));
      seq.dispose();
      const stepped = new Float32Array(full.length);
      let offset = 0;
      for (const r of rows) {
        stepped.set(r, offset);
        offset += r.length;
      }
      if (fixture === 'llama-rope-dynamic') {
        // Dynamic NTK rope is stateful in transformers: a cached decode differs from a full
        // forward past max_position_embeddings, and the reference records what HF produces.
        const { extra } = await readReference(fixture);
        expect(relL2(stepped, extra.get('logits_cached.t20')!)).toBeLessThan(F32_TOLERANCE);
      } else {
        for (let t = 0; t < longest.ids.length; t++) {
          const a = stepped.subarray(t * V, (t + 1) * V), b = full.subarray(t * V, (t + 1) * V);
          expect(relL2(a, b), `step ${t}`).toBeLessThan(1e-5);
        }
      }
      const batched = await model.logitsBatch(cases.map((c) => c.ids));
      for (const [i, c] of cases.entries()) {
        expect(relL2(batched[i]!, await model.logits(c.ids)), `batched case ${c.name}`).toBeLessThan(1e-6);
      }
    } finally {
      model.dispose();
    }
  });
});
