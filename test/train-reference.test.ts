// One native training step against a float64 PyTorch autograd reference
// (test/reference/reference_train.py, fixtures from test/reference/make_train_fixtures.py):
// the loss terms and the gradient of every trainable parameter, for LoRA (PEFT semantics,
// red-flag rows, KL / red-flag / cross-entropy rows) and full fine-tuning, on Llama (GQA),
// Qwen2 (biases, tied, rsLoRA), Qwen3 (per-head q/k norms, tied) and GPT-2 (Conv1D, tied,
// learned positions).
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { rm } from 'node:fs/promises';

import { encodeConversation } from '../lib/data/encode.js';
import { generateSyntheticData } from '../lib/data/synthetic.js';
import { loadModel } from '../lib/model/model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { SafetensorsFile, toFloat32 } from '../lib/model/safetensors.js';
import { createRng } from '../lib/model/sampling.js';
import type { NativeLossTerms } from '../lib/native.js';
import { accumulationShares, buildStep, termCounts, type StepInput, type TermCounts } from '../lib/train/objectives.js';
import { FIXTURES, relL2 } from './helpers/fixtures.js';
import { tinyLlama } from './helpers/tiny-model.js';

const TRAIN = join(import.meta.dirname, 'fixtures', 'train');

// The requirement: whole-model LoRA and full gradients within 1e-4 relative in fp32.
const GRAD_TOLERANCE = 1e-4;
const TERM_TOLERANCE = 1e-5;

interface TrainCase {
  name: string;
  fixture: string;
  mode: 'lora' | 'full';
  lora: { rank: number; alpha: number; rslora: boolean; targets: string[]; dropout: number } | null;
  rf_token: number;
  aggregation: 'any' | 'mean' | 'single';
  alphas: { benign: number; red_flag: number; after: number; ce: number };
  sequences: number[][];
  reference: number[][];
  /** [kind (0 benign_kl, 1 red_flag, 2 after_kl, 3 ce), row, ref_row, group, target] */
  rows: number[][];
  params: { name: string; shape: number[]; value: boolean }[];
  terms: Record<'benign' | 'red_flag' | 'after' | 'ce' | 'total', number>;
}

const CASES = readdirSync(TRAIN, { withFileTypes: true })
  .filter((d) => d.isDirectory())
  .map((d) => d.name)
  .sort();

function concat(seqs: number[][]): { tokens: Uint32Array; counts: Uint32Array } {
  return { tokens: Uint32Array.from(seqs.flat()), counts: Uint32Array.from(seqs.map((s) => s.length)) };
}

function relErr(a: number, b: number): number {
  return b === 0 ? Math.abs(a) : Math.abs(a - b) / Math.abs(b);
}

it('has the eight training cases', () => {
  expect(CASES).toEqual([
    'gpt2-full',
    'gpt2-lora',
    'llama-gqa-full',
    'llama-gqa-lora-any',
    'llama-gqa-lora-mean',
    'qwen2-bias-lora-rslora',
    'qwen3-qk-norm-full',
    'qwen3-qk-norm-lora',
  ]);
});

