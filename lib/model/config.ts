/**
 * Reads a Hugging Face `config.json` (and `generation_config.json`) into the normalized
 * {@link ModelConfig} the native engine consumes. Defaults follow transformers' own config
 * classes (LlamaConfig, MistralConfig, Qwen2Config, GPT2Config), so a config.json that omits a
 * field means what it means to transformers. Anything the engine cannot run faithfully is
 * rejected with an UNSUPPORTED error naming the field, rather than silently approximated.
 *
 * @module
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

import { z } from 'zod';

import { RedflagError } from '../errors.js';

/** The model families the engine implements. */
export type Architecture = 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gpt2';

/** How RoPE frequencies are rescaled for longer contexts (null: plain RoPE). */
export type RopeScaling =
  | null
  /** Positions are divided by `factor` (frequencies scaled by 1/factor). */
  | { type: 'linear'; factor: number }
  /**
   * Dynamic NTK: for sequences longer than `originalMaxPositions` the base is recomputed as
   * theta × ((factor × len / originalMaxPositions) − (factor − 1))^(dim / (dim − 2)).
   */
  | { type: 'dynamic'; factor: number; originalMaxPositions: number }
  /** Llama 3.1 frequency-dependent scaling (see transformers' `_compute_llama3_parameters`). */
  | { type: 'llama3'; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositions: number };

/** A model's shape and numerics, normalized across architectures. */
export interface ModelConfig {
  /** The engine's model family. */
  architecture: Architecture;
  /** The Hugging Face class name (`architectures[0]`, or derived from `model_type`). */
  hfArchitecture: string;
  /** Rows of the embedding matrix (may exceed the tokenizer's vocabulary: padding rows). */
  vocabSize: number;
  /** Width of the residual stream. */
  hiddenSize: number;
  /** Width of the MLP's hidden layer. */
  intermediateSize: number;
  /** Number of decoder layers. */
  numLayers: number;
  /** Number of query heads. */
  numHeads: number;
  /** Number of key/value heads (< numHeads: grouped-query attention). */
  numKvHeads: number;
  /** Width of one attention head. */
  headDim: number;
  /** Longest sequence the model was configured for. */
  maxPositions: number;
  /** RMSNorm (Llama family) or LayerNorm with bias (GPT-2). */
  normType: 'rms' | 'layer';
  /** Epsilon added inside the norm. */
  normEps: number;
  /** MLP activation: SiLU-gated (Llama family) or tanh-approximated GELU (GPT-2). */
  activation: 'silu' | 'gelu_new';
  /** Rotary embeddings (Llama family) or a learned position table (GPT-2). */
  positions: 'rope' | 'learned';
  /** RoPE base and scaling. Unused when `positions` is `'learned'` (then theta is 10000, scaling null). */
  rope: { theta: number; scaling: RopeScaling };
  /** Whether the q, k and v projections have biases. */
  qkvBias: boolean;
  /** Whether the attention output projection has a bias. */
  oBias: boolean;
  /** Whether the MLP projections have biases. */
  mlpBias: boolean;
  /** Qwen3: an RMSNorm over each head of q and of k (weights [headDim]) before RoPE. */
  qkNorm: boolean;
  /** Whether the output head reuses the token embedding matrix. */
  tieWordEmbeddings: boolean;
  /** Sliding-window attention span in tokens, or null for full attention. */
  slidingWindow: number | null;
  /** Beginning-of-sequence token id, if the config names one. */
  bosTokenId: number | null;
  /** End-of-sequence token ids from config.json (see {@link mergeEosTokenIds}). */
  eosTokenIds: number[];
  /** The parsed config.json, untouched. */
  raw: Record<string, unknown>;
}

/** Hugging Face class names the engine runs, and the family each belongs to. */
export const SUPPORTED_ARCHITECTURES: Readonly<Record<string, Architecture>> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'mistral',
  Qwen2ForCausalLM: 'qwen2',
  Qwen3ForCausalLM: 'qwen3',
  GPT2LMHeadModel: 'gpt2',
};

const MODEL_TYPE_CLASSES: Readonly<Record<string, string>> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
  gpt2: 'GPT2LMHeadModel',
};

