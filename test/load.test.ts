// Loading edge cases, the red-flag token on the weights side, and saving back in HF format.
import { afterAll, describe, expect, it, vi } from 'vitest';
import { cp, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { RedflagError } from '../lib/errors.js';
import { loadModel } from '../lib/model/model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { SafetensorsFile, fromFloat32, toFloat32, writeSafetensors } from '../lib/model/safetensors.js';
import { FIXTURES } from './helpers/fixtures.js';
import { packagedTokenizer, tinyLlama } from './helpers/tiny-model.js';

const cleanup: string[] = [];
afterAll(async () => {
  for (const d of cleanup) await rm(d, { recursive: true, force: true });
});
async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'redflag-load-'));
  cleanup.push(d);
  return d;
}
async function copyFixture(name: string): Promise<string> {
  const d = await tempDir();
  await cp(join(FIXTURES, name), d, { recursive: true });
  return d;
}

describe('loading errors name the problem', () => {
  it('unsupported architecture', async () => {
    const d = await copyFixture('llama-gqa');
    const config = JSON.parse(await readFile(join(d, 'config.json'), 'utf8'));
    config.architectures = ['BertForMaskedLM'];
    config.model_type = 'bert';
    await writeFile(join(d, 'config.json'), JSON.stringify(config));
    await expect(loadModel(d)).rejects.toThrow(/BertForMaskedLM/);
  });

  it('a missing tensor, by its checkpoint name', async () => {
    const d = await copyFixture('llama-gqa');
    const f = await SafetensorsFile.open(join(d, 'model.safetensors'));
    const kept = new Map();
    for (const name of f.tensors.keys()) if (name !== 'model.layers.1.self_attn.k_proj.weight') kept.set(name, await f.read(name));
    await f.close();
    await writeSafetensors(join(d, 'model.safetensors'), kept, { overwrite: true });
    await expect(loadModel(d)).rejects.toThrow(/model\.layers\.1\.self_attn\.k_proj\.weight is missing/);
  });

  it.each([
    ['an f32 NaN', 'llama-gqa', 'F32', NaN, 'NaN'],
    ['a bf16 infinity past the first block of the check', 'llama-bf16-sharded', 'BF16', -Infinity, 'an infinity'],
    ['an f16 NaN', 'llama-gqa', 'F16', NaN, 'NaN'],
  ] as const)('%s in a weight, by tensor, element and file (every answer would be NaN: never flagged)', async (_name, fixture, dtype, value, what) => {
    const d = await copyFixture(fixture);
    const target = 'model.layers.1.mlp.up_proj.weight';
    const index = fixture === 'llama-gqa' ? null : JSON.parse(await readFile(join(d, 'model.safetensors.index.json'), 'utf8'));
    const file = join(d, index === null ? 'model.safetensors' : index.weight_map[target]);
    const f = await SafetensorsFile.open(file);
    const tensors = new Map();
    for (const name of f.tensors.keys()) tensors.set(name, await f.read(name));
    await f.close();
    const poisoned = toFloat32(tensors.get(target));
    const at = poisoned.length - 3; // past 4096 elements: a later block of the check
    expect(at).toBeGreaterThan(4096);
    poisoned[at] = value;
    tensors.set(target, fromFloat32(poisoned, tensors.get(target).shape, dtype));
    await writeSafetensors(file, tensors, { overwrite: true });
    const error = await loadModel(d, { threads: 1 }).then(() => null, (e: unknown) => e);
    expect(error).toMatchObject({ code: 'INVALID_FILE', file });
    expect((error as Error).message).toContain(`tensor ${target} holds ${what} at element ${at}: the weights are corrupt`);
  });

  it('a tensor whose shape disagrees with config.json', async () => {
    const d = await copyFixture('llama-gqa');
    const config = JSON.parse(await readFile(join(d, 'config.json'), 'utf8'));
    config.intermediate_size += 1;
    await writeFile(join(d, 'config.json'), JSON.stringify(config));
    await expect(loadModel(d)).rejects.toThrow(/gate_proj\.weight has shape \[128, 64\], expected \[129, 64\]/);
  });

  it('a weight of a dtype the engine does not read, by tensor and shard, before any is loaded', async () => {
    const d = await copyFixture('llama-bf16-sharded');
    const index = JSON.parse(await readFile(join(d, 'model.safetensors.index.json'), 'utf8'));
    const target = 'model.layers.1.self_attn.k_proj.weight';
    const shard = join(d, index.weight_map[target]);
    const f = await SafetensorsFile.open(shard);
    const tensors = new Map();
    for (const name of f.tensors.keys()) {
      const t = await f.read(name);
      tensors.set(name, name === target ? { dtype: 'F8_E4M3', shape: t.shape, data: new Uint8Array(t.data.byteLength / 2) } : t);
    }
    await f.close();
    await writeSafetensors(shard, tensors, { overwrite: true });
    const error = (await loadModel(d).catch((e: unknown) => e)) as RedflagError;
    expect(error).toMatchObject({ code: 'UNSUPPORTED', file: shard });
    expect(error.message).toMatch(/tensor model\.layers\.1\.self_attn\.k_proj\.weight has dtype F8_E4M3; redflag reads F32, F16, BF16, F64 weights/);
  });

  it('a directory without weights', async () => {
    const d = await tempDir();
    await cp(join(FIXTURES, 'llama-gqa', 'config.json'), join(d, 'config.json'));
    await expect(loadModel(d)).rejects.toThrow(/safetensors/);
  });

  it('bad options are rejected before native code', async () => {
    const d = join(FIXTURES, 'llama-gqa');
    await expect(loadModel(d, { dtype: 'f16' as never })).rejects.toThrow(/dtype/);
    await expect(loadModel(d, { threads: 0 })).rejects.toThrow(/threads/);
  });
});

