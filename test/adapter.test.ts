import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { RedflagError } from '../lib/errors.js';
import { parseModelConfig, type ModelConfig } from '../lib/model/config.js';
import { randomModelConfig, randomModelShapes, type RandomModelSpec } from '../lib/model/random-model.js';
import { createRng } from '../lib/model/sampling.js';
import { SafetensorsFile, fromFloat32, toFloat32, writeSafetensors, type RawTensor } from '../lib/model/safetensors.js';
import { planWeights } from '../lib/model/weights-map.js';
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  RED_FLAG_ROWS_FILE,
  loadAdapter,
  loraScale,
  loraSites,
  moduleLora,
  patternValue,
  peftLoraKey,
  peftModuleName,
  peftTrainableTokensKey,
  saveAdapter,
  selectModules,
  validateAdapter,
  type Adapter,
  type LoraModuleWeights,
} from '../lib/train/adapter.js';
import { AttackModel } from '../lib/attack/gradient-model.js';
import { applyAdapter } from '../lib/train/export.js';
import { mergeAdapterTensors } from '../lib/train/merge.js';
import { loadModel } from '../lib/model/model.js';
import { FIXTURES } from './helpers/fixtures.js';
import { tinyLlama } from './helpers/tiny-model.js';
import { createDetector } from '../lib/detect/detector.js';

let root: string;
let counter = 0;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'redflag-adapter-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});
const newDir = (): string => join(root, `a${counter++}`);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const llamaSpec = (tied: boolean): RandomModelSpec => ({
  architecture: 'llama',
  vocabSize: 40,
  hiddenSize: 16,
  intermediateSize: 24,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 4,
  tieWordEmbeddings: tied,
});
const gpt2Spec: RandomModelSpec = { architecture: 'gpt2', vocabSize: 30, hiddenSize: 12, intermediateSize: 20, numLayers: 2, numHeads: 3, maxPositions: 16 };

const llamaConfig = (tied = false): ModelConfig => parseModelConfig(randomModelConfig(llamaSpec(tied)));
const gpt2Config = (): ModelConfig => parseModelConfig(randomModelConfig(gpt2Spec));

function randomArray(n: number, rng: () => number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (rng() * 2 - 1) * scale;
  return out;
}

interface MakeOptions {
  targets?: string[];
  rank?: number;
  layers?: number[];
  redFlag?: boolean;
  tokenId?: number;
  /** Category flags after <rf>. */
  categories?: { category: string; id: number }[];
  seed?: number;
  rslora?: boolean;
}

function makeAdapter(config: ModelConfig, options: MakeOptions = {}): Adapter {
  const rng = createRng(options.seed ?? 1);
  const rank = options.rank ?? 2;
  const targets = options.targets ?? (config.architecture === 'gpt2' ? ['c_attn'] : ['q_proj', 'v_proj']);
  const sites = selectModules(config, targets, [0]).map((m) => m.site);
  const table = new Map(loraSites(config).map((s) => [s.site, s]));
  const layers = options.layers ?? Array.from({ length: config.numLayers }, (_, i) => i);
  const modules: LoraModuleWeights[] = [];
  for (const layer of layers) {
    for (const site of sites) {
      const s = table.get(site)!;
      modules.push({
        layer,
        site,
        inFeatures: s.inFeatures,
        outFeatures: s.outFeatures,
        A: randomArray(rank * s.inFeatures, rng, 0.5),
        B: randomArray(s.outFeatures * rank, rng, 0.5),
      });
    }
  }
  const categories = options.categories ?? [];
  const H = config.hiddenSize * (1 + categories.length);
  const tied = config.tieWordEmbeddings;
  return {
    rank,
    alpha: 4,
    dropout: 0.05,
    rslora: options.rslora ?? false,
    targets,
    modules,
    redFlag:
      options.redFlag === false
        ? null
        : {
            tokenId: options.tokenId ?? 7,
            categories,
            embed: randomArray(H, rng),
            head: tied ? null : randomArray(H, rng),
            baseEmbed: randomArray(H, rng),
            baseHead: tied ? null : randomArray(H, rng),
          },
    baseModel: 'org/base-model',
    config,
  };
}

async function rejection(promise: Promise<unknown>): Promise<RedflagError> {
  const error = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(RedflagError);
  return error as RedflagError;
}

async function readAllTensors(path: string): Promise<Map<string, RawTensor>> {
  const file = await SafetensorsFile.open(path);
  try {
    const out = new Map<string, RawTensor>();
    for (const name of file.tensors.keys()) out.set(name, await file.read(name));
    return out;
  } finally {
    await file.close();
  }
}

async function readConfigJson(dir: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8')) as Record<string, unknown>;
}

/** Saves a valid adapter, then lets `edit` rewrite its tensors and/or config. */
async function corrupted(
  adapter: Adapter,
  edit: { tensors?: (t: Map<string, RawTensor>) => void; config?: (c: Record<string, unknown>) => void },
): Promise<string> {
  const dir = newDir();
  await saveAdapter(dir, adapter);
  if (edit.tensors) {
    const tensors = await readAllTensors(join(dir, ADAPTER_WEIGHTS_FILE));
    edit.tensors(tensors);
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { overwrite: true });
  }
  if (edit.config) {
    const json = await readConfigJson(dir);
    edit.config(json);
    await writeFile(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(json));
  }
  return dir;
}

function expectSameAdapter(actual: Adapter, expected: Adapter): void {
  expect(actual.rank).toBe(expected.rank);
  expect(actual.alpha).toBe(expected.alpha);
  expect(actual.dropout).toBe(expected.dropout);
  expect(actual.rslora).toBe(expected.rslora);
  expect(actual.targets).toEqual(expected.targets);
  expect(actual.baseModel).toBe(expected.baseModel);
  expect(actual.config).toBe(expected.config);
  const key = (m: LoraModuleWeights): string => `${m.layer}/${m.site}`;
  const sortedExpected = [...expected.modules].sort((a, b) => key(a).localeCompare(key(b)));
  const sortedActual = [...actual.modules].sort((a, b) => key(a).localeCompare(key(b)));
  expect(sortedActual).toEqual(sortedExpected);
  expect(actual.redFlag).toEqual(expected.redFlag);
}

// ---------------------------------------------------------------------------------------------
// Names and scale
// ---------------------------------------------------------------------------------------------

