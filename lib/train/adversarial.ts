/**
 * RF-AT (the paper's most robust variant): red-flag training on adversarially perturbed
 * prompts. For a harmful micro-batch, an inner attack of S steps of projected gradient descent
 * on the harmful prompts' input embeddings (each prompt token inside an l2 ball of radius
 * ε·‖its embedding‖, the embedding-space attack of lib/attack) lowers p(`<rf>`) over the
 * red-flag positions; the outer step then asks for `<rf>` on the perturbed input. Only the
 * red-flag term sees the perturbation: each harmful sequence is duplicated, the copy carries
 * the red-flag rows and the perturbation, the original keeps its after-flag KL rows on the clean
 * text, and benign KL stays on clean text too. The inner steps use the native step with
 * `paramGrads: false`, so they leave the adapter's gradients untouched.
 * @module
 */
import { RedflagError } from '../errors.js';
import type { Model } from '../model/model.js';
import { toFloat32 } from '../model/safetensors.js';
import { RowKind, type StepInput } from './objectives.js';

/** The inner attack's settings (`adversarial` in the training config). */
export interface AdversarialOptions {
  /** Radius relative to each prompt token's embedding norm. */
  epsilon: number;
  /** PGD steps. */
  steps: number;
  /** Step length as a fraction of the radius. */
  stepSize: number;
}

/** A perturbed copy: its index in the split step's batch, its prompt length, the sequence it copies. */
export interface PerturbedCopy {
  index: number;
  promptLength: number;
  source: number;
}

/** Each sequence's first row in the concatenated batch, and the batch's row count. */
function sequenceOffsets(batch: readonly number[][]): { offsets: number[]; total: number } {
  const offsets: number[] = [];
  let total = 0;
  for (const seq of batch) {
    offsets.push(total);
    total += seq.length;
  }
  return { offsets, total };
}

/**
 * The step with each harmful sequence duplicated at the end of the batch, in order: the copy
 * takes the sequence's red-flag rows (to be perturbed), the original keeps every other row.
 */
export function withPerturbedCopies(input: StepInput): { input: StepInput; copies: PerturbedCopy[] } {
  const { offsets, total: end } = sequenceOffsets(input.batch);
  let total = end; // the next copy's first row
  const batch = input.batch.slice();
  const copies: PerturbedCopy[] = [];
  const moved = new Map<number, number>(); // source index -> copy's row offset
  for (const f of input.flagged) {
    moved.set(f.index, total);
    copies.push({ index: batch.length, promptLength: f.promptLength, source: f.index });
    batch.push(input.batch[f.index]!);
    total += input.batch[f.index]!.length;
  }
  const rows = Int32Array.from(input.rows);
  for (let r = 0; r < rows.length; r += 5) {
    if (rows[r] !== RowKind.RedFlag) continue;
    const row = rows[r + 1]!;
    // The sequence this row belongs to: the last offset at or before it.
    let seq = 0;
    while (seq + 1 < offsets.length && offsets[seq + 1]! <= row) seq++;
    const target = moved.get(seq);
    if (target !== undefined) rows[r + 1] = row - offsets[seq]! + target;
  }
  return { input: { ...input, batch, rows }, copies };
}

/** The l2 norm of every input-embedding row [vocab], computed in chunks (the table is never widened whole). */
export async function embeddingRowNorms(model: Model): Promise<Float32Array> {
  const t = await model.readTensor(model.plan.embedName);
  const [rows, width] = t.shape as [number, number];
  const bytes = t.data.byteLength / (rows * width);
  const norms = new Float32Array(model.vocabSize);
  const chunk = 4096;
  for (let r0 = 0; r0 < rows; r0 += chunk) {
    const n = Math.min(chunk, rows - r0);
    const part = toFloat32({ ...t, shape: [n, width], data: t.data.subarray(r0 * width * bytes, (r0 + n) * width * bytes) });
    for (let i = 0; i < n; i++) {
      let sq = 0;
      for (let j = 0; j < width; j++) sq += part[i * width + j]! ** 2;
      norms[r0 + i] = Math.sqrt(sq);
    }
  }
  return norms;
}