describe('end of generation', () => {
  it("stops on the configs' EOS ids and the tokenizer's EOS, the token training ends responses with", async () => {
    const dir = await tinyLlama();
    cleanup.push(dir);
    // A fine-tune whose tokenizer ends turns with another token than the configs name (ChatML's <|im_end|> on a </s> base).
    const configFile = join(dir, 'tokenizer_config.json');
    await writeFile(configFile, JSON.stringify({ ...JSON.parse(await readFile(configFile, 'utf8')), eos_token: '<unk>' }));
    const model = await loadModel(dir, { threads: 1 });
    try {
      expect(model.tokenizer!.eosTokenId).toBe(0);
      expect(model.config.eosTokenIds).toEqual([2]);
      expect(model.eosTokenIds.sort()).toEqual([0, 2]);
    } finally {
      model.dispose();
    }
    // A chat template that ends turns with a special token other than every EOS: that one too.
    const templated = await tinyLlama({}, "{% for m in messages %}{{ m['content'] }}<unk>{% endfor %}{% if add_generation_prompt %}>{% endif %}");
    cleanup.push(templated);
    const withTemplate = await loadModel(templated, { threads: 1 });
    try {
      expect(withTemplate.tokenizer!.turnEndTokenId).toBe(0);
      expect(withTemplate.eosTokenIds.sort()).toEqual([0, 2]);
    } finally {
      withTemplate.dispose();
    }
  });
});

describe('a model without tokenizer files', () => {
  it('loads and runs on ids; text APIs fail clearly; disposed models refuse work', async () => {
    const model = await loadModel(join(FIXTURES, 'gpt2-noprefix'));
    expect(model.tokenizer).toBeNull();
    expect(model.plan.unused).toEqual([]); // the legacy attn.bias buffers are ignored
    const tokens = [];
    for await (const t of model.generate([1, 2, 3], { maxTokens: 4, eosTokenIds: [] })) tokens.push(t);
    expect(tokens).toHaveLength(4);
    await expect(model.generate('text').next()).rejects.toMatchObject({ code: 'NO_TOKENIZER' });
    model.dispose();
    await expect(model.logits([1])).rejects.toMatchObject({ code: 'DISPOSED' });
  });
});

