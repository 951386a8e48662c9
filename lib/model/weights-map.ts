/**
 * How Hugging Face tensor names map onto the engine's tensors (native/model/model.cpp).
 * The engine stacks q/k/v into one `qkv` matrix and gate/up into one `mlp_in` matrix so
 * each block runs one GEMM per projection group.
 * @module
 */
import { RedflagError } from '../errors.js';
import type { ModelConfig } from './config.js';

/** One engine tensor and the Hugging Face tensors it is made of (stacked along dim 0). */
export interface EngineTensor {
  /** Engine name, e.g. `layers.0.qkv.weight`. */
  name: string;
  /** Source tensor names in the checkpoint, in stacking order. */
  sources: string[];
  /** The shape each source must have. */
  shapes: number[][];
  /** GPT-2 Conv1D weights are stored [in, out]. */
  srcIsKN: boolean;
}

/** The plan for one checkpoint: what to load, and which checkpoint tensors go unused. */
export interface WeightPlan {
  tensors: EngineTensor[];
  /** Name of the input embedding in the checkpoint (where `<rf>` rows are added). */
  embedName: string;
  /** Name of the untied LM head in the checkpoint, or null when tied. */
  lmHeadName: string | null;
  /** Checkpoint tensors the engine does not use (reported, not loaded). */
  unused: string[];
}

// Buffers some checkpoints carry that hold no weights (causal masks, cached rotary tables).
const IGNORABLE = [/\.attn\.bias$/, /\.attn\.masked_bias$/, /\.rotary_emb\.inv_freq$/];

/** Builds the load plan and checks every needed tensor exists with the right shape. */
export function planWeights(
  config: ModelConfig,
  names: Iterable<string>,
  shapeOf: (name: string) => number[],
  where: string,
): WeightPlan {
  const available = new Set(names);
  const tensors = config.architecture === 'gpt2' ? gpt2Tensors(config, available) : llamaTensors(config);
  const used = new Set<string>();
  for (const t of tensors) {
    t.sources.forEach((source, i) => {
      if (!available.has(source)) {
        throw new RedflagError('INVALID_FILE', `tensor ${source} is missing (needed for ${config.hfArchitecture})`, {
          file: where,
        });
      }
      const shape = shapeOf(source);
      const want = t.shapes[i]!;
      if (shape.length !== want.length || shape.some((d, j) => d !== want[j])) {
        throw new RedflagError(
          'INVALID_FILE',
          `tensor ${source} has shape [${shape.join(', ')}], expected [${want.join(', ')}] from config.json`,
          { file: where },
        );
      }
      used.add(source);
    });
  }
  const embedName = tensors.find((t) => t.name === 'embed')!.sources[0]!;
  const lmHead = tensors.find((t) => t.name === 'lm_head');
  const unused = [...available].filter(
    (n) => !used.has(n) && !IGNORABLE.some((re) => re.test(n)) && !(config.tieWordEmbeddings && n === 'lm_head.weight'),
  );
  return { tensors, embedName, lmHeadName: lmHead ? lmHead.sources[0]! : null, unused };
}

