/**
 * Writes random-weight models in exact Hugging Face layout: for tests, benchmarks and the
 * demo, since no pretrained weights can be downloaded here. Same spec and seed, same bytes.
 * @module
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';

import { RedflagError } from '../errors.js';
import { fillUniform } from './sampling.js';
import { fromFloat32, writeFileAtomic, writeSafetensors, type DeferredTensor } from './safetensors.js';

/** Shape and numerics of a random model. */
export interface RandomModelSpec {
  architecture: 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gpt2';
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  /** Default: numHeads. */
  numKvHeads?: number;
  /** Default: hiddenSize / numHeads. */
  headDim?: number;
  /** Default 2048 (GPT-2: 1024). */
  maxPositions?: number;
  /** Default false (GPT-2 is always tied). */
  tieWordEmbeddings?: boolean;
  /** Stored element type. Default F32. */
  dtype?: 'F32' | 'F16' | 'BF16';
  ropeTheta?: number;
  /** Default 0. */
  seed?: number;
  /** Token ids written to config.json. */
  bosTokenId?: number | null;
  eosTokenId?: number | null;
  /** Tokenizer files to write beside the weights. */
  tokenizer?: { tokenizerJson: unknown; tokenizerConfig: unknown };
}

const HF_CLASS = {
  llama: ['LlamaForCausalLM', 'llama'],
  mistral: ['MistralForCausalLM', 'mistral'],
  qwen2: ['Qwen2ForCausalLM', 'qwen2'],
  qwen3: ['Qwen3ForCausalLM', 'qwen3'],
  gpt2: ['GPT2LMHeadModel', 'gpt2'],
} as const;

const TORCH_DTYPE = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' } as const;

/** The config.json transformers would write for this spec. */
export function randomModelConfig(spec: RandomModelSpec): Record<string, unknown> {
  const [cls, modelType] = HF_CLASS[spec.architecture];
  const common = {
    architectures: [cls],
    model_type: modelType,
    vocab_size: spec.vocabSize,
    torch_dtype: TORCH_DTYPE[spec.dtype ?? 'F32'],
    bos_token_id: spec.bosTokenId ?? null,
    eos_token_id: spec.eosTokenId ?? null,
  };
  if (spec.architecture === 'gpt2') {
    const positions = spec.maxPositions ?? 1024;
    return {
      ...common,
      n_embd: spec.hiddenSize,
      n_layer: spec.numLayers,
      n_head: spec.numHeads,
      n_inner: spec.intermediateSize,
      n_positions: positions,
      n_ctx: positions,
      layer_norm_epsilon: 1e-5,
      activation_function: 'gelu_new',
      scale_attn_weights: true,
      tie_word_embeddings: true,
    };
  }
  return {
    ...common,
    hidden_size: spec.hiddenSize,
    intermediate_size: spec.intermediateSize,
    num_hidden_layers: spec.numLayers,
    num_attention_heads: spec.numHeads,
    num_key_value_heads: spec.numKvHeads ?? spec.numHeads,
    head_dim: spec.headDim ?? spec.hiddenSize / spec.numHeads,
    max_position_embeddings: spec.maxPositions ?? 2048,
    rms_norm_eps: 1e-5,
    rope_theta: spec.ropeTheta ?? 10000,
    hidden_act: 'silu',
    tie_word_embeddings: spec.tieWordEmbeddings ?? false,
    ...(spec.architecture === 'llama' ? { attention_bias: false, mlp_bias: false } : {}),
    ...(spec.architecture === 'qwen2' ? { use_sliding_window: false } : {}),
    ...(spec.architecture === 'qwen3' ? { attention_bias: false, use_sliding_window: false } : {}),
  };
}

