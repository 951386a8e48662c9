/**
 * Seeded shuffling and the batch sampler the trainer draws from: harmful and benign examples
 * mixed at a fixed ratio, length bucketing, a token budget per batch, epochs, and an order that
 * depends only on the seed, so a run can be resumed at any step and see the same batches.
 *
 * **One epoch.** With `harmfulFraction` f set, an epoch has E examples, f·E of them harmful
 * (rounded), where E is the smallest count that shows every harmful and every benign example at
 * least once (`max(⌈H/f⌉, ⌈B/(1−f)⌉)`; `examplesPerEpoch` overrides it). The class that is short
 * for the ratio is repeated: its examples are drawn from successive fresh shuffles, so no
 * example repeats before all of its class have been seen. The two classes are interleaved
 * evenly. Without `harmfulFraction`, an epoch is one shuffle of all examples (their natural mix).
 *
 * **Batches.** The epoch's sequence is cut into windows of `bucketWindow` batches' worth of
 * examples; within a window each class is sorted by length and batches are filled from the
 * shortest up, picking the class that is furthest below its share, until `batchSize` examples
 * or `maxTokensPerBatch` tokens (the sum of lengths: sequences are packed, not padded) would be
 * exceeded. An unfilled last batch of a window carries its examples into the next window; the
 * window's batches are then shuffled, so lengths do not rise steadily. The last batch of an
 * epoch may be unfilled; it stays last (or is dropped with `dropLast`). `bucketWindow: 1` turns
 * bucketing off (batches follow the shuffled order).
 *
 * Everything is a function of `seed` and the epoch number, computed without looking at earlier
 * epochs' batches; {@link BatchSampler.resume} rebuilds the epochs up to a step (cheap: no
 * tokenization, just sorting indices) and continues from there.
 *
 * @module
 */
import { RedflagError } from '../errors.js';
import { createRng } from '../model/sampling.js';
import type { Label } from './records.js';

/**
 * Shuffles `items` in place with Fisher–Yates driven by `rng` (uniform floats in [0, 1), e.g.
 * `createRng(seed)`), and returns it.
 */
export function shuffleInPlace<T>(items: T[], rng: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    const item = items[i] as T;
    items[i] = items[j] as T;
    items[j] = item;
  }
  return items;
}

/** A shuffled copy of `items`: the same seed always gives the same order. */
export function seededShuffle<T>(items: readonly T[], seed: number): T[] {
  return shuffleInPlace(items.slice(), createRng(seed));
}

/** A 32-bit seed derived from a base seed and stream numbers (splitmix-style mixing). */
export function deriveSeed(seed: number, ...streams: number[]): number {
  let h = (Math.trunc(seed) ^ 0x9e3779b9) >>> 0;
  for (const stream of [...streams, streams.length]) {
    h = (h + Math.imul((Math.trunc(stream) + 1) >>> 0, 0x85ebca6b)) >>> 0;
    h = Math.imul(h ^ (h >>> 16), 0x7feb352d) >>> 0;
    h = Math.imul(h ^ (h >>> 15), 0x846ca68b) >>> 0;
    h = (h ^ (h >>> 16)) >>> 0;
  }
  return h;
}

/** Options of {@link BatchSampler}. At least one of `batchSize` and `maxTokensPerBatch` is needed. */
export interface BatchSamplerOptions<T> {
  /** The seed of every random choice. */
  seed: number;
  /** Most examples in a batch. Default: no limit (then `maxTokensPerBatch` is required). */
  batchSize?: number;
  /** Most tokens (sum of lengths) in a batch. Default: no limit. An example longer than this is an error. */
  maxTokensPerBatch?: number;
  /** Share of harmful examples in each epoch and batch, in [0, 1]. Default: the data's own mix. */
  harmfulFraction?: number;
  /** Batches per bucketing window (≥ 1; 1 = no bucketing). Default 8. */
  bucketWindow?: number;
  /** Number of epochs (integer ≥ 1). Default 1. */
  epochs?: number;
  /** Examples per epoch (with `harmfulFraction`). Default: enough to show every example once. */
  examplesPerEpoch?: number;
  /** Drop each epoch's last batch when it is unfilled (the epoch ran out before `batchSize` or the token budget was reached). Default false. */
  dropLast?: boolean;
  /** An example's length in tokens. Default: `item.ids.length`. */
  tokenCount?: (item: T) => number;
  /** Rows the loaders skipped, reported by {@link BatchSampler.report}. Default 0. */
  skipped?: number;
}

