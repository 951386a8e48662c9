// RF-AT (lib/train/adversarial.ts): the step split that gives the red-flag rows of harmful
// sequences to perturbed copies; the inner attack lowering p(<rf>) on a fixed batch (raising the
// red-flag loss) inside its balls; training with it end to end (deterministic, and at ε = 0 the
// same adapter as plain training up to float rounding, since the split only moves rows).
// The step's gradients with a fixed perturbation are checked against finite differences in
// native/tests/test_train.cpp.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';

import { AttackModel } from '../lib/attack/gradient-model.js';
import { encodeConversation } from '../lib/data/encode.js';
import { generateSyntheticData } from '../lib/data/synthetic.js';
import { loadModel } from '../lib/model/model.js';
import { SafetensorsFile, toFloat32 } from '../lib/model/safetensors.js';
import { adversarialDelta, embeddingRowNorms, withPerturbedCopies } from '../lib/train/adversarial.js';
import { buildStep, RowKind } from '../lib/train/objectives.js';
import { createRng } from '../lib/model/sampling.js';
import { train } from '../lib/train/trainer.js';
import { tinyRedFlagModel } from './helpers/red-flag-adapter.js';

let base: string;
let root: string;
let adapter: string;
beforeAll(async () => {
  ({ base, root, adapter } = await tinyRedFlagModel(30));
}, 300_000);
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(root, { recursive: true, force: true });
});

async function step(model: Awaited<ReturnType<typeof loadModel>>) {
  const data = generateSyntheticData({ seed: 0, perCategory: 4 }).train;
  const convs = [...data.filter((c) => c.label === 'harmful').slice(0, 3), ...data.filter((c) => c.label === 'benign').slice(0, 2)];
  const encoded = convs.map((c) => encodeConversation(model.tokenizer!, c, { maxTokens: 96 }));
  return buildStep(encoded, { objective: 'redflag', rfToken: model.redFlagTokenId!, rfOffset: 1, rfSamples: 2, rfWindow: 3, rng: createRng(4) });
}

