// The white-box attacks (lib/attack) against a red-flag adapter trained briefly on a tiny model.
// Embedding-space PGD: the attack session computes exactly what the detector computes
// (teacher-forced p(<rf>) at a zero perturbation equals classify's), every prompt token's
// perturbation stays inside its ball and the answer is never perturbed, a zero radius changes
// nothing, and a large radius lowers the flag where the adapter raised it. Adaptive GCG: its
// batched objective equals the native training step's, it never proposes special tokens or
// <rf>, it does not end worse than it started, and its suffix works as plain text (the
// detector, reading the suffixed prompt, sees the p(<rf>) the attack reports). Fine-tuning
// attack: it makes the harmful answers more likely, and a merged adapter computes what the
// applied adapter computes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';

import { embeddingAttack } from '../lib/attack/embedding.js';
import { fineTuneAttack } from '../lib/attack/finetune.js';
import { gcgAttack, scoreTargets, swapRanking } from '../lib/attack/gcg.js';
import { AttackModel, type AttackTarget } from '../lib/attack/gradient-model.js';
import { encodeConversation } from '../lib/data/encode.js';
import { generateSyntheticData } from '../lib/data/synthetic.js';
import { createDetector } from '../lib/detect/detector.js';
import { loadModel } from '../lib/model/model.js';
import { applyAdapter, mergeAdapterInto } from '../lib/train/export.js';
import { train } from '../lib/train/trainer.js';
import { tinyRedFlagModel } from './helpers/red-flag-adapter.js';

let base: string;
let root: string;
beforeAll(async () => {
  ({ base, root } = await tinyRedFlagModel(40));
}, 300_000);
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(root, { recursive: true, force: true });
});