describe('addRedFlagToken', () => {
  it('adds <rf> as a new token: embedding and head grow, old logits unchanged, saved and reloaded', async () => {
    const dir = await tinyLlama();
    cleanup.push(dir);
    const model = await loadModel(dir, { threads: 2 });
    const ids = model.tokenizer!.encode('Some harmless text to score');
    const before = await model.logits(ids);
    const info = await addRedFlagToken(model);
    expect(info).toMatchObject({ id: 32000, content: '<rf>', reused: false, vocabSize: 32001 });
    expect(model.redFlagTokenId).toBe(32000);
    expect(model.tokenizer!.encode('a <rf> b', { addSpecialTokens: false })).toContain(32000);

    // Existing columns are untouched; the new column is the mean head row times the hidden state.
    const after = await model.logits(ids);
    const V0 = 32000, V1 = 32001;
    for (let t = 0; t < ids.length; t++) {
      for (let j = 0; j < V0; j += 997) expect(after[t * V1 + j]).toBe(before[t * V0 + j]);
    }
    const embed = toFloat32((await model.readTensor('model.embed_tokens.weight')));
    const H = model.config.hiddenSize;
    let mean0 = 0;
    for (let r = 0; r < V0; r++) mean0 += embed[r * H]!;
    expect(embed[V0 * H]).toBeCloseTo(mean0 / V0, 5);

    const saved = join(await tempDir(), 'rf');
    await model.save(saved);
    await expect(model.save(saved)).rejects.toThrow(/not empty/);
    const reloaded = await loadModel(saved, { threads: 2 });
    expect(reloaded.redFlagTokenId).toBe(32000);
    expect(reloaded.config.vocabSize).toBe(32001);
    expect(JSON.parse(await readFile(join(saved, 'config.json'), 'utf8')).vocab_size).toBe(32001);
    expect(await reloaded.logits(ids)).toEqual(after);
    expect(reloaded.tokenizer!.decode([32000])).toBe('<rf>');
    expect(reloaded.tokenizer!.decode([32000], { skipSpecialTokens: true })).toBe('');
    reloaded.dispose();
    model.dispose();
  });

  it('keeps tied embeddings tied and uses padding rows without growing', async () => {
    // 32064 embedding rows for a 32000-token tokenizer, as many checkpoints pad their vocabulary.
    const dir = await tinyLlama({ vocabSize: 32064, tieWordEmbeddings: true });
    cleanup.push(dir);
    const model = await loadModel(dir);
    const info = await addRedFlagToken(model, model.tokenizer, { init: 'zeros' });
    expect(info).toMatchObject({ id: 32000, vocabSize: 32064 });
    // Tied: the LM head row is the (zero) embedding row, so the <rf> logit is exactly 0.
    const logits = await model.logits([1, 450, 4996]);
    for (let t = 0; t < 3; t++) expect(logits[t * 32064 + 32000]).toBe(0);
    const saved = join(await tempDir(), 'tied');
    await model.save(saved);
    const names = [];
    const f = await SafetensorsFile.open(join(saved, 'model.safetensors'));
    for (const n of f.tensors.keys()) names.push(n);
    await f.close();
    expect(names).not.toContain('lm_head.weight');
    model.dispose();
  });

  it("reuses a reserved special token (Llama-3's <|reserved_special_token_N|>) keeping the vocabulary size", async () => {
    const tokenizer = await packagedTokenizer('llama2');
    const json = tokenizer.tokenizerJson as { added_tokens: object[] };
    for (let i = 0; i < 4; i++) {
      json.added_tokens.push({
        id: 32000 + i, content: `<|reserved_special_token_${i}|>`, single_word: false, lstrip: false, rstrip: false,
        normalized: false, special: true,
      });
    }
    const dir = await tempDir();
    const { writeRandomModel } = await import('../lib/model/random-model.js');
    await writeRandomModel(dir, {
      architecture: 'llama', vocabSize: 32004, hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, tokenizer,
    });
    const model = await loadModel(dir);
    const info = await addRedFlagToken(model);
    expect(info).toMatchObject({ id: 32000, reused: true, vocabSize: 32004 });
    expect(model.tokenizer!.encode('<rf>', { addSpecialTokens: false })).toEqual([32000]);
    const saved = join(await tempDir(), 'reserved');
    await model.save(saved);
    const files = await readdir(saved);
    expect(files).toEqual(expect.arrayContaining(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']));
    const reloaded = await loadModel(saved);
    expect(reloaded.redFlagTokenId).toBe(32000);
    expect(reloaded.vocabSize).toBe(32004);
    reloaded.dispose();
    model.dispose();
  });
});

describe('addRedFlagToken initial rows', () => {
  it('mean of the other rows (a reused row left out), a copy or zeros, rounded once to BF16; every other row bit for bit', async () => {
    const tokenizer = await packagedTokenizer('llama2');
    const json = tokenizer.tokenizerJson as { added_tokens: object[] };
    json.added_tokens.push({ id: 32000, content: '<|reserved_special_token_0|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
    const dir = await tempDir();
    const { writeRandomModel } = await import('../lib/model/random-model.js');
    await writeRandomModel(dir, {
      architecture: 'llama', vocabSize: 32001, hiddenSize: 16, intermediateSize: 32, numLayers: 1, numHeads: 2, tieWordEmbeddings: true, dtype: 'BF16', tokenizer,
    });
    const file = await SafetensorsFile.open(join(dir, 'model.safetensors'));
    const original = await file.read('model.embed_tokens.weight');
    await file.close();
    const values = toFloat32(original);
    const H = 16, V = 32001;
    const mean = new Float64Array(H);
    for (let r = 0; r < V - 1; r++) for (let j = 0; j < H; j++) mean[j]! += values[r * H + j]!;
    const bf16 = (x: number) => toFloat32(fromFloat32(Float32Array.of(Math.fround(x)), [1], 'BF16'))[0]!;
    const expected = {
      mean: Array.from(mean, (v) => bf16(v / (V - 1))),
      copy: Array.from(values.subarray(450 * H, 451 * H)),
      zeros: new Array<number>(H).fill(0),
    };
    for (const [name, init] of [['mean', 'mean'], ['copy', { copyFrom: 450 }], ['zeros', 'zeros']] as const) {
      const model = await loadModel(dir);
      try {
        expect(await addRedFlagToken(model, model.tokenizer, { init })).toMatchObject({ id: 32000, reused: true, vocabSize: V });
        const grown = await model.readTensor('model.embed_tokens.weight');
        expect(grown.dtype).toBe('BF16');
        expect([...toFloat32(grown).subarray(32000 * H)], name).toEqual(expected[name]);
        expect(Buffer.from(grown.data.subarray(0, 32000 * H * 2)).equals(Buffer.from(original.data.subarray(0, 32000 * H * 2))), name).toBe(true);
      } finally {
        model.dispose();
      }
    }
    const model = await loadModel(dir);
    await expect(addRedFlagToken(model, model.tokenizer, { init: { copyFrom: V } })).rejects.toThrow(/copyFrom must be a token id below 32001, got 32001/);
    model.dispose();
  });
});

describe('Model.save', () => {
  it('shards above shardBytes with an index; overwritten with one file, no stale shard or index is left to load', async () => {
    const dir = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2 });
    cleanup.push(dir);
    const model = await loadModel(dir, { threads: 1 });
    const ids = [1, 450, 4996];
    try {
      const want = await model.logits(ids);
      const saved = join(await tempDir(), 'saved');
      // The 4 MB embedding gets a shard of its own; the layers' small tensors share the rest.
      await model.save(saved, { shardBytes: 64 * 1024 });
      const sharded = (await readdir(saved)).filter((f) => f.startsWith('model'));
      expect(sharded).toContain('model.safetensors.index.json');
      expect(sharded.filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f)).length).toBeGreaterThan(1);
      const index = JSON.parse(await readFile(join(saved, 'model.safetensors.index.json'), 'utf8'));
      expect(Object.keys(index.weight_map).sort()).toEqual(model.plan.tensors.flatMap((t) => t.sources).sort());
      const reloaded = await loadModel(saved, { threads: 1 });
      expect(await reloaded.logits(ids)).toEqual(want);
      reloaded.dispose();

      await expect(model.save(saved)).rejects.toThrow(/not empty; pass overwrite: true \(on the command line: --overwrite\)/);
      await model.save(saved, { overwrite: true });
      expect((await readdir(saved)).filter((f) => f.startsWith('model'))).toEqual(['model.safetensors']);
      const again = await loadModel(saved, { threads: 1 });
      expect(await again.logits(ids)).toEqual(want);
      again.dispose();

      // config.json is written last: an overwrite stopped part way leaves no model that looks whole.
      const save = vi.spyOn(model.tokenizer!, 'save').mockRejectedValueOnce(new Error('disk full'));
      await expect(model.save(saved, { overwrite: true })).rejects.toThrow('disk full');
      save.mockRestore();
      expect(await readdir(saved)).not.toContain('config.json');
    } finally {
      model.dispose();
    }
  });
});
