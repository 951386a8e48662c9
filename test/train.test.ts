// The trainer end to end on a tiny model: outputs in PEFT format, determinism, checkpoint and
// resume to the same result, adapters that load back to the same logits, full fine-tuning
// saved as a Hugging Face model, and configuration errors that name the field.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { encodePrompt } from '../lib/data/encode.js';
import { RedflagError } from '../lib/errors.js';
import { loadModel } from '../lib/model/model.js';
import { SafetensorsFile } from '../lib/model/safetensors.js';
import { learningRate, parseTrainConfig, type TrainConfigInput } from '../lib/train/config.js';
import { configDifferences, findCheckpoint } from '../lib/train/checkpoint.js';
import { applyAdapter, mergeAdapterInto } from '../lib/train/export.js';
import { holdOut, train } from '../lib/train/trainer.js';
import type { Conversation } from '../lib/data/records.js';
import { configFromFlags } from '../lib/cli/train.js';
import { cudaUsable } from './helpers/cuda.js';
import { packagedTokenizer, tinyLlama } from './helpers/tiny-model.js';
import { writeRandomModel } from '../lib/model/random-model.js';

let base: string;
let root: string;
beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2 });
  root = await mkdtemp(join(tmpdir(), 'redflag-train-'));
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(root, { recursive: true, force: true });
});

/** Every file of two directories, byte for byte. */
async function expectSameFiles(a: string, b: string): Promise<void> {
  const names = (await readdir(a)).sort();
  expect((await readdir(b)).sort()).toEqual(names);
  // Buffer.equals: toEqual walks a 4 MB buffer element by element for a minute.
  for (const name of names) expect((await readFile(join(b, name))).equals(await readFile(join(a, name))), name).toBe(true);
}

function config(output: string, extra: Partial<TrainConfigInput> = {}): TrainConfigInput {
  return {
    model: base,
    output: join(root, output),
    data: 'synthetic',
    syntheticPerCategory: 3,
    steps: 6,
    batchSize: 4,
    maxTokens: 96,
    evalEvery: 3,
    checkpointEvery: 0,
    threads: 2,
    lora: { rank: 4, alpha: 8, dropout: 0.1 },
    loss: { rfOffset: 1 },
    optimizer: { lr: 1e-2, warmupSteps: 2 },
    ...extra,
  };
}

async function tensors(file: string): Promise<Map<string, Uint8Array>> {
  const f = await SafetensorsFile.open(file);
  const out = new Map<string, Uint8Array>();
  for (const name of f.tensors.keys()) out.set(name, (await f.read(name)).data);
  await f.close();
  return out;
}