describe('white-box attacks on a red-flag adapter', () => {
  it('embedding-space PGD stays in its ball, changes nothing at radius 0, and lowers a raised flag', async () => {
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
        const target: AttackTarget = { ids: e.ids, responseStart: e.responseStart, responseEnd: e.responseEnd, hasEndToken: e.hasEndToken };
        const [reference] = await detector.classify([c.messages]);
        const clean = await attack.answerScores(target, new Float32Array(e.ids.length * H));
        // The positions classify scores, no more (none past the end token).
        expect(clean.length).toBe(reference!.pRf.length);
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

  it('adaptive GCG finds a suffix that works as text and does not end worse than it began', async () => {
    const adapter = join(root, 'rf', 'adapter');
    const model = await loadModel(base, { threads: 2 });
    const attack = await AttackModel.open(model, adapter);
    const detector = await createDetector({ model: base, adapter, threads: 2 });
    try {
      const c = generateSyntheticData({ seed: 0, perCategory: 4 }).train.find((x) => x.label === 'harmful')!;
      const prompt = c.messages.slice(0, -1);
      const answer = c.messages.at(-1)!.content;
      const objectives: number[] = [];
      const result = await gcgAttack(attack, prompt, answer, { length: 6, steps: 4, candidates: 8, topK: 16, lambda: 1, seed: 3, onStep: (_, o) => objectives.push(o) });
      expect(objectives).toHaveLength(4);
      expect(result.objectiveAfter).toBeLessThanOrEqual(result.objectiveBefore);
      expect(result.suffixIds).toHaveLength(6);
      const specials = new Set(model.tokenizer!.specialTokenIds);
      for (const id of result.suffixIds) {
        expect(specials.has(id)).toBe(false);
        expect(id).not.toBe(attack.rfToken);
      }
      // The suffix as text: the detector reads the suffixed conversation and sees what the attack measured.
      expect(result.messages.at(-1)!.content).toBe(`${prompt.at(-1)!.content} ${result.suffixText}`);
      const [scores] = await detector.classify([[...result.messages, { role: 'assistant', content: answer }]]);
      expect(scores!.maxPRf).toBeCloseTo(result.maxPRfAfter, 4);
      // The batched teacher-forced objective and the training step's agree (two independent paths).
      const e = encodeConversation(model.tokenizer!, { messages: [...result.messages, { role: 'assistant', content: answer }], label: 'harmful', source: 'x' }, { maxTokens: 512 });
      const native = await attack.loss({ ids: e.ids, responseStart: e.responseStart, responseEnd: e.responseEnd }, new Float32Array(e.ids.length * attack.hidden), 1);
      expect(native.objective).toBeCloseTo(result.objectiveAfter, 3);
    } finally {
      attack.close();
      model.dispose();
      await detector.dispose();
    }
  });

  it("GCG's gradient ranking points downhill: its top-ranked swaps at a prompt position lower the exact objective more than its bottom-ranked ones", async () => {
    const model = await loadModel(base, { threads: 2 });
    const attack = await AttackModel.open(model, join(root, 'rf', 'adapter'));
    try {
      const c = generateSyntheticData({ seed: 0, perCategory: 4 }).train.find((x) => x.label === 'harmful')!;
      const e = encodeConversation(model.tokenizer!, c, { maxTokens: 512 });
      const target = { ids: e.ids, responseStart: e.responseStart, responseEnd: e.responseEnd };
      const banned = new Set([...model.tokenizer!.specialTokenIds, ...attack.flagIds].filter((id) => id < model.vocabSize));
      const [original] = await scoreTargets(attack, [target], 1);
      let wins = 0;
      const positions = [e.responseStart - 8, e.responseStart - 6, e.responseStart - 4];
      for (const pos of positions) {
        const [order] = await swapRanking(attack, target, pos, 1, 1, banned);
        const allowed = order!.slice(0, order!.length - banned.size);
        const swapped = (v: number) => ({ ...target, ids: target.ids.map((id, i) => (i === pos ? v : id)) });
        const mean = async (vs: number[]) => (await scoreTargets(attack, vs.map(swapped), 1)).reduce((a, b) => a + b, 0) / vs.length;
        const [top, bottom] = [await mean(allowed.slice(0, 12)), await mean(allowed.slice(-12))];
        console.log(JSON.stringify({ pos, original, top, bottom }));
        wins += +(top < bottom);
      }
      expect(wins).toBe(positions.length);
    } finally {
      attack.close();
      model.dispose();
    }
  });

  it('adaptive GCG with category flags ranks and scores on the gradient\'s objective (the mean over the flags)', async () => {
    const output = join(root, 'categories');
    await train({
      model: base, output, data: 'synthetic', syntheticPerCategory: 4, steps: 6, batchSize: 8, maxTokens: 96, evalEvery: 0, checkpointEvery: 0,
      threads: 2, lora: { rank: 4, alpha: 8, dropout: 0 }, loss: { rfOffset: 1 }, optimizer: { lr: 2e-2, warmupSteps: 2 }, flagCategories: 'auto',
    });
    const model = await loadModel(base, { threads: 2 });
    const attack = await AttackModel.open(model, join(output, 'adapter'));
    try {
      expect(attack.flagIds.length).toBeGreaterThan(2);
      const c = generateSyntheticData({ seed: 0, perCategory: 4 }).train.find((x) => x.label === 'harmful')!;
      const prompt = c.messages.slice(0, -1);
      const answer = c.messages.at(-1)!.content;
      const result = await gcgAttack(attack, prompt, answer, { length: 4, steps: 0, lambda: 1 });
      const e = encodeConversation(model.tokenizer!, { messages: [...result.messages, { role: 'assistant', content: answer }], label: 'harmful', source: 'x' }, { maxTokens: 512 });
      const native = await attack.loss({ ids: e.ids, responseStart: e.responseStart, responseEnd: e.responseEnd }, new Float32Array(e.ids.length * attack.hidden), 1);
      expect(native.redFlag).toBeGreaterThan(0.01);
      expect(result.objectiveBefore).toBeCloseTo(native.objective, 3);
    } finally {
      attack.close();
      model.dispose();
    }
  });

  it('the fine-tuning attack makes harmful answers likelier; a merged adapter equals the applied one', async () => {
    const harmful = generateSyntheticData({ seed: 0, perCategory: 4 }).train.filter((c) => c.label === 'harmful');
    const meanLogLikelihood = async (dir: string) => {
      const model = await loadModel(dir, { threads: 2 });
      try {
        let sum = 0;
        let n = 0;
        for (const c of harmful) {
          const e = encodeConversation(model.tokenizer!, c, { maxTokens: 96 });
          const seq = model.newSequence();
          const { logprobs } = await model.teacherForced([seq], [e.ids]);
          seq.dispose();
          for (let r = e.responseStart - 1; r < e.responseEnd - 1; r++, n++) sum += logprobs[r]!;
        }
        return sum / n;
      } finally {
        model.dispose();
      }
    };
    const attacked = await fineTuneAttack({ model: base, harmful, output: join(root, 'ft'), steps: 12, batchSize: 4, lr: 1e-2, maxTokens: 96, threads: 2 });
    const before = await meanLogLikelihood(base);
    const after = await meanLogLikelihood(attacked);
    expect(after).toBeGreaterThan(before + 0.1);

    const adapter = join(root, 'rf', 'adapter');
    const merged = await mergeAdapterInto(base, adapter, join(root, 'merged'));
    const applied = await loadModel(base, { threads: 2 });
    const fromMerged = await loadModel(merged, { threads: 2 });
    try {
      await applyAdapter(applied, adapter);
      const ids = encodeConversation(applied.tokenizer!, harmful[0]!, { maxTokens: 96 }).ids;
      const a = await applied.logits(ids);
      const b = await fromMerged.logits(ids);
      let num = 0;
      let den = 0;
      for (let i = 0; i < a.length; i++) {
        num += (a[i]! - b[i]!) ** 2;
        den += a[i]! ** 2;
      }
      expect(Math.sqrt(num / den)).toBeLessThan(1e-5);
    } finally {
      applied.dispose();
      fromMerged.dispose();
    }
  });
});