describe('RF-AT', () => {
  it('splits a step: perturbed copies take the red-flag rows, everything else stays', async () => {
    const model = await loadModel(base, { threads: 2 });
    const attack = await AttackModel.open(model, adapter);
    try {
      const input = await step(model);
      const { input: split, copies } = withPerturbedCopies(input);
      expect(copies.map((c) => c.source)).toEqual(input.flagged.map((f) => f.index));
      expect(split.batch.slice(0, input.batch.length)).toEqual(input.batch);
      for (const c of copies) expect(split.batch[c.index]).toEqual(input.batch[c.source]);
      expect(split.reference).toEqual(input.reference);
      const originalRows = input.batch.reduce((n, s) => n + s.length, 0);
      let moved = 0;
      for (let r = 0; r < split.rows.length; r += 5) {
        const same = [0, 2, 3, 4].every((k) => split.rows[r + k] === input.rows[r + k]);
        expect(same).toBe(true);
        if (split.rows[r] === RowKind.RedFlag) {
          expect(split.rows[r + 1]).toBeGreaterThanOrEqual(originalRows);
          moved++;
        } else {
          expect(split.rows[r + 1]).toBe(input.rows[r + 1]);
        }
      }
      expect(moved).toBeGreaterThan(0);
    } finally {
      attack.close();
      model.dispose();
    }
  });

  it('the inner attack lowers p(<rf>) on a fixed batch, only on prompt tokens, inside the balls', async () => {
    const model = await loadModel(base, { threads: 2 });
    const attack = await AttackModel.open(model, adapter);
    try {
      const split = withPerturbedCopies(await step(model));
      const norms = await embeddingRowNorms(model);
      const H = model.config.hiddenSize;
      const rfLoss = async (delta: Float32Array) => {
        const rows: number[] = [];
        for (let r = 0; r < split.input.rows.length; r += 5) if (split.input.rows[r] === RowKind.RedFlag) rows.push(...split.input.rows.subarray(r, r + 5));
        const none = new Uint32Array(0);
        const t = await model.engine.trainStep(Uint32Array.from(split.input.batch.flat()), Uint32Array.from(split.input.batch, (s) => s.length), none, none, Int32Array.from(rows),
          { aggregation: 'any', alphaBenign: 0, alphaRf: 1, alphaAfter: 0, alphaCe: 0, gradScale: 1, dropoutSeed: 0, paramGrads: false }, undefined, { embedDelta: delta });
        return t.redFlag;
      };
      const total = split.input.batch.reduce((n, s) => n + s.length, 0);
      const clean = await rfLoss(new Float32Array(total * H));
      const epsilon = 0.3;
      const delta = await adversarialDelta(model, split, norms, { epsilon, steps: 4, stepSize: 0.5, aggregation: 'any', dropoutSeed: 0 });
      const attacked = await rfLoss(delta);
      expect(attacked).toBeGreaterThan(clean * 1.5);
      let offset = 0;
      split.input.batch.forEach((seq, b) => {
        const copy = split.copies.find((c) => c.index === b);
        for (let t = 0; t < seq.length; t++) {
          const norm = Math.hypot(...delta.subarray((offset + t) * H, (offset + t + 1) * H));
          if (!copy || t >= copy.promptLength) expect(norm).toBe(0);
          else expect(norm).toBeLessThanOrEqual(epsilon * norms[seq[t]!]! * (1 + 1e-5));
        }
        offset += seq.length;
      });
      console.log(JSON.stringify({ redFlagLossClean: clean, redFlagLossAttacked: attacked }));
    } finally {
      attack.close();
      model.dispose();
    }
  });

  it('trains end to end: deterministic, and at ε = 0 the plain adapter up to rounding', async () => {
    const config = (output: string, adversarial?: object) => ({
      model: base,
      output: join(root, output),
      data: 'synthetic' as const,
      syntheticPerCategory: 3,
      steps: 4,
      batchSize: 4,
      maxTokens: 80,
      evalEvery: 0,
      checkpointEvery: 0,
      threads: 2,
      lora: { rank: 2, alpha: 4, dropout: 0 },
      loss: { rfOffset: 1, rfSamples: 2, rfWindow: 2 },
      optimizer: { lr: 1e-2 },
      ...(adversarial ? { adversarial } : {}),
    });
    const tensors = async (dir: string) => {
      const f = await SafetensorsFile.open(join(root, dir, 'adapter', 'adapter_model.safetensors'));
      const out = new Map<string, Float32Array>();
      for (const name of f.tensors.keys()) out.set(name, toFloat32(await f.read(name)));
      await f.close();
      return out;
    };
    await train(config('plain'));
    await train(config('eps0', { epsilon: 0, steps: 2 }));
    await train(config('at-a', { epsilon: 0.2, steps: 2 }));
    await train(config('at-b', { epsilon: 0.2, steps: 2 }));
    const [plain, eps0, a, b] = (await Promise.all(['plain', 'eps0', 'at-a', 'at-b'].map(tensors))) as [Map<string, Float32Array>, Map<string, Float32Array>, Map<string, Float32Array>, Map<string, Float32Array>];
    let worst = 0;
    let changed = 0;
    for (const [name, p] of plain) {
      const z = eps0.get(name)!;
      const x = a.get(name)!;
      expect(Buffer.from(x.buffer).equals(Buffer.from(b.get(name)!.buffer)), name).toBe(true);
      for (let i = 0; i < p.length; i++) {
        worst = Math.max(worst, Math.abs(p[i]! - z[i]!) / (1e-3 + Math.abs(p[i]!)));
        if (p[i] !== x[i]) changed++;
      }
    }
    expect(worst).toBeLessThan(1e-3);
    expect(changed).toBeGreaterThan(0);
  }, 300_000);
});