/**
 * The inner attack: a perturbation [tokens of the split batch × hidden], non-zero only on the
 * copies' prompt tokens, found by `steps` PGD steps raising the red-flag loss of the copies'
 * rows (lowering p(`<rf>`)).
 */
export async function adversarialDelta(
  model: Model,
  split: { input: StepInput; copies: PerturbedCopy[] },
  norms: Float32Array,
  options: AdversarialOptions & { aggregation: 'any' | 'mean' | 'single'; dropoutSeed: number; cancel?: Int32Array },
): Promise<Float32Array> {
  const H = model.config.hiddenSize;
  const { input, copies } = split;
  if (!(options.epsilon >= 0) || !Number.isInteger(options.steps) || options.steps < 1 || !(options.stepSize > 0)) {
    throw new RedflagError('INVALID_ARGUMENT', `adversarial: epsilon >= 0, steps >= 1 and stepSize > 0 are needed, got ${JSON.stringify(options)}`);
  }
  // The copies alone: they stand together at the end of the batch (withPerturbedCopies), so the
  // sub-batch's rows are the batch's rows from the first copy's on.
  const { offsets, total } = sequenceOffsets(input.batch);
  const sub = copies.map((c) => input.batch[c.index]!);
  const first = copies.length > 0 ? offsets[copies[0]!.index]! : total;
  const { offsets: subOffsets, total: subTotal } = sequenceOffsets(sub);
  const rows: number[] = [];
  for (let r = 0; r < input.rows.length; r += 5) {
    if (input.rows[r] === RowKind.RedFlag && input.rows[r + 1]! >= first) rows.push(RowKind.RedFlag, input.rows[r + 1]! - first, -1, input.rows[r + 3]!, input.rows[r + 4]!);
  }
  const delta = new Float32Array(subTotal * H);
  if (rows.length === 0 || options.epsilon === 0) return placed(delta);
  const radius = new Float32Array(subTotal);
  copies.forEach((c, k) => {
    for (let t = 0; t < c.promptLength; t++) radius[subOffsets[k]! + t] = options.epsilon * norms[sub[k]![t]!]!;
  });
  const none = new Uint32Array(0);
  const tokens = Uint32Array.from(sub.flat());
  const counts = Uint32Array.from(sub, (s) => s.length);
  const rowArray = Int32Array.from(rows);
  for (let step = 0; step < options.steps; step++) {
    const terms = await model.runNative(() =>
      model.engine.trainStep(
        tokens,
        counts,
        none,
        none,
        rowArray,
        // Minimising −(red-flag loss): the attacker's direction; the adapter's gradients are left alone.
        { aggregation: options.aggregation, alphaBenign: 0, alphaRf: -1, alphaAfter: 0, alphaCe: 0, gradScale: 1, dropoutSeed: options.dropoutSeed, paramGrads: false },
        options.cancel,
        { embedDelta: delta, embedGrad: true },
      ),
    );
    const grad = terms.embedGrad!;
    for (let t = 0; t < subTotal; t++) {
      if (radius[t] === 0) continue;
      const g = grad.subarray(t * H, (t + 1) * H);
      const d = delta.subarray(t * H, (t + 1) * H);
      let gn = 0;
      for (const v of g) gn += v * v;
      gn = Math.sqrt(gn);
      if (gn === 0) continue;
      const scale = (options.stepSize * radius[t]!) / gn;
      let dn = 0;
      for (let i = 0; i < H; i++) {
        d[i] = d[i]! - scale * g[i]!;
        dn += d[i]! * d[i]!;
      }
      dn = Math.sqrt(dn);
      if (dn > radius[t]!) for (let i = 0; i < H; i++) d[i] = (d[i]! * radius[t]!) / dn;
    }
  }
  return placed(delta);

  // The sub-batch's perturbation at the copies' rows of the whole batch (zero elsewhere).
  function placed(subDelta: Float32Array): Float32Array {
    const full = new Float32Array(total * H);
    full.set(subDelta, first * H);
    return full;
  }
}
