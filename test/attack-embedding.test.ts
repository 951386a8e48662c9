// The embedding-space attack (lib/attack): a red-flag adapter trained briefly on a tiny model,
// then projected gradient descent on the prompt's input embeddings against it. Checked: the
// attack session computes exactly what the detector computes (teacher-forced p(<rf>) at a zero
// perturbation equals classify's), every prompt token's perturbation stays inside its ball and
// the answer is never perturbed, a zero radius changes nothing, and a large radius lowers the
// flag where the adapter raised it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { embeddingAttack } from '../lib/attack/embedding.js';
import { AttackModel, type AttackTarget } from '../lib/attack/gradient-model.js';
import { encodeConversation } from '../lib/data/encode.js';
import { generateSyntheticData } from '../lib/data/synthetic.js';
import { createDetector } from '../lib/detect/detector.js';
import { loadModel } from '../lib/model/model.js';
import { train } from '../lib/train/trainer.js';
import { tinyLlama } from './helpers/tiny-model.js';

let base: string;
let root: string;
beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2 });
  root = await mkdtemp(join(tmpdir(), 'redflag-attack-'));
  await train({
    model: base,
    output: join(root, 'rf'),
    data: 'synthetic',
    syntheticPerCategory: 4,
    steps: 40,
    batchSize: 8,
    maxTokens: 96,
    evalEvery: 0,
    checkpointEvery: 0,
    threads: 2,
    lora: { rank: 4, alpha: 8, dropout: 0 },
    loss: { rfOffset: 1 },
    optimizer: { lr: 2e-2, warmupSteps: 2 },
  });
}, 300_000);
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(root, { recursive: true, force: true });
});

describe('embedding-space attack', () => {
  it('stays in its ball, changes nothing at radius 0, and lowers a raised flag', async () => {
    const adapter = join(root, 'rf', 'adapter');
    const model = await loadModel(base, { threads: 2 });
    const attack = await AttackModel.open(model, adapter);
    const detector = await createDetector({ model: base, adapter, threads: 2 });
    try {
      expect(attack.rfToken).toBe(detector.redFlagTokenId);
      const harmful = generateSyntheticData({ seed: 0, perCategory: 4 }).train.filter((c) => c.label === 'harmful').slice(0, 4);
      const H = attack.hidden;
      let lowered = 0;
      for (const c of harmful) {
        const e = encodeConversation(model.tokenizer!, c, { maxTokens: 96 });
        const target: AttackTarget = { ids: e.ids, responseStart: e.responseStart, responseEnd: e.responseEnd };
        const [reference] = await detector.classify([c.messages]);
        const clean = await attack.answerScores(target, new Float32Array(e.ids.length * H));
        // classify stops before the end token; the attack scores it too.
        for (let j = 0; j < reference!.pRf.length; j++) expect(clean[j]).toBeCloseTo(reference!.pRf[j]!, 5);

        const none = await embeddingAttack(attack, target, { epsilon: 0 });
        expect(none.maxPRfAfter).toBe(none.maxPRfBefore);
        expect(none.delta.every((v) => v === 0)).toBe(true);

        const epsilon = 0.5;
        const result = await embeddingAttack(attack, target, { epsilon, steps: 8 });
        const norms = await attack.embeddingNorms(e.ids.slice(0, e.responseStart));
        for (let t = 0; t < e.ids.length; t++) {
          const row = result.delta.subarray(t * H, (t + 1) * H);
          const norm = Math.hypot(...row);
          if (t < e.responseStart) expect(norm).toBeLessThanOrEqual(epsilon * norms[t]! * (1 + 1e-5));
          else expect(norm).toBe(0);
        }
        expect(result.maxPRfAfter).toBeLessThanOrEqual(result.maxPRfBefore);
        console.log(JSON.stringify({ source: c.source, before: result.maxPRfBefore, after: result.maxPRfAfter, ceBefore: result.ceBefore, ceAfter: result.ceAfter }));
        if (result.maxPRfBefore >= 0.2 && result.maxPRfAfter < result.maxPRfBefore / 10) lowered++;
      }
      expect(harmful).toHaveLength(4);
      expect(lowered).toBeGreaterThanOrEqual(2);
    } finally {
      attack.close();
      model.dispose();
      await detector.dispose();
    }
  });
});