describe.each(CASES)('%s', (name) => {
  it('loss terms and every parameter gradient match the float64 reference', async () => {
    const spec = JSON.parse(readFileSync(join(TRAIN, name, 'case.json'), 'utf8')) as TrainCase;
    const expected = new Map<string, Float32Array>();
    const file = await SafetensorsFile.open(join(TRAIN, name, 'expected.safetensors'));
    try {
      for (const key of file.tensors.keys()) expected.set(key, toFloat32(await file.read(key)));
    } finally {
      await file.close();
    }
    const get = (key: string): Float32Array => {
      const v = expected.get(key);
      if (!v) throw new Error(`expected.safetensors lacks ${key}`);
      return v;
    };

    const model = await loadModel(join(FIXTURES, spec.fixture), { dtype: 'f32', threads: 2 });
    try {
      const lora = spec.lora ?? { rank: 4, alpha: 8, rslora: false, targets: [], dropout: 0 };
      const { trainable } = await model.engine.trainInit({
        mode: spec.mode,
        rank: lora.rank,
        alpha: lora.alpha,
        dropout: 0,
        rslora: lora.rslora,
        targets: lora.targets,
        rfToken: spec.rf_token,
        seed: 0,
      });
      // The engine's trainable parameters are exactly the reference's, in the same order.
      expect(model.engine.params()).toEqual(spec.params.map((p) => ({ name: p.name, shape: p.shape })));
      expect(trainable).toBe(spec.params.reduce((n, p) => n + p.shape.reduce((a, b) => a * b, 1), 0));

      for (const p of spec.params) {
        if (p.value) model.engine.setParam(p.name, 'value', get(`value.${p.name}`));
      }

      const batch = concat(spec.sequences);
      const reference = concat(spec.reference);
      const terms: NativeLossTerms = await model.engine.trainStep(
        batch.tokens,
        batch.counts,
        reference.tokens,
        reference.counts,
        Int32Array.from(spec.rows.flat()),
        {
          aggregation: spec.aggregation,
          alphaBenign: spec.alphas.benign,
          alphaRf: spec.alphas.red_flag,
          alphaAfter: spec.alphas.after,
          alphaCe: spec.alphas.ce,
          gradScale: 1,
          dropoutSeed: 0,
        },
      );

      const count = (kind: number) => spec.rows.filter((r) => r[0] === kind).length;
      const groups = new Set(spec.rows.filter((r) => r[0] === 1).map((r) => r[3])).size;
      expect(terms.nBenign).toBe(count(0));
      expect(terms.nGroups).toBe(groups);
      expect(terms.nAfter).toBe(count(2));
      expect(terms.nCe).toBe(count(3));
      expect(terms.tokens).toBe(batch.tokens.length);

      const want = get('terms'); // [benign, red_flag, after, ce, total]
      const got = [terms.benign, terms.redFlag, terms.after, terms.ce, terms.total];
      const termErrors: Record<string, number> = {};
      ['benign', 'red_flag', 'after', 'ce', 'total'].forEach((t, i) => {
        termErrors[t] = relErr(got[i]!, want[i]!);
      });
      const gradErrors: Record<string, number> = {};
      for (const p of spec.params) {
        const grad = model.engine.getParam(p.name, 'grad');
        const ref = get(`grad.${p.name}`);
        expect(grad.length, p.name).toBe(ref.length);
        gradErrors[p.name] = relL2(grad, ref);
      }
      if (process.env.REDFLAG_TRAIN_REPORT) {
        const worst = Object.entries(gradErrors).sort((a, b) => b[1] - a[1]);
        console.log(
          `${name}: terms ${JSON.stringify(termErrors)}\n  worst grads ${JSON.stringify(worst.slice(0, 4))}\n  all ${JSON.stringify(gradErrors)}`,
        );
      }
      for (const [t, e] of Object.entries(termErrors)) expect(e, `term ${t}`).toBeLessThanOrEqual(TERM_TOLERANCE);
      for (const [p, e] of Object.entries(gradErrors)) expect(e, `grad ${p}`).toBeLessThanOrEqual(GRAD_TOLERANCE);
    } finally {
      model.dispose();
    }
  });
});

// setParam during training needs no paramsChanged: the next call that reads the parameters
// (forward, trainStep, optimizerStep, trainEnd) takes the written values first. In full
// fine-tuning the CPU engine multiplies by packed copies of the f32 masters, so a forward that
// skipped the rebuild would give the old logits.
it('values written with setParam reach the next forward without paramsChanged (full fine-tuning)', async () => {
  const model = await loadModel(join(FIXTURES, 'llama-gqa'), { dtype: 'f32', threads: 2 });
  try {
    await model.engine.trainInit({ mode: 'full', rank: 0, alpha: 0, dropout: 0, rslora: false, targets: [], rfToken: -1, seed: 0 });
    const ids = [1, 5, 9, 14, 3];
    const before = await model.logits(ids);
    const name = model.engine.params().find((p) => /^layers\.0\.mlp_out\.weight$/.test(p.name))!.name;
    const original = model.engine.getParam(name);
    model.engine.setParam(name, 'value', original.map((v) => v * 3));
    const changed = await model.logits(ids);
    expect(relL2(changed, before)).toBeGreaterThan(1e-3);
    model.engine.setParam(name, 'value', original);
    expect(relL2(await model.logits(ids), before)).toBe(0);
    model.engine.trainEnd();
  } finally {
    model.dispose();
  }
});

