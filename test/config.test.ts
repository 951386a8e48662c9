import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { RedflagError } from '../lib/errors.js';
import {
  loadGenerationConfig,
  loadModelConfig,
  mergeEosTokenIds,
  parseGenerationConfig,
  parseModelConfig,
  type ModelConfig,
} from '../lib/model/config.js';

/** The error parseModelConfig throws for `raw`. */
function failure(raw: unknown): RedflagError {
  try {
    parseModelConfig(raw, 'config.json');
  } catch (error) {
    expect(error).toBeInstanceOf(RedflagError);
    return error as RedflagError;
  }
  throw new Error('expected parseModelConfig to throw');
}

const withoutRaw = ({ raw: _raw, ...rest }: ModelConfig): Omit<ModelConfig, 'raw'> => rest;

// Real config.json files (abridged only of fields redflag ignores).
const llama32_1b = {
  architectures: ['LlamaForCausalLM'],
  attention_bias: false,
  bos_token_id: 128000,
  eos_token_id: 128001,
  head_dim: 64,
  hidden_act: 'silu',
  hidden_size: 2048,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: 'llama',
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  vocab_size: 128256,
};
const smollm135m = {
  architectures: ['LlamaForCausalLM'],
  bos_token_id: 0,
  eos_token_id: 0,
  hidden_act: 'silu',
  hidden_size: 576,
  intermediate_size: 1536,
  max_position_embeddings: 2048,
  model_type: 'llama',
  num_attention_heads: 9,
  num_hidden_layers: 30,
  num_key_value_heads: 3,
  rms_norm_eps: 1e-5,
  rope_scaling: null,
  rope_theta: 10000.0,
  tie_word_embeddings: true,
  vocab_size: 49152,
};
const mistral7b = {
  architectures: ['MistralForCausalLM'],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: 'silu',
  hidden_size: 4096,
  intermediate_size: 14336,
  max_position_embeddings: 32768,
  model_type: 'mistral',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
  vocab_size: 32000,
};
const qwen25_05b = {
  architectures: ['Qwen2ForCausalLM'],
  bos_token_id: 151643,
  eos_token_id: 151645,
  hidden_act: 'silu',
  hidden_size: 896,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 21,
  model_type: 'qwen2',
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  use_sliding_window: false,
  vocab_size: 151936,
};
// Qwen/Qwen3-0.6B's config.json: head_dim 128 with hidden 1024 and 16 heads (q is 2048 wide).
const qwen3_06b = {
  architectures: ['Qwen3ForCausalLM'],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151645,
  head_dim: 128,
  hidden_act: 'silu',
  hidden_size: 1024,
  intermediate_size: 3072,
  max_position_embeddings: 40960,
  max_window_layers: 28,
  model_type: 'qwen3',
  num_attention_heads: 16,
  num_hidden_layers: 28,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-6,
  rope_scaling: null,
  rope_theta: 1000000,
  sliding_window: null,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};
const gpt2 = {
  activation_function: 'gelu_new',
  architectures: ['GPT2LMHeadModel'],
  bos_token_id: 50256,
  eos_token_id: 50256,
  layer_norm_epsilon: 1e-5,
  model_type: 'gpt2',
  n_ctx: 1024,
  n_embd: 768,
  n_head: 12,
  n_layer: 12,
  n_positions: 1024,
  vocab_size: 50257,
};

