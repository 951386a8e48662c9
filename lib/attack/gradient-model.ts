/**
 * A model prepared for white-box attacks: the variant's LoRA adapter and `<rf>` rows held by a
 * native trainer that never takes an optimizer step, so the training step's backward gives
 * gradients with respect to the input embeddings (native/model/train.h `Sequence::embed_grad`)
 * of any loss the trainer computes — here the attacker's: the harmful answer's cross-entropy
 * minus λ times the red-flag loss.
 *
 * The trainer needs LoRA factors to exist; a model without an adapter (the base model, or a
 * merged red-flag model) gets a rank-1 adapter on one projection whose B factor is zero, so it
 * computes exactly the model.
 * @module
 */
import { RedflagError } from '../errors.js';
import type { Model } from '../model/model.js';
import { toFloat32 } from '../model/safetensors.js';
import { loraSites } from '../train/adapter.js';
import { applyAdapter } from '../train/export.js';
import { RowKind } from '../train/objectives.js';

/** What one attack evaluation returns. */
export interface AttackLoss {
  /** The attacker's objective: ce − λ · redFlag. */
  objective: number;
  /** Mean cross-entropy of the answer tokens. */
  ce: number;
  /** −log p(`<rf>` at least once over the answer positions). */
  redFlag: number;
  /** d objective / d(input embeddings) [tokens × hidden]. */
  grad: Float32Array;
}

/** A sequence under attack: its ids and where the answer starts and ends. */
export interface AttackTarget {
  ids: readonly number[];
  /** Index of the answer's first token. */
  responseStart: number;
  /** One past the answer's last token. */
  responseEnd: number;
  /** Whether that last token is the end token (then nothing past it is scored, as classify does). */
  hasEndToken?: boolean;
}

export class AttackModel {
  readonly hidden: number;

  private constructor(
    readonly model: Model,
    /** The red-flag token, or -1 when the variant has none (then only the cross-entropy is attacked). */
    readonly rfToken: number,
    /** Every flag token (`<rf>` then the category flags); the attack pushes each one down. */
    readonly flagIds: readonly number[],
    private readonly embedRows: (ids: readonly number[]) => Promise<Float32Array>,
    /** The input-embedding matrix [rows × hidden] as the checkpoint holds it (rows may stop short of a grown vocabulary). */
    private readonly table: Float32Array,
  ) {
    this.hidden = model.config.hiddenSize;
  }

  /**
   * Prepares `model` with the adapter in `adapterDir` (whatever adapter the model carried is
   * cleared first), or with none (then the model must carry none). Close it with
   * {@link AttackModel.close}; the model then runs the trainer's copy of the adapter (the eval
   * suites apply the adapter again, lib/eval/suites/white-box.ts).
   */
  static async open(model: Model, adapterDir?: string): Promise<AttackModel> {
    let options = { rank: 1, alpha: 1, rslora: false, targets: [loraSites(model.config)[0]!.site] };
    let values = new Map<string, Float32Array>();
    if (adapterDir !== undefined) {
      // applyAdapter validates the adapter and adds <rf> to the vocabulary as training did; the
      // trainer then takes over its values (it refuses a model that already has adapters).
      const adapter = await applyAdapter(model, adapterDir);
      // The trainer gives every module one rank and alpha, on the sites of a list in every layer.
      if (typeof adapter.targets === 'string' || adapter.exclude || adapter.rankPattern || adapter.alphaPattern) {
        throw new RedflagError('UNSUPPORTED', 'the gradient attacks train through the adapter with one rank and alpha on listed sites; this one has target_modules as a pattern, exclude_modules, rank_pattern or alpha_pattern', { file: adapterDir });
      }
      await model.runNative(() => model.engine.clearAdapters());
      // The sites the adapter holds, by their block-relative names (the trainer's): target_modules
      // may name them with a layer prefix, which the trainer does not read.
      const sites = [...new Set(adapter.modules.map((m) => m.site))];
      options = { rank: adapter.rank, alpha: adapter.alpha, rslora: adapter.rslora, targets: sites.length > 0 ? sites : options.targets };
      values = new Map(adapter.modules.flatMap((m) => [[`layers.${m.layer}.${m.site}.lora_A`, m.A], [`layers.${m.layer}.${m.site}.lora_B`, m.B]] as const));
      if (adapter.redFlag) {
        values.set('rf.embed', adapter.redFlag.embed);
        if (adapter.redFlag.head) values.set('rf.head', adapter.redFlag.head);
      }
    }
    const rfToken = model.redFlagTokenId ?? -1;
    // Category flags: every flag's rows take the adapter's values ([K, H]), as in inference.
    const flagIds = model.flagTokenIds();
    await model.runNative(() =>
      model.engine.trainInit({ mode: 'lora', ...options, dropout: 0, rfToken, ...(flagIds.length > 1 ? { flagTokens: flagIds } : {}), seed: 0 }),
    );
    try {
      for (const p of model.engine.params()) {
        const value = values.get(p.name);
        if (value) model.engine.setParam(p.name, 'value', value);
        else if (/\.lora_B$/.test(p.name)) model.engine.setParam(p.name, 'value', new Float32Array(p.shape.reduce((a, b) => a * b, 1)));
      }
      const missing = [...values.keys()].filter((name) => !model.engine.params().some((p) => p.name === name));
      if (missing.length > 0) throw new RedflagError('INVALID_ARGUMENT', `the attack model has no parameter for ${missing.join(', ')}`, { file: adapterDir });
    } catch (error) {
      model.engine.trainEnd();
      throw error;
    }
    const embed = await model.readTensor(model.plan.embedName);
    const table = toFloat32(embed);
    const width = embed.shape[1]!;
    const rows = async (ids: readonly number[]) => {
      const out = new Float32Array(ids.length * width);
      for (const [t, id] of ids.entries()) {
        const k = flagIds.indexOf(id);
        if (k >= 0 && values.has('rf.embed')) out.set(values.get('rf.embed')!.subarray(k * width, (k + 1) * width), t * width);
        else out.set(table.subarray(id * width, (id + 1) * width), t * width);
      }
      return out;
    };
    return new AttackModel(model, rfToken, flagIds, rows, table);
  }

