/**
 * Folding a trained adapter into the base model's Hugging Face tensors, the equivalent of
 * PEFT's `merge_and_unload()`: each adapted weight becomes W' = W + s·B·A (s: the module's scale,
 * {@link moduleLora}), and the `<rf>` rows replace the embedding row (and the untied LM-head row).
 *
 * Numerics follow PEFT (`tuners/lora/layer.py` `Linear.merge` / `get_delta_weight`) with its
 * default float32 adapter weights: the delta B·A·s is computed in float32 and added to the
 * weight promoted to float32; the sum is rounded once to the weight's dtype (round to nearest
 * even, like PyTorch's `.to(torch.bfloat16)`). Merging into BF16 or F16 weights therefore
 * rounds: a merged BF16 model is not bit-identical to running the base model with the adapter
 * applied in float32, and deltas smaller than half a BF16 ulp of a weight vanish from it.
 * Here B·A is accumulated in float64 and rounded to float32, so results can differ from
 * PyTorch's float32 matmul in the last bit of float32 (and, rarely, flip a BF16 rounding).
 *
 * Pure TypeScript: no native code, and the tensors handed in by `read` are never modified.
 *
 * @module
 */
import { RedflagError } from '../errors.js';
import type { WeightPlan } from '../model/weights-map.js';
import { fromFloat32, toFloat32, withRowsSet, type DeferredTensor, type RawTensor } from '../model/safetensors.js';
import { loraSites, moduleLora, validateAdapter, type Adapter, type LoraModuleWeights } from './adapter.js';

/** The parts of a {@link WeightPlan} the merge needs: the checkpoint's tensor names. */
export type MergePlan = Pick<WeightPlan, 'tensors' | 'embedName' | 'lmHeadName'>;

type FloatDType = 'F32' | 'F16' | 'BF16';