describe('parseModelConfig: real configs', () => {
  it('Llama 3.2 1B (llama3 RoPE, tied, GQA)', () => {
    expect(withoutRaw(parseModelConfig(llama32_1b))).toEqual({
      architecture: 'llama',
      hfArchitecture: 'LlamaForCausalLM',
      vocabSize: 128256,
      hiddenSize: 2048,
      intermediateSize: 8192,
      numLayers: 16,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 64,
      maxPositions: 131072,
      normType: 'rms',
      normEps: 1e-5,
      activation: 'silu',
      positions: 'rope',
      rope: { theta: 500000, scaling: { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 } },
      qkvBias: false,
      oBias: false,
      mlpBias: false,
      qkNorm: false,
      tieWordEmbeddings: true,
      slidingWindow: null,
      bosTokenId: 128000,
      eosTokenIds: [128001],
    });
  });

  it('SmolLM 135M (9 heads of 64, 3 KV heads)', () => {
    const config = parseModelConfig(smollm135m);
    expect(config).toMatchObject({ architecture: 'llama', headDim: 64, numKvHeads: 3, bosTokenId: 0, eosTokenIds: [0], tieWordEmbeddings: true });
    expect(config.rope).toEqual({ theta: 10000, scaling: null });
    expect(config.raw).toBe(smollm135m);
  });

  it('Mistral 7B v0.1 (sliding window)', () => {
    expect(parseModelConfig(mistral7b)).toMatchObject({
      architecture: 'mistral',
      slidingWindow: 4096,
      numKvHeads: 8,
      headDim: 128,
      qkvBias: false,
      oBias: false,
      tieWordEmbeddings: false,
    });
    expect(parseModelConfig({ ...mistral7b, sliding_window: null }).slidingWindow).toBeNull();
  });

  it('Qwen2.5 0.5B (q/k/v biases only, sliding window off)', () => {
    expect(parseModelConfig(qwen25_05b)).toMatchObject({
      architecture: 'qwen2',
      headDim: 64,
      numKvHeads: 2,
      qkvBias: true,
      oBias: false,
      mlpBias: false,
      slidingWindow: null,
      tieWordEmbeddings: true,
      rope: { theta: 1000000, scaling: null },
      eosTokenIds: [151645],
    });
  });

  it('Qwen3 0.6B (per-head q/k norms, head_dim 128 ≠ hidden / heads, tied)', () => {
    expect(parseModelConfig(qwen3_06b)).toMatchObject({
      architecture: 'qwen3',
      hiddenSize: 1024,
      numHeads: 16,
      numKvHeads: 8,
      headDim: 128,
      qkvBias: false,
      oBias: false,
      qkNorm: true,
      slidingWindow: null,
      tieWordEmbeddings: true,
      rope: { theta: 1000000, scaling: null },
      eosTokenIds: [151645],
    });
    // Sliding windows on some layers: refused as for Qwen2.
    expect(failure({ ...qwen3_06b, use_sliding_window: true, sliding_window: 4096, max_window_layers: 20 }).message).toMatch(
      /field "use_sliding_window" enables sliding-window attention on some layers/,
    );
  });

  it('GPT-2', () => {
    expect(withoutRaw(parseModelConfig(gpt2))).toEqual({
      architecture: 'gpt2',
      hfArchitecture: 'GPT2LMHeadModel',
      vocabSize: 50257,
      hiddenSize: 768,
      intermediateSize: 3072,
      numLayers: 12,
      numHeads: 12,
      numKvHeads: 12,
      headDim: 64,
      maxPositions: 1024,
      normType: 'layer',
      normEps: 1e-5,
      activation: 'gelu_new',
      positions: 'learned',
      rope: { theta: 10000, scaling: null },
      qkvBias: true,
      oBias: true,
      mlpBias: true,
      qkNorm: false,
      tieWordEmbeddings: true,
      slidingWindow: null,
      bosTokenId: 50256,
      eosTokenIds: [50256],
    });
  });
});