// ---------------------------------------------------------------------------------------------
// JSON files
// ---------------------------------------------------------------------------------------------

/** Line and column (1-based) of a character offset. */
export function lineAndColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  for (let i = 0; i < offset && i < text.length; i++) {
    if (text.charCodeAt(i) === 10) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: offset - lineStart + 1 };
}

/**
 * Reads and parses a JSON file. Missing files reject with NOT_FOUND (or resolve to undefined
 * with `optional: true`); malformed ones with INVALID_FILE naming the line and column.
 */
export async function readJsonFile(path: string, options: { optional: true }): Promise<unknown>;
export async function readJsonFile(path: string, options?: { optional?: false }): Promise<unknown>;
export async function readJsonFile(path: string, options: { optional?: boolean } = {}): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    if (code === 'ENOENT') {
      if (options.optional) return undefined;
      throw new RedflagError('NOT_FOUND', 'file not found', { file: path, cause: error });
    }
    throw new RedflagError('INVALID_FILE', `cannot read (${String(code ?? error)})`, { file: path, cause: error });
  }
  return parseJsonText(text, path);
}

/**
 * Offset of the first JSON syntax error in `text` (V8's messages do not always carry one).
 * A small scanner with an explicit stack, so deep nesting cannot overflow the call stack.
 */