/** One batch. */
export interface Batch<T> {
  /** Global step (0-based, across epochs). */
  step: number;
  /** Epoch (0-based). */
  epoch: number;
  /** Step within the epoch. */
  stepInEpoch: number;
  /** The examples. */
  items: T[];
  /** Their indices in the sampler's example list. */
  indices: number[];
  /** Sum of their lengths. */
  tokens: number;
  /** The longest one. */
  maxLength: number;
  /** How many are harmful. */
  harmful: number;
  /** How many are benign. */
  benign: number;
}

/** Counts describing a sampler's data and schedule. */
export interface BatchReport {
  /** Distinct examples. */
  examples: number;
  /** Harmful examples. */
  harmful: number;
  /** Benign examples. */
  benign: number;
  /** Examples whose `truncated` field is true (from `encodeConversation` (encode.ts)). */
  truncated: number;
  /** Rows the loaders skipped (the `skipped` option). */
  skipped: number;
  /** Sum of all examples' lengths. */
  tokens: number;
  /** Examples drawn per epoch. */
  examplesPerEpoch: number;
  /** Harmful examples drawn per epoch. */
  harmfulPerEpoch: number;
  /** Benign examples drawn per epoch. */
  benignPerEpoch: number;
  /** Number of epochs. */
  epochs: number;
  /** Batches in each epoch. */
  stepsPerEpoch: number[];
  /** Batches in all epochs. */
  totalSteps: number;
}

/** Example indices waiting to be batched; `items[head]` is next. */
interface Queue {
  items: number[];
  head: number;
}

interface EpochPlan {
  /** Batches as index lists. */
  batches: number[][];
}

/** What {@link BatchSampler} needs of an example (an `EncodedConversation` has it). */
export interface LabelledExample {
  /** The example's class. */
  label: Label;
}

/** The sampler; see the module description. */
export class BatchSampler<T extends LabelledExample> {
  readonly #examples: readonly T[];
  readonly #lengths: Int32Array;
  readonly #harmful: number[] = [];
  readonly #benign: number[] = [];
  readonly #seed: number;
  readonly #batchSize: number;
  readonly #maxTokens: number;
  readonly #fraction: number | undefined;
  readonly #window: number;
  readonly #epochs: number;
  readonly #perEpoch: number;
  readonly #harmfulPerEpoch: number;
  readonly #dropLast: boolean;
  readonly #skipped: number;
  readonly #plans = new Map<number, EpochPlan>();