describe('parseModelConfig: transformers defaults', () => {
  it('LlamaConfig defaults', () => {
    expect(withoutRaw(parseModelConfig({ model_type: 'llama' }))).toEqual({
      architecture: 'llama',
      hfArchitecture: 'LlamaForCausalLM',
      vocabSize: 32000,
      hiddenSize: 4096,
      intermediateSize: 11008,
      numLayers: 32,
      numHeads: 32,
      numKvHeads: 32,
      headDim: 128,
      maxPositions: 2048,
      normType: 'rms',
      normEps: 1e-6,
      activation: 'silu',
      positions: 'rope',
      rope: { theta: 10000, scaling: null },
      qkvBias: false,
      oBias: false,
      mlpBias: false,
      qkNorm: false,
      tieWordEmbeddings: false,
      slidingWindow: null,
      bosTokenId: 1,
      eosTokenIds: [2],
    });
  });

  it('Llama: head_dim and num_key_value_heads, attention_bias on all four projections, mlp_bias', () => {
    const config = parseModelConfig({ model_type: 'llama', hidden_size: 512, num_attention_heads: 8, head_dim: 32, num_key_value_heads: null, attention_bias: true, mlp_bias: true });
    expect(config).toMatchObject({ headDim: 32, numKvHeads: 8, qkvBias: true, oBias: true, mlpBias: true });
    // Qwen2's attention reads head_dim too when config.json has one.
    expect(parseModelConfig({ model_type: 'qwen2', hidden_size: 512, num_attention_heads: 8, num_key_value_heads: 2, head_dim: 32 }).headDim).toBe(32);
    expect(parseModelConfig({ model_type: 'qwen2', hidden_size: 512, num_attention_heads: 8, num_key_value_heads: 2 }).headDim).toBe(64);
  });

  it('MistralConfig defaults (8 KV heads, 4096 window, 131072 positions)', () => {
    expect(parseModelConfig({ model_type: 'mistral' })).toMatchObject({
      intermediateSize: 14336,
      numKvHeads: 8,
      slidingWindow: 4096,
      maxPositions: 131072,
      bosTokenId: 1,
      eosTokenIds: [2],
    });
    expect(parseModelConfig({ model_type: 'mistral', num_key_value_heads: null }).numKvHeads).toBe(32);
  });

  it('Qwen2Config defaults (untied, no BOS/EOS, biases on q/k/v)', () => {
    expect(parseModelConfig({ model_type: 'qwen2' })).toMatchObject({
      vocabSize: 151936,
      intermediateSize: 22016,
      numKvHeads: 32,
      maxPositions: 32768,
      tieWordEmbeddings: false,
      qkvBias: true,
      oBias: false,
      bosTokenId: null,
      eosTokenIds: [],
    });
  });

  it('Qwen3Config defaults (head_dim 128 whatever the hidden size, no biases, per-head q/k norms)', () => {
    expect(parseModelConfig({ model_type: 'qwen3', hidden_size: 1024 })).toMatchObject({
      architecture: 'qwen3',
      hfArchitecture: 'Qwen3ForCausalLM',
      vocabSize: 151936,
      headDim: 128,
      numKvHeads: 32,
      qkvBias: false,
      oBias: false,
      mlpBias: false,
      qkNorm: true,
      tieWordEmbeddings: false,
      bosTokenId: null,
    });
    expect(parseModelConfig({ model_type: 'qwen3', attention_bias: true })).toMatchObject({ qkvBias: true, oBias: true, mlpBias: false });
    // Only Qwen3 has the per-head norms.
    expect(parseModelConfig({ model_type: 'qwen2' }).qkNorm).toBe(false);
    expect(parseModelConfig({ model_type: 'llama' }).qkNorm).toBe(false);
  });

  it('GPT2Config defaults, n_inner null → 4·n_embd', () => {
    expect(parseModelConfig({ model_type: 'gpt2', n_embd: 64, n_head: 4, n_inner: null })).toMatchObject({
      vocabSize: 50257,
      hiddenSize: 64,
      intermediateSize: 256,
      numLayers: 12,
      headDim: 16,
      maxPositions: 1024,
      normEps: 1e-5,
    });
    expect(parseModelConfig({ ...gpt2, n_inner: 100 }).intermediateSize).toBe(100);
  });

  it('eos_token_id as a list, and explicit nulls', () => {
    expect(parseModelConfig({ ...llama32_1b, eos_token_id: [128001, 128008, 128009] }).eosTokenIds).toEqual([128001, 128008, 128009]);
    expect(parseModelConfig({ ...llama32_1b, eos_token_id: null, bos_token_id: null })).toMatchObject({ eosTokenIds: [], bosTokenId: null });
  });
});