function floatDType(name: string, tensor: Pick<RawTensor, 'dtype'>): FloatDType {
  if (tensor.dtype === 'F32' || tensor.dtype === 'F16' || tensor.dtype === 'BF16') return tensor.dtype;
  throw new RedflagError('UNSUPPORTED', `cannot merge into tensor ${name}: dtype ${tensor.dtype} (supported: F32, F16, BF16)`);
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/**
 * The checkpoint tensor name of an adapted layer's weight: `model.layers.{L}.{site}.weight`, or
 * for GPT-2 `{prefix}h.{L}.{site}.weight` with the checkpoint's own prefix (`transformer.` or
 * none, as in openai-community/gpt2), read from the plan.
 */
export function hfWeightName(adapter: Pick<Adapter, 'config'>, plan: MergePlan, layer: number, site: string): string {
  let name: string;
  if (adapter.config.architecture === 'gpt2') {
    const suffix = 'wte.weight';
    if (!plan.embedName.endsWith(suffix)) {
      throw new RedflagError('INVALID_ARGUMENT', `merge: the plan's embedding is ${plan.embedName}, not a GPT-2 wte.weight`);
    }
    name = `${plan.embedName.slice(0, -suffix.length)}h.${layer}.${site}.weight`;
  } else {
    name = `model.layers.${layer}.${site}.weight`;
  }
  const known = plan.tensors.some((t) => t.sources.includes(name));
  if (!known) throw new RedflagError('INVALID_ARGUMENT', `merge: the model has no tensor ${name} (for layer ${layer} ${site})`);
  return name;
}

/**
 * W + s·B·A for one module, in W's layout and dtype. nn.Linear weights are [out, in];
 * GPT-2 Conv1D weights are [in, out], so there the transpose of B·A is added.
 */
function mergeModule(name: string, weight: RawTensor, m: LoraModuleWeights, rank: number, scale: number, conv1d: boolean): RawTensor {
  const dtype = floatDType(name, weight);
  const { inFeatures: nIn, outFeatures: nOut, A, B } = m;
  const want = conv1d ? [nIn, nOut] : [nOut, nIn];
  if (!sameShape(weight.shape, want)) {
    throw new RedflagError(
      'INVALID_ARGUMENT',
      `merge: tensor ${name} has shape [${weight.shape.join(', ')}], expected [${want.join(', ')}] (${conv1d ? 'Conv1D [in, out]' : 'Linear [out, in]'})`,
    );
  }
  const w = toFloat32(weight);
  const row = new Float64Array(nIn);
  for (let o = 0; o < nOut; o++) {
    // row = (B·A)[o, :], accumulated in float64.
    row.fill(0);
    for (let k = 0; k < rank; k++) {
      const b = B[o * rank + k]!;
      if (b === 0) continue;
      const aRow = k * nIn;
      for (let i = 0; i < nIn; i++) row[i]! += b * A[aRow + i]!;
    }
    for (let i = 0; i < nIn; i++) {
      // float32 delta, scaled in float32, added in float32 (then rounded to dtype below).
      const delta = Math.fround(Math.fround(row[i]!) * scale);
      const at = conv1d ? i * nOut + o : o * nIn + i;
      w[at] = w[at]! + delta;
    }
  }
  return fromFloat32(w, weight.shape, dtype);
}

/** A checkpoint tensor's dtype and shape, without its bytes. */
export type TensorShape = Pick<RawTensor, 'dtype' | 'shape'>;

/** The merged [rows, H] shape of an embedding-like matrix whose rows `ids` are replaced. */
function grownShape(name: string, matrix: TensorShape, ids: readonly number[]): [number, number] {
  floatDType(name, matrix);
  if (matrix.shape.length !== 2) throw new RedflagError('INVALID_ARGUMENT', `merge: tensor ${name} has shape [${matrix.shape.join(', ')}], expected [vocab, hidden]`);
  const [V, H] = matrix.shape as [number, number];
  const total = Math.max(V, ...ids.map((id) => id + 1));
  if (total > V + ids.length) {
    throw new RedflagError('INVALID_ARGUMENT', `merge: flag token ids ${ids.join(', ')} go beyond tensor ${name}'s ${V} rows (only appending rows is possible)`);
  }
  return [total, H];
}

/**
 * A copy of an embedding-like matrix [V, H] with rows `ids` replaced by `rows` [ids.length × H]
 * (rounded to the matrix's dtype); ids from V on append rows (the flags were added to the
 * vocabulary). Only those rows' bytes are converted; the others are copied bit for bit.
 */
function replaceRows(name: string, matrix: RawTensor, ids: readonly number[], rows: Float32Array): RawTensor {
  const [total, H] = grownShape(name, matrix, ids);
  if (H * ids.length !== rows.length) throw new RedflagError('INVALID_ARGUMENT', `merge: tensor ${name} rows have ${H} values, the ${ids.length} flag row(s) ${rows.length}`);
  try {
    return withRowsSet(matrix, total, ids, rows);
  } catch (error) {
    if (!(error instanceof RedflagError)) throw error;
    throw new RedflagError(error.code, `merge: tensor ${name}: ${error.message}`, { cause: error });
  }
}

/**
 * The Hugging Face tensors that change when `adapter` is merged into the model, by checkpoint
 * name, as {@link DeferredTensor}s: dtype and shape now (every shape is checked here, before
 * anything is written), the merged bytes only when read, one tensor at a time, so merging an
 * 8B model never holds more than one of its tensors twice. Which tensors, and their values:
 * see {@link mergeAdapterTensors}. `info` gives a checkpoint tensor's dtype and shape; `read`
 * its bytes (called once per read of a merged tensor; its result is not modified).
 */
export function planAdapterMerge(
  adapter: Adapter,
  plan: MergePlan,
  info: (hfName: string) => TensorShape,
  read: (hfName: string) => Promise<RawTensor>,
): Map<string, DeferredTensor> {
  validateAdapter(adapter);
  const config = adapter.config;
  const tiedPlan = plan.lmHeadName === null;
  if (tiedPlan !== config.tieWordEmbeddings) {
    throw new RedflagError(
      'INVALID_ARGUMENT',
      `merge: the plan ${tiedPlan ? 'has no separate LM head' : `has an LM head (${plan.lmHeadName})`} but the adapter's config says tie_word_embeddings is ${config.tieWordEmbeddings}`,
    );
  }
  const sites = new Map(loraSites(config).map((s) => [s.site, s]));
  const out = new Map<string, DeferredTensor>();

  for (const m of adapter.modules) {
    const name = hfWeightName(adapter, plan, m.layer, m.site);
    if (out.has(name)) throw new RedflagError('INVALID_ARGUMENT', `merge: two modules of the adapter target ${name}`);
    const { rank, scale } = moduleLora(adapter, m.layer, m.site);
    const conv1d = sites.get(m.site)!.conv1d;
    const weight = info(name);
    const dtype = floatDType(name, weight);
    const want = conv1d ? [m.inFeatures, m.outFeatures] : [m.outFeatures, m.inFeatures];
    if (!sameShape(weight.shape, want)) {
      throw new RedflagError(
        'INVALID_ARGUMENT',
        `merge: tensor ${name} has shape [${weight.shape.join(', ')}], expected [${want.join(', ')}] (${conv1d ? 'Conv1D [in, out]' : 'Linear [out, in]'})`,
      );
    }
    out.set(name, { dtype, shape: [...weight.shape], read: async () => mergeModule(name, await read(name), m, rank, scale, conv1d).data });
  }

  const rf = adapter.redFlag;
  if (rf !== null) {
    const ids = [rf.tokenId, ...rf.categories.map((c) => c.id)];
    const rows: [string, Float32Array][] = [[plan.embedName, rf.embed]];
    // validateAdapter guarantees an untied config has head rows.
    if (plan.lmHeadName !== null) rows.push([plan.lmHeadName, rf.head!]);
    for (const [name, values] of rows) {
      const matrix = info(name);
      out.set(name, {
        dtype: matrix.dtype,
        shape: grownShape(name, matrix, ids),
        read: async () => replaceRows(name, await read(name), ids, values).data,
      });
    }
  }
  return out;
}

/**
 * The Hugging Face tensors that change when `adapter` is merged into the model, by checkpoint
 * name, in each tensor's original dtype: every adapted weight (W + s·B·A; Llama q/k/v/gate/up
 * are separate tensors, GPT-2's fused `c_attn` is one), and, with `<rf>` rows, the input
 * embedding (and the LM head when untied; a tied head shares the embedding and is not listed).
 * When the `<rf>` id equals the embedding's row count, the returned matrices have one more
 * row. `read` returns a checkpoint tensor by name (it is called once per tensor and its result
 * is not modified); `plan` is the model's {@link WeightPlan}.
 */
export async function mergeAdapterTensors(
  adapter: Adapter,
  read: (hfName: string) => Promise<RawTensor>,
  plan: MergePlan,
): Promise<Map<string, RawTensor>> {
  validateAdapter(adapter);
  // Every tensor the merge changes, read once, up front: the shapes come from the tensors.
  const names = adapter.modules.map((m) => hfWeightName(adapter, plan, m.layer, m.site));
  if (adapter.redFlag !== null) names.push(plan.embedName, ...(plan.lmHeadName !== null ? [plan.lmHeadName] : []));
  const tensors = new Map<string, RawTensor>();
  for (const name of names) if (!tensors.has(name)) tensors.set(name, await read(name));
  const merged = planAdapterMerge(adapter, plan, (name) => tensors.get(name)!, async (name) => tensors.get(name)!);
  const out = new Map<string, RawTensor>();
  for (const [name, t] of merged) out.set(name, { dtype: t.dtype, shape: t.shape, data: await t.read() });
  return out;
}