describe('train (red-flag LoRA)', () => {
  it('writes the adapter in PEFT format, the tokenizer with <rf>, metrics and a checkpoint', async () => {
    const steps: number[] = [];
    const evals: number[] = [];
    const result = await train(config('run-a'), { onStep: (s) => steps.push(s.step), onEval: (s) => evals.push(s) });
    expect(steps).toEqual([1, 2, 3, 4, 5, 6]);
    expect(evals).toEqual([3, 6]);
    const adapter = join(root, 'run-a', 'adapter');
    const files = await readdir(adapter);
    expect(files).toEqual(expect.arrayContaining(['adapter_config.json', 'adapter_model.safetensors', 'tokenizer.json', 'tokenizer_config.json']));
    const cfg = JSON.parse(await readFile(join(adapter, 'adapter_config.json'), 'utf8'));
    expect(cfg).toMatchObject({ peft_type: 'LORA', r: 4, lora_alpha: 8, task_type: 'CAUSAL_LM' });
    const keys = [...(await tensors(join(adapter, 'adapter_model.safetensors'))).keys()];
    expect(keys).toContain('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight');
    expect(keys).toContain('base_model.model.model.layers.1.mlp.down_proj.lora_B.weight');
    const metrics = (await readFile(join(root, 'run-a', 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
    expect(metrics.filter((m) => m.type === 'step')).toHaveLength(6);
    expect(metrics.filter((m) => m.type === 'eval')).toHaveLength(2);
    expect(metrics[0]).toMatchObject({ type: 'step', step: 1 });
    expect(Number.isFinite(metrics[0].loss.redFlag)).toBe(true);
    expect(result.lastLoss!.total).toBeGreaterThan(0);
    const found = await findCheckpoint(join(root, 'run-a'));
    expect(found).toMatchObject({ step: 6, layout: 'pointer' });
    await stat(join(found!.dir, 'state.json'));
  });

  it('is deterministic: the same config and seed give the same adapter', async () => {
    await train(config('run-b'));
    const a = await tensors(join(root, 'run-a', 'adapter', 'adapter_model.safetensors'));
    const b = await tensors(join(root, 'run-b', 'adapter', 'adapter_model.safetensors'));
    expect([...b.keys()]).toEqual([...a.keys()]);
    for (const [k, v] of a) expect(Buffer.compare(Buffer.from(b.get(k)!), Buffer.from(v)), k).toBe(0);
  });

  it('stops on an AbortSignal with a checkpoint, and resuming gives the uninterrupted result', async () => {
    const controller = new AbortController();
    await expect(
      train(config('run-c', { checkpointEvery: 2 }), {
        signal: controller.signal,
        onStep: (s) => {
          if (s.step === 3) controller.abort();
        },
      }),
    ).rejects.toMatchObject({ name: 'AbortError' });
    const found = await findCheckpoint(join(root, 'run-c'));
    const state = JSON.parse(await readFile(join(found!.dir, 'state.json'), 'utf8'));
    expect(state.step).toBe(3);
    await expect(train(config('run-c', { checkpointEvery: 2 }))).rejects.toThrow(/holds a checkpoint/);
    const ratios: number[] = [];
    await train(config('run-c', { checkpointEvery: 2 }), { resume: true, onStep: (s) => ratios.push(s.etaSeconds / s.elapsedSeconds) });
    const a = await tensors(join(root, 'run-a', 'adapter', 'adapter_model.safetensors'));
    const c = await tensors(join(root, 'run-c', 'adapter', 'adapter_model.safetensors'));
    for (const [k, v] of a) expect(Buffer.compare(Buffer.from(c.get(k)!), Buffer.from(v)), k).toBe(0);
    // The ETA counts the steps this process ran: after step 4 of 6, one step in 'elapsed', two to go.
    expect(ratios[0]).toBeCloseTo(2, 10);
    // The stop came between step 3 and its evaluation: the resumed run evaluates at step 3 first, so
    // metrics.jsonl has the uninterrupted run's lines, and the same evaluation figures.
    const lines = async (run: string) => (await readFile(join(root, run, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
    const [ma, mc] = [await lines('run-a'), await lines('run-c')];
    expect(mc.map((m) => `${m.type}@${m.step}`)).toEqual(ma.map((m) => `${m.type}@${m.step}`));
    expect(mc.filter((m) => m.type === 'eval')).toEqual(ma.filter((m) => m.type === 'eval'));
  });

  it('resume refuses changed data (naming the file) and a checkpoint past steps; a data-parallel rank resumes rank 0\'s', async () => {
    const data = join(root, 'resume-data.jsonl');
    const rows = (flip: boolean) =>
      Array.from({ length: 12 }, (_, i) => JSON.stringify({
        prompt: `Question number ${i}?`, response: `Answer number ${i}, in some words.`, label: (i % 2 === 0) !== flip ? 'harmful' : 'benign',
      })).join('\n') + '\n';
    await writeFile(data, rows(false));
    const run = config('resume-check', { data: [{ file: data }], steps: 2, evalEvery: 0 });
    await train(run);
    await expect(train({ ...run, steps: 1 }, { resume: true })).rejects.toThrow(/at step 2, past this run's steps \(1\): resume with steps of at least 2/);
    await writeFile(data, rows(true));
    const refused = await train(run, { resume: true }).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(RedflagError);
    expect((refused as RedflagError).message).toMatch(/changed since the checkpoint was written/);
    expect((refused as RedflagError).file).toBe(data);

    // Each rank resumes the checkpoint rank 0 wrote: its own rank, GPU index and group id file differ.
    const saved = parseTrainConfig({ ...run, device: 'cuda:0', mode: 'lora', dataParallel: { worldSize: 2, rank: 0, idFile: '/tmp/g1' } });
    const rank1 = parseTrainConfig({ ...run, output: `./${run.output}`, device: 'cuda:1', dataParallel: { worldSize: 2, rank: 1, idFile: '/tmp/g2' } });
    expect(configDifferences(saved, rank1)).toEqual([]);
    expect(configDifferences(saved, { ...rank1, device: 'cpu' })).toEqual(['device: "cuda" -> "cpu"']);
    expect(configDifferences(saved, { ...rank1, dataParallel: { worldSize: 4, rank: 1, idFile: '/tmp/g2' } })).toEqual(['dataParallel.worldSize: 2 -> 4']);
  });

  it('a saved adapter loads back onto the base model with exactly the trained logits; the merged model agrees', async () => {
    const ids = [1, 4911, 29901, 1128, 437, 306, 2125, 263];
    let trained: Float32Array | null = null;
    await train(config('run-d', { merge: true }), {
      onTrained: async (model) => {
        trained = await model.logits(ids);
      },
    });
    const model = await loadModel(base, { threads: 2 });
    try {
      await applyAdapter(model, join(root, 'run-d', 'adapter'));
      const again = await model.logits(ids);
      expect(again).toEqual(trained);
    } finally {
      model.dispose();
    }
    const merged = await loadModel(join(root, 'run-d', 'merged'), { threads: 2 });
    try {
      const m = await merged.logits(ids);
      let num = 0, den = 0;
      for (let i = 0; i < m.length; i++) {
        num += (m[i]! - trained![i]!) ** 2;
        den += trained![i]! ** 2;
      }
      expect(Math.sqrt(num / den)).toBeLessThan(1e-5); // W + sBA formed once vs applied per call
      expect(merged.redFlagTokenId).toBe(32000);
    } finally {
      merged.dispose();
    }
    // Merging the saved adapter from the files alone (no engine, one tensor at a time) writes what training wrote.
    await mergeAdapterInto(base, join(root, 'run-d', 'adapter'), join(root, 'run-d', 'merged-files'));
    await expectSameFiles(join(root, 'run-d', 'merged'), join(root, 'run-d', 'merged-files'));
  });
});

describe('train (Qwen3: per-head q/k norms, the Qwen3 tokenizer)', () => {
  it('trains a red-flag adapter whose saved form loads back to the trained logits, and merges from the files', async () => {
    // Qwen3-0.6B's layout in miniature: head_dim 16 with hidden 32 (q is 64 wide), tied
    // embeddings, 151936 rows for the tokenizer's 151669 tokens (<rf> takes a padding row).
    const qwen3 = join(root, 'qwen3-base');
    await writeRandomModel(qwen3, {
      architecture: 'qwen3', vocabSize: 151936, hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2,
      headDim: 16, tieWordEmbeddings: true, seed: 5, eosTokenId: 151645, tokenizer: await packagedTokenizer('qwen3'),
    });
    const ids = [151644, 872, 198, 9707, 11, 1246, 525, 498];
    const user = [{ role: 'user' as const, content: 'Hi' }];
    const thinkBlock = '<|im_start|>assistant\n<think>\n\n</think>\n\n';
    let trained: Float32Array | null = null;
    // Trained without thinking: the prompts end with an empty think block, and the adapter says so.
    await train({ ...config('run-qwen3', { steps: 3, evalEvery: 0, merge: true, chatTemplateKwargs: { enable_thinking: false } }), model: qwen3 }, {
      onTrained: async (model) => {
        expect(model.config.qkNorm).toBe(true);
        expect(model.redFlagTokenId).toBeLessThan(151936);
        expect(model.vocabSize).toBe(151936);
        expect(model.tokenizer!.decode(encodePrompt(model.tokenizer!, user)).endsWith(thinkBlock)).toBe(true);
        trained = await model.logits(ids);
      },
    });
    const saved = JSON.parse(await readFile(join(root, 'run-qwen3', 'adapter', 'adapter_config.json'), 'utf8'));
    expect(saved.redflag.chat_template_kwargs).toEqual({ enable_thinking: false });
    const model = await loadModel(qwen3, { threads: 2 });
    try {
      expect(model.tokenizer!.decode(encodePrompt(model.tokenizer!, user)).endsWith(thinkBlock)).toBe(false);
      await applyAdapter(model, join(root, 'run-qwen3', 'adapter'));
      expect(await model.logits(ids)).toEqual(trained);
      // The adapter brings its kwargs: served as trained.
      expect(model.tokenizer!.chatTemplateKwargs).toEqual({ enable_thinking: false });
      expect(model.tokenizer!.decode(encodePrompt(model.tokenizer!, user)).endsWith(thinkBlock)).toBe(true);
    } finally {
      model.dispose();
    }
    // Kwargs the model was loaded with win over the adapter's.
    const thinking = await loadModel(qwen3, { threads: 2, chatTemplateKwargs: { enable_thinking: true } });
    try {
      await applyAdapter(thinking, join(root, 'run-qwen3', 'adapter'));
      expect(thinking.tokenizer!.chatTemplateKwargs).toEqual({ enable_thinking: true });
      expect(thinking.loadOptions().chatTemplateKwargs).toEqual({ enable_thinking: true });
    } finally {
      thinking.dispose();
    }
    await mergeAdapterInto(qwen3, join(root, 'run-qwen3', 'adapter'), join(root, 'run-qwen3', 'merged-files'));
    await expectSameFiles(join(root, 'run-qwen3', 'merged'), join(root, 'run-qwen3', 'merged-files'));
  });
});

describe('train (aggregation single)', () => {
  it("trains the sampled position alone, also with several windows and rfWindow left at 0", async () => {
    const r = await train(config('run-single', { steps: 2, evalEvery: 0, loss: { rfOffset: 1, rfAggregation: 'single', rfSamples: 4 } }));
    expect(r.lastLoss!.redFlag).toBeGreaterThan(0);
  });
});

describe('train (one flag per risk category)', () => {
  it('adds <rf:NAME> per category, trains each example\'s flag, saves [K, H] rows that load back (adapter, merged model)', async () => {
    const ids = [1, 4911, 29901, 1128, 437, 306, 2125, 263];
    let trained: { logits: Float32Array; flags: number[]; categories: string[] } | null = null;
    const result = await train(config('run-cat', { flagCategories: 'auto', categoryMap: { self_harm: 'self-harm' }, merge: true }), {
      onTrained: async (model) => {
        trained = { logits: await model.logits(ids), flags: model.flagTokenIds(), categories: model.flagCategories.map((c) => c.category) };
      },
    });
    // The synthetic set's harmful categories, sorted after the map; ids after <rf> (32000).
    expect(trained!.categories).toEqual(['cyber_intrusion', 'drugs', 'fraud', 'self-harm', 'weapons']);
    expect(trained!.flags).toEqual([32000, 32001, 32002, 32003, 32004, 32005]);
    // The evaluation scores p of any flag and names the most likely one.
    expect(result.finalEval!.examples.filter((e) => e.label === 'harmful').every((e) => e.flag !== undefined && e.category !== undefined)).toBe(true);

    const dir = join(root, 'run-cat', 'adapter');
    const json = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')) as Record<string, Record<string, unknown>>;
    expect(json['trainable_token_indices']!['embed_tokens']).toEqual(trained!.flags);
    expect(json['redflag']!['categories']).toEqual({ cyber_intrusion: 32001, drugs: 32002, fraud: 32003, 'self-harm': 32004, weapons: 32005 });
    const model = await loadModel(base, { threads: 2 });
    try {
      // Merging into the weights is the GPU engine's; the CPU says so before touching the model.
      await expect(applyAdapter(model, dir, { merge: true })).rejects.toThrow(/merge is for models on a GPU \(device 'cuda'\); this one is on 'cpu'/);
      await expect(applyAdapter(model, dir, { merge: 'yes' as unknown as boolean })).rejects.toThrow(/merge must be a boolean/);
      await applyAdapter(model, dir);
      expect(model.flagTokenIds()).toEqual(trained!.flags);
      expect(await model.logits(ids)).toEqual(trained!.logits);
      // Per-flag scores and their total, from the same logits.
      const seq = model.newSequence();
      const { pRf, pFlags, flags } = await model.flagScores([seq], [ids]);
      seq.dispose();
      expect(flags).toBe(6);
      const V = model.vocabSize;
      for (let r = 0; r < ids.length; r++) {
        const row = trained!.logits.subarray(r * V, (r + 1) * V);
        const max = Math.max(...row);
        const lse = max + Math.log(row.reduce((s, z) => s + Math.exp(z - max), 0));
        let sum = 0;
        trained!.flags.forEach((id, k) => {
          const want = Math.exp(row[id]! - lse);
          sum += want;
          expect(Math.abs(pFlags[r * 6 + k]! - want)).toBeLessThanOrEqual(1e-5 * want + 1e-30);
        });
        expect(Math.abs(pRf[r]! - sum)).toBeLessThanOrEqual(1e-5 * sum);
      }
    } finally {
      model.dispose();
    }
    // The merged model has the category tokens in its tokenizer and finds them on load.
    const merged = await loadModel(join(root, 'run-cat', 'merged'), { threads: 2 });
    try {
      expect(merged.flagTokenIds()).toEqual(trained!.flags);
      expect(merged.flagCategories.map((c) => c.category)).toEqual(trained!.categories);
    } finally {
      merged.dispose();
    }
    await mergeAdapterInto(base, dir, join(root, 'run-cat', 'merged-files'));
    await expectSameFiles(join(root, 'run-cat', 'merged'), join(root, 'run-cat', 'merged-files'));
  });

  it('a listed category trains its flag; others and uncategorised examples train <rf>; bad names are refused', async () => {
    let got: string[] = [];
    await train(config('run-cat2', { flagCategories: ['weapons', 'nonexistent'], steps: 2, evalEvery: 0 }), {
      onTrained: async (model) => {
        got = model.flagCategories.map((c) => c.category);
      },
    });
    expect(got).toEqual(['weapons', 'nonexistent']);
    expect(() => parseTrainConfig({ ...config('x'), flagCategories: ['bad name'] })).toThrow(/flagCategories\.0: a category name/);
  });
});

describe('train (refusal baseline)', () => {
  it('trains towards refusals with the benign KL and no red-flag token', async () => {
    const losses: number[] = [];
    const result = await train(config('refusal', { objective: 'refusal', steps: 3, evalEvery: 0 }), { onStep: (s) => losses.push(s.loss.ce) });
    expect(losses.every((l) => l > 0)).toBe(true);
    expect(result.finalEval).toBeNull(); // flag rates are meaningless without <rf>
    const cfg = JSON.parse(await readFile(join(root, 'refusal', 'adapter', 'adapter_config.json'), 'utf8'));
    expect(cfg.trainable_token_indices ?? null).toBeNull();
  });
});

describe('train (full fine-tuning)', () => {
  it('learns the language and saves a Hugging Face model that reloads to the same logits', async () => {
    const ids = [1, 4911, 29901, 1128, 437];
    let trained: Float32Array | null = null;
    const losses: number[] = [];
    await train(config('full', { objective: 'lm', mode: 'full', steps: 8, evalEvery: 0, optimizer: { lr: 3e-3, warmupSteps: 1 } }), {
      onStep: (s) => losses.push(s.loss.ce),
      onTrained: async (model) => {
        trained = await model.logits(ids);
      },
    });
    expect(losses[losses.length - 1]!).toBeLessThan(losses[0]!);
    const model = await loadModel(join(root, 'full', 'model'), { threads: 2 });
    try {
      expect(await model.logits(ids)).toEqual(trained);
    } finally {
      model.dispose();
    }
  });
});

describe('train (learned positions)', () => {
  it('keeps room for the inserted <rf> when maxTokens is the model\'s whole context', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'redflag-gpt2-'));
    try {
      await writeRandomModel(dir, {
        architecture: 'gpt2', vocabSize: 32000, hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 4, seed: 3, bosTokenId: 1, eosTokenId: 2,
        maxPositions: 64, tokenizer: await packagedTokenizer('llama2'),
      });
      const logs: string[] = [];
      const result = await train({ ...config('gpt2-context', { steps: 2, evalEvery: 0, maxTokens: 64 }), model: dir, lora: { rank: 2, alpha: 4, dropout: 0 } }, { log: (m) => logs.push(m) });
      expect(result.steps).toBe(2);
      expect(logs).toContain('maxTokens 64 lowered to 63: the model has 64 positions, one of them for the inserted <rf>');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 120_000);
});

describe('training configuration', () => {
  it('names every bad field', () => {
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', lora: { rank: 0 } })).toThrow(/lora\.rank/);
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', stepz: 3 })).toThrow(/stepz|Unrecognized/);
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: [] })).toThrow(/data/);
    expect(parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic' })).toMatchObject({ steps: 100, lora: { rank: 8 }, loss: { rfAggregation: 'any' } });
  });

  it('takes a device: cpu by default, cuda or cuda:N; full fine-tuning trains the lm objective', () => {
    const c = parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic' });
    expect(c.device).toBe('cpu');
    expect(c.dtype).toBeUndefined(); // the device's default: f32 on the CPU, bf16 on a GPU
    expect(parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'cuda:1' }).device).toBe('cuda:1');
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'gpu' })).toThrow(/device: must be 'cpu', 'cuda' or 'cuda:N'/);
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'cuda', mode: 'full' })).toThrow(/mode: 'full' \(full fine-tuning\) trains the 'lm' objective/);
    // On the CPU too (its trainer has no reference model either), before any model loads.
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', mode: 'full', objective: 'refusal' })).toThrow(/the 'refusal' objective's KL terms need the reference model/);
    // Options that would be ignored are refused.
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', mode: 'full', objective: 'lm', merge: true })).toThrow(/merge: merges a LoRA adapter into the weights/);
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', objective: 'lm', flagCategories: 'auto' })).toThrow(/flagCategories: are flag tokens the 'redflag' objective trains/);
    expect(parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'cuda', mode: 'full', objective: 'lm' }).mode).toBe('full');
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', recompute: true })).toThrow(/recompute: activation recomputation is a GPU trainer option/);
    expect(parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'cuda', recompute: true }).recompute).toBe(true);
    const group = { worldSize: 2, rank: 1, idFile: '/tmp/g' };
    expect(parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'cuda:1', dataParallel: group }).dataParallel).toEqual(group);
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', device: 'cuda', dataParallel: { ...group, rank: 2 } })).toThrow(/dataParallel.rank: 2 must be below worldSize 2/);
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', dataParallel: group })).toThrow(/one process per GPU/);
  });

  it('holds out whole requests: copies of a request (another answer, or the same row twice) never straddle the split', () => {
    const conv = (prompt: string, answer: string, label: 'harmful' | 'benign'): Conversation => ({
      messages: [
        { role: 'user', content: prompt },
        { role: 'assistant', content: answer },
      ],
      label,
      source: `${prompt}/${answer}`,
    });
    const distinct = Array.from({ length: 60 }, (_, i) => conv(`request ${i}`, `answer ${i}`, i % 2 ? 'harmful' : 'benign'));
    // Without repeats: exactly the fraction, and a seed gives one split.
    const plain = holdOut(distinct, 0.1, 3);
    expect(plain.evalSet.length).toBe(6);
    expect(plain.repeats).toBe(0);
    expect(holdOut(distinct, 0.1, 3)).toEqual(plain);
    // Every request in triplicate (two answers, one exact copy), as overlapping public sets have it.
    const repeated = distinct.flatMap((c, i) => [c, conv(`request ${i}`, `Sure, here is answer ${i}`, 'harmful'), c]);
    for (const seed of [0, 1, 2, 3]) {
      const split = holdOut(repeated, 0.1, seed);
      expect(split.repeats).toBe(120);
      const held = new Set(split.evalSet.map((c) => c.messages[0]!.content));
      expect(split.trainSet.filter((c) => held.has(c.messages[0]!.content))).toEqual([]);
      expect(split.evalSet.length).toBe(18); // whole groups of 3, reaching round(180 * 0.1)
      expect(split.trainSet.length + split.evalSet.length).toBe(180);
    }
  });

  it('schedules the learning rate: linear warmup, then cosine, linear or constant down to minLrRatio', () => {
    const base = parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', optimizer: { lr: 1, warmupSteps: 4, minLrRatio: 0.1 } }).optimizer;
    const at = (schedule: 'cosine' | 'linear' | 'constant', steps: number[]) => steps.map((s) => learningRate(s, 12, { ...base, schedule }));
    // Values worked by hand: warmup (s+1)/4; then t = (s-4)/8, cosine 0.1 + 0.45 (1 + cos πt), linear 1 - 0.9 t.
    const expected = {
      cosine: [0.25, 0.5, 1, 1, 0.1 + 0.45 * (1 + Math.SQRT1_2), 0.55, 0.1 + 0.45 * (1 - Math.SQRT1_2), 0.1, 0.1],
      linear: [0.25, 0.5, 1, 1, 0.775, 0.55, 0.325, 0.1, 0.1],
      constant: [0.25, 0.5, 1, 1, 1, 1, 1, 1, 1],
    };
    for (const schedule of ['cosine', 'linear', 'constant'] as const) {
      at(schedule, [0, 1, 3, 4, 6, 8, 10, 12, 20]).forEach((lr, i) => expect(lr, `${schedule} #${i}`).toBeCloseTo(expected[schedule][i]!, 12));
    }
    // Without warmup the first step runs at the peak.
    expect(learningRate(0, 12, { ...base, warmupSteps: 0 })).toBe(1);
  });

  it('from the CLI, names the flag that sets a bad field', async () => {
    const flags = { model: 'm', output: 'o', synthetic: true };
    await expect(configFromFlags({ ...flags, lr: 0 })).rejects.toThrow(/^flags: optimizer\.lr \(--lr\): Too small/);
    await expect(configFromFlags({ ...flags, worldSize: 2, processRank: 2, groupFile: '/tmp/g', device: 'cuda' })).rejects.toThrow(/dataParallel\.rank \(--process-rank\): 2 must be below/);
    await expect(configFromFlags({ ...flags, targets: [] })).rejects.toThrow(/lora\.targets \(--targets\)/);
    // A field no flag sets keeps its bare name.
    expect(() => parseTrainConfig({ model: 'm', output: 'o', data: 'synthetic', loss: { rfOffset: -1 } })).toThrow(/loss\.rfOffset: /);
  });

  it.skipIf(cudaUsable())('on a GPU that is not there, fails at once with the CUDA error and trains nothing', async () => {
    const out = join(root, 'no-gpu');
    const error = await train({ ...config('no-gpu'), device: 'cuda' }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RedflagError);
    expect((error as Error).message).toMatch(/CUDA/);
    expect(await readdir(out)).toEqual([]); // no metrics, checkpoint or adapter
  });
});