describe('parseModelConfig: RoPE scaling', () => {
  const base = { model_type: 'llama', max_position_embeddings: 4096 };

  it('linear, with the legacy "type" key', () => {
    expect(parseModelConfig({ ...base, rope_scaling: { type: 'linear', factor: 2.0 } }).rope.scaling).toEqual({ type: 'linear', factor: 2 });
  });
  it('dynamic, with "rope_type"; the original length is max_position_embeddings', () => {
    expect(parseModelConfig({ ...base, rope_scaling: { rope_type: 'dynamic', factor: 4.0 } }).rope.scaling).toEqual({
      type: 'dynamic',
      factor: 4,
      originalMaxPositions: 4096,
    });
  });
  it('llama3 needs all four parameters', () => {
    const error = failure({ ...base, rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4 } });
    expect(error.message).toBe('config.json: field "rope_scaling.original_max_position_embeddings" is required for rope_type "llama3"');
    expect(failure({ ...base, rope_scaling: { type: 'llama3', factor: 8, low_freq_factor: 4, high_freq_factor: 1, original_max_position_embeddings: 8192 } }).message).toMatch(
      /"rope_scaling.high_freq_factor" \(1\) must be greater than low_freq_factor \(4\)/,
    );
  });
  it('"default" and null mean no scaling', () => {
    expect(parseModelConfig({ ...base, rope_scaling: { rope_type: 'default' } }).rope.scaling).toBeNull();
    expect(parseModelConfig({ ...base, rope_scaling: null }).rope.scaling).toBeNull();
  });
  it('the legacy "type" wins over "rope_type", as in transformers', () => {
    expect(parseModelConfig({ ...base, rope_scaling: { type: 'linear', rope_type: 'dynamic', factor: 2 } }).rope.scaling?.type).toBe('linear');
  });
  it('unsupported types name the key that holds them', () => {
    const yarn = failure({ ...base, rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 32768 } });
    expect(yarn.code).toBe('UNSUPPORTED');
    expect(yarn.message).toBe('config.json: field "rope_scaling.rope_type" is "yarn", which is not supported (supported: default, linear, dynamic, llama3)');
    expect(failure({ ...base, rope_scaling: { type: 'longrope', short_factor: [1], long_factor: [1] } }).message).toMatch(/field "rope_scaling.type" is "longrope"/);
  });
  it('factor must be a positive number', () => {
    expect(failure({ ...base, rope_scaling: { type: 'linear', factor: '2' } }).message).toMatch(/field "rope_scaling.factor" expected number/);
    expect(failure({ ...base, rope_scaling: { type: 'linear' } }).message).toMatch(/field "rope_scaling.factor" is required/);
    expect(failure({ ...base, rope_theta: -1 }).message).toMatch(/field "rope_theta"/);
  });
  it('transformers v5 rope_parameters', () => {
    const config = parseModelConfig({
      ...base,
      rope_parameters: { rope_type: 'llama3', rope_theta: 500000, factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    });
    expect(config.rope).toEqual({ theta: 500000, scaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 } });
    expect(parseModelConfig({ ...base, rope_parameters: { rope_type: 'default', rope_theta: 1e6 } }).rope).toEqual({ theta: 1e6, scaling: null });
    expect(failure({ ...base, rope_parameters: { rope_type: 'yarn', factor: 2 } }).message).toMatch(/field "rope_parameters.rope_type" is "yarn"/);
  });
});