function llamaTensors(c: ModelConfig): EngineTensor[] {
  const H = c.hiddenSize, V = c.vocabSize, I = c.intermediateSize;
  const q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  const t = (name: string, sources: string[], shapes: number[][]): EngineTensor => ({ name, sources, shapes, srcIsKN: false });
  const out: EngineTensor[] = [t('embed', ['model.embed_tokens.weight'], [[V, H]])];
  if (!c.tieWordEmbeddings) out.push(t('lm_head', ['lm_head.weight'], [[V, H]]));
  out.push(t('final_norm.weight', ['model.norm.weight'], [[H]]));
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}.`, e = `layers.${i}.`;
    const attn = ['q_proj', 'k_proj', 'v_proj'].map((n) => `${p}self_attn.${n}`);
    out.push(
      t(`${e}attn_norm.weight`, [`${p}input_layernorm.weight`], [[H]]),
      t(`${e}mlp_norm.weight`, [`${p}post_attention_layernorm.weight`], [[H]]),
      t(`${e}qkv.weight`, attn.map((n) => `${n}.weight`), [[q, H], [kv, H], [kv, H]]),
      t(`${e}o.weight`, [`${p}self_attn.o_proj.weight`], [[H, q]]),
      t(`${e}mlp_in.weight`, [`${p}mlp.gate_proj.weight`, `${p}mlp.up_proj.weight`], [[I, H], [I, H]]),
      t(`${e}mlp_out.weight`, [`${p}mlp.down_proj.weight`], [[H, I]]),
    );
    if (c.qkvBias) out.push(t(`${e}qkv.bias`, attn.map((n) => `${n}.bias`), [[q], [kv], [kv]]));
    if (c.qkNorm) {
      out.push(
        t(`${e}q_norm.weight`, [`${p}self_attn.q_norm.weight`], [[c.headDim]]),
        t(`${e}k_norm.weight`, [`${p}self_attn.k_norm.weight`], [[c.headDim]]),
      );
    }
    if (c.oBias) out.push(t(`${e}o.bias`, [`${p}self_attn.o_proj.bias`], [[H]]));
    if (c.mlpBias) {
      out.push(
        t(`${e}mlp_in.bias`, [`${p}mlp.gate_proj.bias`, `${p}mlp.up_proj.bias`], [[I], [I]]),
        t(`${e}mlp_out.bias`, [`${p}mlp.down_proj.bias`], [[H]]),
      );
    }
  }
  return out;
}

function gpt2Tensors(c: ModelConfig, available: Set<string>): EngineTensor[] {
  // openai-community/gpt2 stores names without the `transformer.` prefix that
  // GPT2LMHeadModel.save_pretrained writes; accept both.
  const pre = available.has('transformer.wte.weight') || !available.has('wte.weight') ? 'transformer.' : '';
  const H = c.hiddenSize, V = c.vocabSize, I = c.intermediateSize, P = c.maxPositions;
  const t = (name: string, source: string, shape: number[], kn = false): EngineTensor => ({
    name,
    sources: [pre + source],
    shapes: [shape],
    srcIsKN: kn,
  });
  const out: EngineTensor[] = [
    t('embed', 'wte.weight', [V, H]),
    t('pos_embed', 'wpe.weight', [P, H]),
    t('final_norm.weight', 'ln_f.weight', [H]),
    t('final_norm.bias', 'ln_f.bias', [H]),
  ];
  for (let i = 0; i < c.numLayers; i++) {
    const p = `h.${i}.`, e = `layers.${i}.`;
    out.push(
      t(`${e}attn_norm.weight`, `${p}ln_1.weight`, [H]),
      t(`${e}attn_norm.bias`, `${p}ln_1.bias`, [H]),
      t(`${e}qkv.weight`, `${p}attn.c_attn.weight`, [H, 3 * H], true),
      t(`${e}qkv.bias`, `${p}attn.c_attn.bias`, [3 * H]),
      t(`${e}o.weight`, `${p}attn.c_proj.weight`, [H, H], true),
      t(`${e}o.bias`, `${p}attn.c_proj.bias`, [H]),
      t(`${e}mlp_norm.weight`, `${p}ln_2.weight`, [H]),
      t(`${e}mlp_norm.bias`, `${p}ln_2.bias`, [H]),
      t(`${e}mlp_in.weight`, `${p}mlp.c_fc.weight`, [H, I], true),
      t(`${e}mlp_in.bias`, `${p}mlp.c_fc.bias`, [I]),
      t(`${e}mlp_out.weight`, `${p}mlp.c_proj.weight`, [I, H], true),
      t(`${e}mlp_out.bias`, `${p}mlp.c_proj.bias`, [H]),
    );
  }
  return out;
}