/** Checkpoint tensor names and shapes for this spec, in HF naming. */
export function randomModelShapes(spec: RandomModelSpec): [string, number[]][] {
  const H = spec.hiddenSize, I = spec.intermediateSize, V = spec.vocabSize;
  const out: [string, number[]][] = [];
  if (spec.architecture === 'gpt2') {
    out.push(['transformer.wte.weight', [V, H]], ['transformer.wpe.weight', [spec.maxPositions ?? 1024, H]]);
    for (let i = 0; i < spec.numLayers; i++) {
      const p = `transformer.h.${i}.`;
      out.push(
        [`${p}ln_1.weight`, [H]], [`${p}ln_1.bias`, [H]],
        [`${p}attn.c_attn.weight`, [H, 3 * H]], [`${p}attn.c_attn.bias`, [3 * H]],
        [`${p}attn.c_proj.weight`, [H, H]], [`${p}attn.c_proj.bias`, [H]],
        [`${p}ln_2.weight`, [H]], [`${p}ln_2.bias`, [H]],
        [`${p}mlp.c_fc.weight`, [H, I]], [`${p}mlp.c_fc.bias`, [I]],
        [`${p}mlp.c_proj.weight`, [I, H]], [`${p}mlp.c_proj.bias`, [H]],
      );
    }
    out.push(['transformer.ln_f.weight', [H]], ['transformer.ln_f.bias', [H]]);
    return out;
  }
  const hd = spec.headDim ?? H / spec.numHeads;
  const q = spec.numHeads * hd, kv = (spec.numKvHeads ?? spec.numHeads) * hd;
  out.push(['model.embed_tokens.weight', [V, H]], ['model.norm.weight', [H]]);
  if (!spec.tieWordEmbeddings) out.push(['lm_head.weight', [V, H]]);
  for (let i = 0; i < spec.numLayers; i++) {
    const p = `model.layers.${i}.`;
    out.push(
      [`${p}input_layernorm.weight`, [H]],
      [`${p}self_attn.q_proj.weight`, [q, H]], [`${p}self_attn.k_proj.weight`, [kv, H]],
      [`${p}self_attn.v_proj.weight`, [kv, H]], [`${p}self_attn.o_proj.weight`, [H, q]],
      [`${p}post_attention_layernorm.weight`, [H]],
      [`${p}mlp.gate_proj.weight`, [I, H]], [`${p}mlp.up_proj.weight`, [I, H]], [`${p}mlp.down_proj.weight`, [H, I]],
    );
    if (spec.architecture === 'qwen2') {
      out.push([`${p}self_attn.q_proj.bias`, [q]], [`${p}self_attn.k_proj.bias`, [kv]], [`${p}self_attn.v_proj.bias`, [kv]]);
    }
    if (spec.architecture === 'qwen3') out.push([`${p}self_attn.q_norm.weight`, [hd]], [`${p}self_attn.k_norm.weight`, [hd]]);
  }
  return out;
}

/**
 * Writes config.json, generation_config.json, model.safetensors and (when given) the tokenizer
 * files into `dir`. Weights are uniform with variance 1/fan_in (norm weights near 1, biases
 * small), so activations keep their scale through the layers. The values are one random stream
 * over the tensors in {@link randomModelShapes} order; each tensor is made when the writer
 * reaches it (its part of the stream skipped to), so memory holds one tensor, not the model.
 */
export async function writeRandomModel(dir: string, spec: RandomModelSpec, options: { overwrite?: boolean } = {}): Promise<void> {
  for (const key of ['vocabSize', 'hiddenSize', 'intermediateSize', 'numLayers', 'numHeads'] as const) {
    if (!Number.isInteger(spec[key]) || spec[key] <= 0) {
      throw new RedflagError('INVALID_ARGUMENT', `random model: ${key} must be a positive integer`);
    }
  }
  await mkdir(dir, { recursive: true });
  const seed = spec.seed ?? 0;
  const dtype = spec.dtype ?? 'F32';
  const tensors = new Map<string, DeferredTensor>();
  let drawn = 0; // draws of the stream before this tensor's
  // One f32 buffer for every tensor's values (converted into a new one each): first touches of
  // fresh memory cost more than the draws (measured 12 vs 2 ns an element here).
  const shapes = randomModelShapes(spec);
  const scratch = new Float32Array(Math.max(...shapes.map(([, shape]) => shape.reduce((a, b) => a * b, 1))));
  for (const [name, shape] of shapes) {
    const n = shape.reduce((a, b) => a * b, 1);
    const isNorm = /(norm|ln_\d|ln_f)\.weight$/.test(name);
    const isBias = name.endsWith('.bias');
    // Fan-in: the second dim of nn.Linear [out, in]; the first of GPT-2 Conv1D [in, out].
    const fanIn = shape.length === 2 ? (name.includes('.c_') ? shape[0]! : shape[1]!) : 1;
    const embedding = /(embed_tokens|wte|wpe)\.weight$/.test(name);
    const scale = isNorm ? 0.1 : isBias ? 0.02 : embedding ? 1 : Math.sqrt(3 / fanIn);
    const skip = drawn;
    drawn += n;
    tensors.set(name, {
      dtype,
      shape,
      read: async () => {
        const data = scratch.subarray(0, n);
        fillUniform(data, seed, skip, isNorm ? 1 : 0, scale);
        return fromFloat32(data, shape, dtype).data;
      },
    });
  }
  const overwrite = options.overwrite ?? false;
  await writeSafetensors(join(dir, 'model.safetensors'), tensors, { metadata: { format: 'pt' }, overwrite });
  const json = (v: unknown, indent = 2) => [new TextEncoder().encode(JSON.stringify(v, null, indent) + (indent ? '\n' : ''))];
  await writeFileAtomic(join(dir, 'config.json'), json(randomModelConfig(spec)), { overwrite });
  const generation = { bos_token_id: spec.bosTokenId ?? null, eos_token_id: spec.eosTokenId ?? null };
  await writeFileAtomic(join(dir, 'generation_config.json'), json(generation), { overwrite });
  if (spec.tokenizer) {
    await writeFileAtomic(join(dir, 'tokenizer.json'), json(spec.tokenizer.tokenizerJson, 0), { overwrite });
    await writeFileAtomic(join(dir, 'tokenizer_config.json'), json(spec.tokenizer.tokenizerConfig), { overwrite });
  }
}