describe('adapter names', () => {
  it('computes the LoRA scale with and without rsLoRA', () => {
    expect(loraScale({ rank: 16, alpha: 32, rslora: false })).toBe(2);
    expect(loraScale({ rank: 16, alpha: 32, rslora: true })).toBe(8);
  });

  it('uses PEFT key names', () => {
    const llama = llamaConfig();
    const gpt2 = gpt2Config();
    expect(peftLoraKey(llama, 1, 'mlp.down_proj', 'B')).toBe('base_model.model.model.layers.1.mlp.down_proj.lora_B.weight');
    expect(peftLoraKey(gpt2, 0, 'attn.c_attn', 'A')).toBe('base_model.model.transformer.h.0.attn.c_attn.lora_A.weight');
    expect(peftTrainableTokensKey(llama, 'embed')).toBe('base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta');
    expect(peftTrainableTokensKey(llama, 'head')).toBe('base_model.model.lm_head.token_adapter.trainable_tokens_delta');
    expect(peftTrainableTokensKey(gpt2, 'embed')).toBe('base_model.model.transformer.wte.token_adapter.trainable_tokens_delta');
  });

  it('resolves PEFT target_modules lists by suffix after a dot, or the whole name', () => {
    const sites = (config: ModelConfig, targets: string[]) => selectModules(config, targets, [1]).map((m) => m.site);
    expect(sites(llamaConfig(), ['q_proj', 'mlp.down_proj'])).toEqual(['self_attn.q_proj', 'mlp.down_proj']);
    expect(sites(gpt2Config(), ['c_proj'])).toEqual(['attn.c_proj', 'mlp.c_proj']);
    expect(sites(gpt2Config(), ['attn.c_proj'])).toEqual(['attn.c_proj']);
    expect(sites(llamaConfig(), ['model.layers.1.self_attn.k_proj', 'layers.0.mlp.up_proj'])).toEqual(['self_attn.k_proj']);
    expect(sites(llamaConfig(), ['c_attn', 'proj'])).toEqual([]);
    // An in-memory adapter's targets are checked the same way, each entry naming some module.
    const adapter = makeAdapter(llamaConfig());
    for (const [targets, message] of [
      [['c_attn'], /targets entry "c_attn" matches no adaptable layer of LlamaForCausalLM/],
      [['proj'], /targets entry "proj" matches no adaptable layer/],
      [[], /targets must be a non-empty list/],
      [['q_proj', 'q_proj'], /targets lists "q_proj" twice/],
    ] as const) {
      expect(() => validateAdapter({ ...adapter, targets: [...targets] })).toThrow(message);
    }
  });
});