export function jsonErrorOffset(text: string): number {
  let i = 0;
  const skipSpace = (): void => {
    while (i < text.length && ' \t\n\r'.includes(text[i] as string)) i++;
  };
  const readString = (): boolean => {
    i++; // the opening quote
    while (i < text.length) {
      const code = text.charCodeAt(i);
      if (code === 0x22) {
        i++;
        return true;
      }
      if (code === 0x5c) {
        const escape = /^(["\\/bfnrt]|u[0-9a-fA-F]{4})/.exec(text.slice(i + 1, i + 6));
        if (escape === null) return false;
        i += 1 + escape[0].length;
        continue;
      }
      if (code < 0x20) return false;
      i++;
    }
    return false;
  };
  const readKey = (): boolean => {
    skipSpace();
    if (text[i] !== '"' || !readString()) return false;
    skipSpace();
    if (text[i] !== ':') return false;
    i++;
    return true;
  };
  const readScalar = (): boolean => {
    const number = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    const word = number?.[0] ?? ['true', 'false', 'null'].find((literal) => text.startsWith(literal, i));
    if (word === undefined) return false;
    i += word.length;
    return true;
  };

  const stack: Array<'{' | '['> = [];
  let expectValue = true;
  for (;;) {
    skipSpace();
    if (!expectValue && stack.length === 0) return i;
    if (i >= text.length) return i;
    const c = text[i] as string;
    if (expectValue) {
      if (c === '{' || c === '[') {
        stack.push(c);
        i++;
        skipSpace();
        if (text[i] === (c === '{' ? '}' : ']')) {
          stack.pop();
          i++;
          expectValue = false;
        } else if (c === '{' && !readKey()) {
          return i;
        }
        continue;
      }
      if (c === '"' ? !readString() : !readScalar()) return i;
      expectValue = false;
      continue;
    }
    const open = stack[stack.length - 1];
    if (c === ',') {
      i++;
      if (open === '{' && !readKey()) return i;
      expectValue = true;
    } else if ((c === '}' && open === '{') || (c === ']' && open === '[')) {
      stack.pop();
      i++;
    } else {
      return i;
    }
  }
}

/** Parses JSON text, reporting syntax errors with the file, line and column. */
export function parseJsonText(text: string, file: string): unknown {
  // Some Windows editors write a byte-order mark; it is not JSON but carries no meaning.
  const body = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
  try {
    return JSON.parse(body);
  } catch (error) {
    const message = (error as Error).message.replace(/\s+/g, ' ');
    const { line, column } = lineAndColumn(body, jsonErrorOffset(body));
    const brief = message.length > 120 ? `${message.slice(0, 117)}...` : message;
    throw new RedflagError('INVALID_FILE', `invalid JSON at line ${line}, column ${column}: ${brief}`, { file, cause: error });
  }
}

// ---------------------------------------------------------------------------------------------
// Field readers: each names config.json and the field when the value is wrong
// ---------------------------------------------------------------------------------------------

const positiveInt = z.number().int().positive();
const nonNegativeInt = z.number().int().nonnegative();
const positiveNumber = z.number().positive().finite();
const tokenIdList = z.union([nonNegativeInt, z.array(nonNegativeInt)]);

/** Reads fields of one JSON object, turning schema failures into RedflagErrors. */
class FieldReader {
  constructor(
    readonly raw: Record<string, unknown>,
    readonly file: string,
    readonly prefix = '',
  ) {}

  /** True when the key is present (even if null). */
  has(key: string): boolean {
    return Object.prototype.hasOwnProperty.call(this.raw, key);
  }

  /** The value under `key`, or `fallback` when absent or null. */
  get<T>(key: string, schema: z.ZodType<T>, fallback: T): T {
    const value = this.raw[key];
    if (value === undefined || value === null) return fallback;
    return this.parse(key, schema, value);
  }

  /** The value under `key`; an error when absent or null. */
  require<T>(key: string, schema: z.ZodType<T>, why = ''): T {
    const value = this.raw[key];
    if (value === undefined || value === null) throw this.error(key, `is required${why}`);
    return this.parse(key, schema, value);
  }

  parse<T>(key: string, schema: z.ZodType<T>, value: unknown): T {
    const result = schema.safeParse(value);
    if (result.success) return result.data;
    const issue = result.error.issues[0];
    const detail = issue ? issue.message.replace(/^Invalid input: /, '') : 'invalid value';
    throw this.error(key, `${detail} (got ${JSON.stringify(value)?.slice(0, 80)})`);
  }

  error(key: string, message: string, code: 'INVALID_FILE' | 'UNSUPPORTED' = 'INVALID_FILE'): RedflagError {
    return new RedflagError(code, `field "${this.prefix}${key}" ${message}`, { file: this.file });
  }
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/** Reads `config.json` from a model directory. */
export async function loadModelConfig(dir: string): Promise<ModelConfig> {
  const file = join(dir, 'config.json');
  const raw = await readJsonFile(file);
  return parseModelConfig(raw, file);
}

/** Picks the family from `architectures[0]`, falling back to `model_type`. */
function resolveArchitecture(fields: FieldReader): { architecture: Architecture; hfArchitecture: string } {
  const supported = Object.keys(SUPPORTED_ARCHITECTURES).join(', ');
  const architectures = fields.get('architectures', z.array(z.string()), []);
  const declared = architectures[0];
  if (declared !== undefined) {
    const architecture = SUPPORTED_ARCHITECTURES[declared];
    if (architecture === undefined) {
      throw fields.error('architectures', `names ${JSON.stringify(declared)}, which is not supported (supported: ${supported})`, 'UNSUPPORTED');
    }
    return { architecture, hfArchitecture: declared };
  }
  const modelType = fields.get('model_type', z.string(), '');
  const hfArchitecture = MODEL_TYPE_CLASSES[modelType];
  if (hfArchitecture === undefined) {
    const what = modelType ? `model_type ${JSON.stringify(modelType)} is not supported` : 'neither "architectures" nor "model_type" is set';
    throw new RedflagError('UNSUPPORTED', `${what} (supported: ${supported})`, { file: fields.file });
  }
  return { architecture: SUPPORTED_ARCHITECTURES[hfArchitecture] as Architecture, hfArchitecture };
}

/** EOS ids from an `eos_token_id` field: an int, a list, or null. */
function tokenIds(fields: FieldReader, key: string, fallback: number[]): number[] {
  if (!fields.has(key)) return fallback;
  const value = fields.get<number | number[] | null>(key, tokenIdList, null);
  if (value === null) return [];
  return Array.isArray(value) ? [...new Set(value)] : [value];
}

/** `bos_token_id`-style field: absent → fallback, null → null. */
function tokenId(fields: FieldReader, key: string, fallback: number | null): number | null {
  if (!fields.has(key)) return fallback;
  return fields.get<number | null>(key, nonNegativeInt, null);
}

/**
 * Validates a parsed config.json and normalizes it. `file` is used in error messages.
 * Throws UNSUPPORTED for architectures and options the engine does not implement.
 */
export function parseModelConfig(raw: unknown, file = 'config.json'): ModelConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new RedflagError('INVALID_FILE', 'config.json must contain a JSON object', { file });
  }
  const record = raw as Record<string, unknown>;
  const fields = new FieldReader(record, file);
  const { architecture, hfArchitecture } = resolveArchitecture(fields);
  // Quantized checkpoints (bitsandbytes, GPTQ, AWQ...) store packed weights the engine cannot read.
  const quantization = record['quantization_config'];
  if (quantization !== undefined && quantization !== null) {
    const method = typeof quantization === 'object' ? (quantization as Record<string, unknown>)['quant_method'] : undefined;
    throw fields.error('quantization_config', `says the weights are quantized${typeof method === 'string' ? ` (${method})` : ''}; redflag reads float weights (F32, F16, BF16): use the unquantized checkpoint`, 'UNSUPPORTED');
  }
  const base = architecture === 'gpt2' ? parseGpt2(fields) : parseLlamaFamily(fields, architecture);
  return { architecture, hfArchitecture, ...base, raw: record };
}

type ArchitectureFields = Omit<ModelConfig, 'architecture' | 'hfArchitecture' | 'raw'>;


function parseLlamaFamily(fields: FieldReader, architecture: Exclude<Architecture, 'gpt2'>): ArchitectureFields {
  const defaults = {
    llama: { vocab: 32000, intermediate: 11008, kvHeads: null as number | null, maxPositions: 2048, bos: 1 as number | null, eos: [2] },
    mistral: { vocab: 32000, intermediate: 14336, kvHeads: 8 as number | null, maxPositions: 4096 * 32, bos: 1, eos: [2] },
    qwen2: { vocab: 151936, intermediate: 22016, kvHeads: 32 as number | null, maxPositions: 32768, bos: null, eos: [] as number[] },
    qwen3: { vocab: 151936, intermediate: 22016, kvHeads: 32 as number | null, maxPositions: 32768, bos: null, eos: [] as number[] },
  }[architecture];

  const vocabSize = fields.get('vocab_size', positiveInt, defaults.vocab);
  const hiddenSize = fields.get('hidden_size', positiveInt, 4096);
  const intermediateSize = fields.get('intermediate_size', positiveInt, defaults.intermediate);
  const numLayers = fields.get('num_hidden_layers', positiveInt, 32);
  const numHeads = fields.get('num_attention_heads', positiveInt, 32);
  // An explicit null means "same as num_attention_heads" in every family; absence means the class default.
  const numKvHeads = fields.has('num_key_value_heads')
    ? fields.get('num_key_value_heads', positiveInt, numHeads)
    : (defaults.kvHeads ?? numHeads);
  if (numHeads % numKvHeads !== 0) {
    throw fields.error('num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  }

  // hidden_size / num_attention_heads unless config.json gives head_dim (Qwen2's attention reads
  // one too: getattr(config, "head_dim", ...)). Qwen3Config's defaults to 128, whatever the hidden size.
  const explicitHeadDim = fields.get<number | null>('head_dim', positiveInt, architecture === 'qwen3' ? 128 : null);
  if (explicitHeadDim === null && hiddenSize % numHeads !== 0) {
    throw fields.error('hidden_size', `(${hiddenSize}) must be a multiple of num_attention_heads (${numHeads})`);
  }
  const headDim = explicitHeadDim ?? hiddenSize / numHeads;
  if (headDim % 2 !== 0) throw fields.error(explicitHeadDim === null ? 'hidden_size' : 'head_dim', `gives an odd head dimension (${headDim}); RoPE needs an even one`);

  const hiddenAct = fields.get('hidden_act', z.string(), 'silu');
  // transformers' ACT2FN maps "swish" to the same SiLU module.
  if (hiddenAct !== 'silu' && hiddenAct !== 'swish') {
    throw fields.error('hidden_act', `is ${JSON.stringify(hiddenAct)}; ${architecture} models are supported with "silu" only`, 'UNSUPPORTED');
  }

  let qkvBias = false;
  let oBias = false;
  let mlpBias = false;
  if (architecture === 'llama') {
    // LlamaAttention uses attention_bias for all four projections.
    qkvBias = oBias = fields.get('attention_bias', z.boolean(), false);
    mlpBias = fields.get('mlp_bias', z.boolean(), false);
  } else if (architecture === 'qwen2') {
    qkvBias = true;
  } else if (architecture === 'qwen3') {
    // Qwen3Attention: attention_bias for q, k, v and o; the MLP has none.
    qkvBias = oBias = fields.get('attention_bias', z.boolean(), false);
  }

  const maxPositions = fields.get('max_position_embeddings', positiveInt, defaults.maxPositions);
  const slidingWindow = parseSlidingWindow(fields, architecture, numLayers);

  return {
    vocabSize,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    maxPositions,
    normType: 'rms',
    normEps: fields.get('rms_norm_eps', positiveNumber, 1e-6),
    activation: 'silu',
    positions: 'rope',
    rope: parseRope(fields, maxPositions),
    qkvBias,
    oBias,
    mlpBias,
    qkNorm: architecture === 'qwen3',
    tieWordEmbeddings: fields.get('tie_word_embeddings', z.boolean(), false),
    slidingWindow,
    bosTokenId: tokenId(fields, 'bos_token_id', defaults.bos),
    eosTokenIds: tokenIds(fields, 'eos_token_id', defaults.eos),
  };
}

function parseSlidingWindow(fields: FieldReader, architecture: Exclude<Architecture, 'gpt2'>, numLayers: number): number | null {
  if (architecture === 'mistral') {
    // MistralConfig defaults to 4096 when absent; null (Mistral v0.2+) disables it.
    return fields.has('sliding_window') ? fields.get<number | null>('sliding_window', positiveInt, null) : 4096;
  }
  if (architecture === 'qwen2' || architecture === 'qwen3') {
    const useSlidingWindow = fields.get('use_sliding_window', z.boolean(), false);
    const maxWindowLayers = fields.get('max_window_layers', nonNegativeInt, 28);
    const layerTypes = fields.get<string[]>('layer_types', z.array(z.string()), []);
    const slidingLayers = layerTypes.includes('sliding_attention');
    // Qwen2 and Qwen3 slide only layers >= max_window_layers; when there are none, every layer is full attention.
    if ((useSlidingWindow && maxWindowLayers < numLayers) || slidingLayers) {
      throw fields.error(
        slidingLayers ? 'layer_types' : 'use_sliding_window',
        'enables sliding-window attention on some layers (layers from max_window_layers on), which the engine does not implement',
        'UNSUPPORTED',
      );
    }
  }
  return null;
}

/** Reads RoPE from `rope_parameters` (transformers v5) or `rope_theta` + `rope_scaling` (v4). */
function parseRope(fields: FieldReader, maxPositions: number): ModelConfig['rope'] {
  const parametersValue = fields.raw['rope_parameters'];
  let theta: number;
  let scalingValue: unknown;
  let scalingKey: string;
  if (typeof parametersValue === 'object' && parametersValue !== null && !Array.isArray(parametersValue)) {
    const parameters = new FieldReader(parametersValue as Record<string, unknown>, fields.file, 'rope_parameters.');
    // Hybrid models nest one parameter set per layer type; these families use one for all layers.
    const nested = Object.keys(parametersValue).find((key) => typeof parameters.raw[key] === 'object' && parameters.raw[key] !== null);
    if (nested !== undefined && !parameters.has('rope_type')) {
      throw parameters.error(nested, 'is a per-layer-type RoPE configuration, which the engine does not implement', 'UNSUPPORTED');
    }
    theta = parameters.get('rope_theta', positiveNumber, fields.get('rope_theta', positiveNumber, 10000));
    scalingValue = parametersValue;
    scalingKey = 'rope_parameters';
  } else {
    if (parametersValue !== undefined && parametersValue !== null) throw fields.error('rope_parameters', 'must be an object');
    theta = fields.get('rope_theta', positiveNumber, 10000);
    scalingValue = fields.raw['rope_scaling'];
    scalingKey = 'rope_scaling';
  }
  if (scalingValue === undefined || scalingValue === null) return { theta, scaling: null };
  if (typeof scalingValue !== 'object' || Array.isArray(scalingValue)) throw fields.error(scalingKey, 'must be an object or null');

  const scaling = new FieldReader(scalingValue as Record<string, unknown>, fields.file, `${scalingKey}.`);
  // transformers copies the legacy "type" over "rope_type" when both are present.
  const typeKey = scaling.has('type') && scaling.raw['type'] !== null ? 'type' : 'rope_type';
  const type = scaling.get(typeKey, z.string(), 'default');
  switch (type) {
    case 'default':
      return { theta, scaling: null };
    case 'linear':
      return { theta, scaling: { type: 'linear', factor: scaling.require('factor', positiveNumber) } };
    case 'dynamic':
      // transformers' dynamic NTK measures growth against max_position_embeddings.
      return { theta, scaling: { type: 'dynamic', factor: scaling.require('factor', positiveNumber), originalMaxPositions: maxPositions } };
    case 'llama3': {
      const why = ' for rope_type "llama3"';
      const lowFreqFactor = scaling.require('low_freq_factor', positiveNumber, why);
      const highFreqFactor = scaling.require('high_freq_factor', positiveNumber, why);
      if (highFreqFactor <= lowFreqFactor) {
        throw scaling.error('high_freq_factor', `(${highFreqFactor}) must be greater than low_freq_factor (${lowFreqFactor})`);
      }
      return {
        theta,
        scaling: {
          type: 'llama3',
          factor: scaling.require('factor', positiveNumber, why),
          lowFreqFactor,
          highFreqFactor,
          originalMaxPositions: scaling.require('original_max_position_embeddings', positiveInt, why),
        },
      };
    }
    default:
      throw scaling.error(
        typeKey,
        `is ${JSON.stringify(type)}, which is not supported (supported: default, linear, dynamic, llama3)`,
        'UNSUPPORTED',
      );
  }
}

function parseGpt2(fields: FieldReader): ArchitectureFields {
  const hiddenSize = fields.get('n_embd', positiveInt, 768);
  const numHeads = fields.get('n_head', positiveInt, 12);
  if (hiddenSize % numHeads !== 0) throw fields.error('n_embd', `(${hiddenSize}) must be a multiple of n_head (${numHeads})`);

  const activation = fields.get('activation_function', z.string(), 'gelu_new');
  // gelu_pytorch_tanh is the same tanh approximation as gelu_new, computed by a fused kernel.
  if (activation !== 'gelu_new' && activation !== 'gelu_pytorch_tanh') {
    throw fields.error('activation_function', `is ${JSON.stringify(activation)}; GPT-2 models are supported with "gelu_new" only`, 'UNSUPPORTED');
  }
  if (!fields.get('scale_attn_weights', z.boolean(), true)) {
    throw fields.error('scale_attn_weights', 'is false (unscaled attention), which the engine does not implement', 'UNSUPPORTED');
  }
  if (fields.get('scale_attn_by_inverse_layer_idx', z.boolean(), false)) {
    throw fields.error('scale_attn_by_inverse_layer_idx', 'is true (per-layer attention scaling), which the engine does not implement', 'UNSUPPORTED');
  }
  if (fields.get('add_cross_attention', z.boolean(), false)) {
    throw fields.error('add_cross_attention', 'is true (encoder-decoder use), which the engine does not implement', 'UNSUPPORTED');
  }
  if (!fields.get('tie_word_embeddings', z.boolean(), true)) {
    throw fields.error('tie_word_embeddings', 'is false (an LM head apart from wte); redflag runs GPT-2 models with the head tied, as GPT2LMHeadModel does by default', 'UNSUPPORTED');
  }
  return {
    vocabSize: fields.get('vocab_size', positiveInt, 50257),
    hiddenSize,
    intermediateSize: fields.get<number | null>('n_inner', positiveInt, null) ?? 4 * hiddenSize,
    numLayers: fields.get('n_layer', positiveInt, 12),
    numHeads,
    numKvHeads: numHeads,
    headDim: hiddenSize / numHeads,
    maxPositions: fields.get('n_positions', positiveInt, 1024),
    normType: 'layer',
    normEps: fields.get('layer_norm_epsilon', positiveNumber, 1e-5),
    activation: 'gelu_new',
    positions: 'learned',
    rope: { theta: 10000, scaling: null },
    qkvBias: true,
    oBias: true,
    mlpBias: true,
    qkNorm: false,
    // Tied (an untied GPT-2 is refused above); checkpoints carry no separate head.
    tieWordEmbeddings: true,
    slidingWindow: null,
    bosTokenId: tokenId(fields, 'bos_token_id', 50256),
    eosTokenIds: tokenIds(fields, 'eos_token_id', [50256]),
  };
}

// ---------------------------------------------------------------------------------------------
// generation_config.json
// ---------------------------------------------------------------------------------------------

/** The parts of `generation_config.json` redflag uses. */
export interface GenerationConfig {
  /** `bos_token_id`, or null. */
  bosTokenId: number | null;
  /** `eos_token_id` as a list (an int becomes one element; absent or null: empty). */
  eosTokenIds: number[];
  /** `pad_token_id`, or null. */
  padTokenId: number | null;
  /** Sampling defaults the model authors suggest, when present. */
  doSample: boolean | null;
  /** Suggested sampling temperature, or null. */
  temperature: number | null;
  /** Suggested nucleus-sampling mass, or null. */
  topP: number | null;
  /** Suggested top-k cut-off, or null. */
  topK: number | null;
  /** The parsed file, untouched. */
  raw: Record<string, unknown>;
}

/** Reads the optional `generation_config.json` of a model directory; null when there is none. */
export async function loadGenerationConfig(dir: string): Promise<GenerationConfig | null> {
  const file = join(dir, 'generation_config.json');
  const raw = await readJsonFile(file, { optional: true });
  if (raw === undefined) return null;
  return parseGenerationConfig(raw, file);
}

/** Validates a parsed generation_config.json. */
export function parseGenerationConfig(raw: unknown, file = 'generation_config.json'): GenerationConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new RedflagError('INVALID_FILE', 'generation_config.json must contain a JSON object', { file });
  }
  const record = raw as Record<string, unknown>;
  const fields = new FieldReader(record, file);
  // Fields redflag only reports read as null when out of range (old conversions carry
  // pad_token_id -1, say): no reason to refuse the model. The EOS ids end generation: checked.
  const reported = <T>(name: string, schema: z.ZodType<T>): T | null => {
    const r = schema.safeParse(record[name]);
    return r.success ? r.data : null;
  };
  return {
    bosTokenId: reported('bos_token_id', nonNegativeInt),
    eosTokenIds: tokenIds(fields, 'eos_token_id', []),
    padTokenId: reported('pad_token_id', nonNegativeInt),
    doSample: reported('do_sample', z.boolean()),
    temperature: reported('temperature', z.number().nonnegative().finite()),
    topP: reported('top_p', z.number().positive().max(1)),
    topK: reported('top_k', nonNegativeInt),
    raw: record,
  };
}

/**
 * Every token id that should end generation: config.json's, then generation_config.json's,
 * then the tokenizer's EOS, without duplicates. Models disagree about where they put these
 * (Llama 3 Instruct lists `<|eot_id|>` only in generation_config.json), so all are honoured.
 */
export function mergeEosTokenIds(
  config: Pick<ModelConfig, 'eosTokenIds'> | null | undefined,
  generationConfig: Pick<GenerationConfig, 'eosTokenIds'> | null | undefined,
  tokenizerEosTokenId: number | null | undefined,
): number[] {
  const ids = new Set<number>([...(config?.eosTokenIds ?? []), ...(generationConfig?.eosTokenIds ?? [])]);
  if (tokenizerEosTokenId !== null && tokenizerEosTokenId !== undefined) ids.add(tokenizerEosTokenId);
  return [...ids];
}