  /** Checks the options and measures the examples (`examples` is not copied: do not change it). */
  constructor(examples: readonly T[], options: BatchSamplerOptions<T>) {
    const fail = (message: string): never => {
      throw new RedflagError('INVALID_ARGUMENT', message);
    };
    if (!Array.isArray(examples) || examples.length === 0) fail('the batch sampler needs a non-empty array of examples');
    if (!Number.isFinite(options.seed)) fail(`seed must be a number, got ${String(options.seed)}`);
    const positiveInt = (value: number | undefined, name: string): number => {
      if (value === undefined) return Infinity;
      if (!Number.isSafeInteger(value) || value < 1) fail(`${name} must be an integer ≥ 1, got ${String(value)}`);
      return value;
    };
    this.#batchSize = positiveInt(options.batchSize, 'batchSize');
    this.#maxTokens = positiveInt(options.maxTokensPerBatch, 'maxTokensPerBatch');
    if (this.#batchSize === Infinity && this.#maxTokens === Infinity) fail('set batchSize, maxTokensPerBatch or both');
    this.#window = options.bucketWindow === undefined ? 8 : positiveInt(options.bucketWindow, 'bucketWindow');
    this.#epochs = options.epochs === undefined ? 1 : positiveInt(options.epochs, 'epochs');
    this.#dropLast = options.dropLast ?? false;
    this.#skipped = options.skipped ?? 0;
    this.#seed = Math.trunc(options.seed);
    this.#examples = examples;

    const count =
      options.tokenCount ??
      ((item: T): number => {
        const ids = (item as { ids?: ArrayLike<number> }).ids;
        if (ids === undefined || typeof ids.length !== 'number') fail('examples have no "ids" array: pass tokenCount');
        return (ids as ArrayLike<number>).length;
      });
    this.#lengths = new Int32Array(examples.length);
    examples.forEach((item, index) => {
      const where = (): string => {
        const source = (item as { source?: unknown }).source;
        return typeof source === 'string' ? `example ${index} (${source})` : `example ${index}`;
      };
      if (item.label === 'harmful') this.#harmful.push(index);
      else if (item.label === 'benign') this.#benign.push(index);
      else fail(`${where()} has label ${JSON.stringify(item.label)}; expected "harmful" or "benign"`);
      const length = count(item);
      if (!Number.isSafeInteger(length) || length < 0) fail(`${where()} has length ${String(length)}`);
      if (length > this.#maxTokens) fail(`${where()} has ${length} tokens, more than maxTokensPerBatch (${this.#maxTokens})`);
      this.#lengths[index] = length;
    });

    const fraction = options.harmfulFraction;
    if (fraction === undefined) {
      this.#fraction = undefined;
      this.#perEpoch = examples.length;
      this.#harmfulPerEpoch = this.#harmful.length;
      if (options.examplesPerEpoch !== undefined) fail('examplesPerEpoch needs harmfulFraction');
    } else {
      if (typeof fraction !== 'number' || !(fraction >= 0 && fraction <= 1)) fail(`harmfulFraction must be in [0, 1], got ${String(fraction)}`);
      if (fraction > 0 && this.#harmful.length === 0) fail(`harmfulFraction is ${fraction} but there are no harmful examples`);
      if (fraction < 1 && this.#benign.length === 0) fail(`harmfulFraction is ${fraction} but there are no benign examples`);
      this.#fraction = fraction;
      const needed = Math.max(fraction > 0 ? Math.ceil(this.#harmful.length / fraction) : 0, fraction < 1 ? Math.ceil(this.#benign.length / (1 - fraction)) : 0);
      this.#perEpoch = options.examplesPerEpoch === undefined ? needed : positiveInt(options.examplesPerEpoch, 'examplesPerEpoch');
      this.#harmfulPerEpoch = Math.round(this.#perEpoch * fraction);
    }
  }

  /** Number of epochs. */
  get epochs(): number {
    return this.#epochs;
  }

  /** Number of batches in epoch `epoch`. */
  stepsInEpoch(epoch: number): number {
    return this.#plan(epoch).batches.length;
  }

  /** Number of batches in all epochs. */
  get totalSteps(): number {
    let total = 0;
    for (let epoch = 0; epoch < this.#epochs; epoch++) total += this.stepsInEpoch(epoch);
    return total;
  }

  /** The batches of one epoch, in order. */
  epochBatches(epoch: number): Batch<T>[] {
    let step = 0;
    for (let e = 0; e < epoch; e++) step += this.stepsInEpoch(e);
    return this.#plan(epoch).batches.map((indices, stepInEpoch) => this.#batch(indices, epoch, stepInEpoch, step + stepInEpoch));
  }

  /** Every batch of every epoch, in order. */
  batches(): Generator<Batch<T>, void, undefined> {
    return this.resume(0);
  }

  /**
   * The batches from global step `step` on: exactly those {@link BatchSampler.batches} yields
   * from that step, for a sampler built with the same examples and options.
   */
  *resume(step: number): Generator<Batch<T>, void, undefined> {
    if (!Number.isSafeInteger(step) || step < 0) throw new RedflagError('INVALID_ARGUMENT', `step must be a non-negative integer, got ${String(step)}`);
    let first = 0;
    for (let epoch = 0; epoch < this.#epochs; epoch++) {
      const plan = this.#plan(epoch);
      const end = first + plan.batches.length;
      for (let s = Math.max(step, first); s < end; s++) yield this.#batch(plan.batches[s - first] as number[], epoch, s - first, s);
      first = end;
    }
  }

  /** Counts describing the data and the schedule. */
  report(): BatchReport {
    let truncated = 0;
    let tokens = 0;
    this.#examples.forEach((item, index) => {
      if ((item as { truncated?: unknown }).truncated === true) truncated++;
      tokens += this.#lengths[index] as number;
    });
    const stepsPerEpoch = Array.from({ length: this.#epochs }, (_, epoch) => this.stepsInEpoch(epoch));
    return {
      examples: this.#examples.length,
      harmful: this.#harmful.length,
      benign: this.#benign.length,
      truncated,
      skipped: this.#skipped,
      tokens,
      examplesPerEpoch: this.#perEpoch,
      harmfulPerEpoch: this.#harmfulPerEpoch,
      benignPerEpoch: this.#perEpoch - this.#harmfulPerEpoch,
      epochs: this.#epochs,
      stepsPerEpoch,
      totalSteps: stepsPerEpoch.reduce((a, b) => a + b, 0),
    };
  }

  /** {@link BatchSampler.report} in one line, for logs. */
  summary(): string {
    const r = this.report();
    return (
      `${r.examples} examples (${r.harmful} harmful, ${r.benign} benign; ${r.truncated} truncated, ${r.skipped} skipped; ${r.tokens} tokens); ` +
      `${r.examplesPerEpoch} per epoch (${r.harmfulPerEpoch} harmful), ${r.epochs} epoch(s), ${r.totalSteps} steps`
    );
  }

  #batch(indices: number[], epoch: number, stepInEpoch: number, step: number): Batch<T> {
    let tokens = 0;
    let maxLength = 0;
    let harmful = 0;
    const items = indices.map((index) => {
      const length = this.#lengths[index] as number;
      tokens += length;
      if (length > maxLength) maxLength = length;
      const item = this.#examples[index] as T;
      if (item.label === 'harmful') harmful++;
      return item;
    });
    return { step, epoch, stepInEpoch, items, indices: indices.slice(), tokens, maxLength, harmful, benign: indices.length - harmful };
  }

  /** The epoch's example sequence: the classes drawn from fresh shuffles and interleaved evenly. */
  #sequence(rng: () => number): { pools: number[][]; shares: number[] } {
    if (this.#fraction === undefined) {
      return { pools: [shuffleInPlace([...this.#harmful, ...this.#benign].sort((a, b) => a - b), rng)], shares: [1] };
    }
    const draw = (pool: readonly number[], count: number): number[] => {
      const out: number[] = [];
      while (out.length < count) for (const index of shuffleInPlace(pool.slice(), rng)) if (out.length < count) out.push(index);
      return out;
    };
    const harmful = draw(this.#harmful, this.#harmfulPerEpoch);
    const benign = draw(this.#benign, this.#perEpoch - this.#harmfulPerEpoch);
    return { pools: [harmful, benign], shares: [this.#fraction, 1 - this.#fraction] };
  }

  #plan(epoch: number): EpochPlan {
    if (!Number.isSafeInteger(epoch) || epoch < 0 || epoch >= this.#epochs) {
      throw new RedflagError('INVALID_ARGUMENT', `epoch must be an integer in [0, ${this.#epochs - 1}], got ${String(epoch)}`);
    }
    const cached = this.#plans.get(epoch);
    if (cached !== undefined) return cached;
    const rng = createRng(deriveSeed(this.#seed, epoch));
    const { pools, shares } = this.#sequence(rng);
    const total = pools.reduce((sum, pool) => sum + pool.length, 0);

    // Interleave the classes evenly, then cut the sequence into windows.
    const order: number[] = [];
    const origin: number[] = [];
    if (pools.length === 1) {
      for (const index of pools[0] as number[]) {
        order.push(index);
        origin.push(0);
      }
    } else {
      const harmful = pools[0] as number[];
      const benign = pools[1] as number[];
      let h = 0;
      let b = 0;
      for (let k = 0; k < total; k++) {
        const takeHarmful = Math.floor(((k + 1) * harmful.length) / total) > Math.floor((k * harmful.length) / total);
        if (takeHarmful) {
          order.push(harmful[h++] as number);
          origin.push(0);
        } else {
          order.push(benign[b++] as number);
          origin.push(1);
        }
      }
    }
    const meanLength = Math.max(1, order.reduce((sum, index) => sum + (this.#lengths[index] as number), 0) / Math.max(1, order.length));
    const perBatch = Math.max(1, Math.min(this.#batchSize, Math.floor(this.#maxTokens / meanLength)));
    const windowSize = this.#window * perBatch;
    const bucketing = this.#window > 1;

    const queues: Queue[] = pools.map(() => ({ items: [], head: 0 }));
    const batches: number[][] = [];
    for (let start = 0; start < order.length; start += windowSize) {
      const end = Math.min(order.length, start + windowSize);
      const lastWindow = end === order.length;
      for (const queue of queues) {
        queue.items = queue.items.slice(queue.head);
        queue.head = 0;
      }
      for (let k = start; k < end; k++) (queues[origin[k] as number] as Queue).items.push(order[k] as number);
      if (bucketing) {
        // Stable sort by length; ties keep the shuffled order.
        for (const queue of queues) {
          const rank = new Map(queue.items.map((index, position) => [index, position]));
          queue.items.sort((a, c) => (this.#lengths[a] as number) - (this.#lengths[c] as number) || (rank.get(a) as number) - (rank.get(c) as number));
        }
      }
      const windowBatches: number[][] = [];
      let partial: number[] | null = null;
      for (;;) {
        const { batch, full, taken } = this.#fill(queues, shares);
        if (batch.length === 0) break;
        if (!full && !lastWindow) {
          // Carry the unfilled batch into the next window: its examples go back to their queues.
          queues.forEach((queue, q) => (queue.head -= taken[q] as number));
          break;
        }
        if (!full) {
          // The epoch's last, unfilled batch stays last.
          if (!this.#dropLast) partial = batch;
          break;
        }
        windowBatches.push(batch);
      }
      if (bucketing) shuffleInPlace(windowBatches, rng);
      for (const batch of windowBatches) batches.push(batch);
      if (partial !== null) batches.push(partial);
    }
    const plan = { batches };
    this.#plans.set(epoch, plan);
    return plan;
  }

  /**
   * Fills one batch from the queues (taking from their fronts), choosing each time the class
   * furthest below its share. `full`: it stopped because the next example did not fit.
   */
  #fill(queues: Queue[], shares: readonly number[]): { batch: number[]; full: boolean; taken: number[] } {
    const batch: number[] = [];
    const taken = shares.map(() => 0);
    let tokens = 0;
    for (;;) {
      let choice = -1;
      let best = -Infinity;
      for (let q = 0; q < queues.length; q++) {
        const queue = queues[q] as Queue;
        if (queue.head >= queue.items.length) continue;
        const deficit = (shares[q] as number) * (batch.length + 1) - (taken[q] as number);
        if (deficit > best + 1e-12) {
          best = deficit;
          choice = q;
        }
      }
      if (choice < 0) return { batch, full: false, taken };
      const queue = queues[choice] as Queue;
      const index = queue.items[queue.head] as number;
      const length = this.#lengths[index] as number;
      if (batch.length > 0 && (batch.length + 1 > this.#batchSize || tokens + length > this.#maxTokens)) return { batch, full: true, taken };
      queue.head++;
      batch.push(index);
      taken[choice] = (taken[choice] as number) + 1;
      tokens += length;
      if (batch.length === this.#batchSize) return { batch, full: true, taken };
    }
  }
}