  /** The input-embedding matrix, [rows × hidden] row-major (GCG's token gradients are it times the embedding gradient). */
  embeddingTable(): Float32Array {
    return this.table;
  }

  /** The l2 norm of each token's input embedding (the scale of a relative perturbation budget). */
  async embeddingNorms(ids: readonly number[]): Promise<Float32Array> {
    const rows = await this.embedRows(ids);
    const H = this.hidden;
    return Float32Array.from(ids, (_, t) => Math.hypot(...rows.subarray(t * H, (t + 1) * H)));
  }

  /**
   * The attacker's objective at perturbation `delta` [tokens × hidden] and its gradient:
   * ce − λ · redFlag, ce the answer's mean cross-entropy (keep the harmful answer likely),
   * redFlag = −log p(`<rf>` at least once before an answer token) (push every p(`<rf>`) down);
   * with category flags, the mean of that over every flag (each one's own group), since the
   * detector fires on any of them.
   */
  async loss(target: AttackTarget, delta: Float32Array, lambda: number, signal?: AbortSignal): Promise<AttackLoss> {
    const { ids, responseStart, responseEnd } = target;
    const rows: number[] = [];
    for (let r = responseStart - 1; r < responseEnd - 1; r++) {
      rows.push(RowKind.Ce, r, -1, -1, ids[r + 1]!);
      if (this.rfToken >= 0 && lambda !== 0) this.flagIds.forEach((flag, k) => rows.push(RowKind.RedFlag, r, -1, k, flag));
    }
    const none = new Uint32Array(0);
    if (signal?.aborted) throw new RedflagError('ABORTED', 'the attack was cancelled');
    const terms = await this.model.runNative(() =>
      this.model.engine.trainStep(
        Uint32Array.from(ids),
        Uint32Array.of(ids.length),
        none,
        none,
        Int32Array.from(rows),
        // The session's parameters never step: their gradients are left alone.
        { aggregation: 'any', alphaBenign: 0, alphaRf: -lambda, alphaAfter: 0, alphaCe: 1, gradScale: 1, dropoutSeed: 0, paramGrads: false },
        undefined,
        { embedDelta: delta, embedGrad: true },
      ),
    );
    return { objective: terms.total, ce: terms.ce, redFlag: terms.redFlag, grad: terms.embedGrad! };
  }

  /**
   * Teacher-forced p(`<rf>`) before each answer token and after its last one, at perturbation
   * `delta`: the positions classify scores (not past an end token, which nothing decodes after).
   */
  async answerScores(target: AttackTarget, delta: Float32Array, signal?: AbortSignal): Promise<Float32Array> {
    if (this.rfToken < 0) throw new RedflagError('INVALID_ARGUMENT', 'this variant has no red-flag token to score');
    const seq = this.model.newSequence();
    try {
      const scores = await this.model.tokenScores([seq], [Uint32Array.from(target.ids)], { rfToken: this.rfToken, embedDelta: delta, ...(signal ? { signal } : {}) });
      return scores.slice(target.responseStart - 1, target.responseEnd - (target.hasEndToken ? 1 : 0));
    } finally {
      seq.dispose();
    }
  }

  /** Ends the attack session; the model keeps the trainer's adapter (and flag rows) for inference. */
  close(): void {
    this.model.engine.trainEnd();
  }
}