// PEFT's per-module forms: target_modules as a pattern, exclude_modules, rank_pattern and
// alpha_pattern (peft tuners_utils.check_target_module_exists, utils/other.get_pattern_key).
describe('PEFT module patterns', () => {
  it('match module names as PEFT does', () => {
    const llama = llamaConfig();
    const q1 = peftModuleName(llama, 1, 'self_attn.q_proj');
    expect(q1).toBe('model.layers.1.self_attn.q_proj');
    expect(peftModuleName(gpt2Config(), 0, 'attn.c_attn')).toBe('transformer.h.0.attn.c_attn');
    // A key matches the end of the name, after a dot or from the start; the first that matches wins.
    const value = (pattern: Record<string, number>) => patternValue(pattern, q1)?.value;
    expect(value({ q_proj: 4 })).toBe(4);
    expect(value({ 'self_attn.q_proj': 4 })).toBe(4);
    expect(value({ 'layers.1.self_attn.q_proj': 4 })).toBe(4);
    expect(value({ 'model\\.layers\\.[0-9]+\\.self_attn\\.(q|k)_proj': 4 })).toBe(4);
    expect(value({ proj: 4 })).toBeUndefined();  // not at a dot
    expect(value({ 'layers.0.self_attn.q_proj': 4 })).toBeUndefined();
    expect(value({ q_pro: 4 })).toBeUndefined();  // not to the end
    expect(patternValue({ v_proj: 1, '.*_proj': 2, q_proj: 3 }, q1)).toEqual({ key: '.*_proj', value: 2 });
    expect(patternValue({ '(?P<p>q)_proj': 5 }, q1)?.value).toBe(5);  // Python's named group

    const ids = (list: Array<{ layer: number; site: string }>) => list.map((m) => `${m.layer}/${m.site}`);
    expect(ids(selectModules(llama, '.*\\.layers\\.1\\.(self_attn\\.q_proj|mlp\\.down_proj)', null))).toEqual(['1/self_attn.q_proj', '1/mlp.down_proj']);
    expect(ids(selectModules(llama, '.*q_proj', null, ['layers.0.self_attn.q_proj']))).toEqual(['1/self_attn.q_proj']);
    expect(ids(selectModules(llama, ['q_proj', 'v_proj'], [1], '.*v_proj'))).toEqual(['1/self_attn.q_proj']);
    expect(selectModules(llama, 'all-linear', null)).toHaveLength(2 * 7);
    expect(ids(selectModules(gpt2Config(), 'transformer\\.h\\.0\\.mlp\\..*', null))).toEqual(['0/mlp.c_fc', '0/mlp.c_proj']);
    expect(selectModules(llama, 'q_proj', null)).toEqual([]);  // a whole-name match: the bare name is no module's
  });

  /** A Llama adapter with PEFT's per-module forms, its modules drawn at their ranks. */
  function patternAdapter(config: ModelConfig, seed = 3): Adapter {
    const rng = createRng(seed);
    const adapter: Adapter = {
      rank: 2,
      alpha: 4,
      dropout: 0,
      rslora: false,
      targets: '.*\\.(q_proj|v_proj|down_proj)',
      exclude: ['layers.1.mlp.down_proj'],
      rankPattern: { v_proj: 3, 'layers\\.1\\.self_attn\\.q_proj': 5 },
      alphaPattern: { down_proj: 12 },
      modules: [],
      redFlag: null,
      baseModel: '',
      config,
    };
    const table = new Map(loraSites(config).map((s) => [s.site, s]));
    for (const { layer, site } of selectModules(config, adapter.targets, null, adapter.exclude)) {
      const { inFeatures, outFeatures } = table.get(site)!;
      const { rank } = moduleLora(adapter, layer, site);
      adapter.modules.push({ layer, site, inFeatures, outFeatures, A: randomArray(rank * inFeatures, rng, 0.3), B: randomArray(outFeatures * rank, rng, 0.3) });
    }
    return adapter;
  }

  it('give each module its rank and scale, and round-trip through adapter_config.json as PEFT writes them', async () => {
    const config = llamaConfig();
    const adapter = patternAdapter(config);
    expect(adapter.modules.map((m) => [m.layer, m.site, moduleLora(adapter, m.layer, m.site)])).toEqual([
      [0, 'self_attn.q_proj', { rank: 2, alpha: 4, scale: 2 }],
      [0, 'self_attn.v_proj', { rank: 3, alpha: 4, scale: 4 / 3 }],
      [0, 'mlp.down_proj', { rank: 2, alpha: 12, scale: 6 }],
      [1, 'self_attn.q_proj', { rank: 5, alpha: 4, scale: 4 / 5 }],
      [1, 'self_attn.v_proj', { rank: 3, alpha: 4, scale: 4 / 3 }],
    ]);
    const dir = newDir();
    await saveAdapter(dir, adapter);
    const json = await readConfigJson(dir);
    expect(json).toMatchObject({
      target_modules: adapter.targets,
      exclude_modules: adapter.exclude,
      rank_pattern: adapter.rankPattern,
      alpha_pattern: adapter.alphaPattern,
      layers_to_transform: null,
      r: 2,
      lora_alpha: 4,
    });
    const tensors = await readAllTensors(join(dir, ADAPTER_WEIGHTS_FILE));
    expect(tensors.get(peftLoraKey(config, 1, 'self_attn.q_proj', 'A'))!.shape).toEqual([5, 16]);
    expect(tensors.get(peftLoraKey(config, 0, 'self_attn.v_proj', 'B'))!.shape).toEqual([8, 3]);
    const loaded = await loadAdapter(dir, config);
    expectSameAdapter(loaded, adapter);
    expect([loaded.exclude, loaded.rankPattern, loaded.alphaPattern]).toEqual([adapter.exclude, adapter.rankPattern, adapter.alphaPattern]);

    // Exactly the modules the patterns select: one more (the excluded one), or one fewer, is an error.
    const extra = await corrupted(adapter, { tensors: (t) => t.set(peftLoraKey(config, 1, 'mlp.down_proj', 'A'), fromFloat32(new Float32Array(2 * 24), [2, 24], 'F32')) });
    expect((await rejection(loadAdapter(extra, config))).message).toMatch(/model\.layers\.1\.mlp\.down_proj is excluded by exclude_modules \["layers\.1\.mlp\.down_proj"\]/);
    const unmatched = await corrupted(adapter, { tensors: (t) => t.set(peftLoraKey(config, 0, 'self_attn.k_proj', 'A'), fromFloat32(new Float32Array(2 * 16), [2, 16], 'F32')) });
    expect((await rejection(loadAdapter(unmatched, config))).message).toMatch(/model\.layers\.0\.self_attn\.k_proj is not selected by target_modules/);
    const missing = await corrupted(adapter, { tensors: (t) => t.delete(peftLoraKey(config, 0, 'mlp.down_proj', 'B')) });
    expect((await rejection(loadAdapter(missing, config))).message).toMatch(/layers\.0\.mlp\.down_proj\.lora_B\.weight" is missing \(target_modules in adapter_config\.json select it\)/);
    const short = { ...adapter, modules: adapter.modules.slice(1) };
    await expect(saveAdapter(newDir(), short)).rejects.toThrow(/layers\.0\.self_attn\.q_proj\.lora_A\.weight is missing: targets .* select it/);
  });

  it('an overwrite stopped midway leaves no adapter, never the new weights under the old config', async () => {
    const config = llamaConfig();
    const dir = newDir();
    await saveAdapter(dir, makeAdapter(config));
    // The weights cannot be written (a folder in their place): the save fails after it started.
    await rm(join(dir, ADAPTER_WEIGHTS_FILE));
    await mkdir(join(dir, ADAPTER_WEIGHTS_FILE));
    await expect(saveAdapter(dir, makeAdapter(config), { overwrite: true })).rejects.toThrow();
    await expect(readFile(join(dir, 'adapter_config.json'))).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(loadAdapter(dir, config)).rejects.toThrow(/adapter_config\.json/);
  });

  it('compute what a uniform adapter holding the same products computes, live and merged', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    try {
      const config = model.config;
      const adapter = patternAdapter(config, 5);
      // The same deltas at one rank (5) and scale (1): each module's factors padded with zero
      // rows and columns, its scale folded into B; the excluded module present with B = 0.
      const R = 5;
      const uniform: Adapter = { rank: R, alpha: R, dropout: 0, rslora: false, targets: ['q_proj', 'v_proj', 'down_proj'], modules: [], redFlag: null, baseModel: '', config };
      for (const { layer, site, inFeatures, outFeatures } of selectModules(config, uniform.targets, null).map((m) => ({ ...m, ...loraSites(config).find((s) => s.site === m.site)! }))) {
        const A = new Float32Array(R * inFeatures), B = new Float32Array(outFeatures * R);
        const m = adapter.modules.find((x) => x.layer === layer && x.site === site);
        if (m) {
          const { rank, scale } = moduleLora(adapter, layer, site);
          A.set(m.A);
          for (let o = 0; o < outFeatures; o++) for (let k = 0; k < rank; k++) B[o * R + k] = m.B[o * rank + k]! * scale;
        }
        uniform.modules.push({ layer, site, inFeatures, outFeatures, A, B });
      }
      const [patternDir, uniformDir] = [newDir(), newDir()];
      await saveAdapter(patternDir, adapter);
      await saveAdapter(uniformDir, uniform);
      const ids = [1, 17, 42, 99, 5, 230, 64, 8];
      const base = await model.logits(ids);
      await applyAdapter(model, patternDir);
      const patterned = await model.logits(ids);
      await applyAdapter(model, uniformDir);
      const padded = await model.logits(ids);
      let diff = 0, norm = 0, moved = 0;
      for (let i = 0; i < base.length; i++) {
        diff += (patterned[i]! - padded[i]!) ** 2;
        norm += padded[i]! ** 2;
        moved += (padded[i]! - base[i]!) ** 2;
      }
      expect(Math.sqrt(diff / norm)).toBeLessThan(1e-5);
      expect(Math.sqrt(moved / norm)).toBeGreaterThan(1e-3);  // the adapters do change the logits
      // The white-box attacks differentiate through one rank on listed sites: refused by name.
      const refused = await rejection(AttackModel.open(model, patternDir));
      expect([refused.code, refused.file]).toEqual(['UNSUPPORTED', patternDir]);
      expect(refused.message).toMatch(/rank_pattern or alpha_pattern/);

      // Merged: each weight W + s·B·A at the module's own rank and scale, in float64.
      const { plan, tensors, read } = checkpoint(llamaSpec(false), 'F32');
      const small = patternAdapter(parseModelConfig(randomModelConfig(llamaSpec(false))), 7);
      const merged = await mergeAdapterTensors(small, read, plan);
      expect([...merged.keys()].sort()).toEqual(small.modules.map((m) => `model.layers.${m.layer}.${m.site}.weight`).sort());
      for (const m of small.modules) {
        const { rank, scale } = moduleLora(small, m.layer, m.site);
        const name = `model.layers.${m.layer}.${m.site}.weight`;
        const before = toFloat32(tensors.get(name)!), after = toFloat32(merged.get(name)!);
        for (let o = 0; o < m.outFeatures; o++) {
          for (let i = 0; i < m.inFeatures; i++) expect(Math.abs(after[o * m.inFeatures + i]! - before[o * m.inFeatures + i]! - naiveDelta(m, rank, scale, o, i))).toBeLessThan(1e-6);
        }
      }
    } finally {
      model.dispose();
    }
  });
});