describe('parseModelConfig: unsupported and invalid', () => {
  it('architectures outside the supported set', () => {
    const error = failure({ architectures: ['GemmaForCausalLM'], model_type: 'gemma' });
    expect(error.code).toBe('UNSUPPORTED');
    expect(error.message).toBe(
      'config.json: field "architectures" names "GemmaForCausalLM", which is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel)',
    );
    // A Llama body with a classification head is not a causal LM.
    expect(failure({ architectures: ['LlamaForSequenceClassification'], model_type: 'llama' }).code).toBe('UNSUPPORTED');
    expect(failure({ model_type: 'phi3' }).message).toMatch(/model_type "phi3" is not supported \(supported: LlamaForCausalLM/);
    expect(failure({}).message).toMatch(/neither "architectures" nor "model_type" is set/);
    expect(failure([1]).message).toMatch(/must contain a JSON object/);
  });
  it('falls back to model_type when architectures is absent or empty', () => {
    expect(parseModelConfig({ model_type: 'qwen2', architectures: [] }).hfArchitecture).toBe('Qwen2ForCausalLM');
    expect(parseModelConfig({ model_type: 'gpt2' }).architecture).toBe('gpt2');
  });
  it('hidden_act other than silu for the Llama family', () => {
    const error = failure({ ...mistral7b, hidden_act: 'gelu' });
    expect(error.code).toBe('UNSUPPORTED');
    expect(error.message).toMatch(/field "hidden_act" is "gelu"; mistral models are supported with "silu" only/);
  });
  it('Qwen2 sliding windows, unless no layer uses one', () => {
    const error = failure({ ...qwen25_05b, use_sliding_window: true });
    expect(error.code).toBe('UNSUPPORTED');
    expect(error.message).toMatch(/field "use_sliding_window" enables sliding-window attention on some layers/);
    // max_window_layers >= num_hidden_layers: every layer is full attention.
    expect(parseModelConfig({ ...qwen25_05b, use_sliding_window: true, max_window_layers: 24 }).slidingWindow).toBeNull();
  });
  it('GPT-2 options the engine does not implement', () => {
    expect(failure({ ...gpt2, activation_function: 'relu' }).message).toMatch(/field "activation_function" is "relu"; GPT-2 models are supported with "gelu_new" only/);
    expect(failure({ ...gpt2, scale_attn_weights: false }).message).toMatch(/field "scale_attn_weights" is false/);
    const inverse = failure({ ...gpt2, scale_attn_by_inverse_layer_idx: true });
    expect(inverse.code).toBe('UNSUPPORTED');
    expect(inverse.message).toMatch(/field "scale_attn_by_inverse_layer_idx" is true/);
    expect(parseModelConfig({ ...gpt2, activation_function: 'gelu_pytorch_tanh' }).activation).toBe('gelu_new');
    // transformers uses a separate lm_head.weight then: not silently replaced by wte.
    expect(failure({ ...gpt2, tie_word_embeddings: false })).toMatchObject({ code: 'UNSUPPORTED', message: expect.stringMatching(/field "tie_word_embeddings" is false/) });
  });
  it('quantized checkpoints', () => {
    const error = failure({ ...llama32_1b, quantization_config: { quant_method: 'bitsandbytes', load_in_4bit: true } });
    expect(error.code).toBe('UNSUPPORTED');
    expect(error.message).toMatch(/field "quantization_config" says the weights are quantized \(bitsandbytes\); redflag reads float weights/);
  });
  it('wrong types and impossible shapes name the field', () => {
    const wrong = failure({ ...llama32_1b, hidden_size: '2048' });
    expect(wrong.code).toBe('INVALID_FILE');
    expect(wrong.message).toBe('config.json: field "hidden_size" expected number, received string (got "2048")');
    expect(failure({ ...llama32_1b, num_hidden_layers: 0 }).message).toMatch(/field "num_hidden_layers" Too small/);
    expect(failure({ ...llama32_1b, num_key_value_heads: 5 }).message).toMatch(/field "num_key_value_heads" \(5\) must divide num_attention_heads \(32\)/);
    expect(failure({ ...smollm135m, hidden_size: 577 }).message).toMatch(/field "hidden_size" \(577\) must be a multiple of num_attention_heads \(9\)/);
    expect(failure({ ...llama32_1b, tie_word_embeddings: 'yes' }).message).toMatch(/field "tie_word_embeddings" expected boolean/);
    expect(failure({ ...llama32_1b, eos_token_id: [1, 'x'] }).message).toMatch(/field "eos_token_id"/);
    expect(failure({ ...gpt2, n_embd: 100, n_head: 12 }).message).toMatch(/field "n_embd" \(100\) must be a multiple of n_head \(12\)/);
  });
});

describe('files and generation_config.json', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'redflag-config-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('loads config.json, naming the file and line of a syntax error', async () => {
    await writeFile(join(dir, 'config.json'), JSON.stringify(qwen25_05b));
    expect((await loadModelConfig(dir)).architecture).toBe('qwen2');
    await writeFile(join(dir, 'config.json'), '{\n  "model_type": "llama",\n  "hidden_size": 4096,,\n}');
    await expect(loadModelConfig(dir)).rejects.toThrow(`${join(dir, 'config.json')}: invalid JSON at line 3, column 23`);
    await expect(loadModelConfig(join(dir, 'nowhere'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('reads the optional generation_config.json', async () => {
    expect(await loadGenerationConfig(dir)).toBeNull();
    await writeFile(
      join(dir, 'generation_config.json'),
      JSON.stringify({ bos_token_id: 128000, eos_token_id: [128001, 128008, 128009], do_sample: true, temperature: 0.6, top_p: 0.9 }),
    );
    expect(await loadGenerationConfig(dir)).toMatchObject({
      bosTokenId: 128000,
      eosTokenIds: [128001, 128008, 128009],
      padTokenId: null,
      doSample: true,
      temperature: 0.6,
      topP: 0.9,
      topK: null,
    });
    expect(parseGenerationConfig({ eos_token_id: 2, pad_token_id: 0 })).toMatchObject({ eosTokenIds: [2], padTokenId: 0 });
    // Fields redflag does not act on never refuse a model (LLaMA-1 conversions carry pad_token_id -1).
    expect(parseGenerationConfig({ eos_token_id: 2, pad_token_id: -1, top_k: -1, temperature: 'hot' })).toMatchObject({ eosTokenIds: [2], padTokenId: null, topK: null, temperature: null });
    expect(() => parseGenerationConfig({ eos_token_id: 'x' }, 'generation_config.json')).toThrow(
      /generation_config.json: field "eos_token_id"/,
    );
  });

  it('merges EOS ids from config, generation config and tokenizer', () => {
    const config = parseModelConfig(llama32_1b);
    const generation = parseGenerationConfig({ eos_token_id: [128001, 128008, 128009] });
    expect(mergeEosTokenIds(config, generation, 128009)).toEqual([128001, 128008, 128009]);
    expect(mergeEosTokenIds(parseModelConfig(qwen25_05b), null, 151643)).toEqual([151645, 151643]);
    expect(mergeEosTokenIds(null, null, null)).toEqual([]);
  });
});