// Gradient accumulation: micro-batches of different sizes, each term weighted by its share of
// the step's rows (accumulationShares), give the loss and gradients of one step on all of them.
it('accumulated micro-batches of different sizes equal one step on their union', async () => {
  const dir = await tinyLlama({ hiddenSize: 32, intermediateSize: 64 });
  const model = await loadModel(dir, { dtype: 'f32', threads: 2 });
  try {
    const rf = (await addRedFlagToken(model)).id;
    const data = generateSyntheticData({ seed: 1, perCategory: 2 }).train;
    const encode = (i: number) => encodeConversation(model.tokenizer!, data[i]!, { maxTokens: 96 });
    const harmful = data.flatMap((c, i) => (c.label === 'harmful' ? [i] : []));
    const benign = data.flatMap((c, i) => (c.label === 'benign' ? [i] : []));
    // A small micro-batch and a large one: one harmful and one benign, then two and five.
    const parts = [[harmful[0]!, benign[0]!], [harmful[1]!, harmful[2]!, ...benign.slice(1, 6)]].map((ix) => ix.map(encode));
    const build = (items: ReturnType<typeof encode>[], rng: () => number) => buildStep(items, { objective: 'redflag', rfToken: rf, rfOffset: 2, rng });
    const rng = createRng(7);
    const micros = parts.map((items) => build(items, rng));  // one stream, as the union below draws it
    const union = build(parts.flat(), createRng(7));
    const alphas = { alphaBenign: 2, alphaRf: 1, alphaAfter: 0.5 };
    const run = async (inputs: StepInput[], shares: TermCounts[]) => {
      await model.engine.trainInit({ mode: 'lora', rank: 2, alpha: 4, dropout: 0, rslora: false, targets: ['q_proj', 'down_proj'], rfToken: rf, seed: 3 });
      // Nonzero B factors, so that every factor has a gradient.
      for (const p of model.engine.params()) if (p.name.endsWith('lora_B')) model.engine.setParam(p.name, 'value', Float32Array.from({ length: p.shape[0]! * p.shape[1]! }, (_, i) => Math.sin(i) * 0.05));
      let total = 0;
      for (const [i, input] of inputs.entries()) {
        const s = shares[i]!;
        const terms = await model.engine.trainStep(concat(input.batch).tokens, concat(input.batch).counts, concat(input.reference).tokens, concat(input.reference).counts, input.rows, {
          aggregation: 'any', alphaBenign: alphas.alphaBenign * s.benign, alphaRf: alphas.alphaRf * s.redFlag, alphaAfter: alphas.alphaAfter * s.after, alphaCe: s.ce, gradScale: 1, dropoutSeed: 0,
        });
        total += terms.total;
      }
      const grads = model.engine.params().map((p) => model.engine.getParam(p.name, 'grad'));
      model.engine.trainEnd();
      model.engine.clearAdapters();
      return { total, grads };
    };
    const counts = micros.map(termCounts);
    expect(counts[0]!.benign).toBeLessThan(counts[1]!.benign / 3); // really different sizes
    const accumulated = await run(micros, accumulationShares(counts));
    const whole = await run([union], accumulationShares([termCounts(union)]));
    expect(relErr(accumulated.total, whole.total)).toBeLessThan(1e-5);
    accumulated.grads.forEach((g, i) => expect(relL2(g, whole.grads[i]!)).toBeLessThan(1e-5));
  } finally {
    model.dispose();
    await rm(dir, { recursive: true, force: true });
  }
});