describe('applyAdapter', () => {
  it('an adapter without flags in place of one with them leaves the model without a flag token', async () => {
    const dir = await tinyLlama();
    const model = await loadModel(dir, { threads: 1 });
    const [withFlag, withoutFlag] = [newDir(), newDir()];
    try {
      const V = model.vocabSize;
      await saveAdapter(withFlag, makeAdapter(model.config, { tokenId: V, categories: [{ category: 'cyber', id: V + 1 }] }));
      await saveAdapter(withoutFlag, makeAdapter(model.config, { seed: 2, redFlag: false }));
      expect(model.redFlagTokenId).toBeNull();
      await applyAdapter(model, withFlag);
      expect(model.flagTokenIds()).toEqual([V, V + 1]);
      // Its trained rows go with it: the tokens added for it keep untrained rows, not flags.
      await applyAdapter(model, withoutFlag);
      expect([model.redFlagTokenId, model.flagCategories]).toEqual([null, []]);
      await expect(createDetector({ model })).rejects.toThrow(/no <rf> token/);
      await applyAdapter(model, withFlag);
      expect(model.flagTokenIds()).toEqual([V, V + 1]);
    } finally {
      model.dispose();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('the gradient attacks open an adapter whose target_modules name modules with their layer, and compute what it computes', async () => {
    const dir = await tinyLlama();
    const model = await loadModel(dir, { threads: 1 });
    const adapterDir = newDir();
    try {
      const adapter = makeAdapter(model.config, { targets: ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj'], layers: [0], redFlag: false });
      await saveAdapter(adapterDir, adapter);
      const ids = [1, 17, 42, 99, 5, 230, 64, 8];
      await applyAdapter(model, adapterDir);
      const applied = await model.logits(ids);
      const attack = await AttackModel.open(model, adapterDir);
      try {
        // The trainer's copy of the adapter, which the model now runs.
        const trained = await model.logits(ids);
        expect(trained.reduce((m, v, i) => Math.max(m, Math.abs(v - applied[i]!)), 0)).toBeLessThan(1e-4);
      } finally {
        attack.close();
      }
    } finally {
      model.dispose();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Save / load
// ---------------------------------------------------------------------------------------------

describe('saveAdapter / loadAdapter', () => {
  it('round-trips a Llama adapter with an untied <rf> head in PEFT layout', async () => {
    const config = llamaConfig(false);
    const adapter = makeAdapter(config, { targets: ['q_proj', 'k_proj', 'mlp.down_proj'], rank: 3 });
    const dir = newDir();
    await saveAdapter(dir, adapter);

    const tensors = await readAllTensors(join(dir, ADAPTER_WEIGHTS_FILE));
    const expected: Record<string, number[]> = {};
    for (const L of [0, 1]) {
      const p = `base_model.model.model.layers.${L}.`;
      expected[`${p}self_attn.q_proj.lora_A.weight`] = [3, 16];
      expected[`${p}self_attn.q_proj.lora_B.weight`] = [16, 3];
      expected[`${p}self_attn.k_proj.lora_A.weight`] = [3, 16];
      expected[`${p}self_attn.k_proj.lora_B.weight`] = [8, 3];
      expected[`${p}mlp.down_proj.lora_A.weight`] = [3, 24];
      expected[`${p}mlp.down_proj.lora_B.weight`] = [16, 3];
    }
    expected['base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta'] = [1, 16];
    expected['base_model.model.lm_head.token_adapter.trainable_tokens_delta'] = [1, 16];
    expect([...tensors.keys()].sort()).toEqual(Object.keys(expected).sort());
    for (const [name, shape] of Object.entries(expected)) {
      expect(tensors.get(name)!.shape, name).toEqual(shape);
      expect(tensors.get(name)!.dtype, name).toBe('F32');
    }
    // lora_A is [r, in] row-major, exactly the module's A.
    const q0 = adapter.modules.find((m) => m.layer === 0 && m.site === 'self_attn.q_proj')!;
    expect(toFloat32(tensors.get('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')!)).toEqual(q0.A);
    expect(toFloat32(tensors.get('base_model.model.lm_head.token_adapter.trainable_tokens_delta')!)).toEqual(adapter.redFlag!.head);

    const json = await readConfigJson(dir);
    expect(json).toMatchObject({
      peft_type: 'LORA',
      task_type: 'CAUSAL_LM',
      r: 3,
      lora_alpha: 4,
      lora_dropout: 0.05,
      target_modules: ['q_proj', 'k_proj', 'mlp.down_proj'],
      use_rslora: false,
      bias: 'none',
      fan_in_fan_out: false,
      init_lora_weights: true,
      inference_mode: true,
      base_model_name_or_path: 'org/base-model',
      use_dora: false,
      modules_to_save: null,
      layers_to_transform: null,
      rank_pattern: {},
      alpha_pattern: {},
      trainable_token_indices: { embed_tokens: [7], lm_head: [7] },
      redflag: { format_version: 1, token: '<rf>', token_id: 7, tied: false, base_rows_file: RED_FLAG_ROWS_FILE },
    });
    const rows = await readAllTensors(join(dir, RED_FLAG_ROWS_FILE));
    expect([...rows.keys()].sort()).toEqual(['base_embed', 'base_head']);

    expectSameAdapter(await loadAdapter(dir, config), adapter);
  });

  it('round-trips a tied Llama adapter: only the embedding row is stored', async () => {
    const config = llamaConfig(true);
    const adapter = makeAdapter(config, { tokenId: 40 /* appended: == vocabSize */ });
    const dir = newDir();
    await saveAdapter(dir, adapter);
    const tensors = await readAllTensors(join(dir, ADAPTER_WEIGHTS_FILE));
    expect(tensors.has('base_model.model.lm_head.token_adapter.trainable_tokens_delta')).toBe(false);
    expect(tensors.get('base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta')!.shape).toEqual([1, 16]);
    expect(tensors.size).toBe(2 * 2 * 2 + 1);
    const json = await readConfigJson(dir);
    expect(json['trainable_token_indices']).toEqual({ embed_tokens: [40] });
    expect(json['redflag']).toMatchObject({ token_id: 40, tied: true });
    expect([...(await readAllTensors(join(dir, RED_FLAG_ROWS_FILE))).keys()]).toEqual(['base_embed']);
    expectSameAdapter(await loadAdapter(dir, config), adapter);
  });

  it('round-trips category flags: [K, H] rows after <rf>, named in the redflag block', async () => {
    for (const tied of [false, true]) {
      const config = llamaConfig(tied);
      const categories = [
        { category: 'cyber', id: 40 },
        { category: 'weapons', id: 3 },
      ];
      const adapter = makeAdapter(config, { tokenId: 7, categories });
      const dir = newDir();
      await saveAdapter(dir, adapter);
      const tensors = await readAllTensors(join(dir, ADAPTER_WEIGHTS_FILE));
      expect(tensors.get('base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta')!.shape).toEqual([3, 16]);
      const json = await readConfigJson(dir);
      expect(json['trainable_token_indices']).toEqual(tied ? { embed_tokens: [7, 40, 3] } : { embed_tokens: [7, 40, 3], lm_head: [7, 40, 3] });
      expect(json['redflag']).toMatchObject({ token_id: 7, categories: { cyber: 40, weapons: 3 } });
      expect((await readAllTensors(join(dir, RED_FLAG_ROWS_FILE))).get('base_embed')!.shape).toEqual([3, 16]);
      expectSameAdapter(await loadAdapter(dir, config), adapter);
    }
    // Rows that do not match the flags are refused before writing.
    const bad = makeAdapter(llamaConfig(true), { categories: [{ category: 'cyber', id: 7 }] });
    expect((await rejection(saveAdapter(newDir(), bad))).message).toMatch(/categories\[0\]\.id must be a token id not used by another flag/);
    const beyond = makeAdapter(llamaConfig(true), { categories: [{ category: 'cyber', id: 42 }] });
    expect((await rejection(saveAdapter(newDir(), beyond))).message).toMatch(/categories\[0\]\.id must be a token id in \[0, 41\], got 42/);
  });

  it('round-trips a GPT-2 adapter (Conv1D: fan_in_fan_out, A [r, in], B [out, r])', async () => {
    const config = gpt2Config();
    const adapter = makeAdapter(config, { targets: ['c_attn', 'attn.c_proj', 'mlp.c_fc'], rank: 4, rslora: true });
    const dir = newDir();
    await saveAdapter(dir, adapter);
    const tensors = await readAllTensors(join(dir, ADAPTER_WEIGHTS_FILE));
    const expected: Record<string, number[]> = {};
    for (const L of [0, 1]) {
      const p = `base_model.model.transformer.h.${L}.`;
      expected[`${p}attn.c_attn.lora_A.weight`] = [4, 12];
      expected[`${p}attn.c_attn.lora_B.weight`] = [36, 4];
      expected[`${p}attn.c_proj.lora_A.weight`] = [4, 12];
      expected[`${p}attn.c_proj.lora_B.weight`] = [12, 4];
      expected[`${p}mlp.c_fc.lora_A.weight`] = [4, 12];
      expected[`${p}mlp.c_fc.lora_B.weight`] = [20, 4];
    }
    expected['base_model.model.transformer.wte.token_adapter.trainable_tokens_delta'] = [1, 12];
    expect([...tensors.keys()].sort()).toEqual(Object.keys(expected).sort());
    for (const [name, shape] of Object.entries(expected)) expect(tensors.get(name)!.shape, name).toEqual(shape);
    const json = await readConfigJson(dir);
    expect(json).toMatchObject({ fan_in_fan_out: true, use_rslora: true, r: 4, trainable_token_indices: { wte: [7] }, redflag: { tied: true } });
    expectSameAdapter(await loadAdapter(dir, config), adapter);
  });

  it('round-trips an adapter without <rf> rows and one restricted to some layers', async () => {
    const config = llamaConfig(false);
    const plain = makeAdapter(config, { redFlag: false });
    const dir = newDir();
    await saveAdapter(dir, plain);
    const json = await readConfigJson(dir);
    expect(json['trainable_token_indices']).toBeNull();
    expect(json['redflag']).toMatchObject({ token_id: null });
    await expect(readFile(join(dir, RED_FLAG_ROWS_FILE))).rejects.toThrow();
    expectSameAdapter(await loadAdapter(dir, config), plain);

    const partial = makeAdapter(config, { layers: [1] });
    const dir2 = newDir();
    await saveAdapter(dir2, partial);
    expect(await readConfigJson(dir2)).toMatchObject({ layers_to_transform: [1], layers_pattern: 'layers' });
    expectSameAdapter(await loadAdapter(dir2, config), partial);
  });

  it('refuses to overwrite unless asked, and leaves the old files intact', async () => {
    const config = llamaConfig(false);
    const dir = newDir();
    await saveAdapter(dir, makeAdapter(config, { seed: 1 }));
    const before = await readFile(join(dir, ADAPTER_WEIGHTS_FILE));
    const error = await rejection(saveAdapter(dir, makeAdapter(config, { seed: 2 })));
    expect(error.message).toMatch(/refusing to overwrite/);
    expect(error.message).toContain(ADAPTER_CONFIG_FILE);
    expect(await readFile(join(dir, ADAPTER_WEIGHTS_FILE))).toEqual(before);

    const replacement = makeAdapter(config, { seed: 2, redFlag: false });
    await saveAdapter(dir, replacement, { overwrite: true });
    expectSameAdapter(await loadAdapter(dir, config), replacement);
    await expect(readFile(join(dir, RED_FLAG_ROWS_FILE))).rejects.toThrow();
  });

  it('validates the in-memory adapter before writing', async () => {
    const config = llamaConfig(false);
    const bad = makeAdapter(config);
    bad.modules[0]!.A = new Float32Array(3);
    expect((await rejection(saveAdapter(newDir(), bad))).message).toContain('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight');

    const gap = makeAdapter(config);
    gap.modules.splice(1, 1); // layer 0 v_proj
    expect((await rejection(saveAdapter(newDir(), gap))).message).toContain('base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight is missing');

    const tiedHead = makeAdapter(llamaConfig(true));
    tiedHead.redFlag!.head = new Float32Array(16);
    expect((await rejection(saveAdapter(newDir(), tiedHead))).message).toMatch(/redFlag.head must be null/);

    const nan = makeAdapter(config);
    nan.redFlag!.embed[3] = Number.NaN;
    expect((await rejection(saveAdapter(newDir(), nan))).message).toMatch(/redFlag.embed: value 3 is not finite/);

    const outOfRange = makeAdapter(config);
    outOfRange.modules[0]!.layer = 2;
    expect((await rejection(saveAdapter(newDir(), outOfRange))).message).toMatch(/layer 2 is out of range/);
  });
});

describe('loadAdapter rejects malformed adapters', () => {
  const config = llamaConfig(false);
  const q0A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
  const v1B = 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight';

  it('a missing LoRA factor', async () => {
    const dir = await corrupted(makeAdapter(config), { tensors: (t) => t.delete(v1B) });
    const error = await rejection(loadAdapter(dir, config));
    expect(error.code).toBe('INVALID_FILE');
    expect(error.message).toContain(`"${v1B}" is missing`);
    expect(error.file).toBe(join(dir, ADAPTER_WEIGHTS_FILE));
  });

  it('a wrong shape', async () => {
    const dir = await corrupted(makeAdapter(config), {
      tensors: (t) => t.set(v1B, fromFloat32(new Float32Array(9 * 2), [9, 2], 'F32')),
    });
    expect((await rejection(loadAdapter(dir, config))).message).toMatch(new RegExp(`"${v1B.replace(/\./g, '\\.')}" has shape \\[9, 2\\], expected \\[8, 2\\]`));
  });

  it('an unknown key', async () => {
    for (const name of [
      'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight',
      'base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight',
      'base_model.model.model.norm.weight',
      'lora_A.weight',
    ]) {
      const dir = await corrupted(makeAdapter(config), { tensors: (t) => t.set(name, fromFloat32(new Float32Array(2), [2], 'F32')) });
      const error = await rejection(loadAdapter(dir, config));
      expect(error.message).toContain(`unknown tensor "${name}"`);
    }
    const site = 'base_model.model.model.layers.0.self_attn.rotary.lora_A.weight';
    const dir = await corrupted(makeAdapter(config), { tensors: (t) => t.set(site, fromFloat32(new Float32Array(2), [1, 2], 'F32')) });
    expect((await rejection(loadAdapter(dir, config))).message).toMatch(/"self_attn.rotary" is not an adaptable layer/);
    // A site that exists but is not targeted.
    const o = 'base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight';
    const dir2 = await corrupted(makeAdapter(config), { tensors: (t) => t.set(o, fromFloat32(new Float32Array(32), [2, 16], 'F32')) });
    expect((await rejection(loadAdapter(dir2, config))).message).toMatch(/self_attn.o_proj is not selected by target_modules/);
  });

  it('an LM-head row in a tied model', async () => {
    const tied = llamaConfig(true);
    const key = 'base_model.model.lm_head.token_adapter.trainable_tokens_delta';
    const dir = await corrupted(makeAdapter(tied), { tensors: (t) => t.set(key, fromFloat32(new Float32Array(16), [1, 16], 'F32')) });
    expect((await rejection(loadAdapter(dir, tied))).message).toContain(`unknown tensor "${key}" (the model ties its LM head`);
  });

  it('a rank mismatch', async () => {
    const dir = await corrupted(makeAdapter(config, { rank: 2 }), { config: (c) => (c['r'] = 4) });
    const error = await rejection(loadAdapter(dir, config));
    expect(error.message).toMatch(/has shape \[2, 16\], expected \[4, 16\]: rank 2 does not match r = 4/);
    expect(error.message).toMatch(/base_model\.model\.model\.layers\.\d\.self_attn\.[qv]_proj\.lora_A\.weight/);

    const mixed = await corrupted(makeAdapter(config, { rank: 2 }), {
      tensors: (t) => t.set(q0A, fromFloat32(new Float32Array(3 * 16), [3, 16], 'F32')),
    });
    expect((await rejection(loadAdapter(mixed, config))).message).toContain(`"${q0A}" has shape [3, 16], expected [2, 16]: rank 3 does not match r = 2`);

    const patterned = await corrupted(makeAdapter(config, { rank: 2 }), { config: (c) => (c['rank_pattern'] = { 'layers\\.0\\.self_attn\\.q_proj': 4 }) });
    expect((await rejection(loadAdapter(patterned, config))).message).toContain(`"${q0A}" has shape [2, 16], expected [4, 16]: rank 2 does not match rank_pattern "layers\\\\.0\\\\.self_attn\\\\.q_proj": 4`);
  });

  it('a layer out of range', async () => {
    const key = 'base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight';
    const dir = await corrupted(makeAdapter(config), { tensors: (t) => t.set(key, fromFloat32(new Float32Array(32), [2, 16], 'F32')) });
    const error = await rejection(loadAdapter(dir, config));
    expect(error.message).toContain(`"${key}": layer 2 is out of range (the model has 2 layers)`);
  });

  it('a missing or unexpected <rf> row', async () => {
    const head = 'base_model.model.lm_head.token_adapter.trainable_tokens_delta';
    const dir = await corrupted(makeAdapter(config), { tensors: (t) => t.delete(head) });
    expect((await rejection(loadAdapter(dir, config))).message).toContain(`"${head}" is missing`);

    const embed = 'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta';
    const dir2 = await corrupted(makeAdapter(config, { redFlag: false }), {
      tensors: (t) => t.set(embed, fromFloat32(new Float32Array(16), [1, 16], 'F32')),
    });
    expect((await rejection(loadAdapter(dir2, config))).message).toContain(`"${embed}" is not expected`);

    const dir3 = await corrupted(makeAdapter(config), { tensors: (t) => t.set(embed, fromFloat32(new Float32Array(32), [2, 16], 'F32')) });
    expect((await rejection(loadAdapter(dir3, config))).message).toContain(`"${embed}" has shape [2, 16], expected [1, 16]`);

    const dir4 = await corrupted(makeAdapter(config), {});
    await rm(join(dir4, RED_FLAG_ROWS_FILE));
    const missing = await rejection(loadAdapter(dir4, config));
    expect(missing.code).toBe('NOT_FOUND');
    expect(missing.file).toBe(join(dir4, RED_FLAG_ROWS_FILE));
  });

  it('bad adapter_config.json fields, naming the field', async () => {
    const cases: Array<[(c: Record<string, unknown>) => void, RegExp]> = [
      [(c) => (c['peft_type'] = 'IA3'), /"peft_type" is "IA3"/],
      [(c) => (c['fan_in_fan_out'] = true), /"fan_in_fan_out" is true/],
      [(c) => (c['use_dora'] = true), /"use_dora" is true/],
      [(c) => (c['rank_pattern'] = { q_proj: 0 }), /"rank_pattern\.q_proj" must be a positive integer, got 0/],
      [(c) => (c['rank_pattern'] = { '(q_proj': 2 }), /"rank_pattern" key is "\(q_proj", not a regular expression redflag can read/],
      [(c) => (c['alpha_pattern'] = [8]), /"alpha_pattern" must be an object of module patterns to alphas/],
      [(c) => (c['target_modules'] = '(?i).*Q_PROJ'), /"target_modules" is "\(\?i\)\.\*Q_PROJ", whose inline flags redflag does not support/],
      [(c) => (c['target_modules'] = '.*\\.lm_head'), /"target_modules" is ".*\\\\.lm_head", which selects no adaptable layer of LlamaForCausalLM \(module names like "model\.layers\.0\.self_attn\.q_proj"\)/],
      [(c) => ((c['target_modules'] = '.*q_proj'), (c['layers_to_transform'] = [0])), /"layers_to_transform" is \[0\], but target_modules is a pattern/],
      [(c) => (c['exclude_modules'] = ['q_proj', 'v_proj']), /"target_modules" is \["q_proj","v_proj"\] less exclude_modules .* selects no adaptable layer/],
      [(c) => (c['bias'] = 'all'), /"bias" is "all"/],
      [(c) => (c['target_modules'] = ['q_proj', 'c_attn']), /"c_attn" matches no adaptable layer/],
      [(c) => (c['r'] = 0), /"r" must be a positive integer/],
      [(c) => (c['layers_to_transform'] = [0, 5]), /"layers_to_transform" names layer 5/],
      [(c) => (c['trainable_token_indices'] = { embed_tokens: [7] }), /no "lm_head" entry/],
      [(c) => (c['trainable_token_indices'] = { embed_tokens: [7, 8], lm_head: [7, 8] }), /"redflag.categories" names no category for token 8/],
      [(c) => (c['trainable_token_indices'] = { embed_tokens: [], lm_head: [] }), /lists no token/],
      // Two flags may take the two rows after the vocabulary, no further.
      [
        (c) => ((c['trainable_token_indices'] = { embed_tokens: [7, config.vocabSize + 2], lm_head: [7, config.vocabSize + 2] }), ((c['redflag'] as Record<string, unknown>)['categories'] = { cyber: config.vocabSize + 2 })),
        /names token \d+, beyond the vocabulary \(\d+ rows, 2 new rows allowed\)/,
      ],
      [(c) => (c['trainable_token_indices'] = { embed_tokens: [7], lm_head: [8] }), /must name the same tokens/],
      [(c) => ((c['redflag'] as Record<string, unknown>)['categories'] = { cyber: 8 }), /"redflag.categories.cyber" is 8, not one of the flag tokens/],
      [(c) => ((c['redflag'] as Record<string, unknown>)['token_id'] = 9), /"redflag.token_id" is 9/],
      [(c) => ((c['redflag'] as Record<string, unknown>)['tied'] = true), /"redflag.tied" is true/],
      [(c) => delete c['redflag'], /"redflag" is missing/],
    ];
    for (const [edit, pattern] of cases) {
      const dir = await corrupted(makeAdapter(config), { config: edit });
      const error = await rejection(loadAdapter(dir, config));
      expect(error.message, String(pattern)).toMatch(pattern);
      expect(error.file).toBe(join(dir, ADAPTER_CONFIG_FILE));
    }
  });

  it('an adapter for another model', async () => {
    const dir = newDir();
    await saveAdapter(dir, makeAdapter(gpt2Config()));
    const error = await rejection(loadAdapter(dir, config));
    expect(error.message).toMatch(/fan_in_fan_out/);
    await expect(loadAdapter(newDir(), config)).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});

// ---------------------------------------------------------------------------------------------
// Merge
// ---------------------------------------------------------------------------------------------

/** A random checkpoint for `spec` in `dtype`, its plan, and a read() that counts calls. */
function checkpoint(spec: RandomModelSpec, dtype: 'F32' | 'BF16' | 'F16', stripPrefix = false) {
  const rng = createRng(11);
  const tensors = new Map<string, RawTensor>();
  for (const [name, shape] of randomModelShapes(spec)) {
    const n = shape.reduce((a, b) => a * b, 1);
    tensors.set(stripPrefix ? name.replace(/^transformer\./, '') : name, fromFloat32(randomArray(n, rng, 0.3), shape, dtype));
  }
  const config = parseModelConfig(randomModelConfig(spec));
  const plan = planWeights(config, tensors.keys(), (n) => tensors.get(n)!.shape, 'test');
  const copies = new Map([...tensors].map(([k, v]) => [k, new Uint8Array(v.data)]));
  const read = async (name: string): Promise<RawTensor> => {
    const t = tensors.get(name);
    if (!t) throw new Error(`no ${name}`);
    return t;
  };
  const untouched = (): boolean => [...tensors].every(([k, v]) => Buffer.from(v.data).equals(Buffer.from(copies.get(k)!)));
  return { config, plan, tensors, read, untouched };
}

/** (B·A)[o, i] · s in float64. */
function naiveDelta(m: LoraModuleWeights, rank: number, s: number, o: number, i: number): number {
  let acc = 0;
  for (let k = 0; k < rank; k++) acc += m.B[o * rank + k]! * m.A[k * m.inFeatures + i]!;
  return acc * s;
}

/** Half a BF16 ulp at |x| (bf16 keeps 8 significant bits). */
const halfBf16Ulp = (x: number): number => (x === 0 ? 2 ** -133 : 2 ** (Math.floor(Math.log2(Math.abs(x))) - 8));

describe('mergeAdapterTensors', () => {
  it('adds s·B·A to Llama Linear weights (F32, exact to 1e-6) and replaces the <rf> rows', async () => {
    const spec = llamaSpec(false);
    const { config, plan, tensors, read, untouched } = checkpoint(spec, 'F32');
    const adapter = makeAdapter(config, { targets: ['q_proj', 'v_proj', 'gate_proj', 'down_proj'], rank: 3, tokenId: 5 });
    adapter.alpha = 6;
    const s = loraScale(adapter);
    const merged = await mergeAdapterTensors(adapter, read, plan);

    const expectedNames = [
      ...[0, 1].flatMap((L) => ['self_attn.q_proj', 'self_attn.v_proj', 'mlp.gate_proj', 'mlp.down_proj'].map((site) => `model.layers.${L}.${site}.weight`)),
      'model.embed_tokens.weight',
      'lm_head.weight',
    ];
    expect([...merged.keys()].sort()).toEqual(expectedNames.sort());
    expect(untouched()).toBe(true);

    for (const m of adapter.modules) {
      const name = `model.layers.${m.layer}.${m.site}.weight`;
      const before = toFloat32(tensors.get(name)!);
      const after = merged.get(name)!;
      expect(after.dtype).toBe('F32');
      expect(after.shape).toEqual([m.outFeatures, m.inFeatures]);
      const w = toFloat32(after);
      for (let o = 0; o < m.outFeatures; o++) {
        for (let i = 0; i < m.inFeatures; i++) {
          const want = before[o * m.inFeatures + i]! + naiveDelta(m, 3, s, o, i);
          expect(Math.abs(w[o * m.inFeatures + i]! - want)).toBeLessThan(1e-6);
        }
      }
    }

    const H = config.hiddenSize;
    for (const [name, row] of [['model.embed_tokens.weight', adapter.redFlag!.embed], ['lm_head.weight', adapter.redFlag!.head!]] as const) {
      const before = toFloat32(tensors.get(name)!);
      const after = toFloat32(merged.get(name)!);
      expect(merged.get(name)!.shape).toEqual([40, H]);
      expect(after.subarray(5 * H, 6 * H)).toEqual(row);
      expect(after.subarray(0, 5 * H)).toEqual(before.subarray(0, 5 * H));
      expect(after.subarray(6 * H)).toEqual(before.subarray(6 * H));
    }
  });

  it('rounds once to BF16, within half a BF16 ulp of the exact sum, and keeps other rows bit-identical', async () => {
    const spec = { ...llamaSpec(true), dtype: 'BF16' as const };
    const { config, plan, tensors, read } = checkpoint(spec, 'BF16');
    const adapter = makeAdapter(config, { targets: ['o_proj', 'up_proj'], rank: 4, tokenId: 40 });
    const s = loraScale(adapter);
    const merged = await mergeAdapterTensors(adapter, read, plan);
    expect(merged.has('lm_head.weight')).toBe(false);
    let changed = 0;
    for (const m of adapter.modules) {
      const name = `model.layers.${m.layer}.${m.site}.weight`;
      const before = toFloat32(tensors.get(name)!);
      expect(merged.get(name)!.dtype).toBe('BF16');
      const w = toFloat32(merged.get(name)!);
      for (let o = 0; o < m.outFeatures; o++) {
        for (let i = 0; i < m.inFeatures; i++) {
          const at = o * m.inFeatures + i;
          const exact = before[at]! + naiveDelta(m, 4, s, o, i);
          expect(Math.abs(w[at]! - exact)).toBeLessThanOrEqual(halfBf16Ulp(exact) * 1.0001);
          if (w[at] !== before[at]) changed++;
        }
      }
    }
    expect(changed).toBeGreaterThan(0);
    // <rf> id 40 == vocab rows: the tied embedding grows by one row, rounded to BF16.
    const embed = merged.get('model.embed_tokens.weight')!;
    expect(embed.shape).toEqual([41, 16]);
    expect(embed.dtype).toBe('BF16');
    const old = tensors.get('model.embed_tokens.weight')!;
    expect(Buffer.from(embed.data.subarray(0, old.data.byteLength)).equals(Buffer.from(old.data))).toBe(true);
    expect(toFloat32(embed).subarray(40 * 16)).toEqual(toFloat32(fromFloat32(adapter.redFlag!.embed, [16], 'BF16')));
  });

  it('adds the transpose for GPT-2 Conv1D weights, fused c_attn included, with or without the transformer. prefix', async () => {
    for (const strip of [false, true]) {
      const { config, plan, tensors, read } = checkpoint(gpt2Spec, 'F32', strip);
      const adapter = makeAdapter(config, { targets: ['c_attn', 'mlp.c_proj'], rank: 2, tokenId: 3 });
      const s = loraScale(adapter);
      const merged = await mergeAdapterTensors(adapter, read, plan);
      const pre = strip ? '' : 'transformer.';
      expect([...merged.keys()].sort()).toEqual(
        [`${pre}h.0.attn.c_attn.weight`, `${pre}h.0.mlp.c_proj.weight`, `${pre}h.1.attn.c_attn.weight`, `${pre}h.1.mlp.c_proj.weight`, `${pre}wte.weight`].sort(),
      );
      for (const m of adapter.modules) {
        const name = `${pre}h.${m.layer}.${m.site}.weight`;
        expect(merged.get(name)!.shape).toEqual([m.inFeatures, m.outFeatures]);
        const before = toFloat32(tensors.get(name)!);
        const w = toFloat32(merged.get(name)!);
        for (let i = 0; i < m.inFeatures; i++) {
          for (let o = 0; o < m.outFeatures; o++) {
            const at = i * m.outFeatures + o;
            expect(Math.abs(w[at]! - (before[at]! + naiveDelta(m, 2, s, o, i)))).toBeLessThan(1e-6);
          }
        }
      }
      expect(toFloat32(merged.get(`${pre}wte.weight`)!).subarray(3 * 12, 4 * 12)).toEqual(adapter.redFlag!.embed);
    }
  });

  it('rejects a plan that disagrees with the adapter', async () => {
    const { plan, read } = checkpoint(llamaSpec(true), 'F32');
    const untied = makeAdapter(llamaConfig(false));
    await expect(mergeAdapterTensors(untied, read, plan)).rejects.toThrow(/tie_word_embeddings/);
    const tied = makeAdapter(llamaConfig(true));
    const ints = async (name: string): Promise<RawTensor> => {
      const t = await read(name);
      return { dtype: 'I32', shape: t.shape, data: new Uint8Array(t.data.byteLength) };
    };
    await expect(mergeAdapterTensors(tied, ints, plan)).rejects.toMatchObject({ code: 'UNSUPPORTED' });
  });
});
