// The batch sampler: seeded shuffling, harmful/benign ratio, token budget, bucketing, epochs,
// determinism and resuming.
import { describe, expect, it } from 'vitest';

import { BatchSampler, deriveSeed, seededShuffle, shuffleInPlace, type Batch } from '../lib/data/batches.js';
import type { Label } from '../lib/data/records.js';
import { createRng } from '../lib/model/sampling.js';

interface Item {
  label: Label;
  length: number;
  truncated?: boolean;
  source: string;
}

/** `harmful` harmful and `benign` benign items with lengths from a seeded generator. */
function items(harmful: number, benign: number, seed = 7, maxLength = 200): Item[] {
  const rng = createRng(seed);
  const out: Item[] = [];
  for (let i = 0; i < harmful + benign; i++) {
    out.push({ label: i < harmful ? 'harmful' : 'benign', length: 10 + Math.floor(rng() * (maxLength - 10)), source: `item:${i}`, truncated: i % 10 === 0 });
  }
  return seededShuffle(out, seed + 1);
}
const tokenCount = (item: Item): number => item.length;
const all = <T>(generator: Iterable<T>): T[] => Array.from(generator);
const indicesOf = (batches: Batch<Item>[]): number[][] => batches.map((batch) => batch.indices);

describe('seeded shuffling', () => {
  it('is a permutation, the same for a seed and different across seeds', () => {
    const values = Array.from({ length: 100 }, (_, i) => i);
    const a = seededShuffle(values, 1);
    expect(a.slice().sort((x, y) => x - y)).toEqual(values);
    expect(seededShuffle(values, 1)).toEqual(a);
    expect(seededShuffle(values, 2)).not.toEqual(a);
    expect(values[0]).toBe(0); // the input is not touched
    const inPlace = values.slice();
    expect(shuffleInPlace(inPlace, createRng(1))).toBe(inPlace);
    expect(inPlace).toEqual(a);
  });

  it('is uniform enough: each value lands in each slot about equally often', () => {
    const counts = Array.from({ length: 4 }, () => new Array<number>(4).fill(0));
    const rng = createRng(3);
    for (let t = 0; t < 8000; t++) shuffleInPlace([0, 1, 2, 3], rng).forEach((value, slot) => (counts[value]![slot]! += 1));
    for (const row of counts) for (const count of row) expect(Math.abs(count - 2000)).toBeLessThan(150);
  });

  it('derives distinct seeds for distinct streams', () => {
    const seeds = new Set<number>();
    for (let epoch = 0; epoch < 1000; epoch++) seeds.add(deriveSeed(42, epoch));
    expect(seeds.size).toBe(1000);
    expect(deriveSeed(42, 3)).toBe(deriveSeed(42, 3));
    expect(deriveSeed(42, 3)).not.toBe(deriveSeed(43, 3));
  });
});

describe('harmful/benign ratio', () => {
  it('mixes the classes at the configured fraction in every batch, repeating the short class', () => {
    const data = items(30, 90);
    const sampler = new BatchSampler(data, { seed: 1, batchSize: 8, harmfulFraction: 0.5, tokenCount, epochs: 2 });
    const report = sampler.report();
    expect([report.examplesPerEpoch, report.harmfulPerEpoch, report.benignPerEpoch]).toEqual([180, 90, 90]);
    for (let epoch = 0; epoch < 2; epoch++) {
      const batches = sampler.epochBatches(epoch);
      expect(batches).toHaveLength(Math.ceil(180 / 8));
      for (const batch of batches) {
        expect(batch.items.every((item) => data[batch.indices[batch.items.indexOf(item)]!] === item)).toBe(true);
        if (batch.items.length === 8) expect([batch.harmful, batch.benign]).toEqual([4, 4]);
      }
      // Every benign example once; every harmful one three times (three fresh passes).
      const seen = new Map<number, number>();
      for (const batch of batches) for (const index of batch.indices) seen.set(index, (seen.get(index) ?? 0) + 1);
      data.forEach((item, index) => expect(seen.get(index)).toBe(item.label === 'harmful' ? 3 : 1));
    }
  });

  it('supports other fractions, all-one-class, and the natural mix', () => {
    const data = items(40, 40);
    const quarter = new BatchSampler(data, { seed: 2, batchSize: 8, harmfulFraction: 0.25, tokenCount, bucketWindow: 1 });
    const batches = all(quarter.batches());
    expect(quarter.report().examplesPerEpoch).toBe(160);
    for (const batch of batches) expect(batch.harmful).toBe(2);
    const harmfulOnly = new BatchSampler(data, { seed: 2, batchSize: 8, harmfulFraction: 1, tokenCount });
    expect(all(harmfulOnly.batches()).every((batch) => batch.benign === 0)).toBe(true);
    expect(harmfulOnly.report().examplesPerEpoch).toBe(40);
    const natural = new BatchSampler(data, { seed: 2, batchSize: 8, tokenCount });
    const naturalBatches = all(natural.batches());
    expect(naturalBatches.flatMap((batch) => batch.indices).sort((a, b) => a - b)).toEqual(data.map((_, i) => i));
  });

  it('honours examplesPerEpoch', () => {
    const sampler = new BatchSampler(items(10, 10), { seed: 3, batchSize: 4, harmfulFraction: 0.5, examplesPerEpoch: 8, tokenCount });
    const batches = all(sampler.batches());
    expect(batches.map((batch) => [batch.harmful, batch.benign])).toEqual([
      [2, 2],
      [2, 2],
    ]);
  });
});

describe('token budget and bucketing', () => {
  it('keeps every batch within maxTokensPerBatch and covers each example once per epoch', () => {
    const data = items(60, 60);
    const sampler = new BatchSampler(data, { seed: 4, maxTokensPerBatch: 1000, tokenCount, epochs: 3 });
    for (let epoch = 0; epoch < 3; epoch++) {
      const batches = sampler.epochBatches(epoch);
      for (const batch of batches) {
        expect(batch.tokens).toBeLessThanOrEqual(1000);
        expect(batch.tokens).toBe(batch.items.reduce((sum, item) => sum + item.length, 0));
        expect(batch.maxLength).toBe(Math.max(...batch.items.map((item) => item.length)));
      }
      expect(batches.flatMap((batch) => batch.indices).sort((a, b) => a - b)).toEqual(data.map((_, i) => i));
    }
  });

  it('groups similar lengths together (smaller spread within batches than without bucketing)', () => {
    const data = items(200, 200, 11, 1000);
    const spread = (bucketWindow: number): number => {
      const sampler = new BatchSampler(data, { seed: 5, batchSize: 16, harmfulFraction: 0.5, bucketWindow, tokenCount });
      const batches = all(sampler.batches());
      let total = 0;
      for (const batch of batches) {
        const lengths = batch.items.map((item) => item.length);
        total += Math.max(...lengths) - Math.min(...lengths);
      }
      return total / batches.length;
    };
    const unbucketed = spread(1);
    const bucketed = spread(16);
    expect(bucketed).toBeLessThan(unbucketed / 3);
  });

  it('does not order batches by length within an epoch', () => {
    const sampler = new BatchSampler(items(100, 100, 12, 1000), { seed: 6, batchSize: 8, harmfulFraction: 0.5, bucketWindow: 25, tokenCount });
    const lengths = all(sampler.batches()).map((batch) => batch.maxLength);
    const sorted = lengths.slice().sort((a, b) => a - b);
    expect(lengths).not.toEqual(sorted);
  });

  it('drops a short last batch with dropLast', () => {
    const data = items(11, 10);
    const kept = new BatchSampler(data, { seed: 7, batchSize: 4, tokenCount });
    const dropped = new BatchSampler(data, { seed: 7, batchSize: 4, tokenCount, dropLast: true });
    expect(all(kept.batches()).map((batch) => batch.items.length)).toEqual([4, 4, 4, 4, 4, 1]);
    expect(all(dropped.batches()).map((batch) => batch.items.length)).toEqual([4, 4, 4, 4, 4]);
  });
});

describe('determinism and resume', () => {
  const options = { seed: 9, batchSize: 6, harmfulFraction: 0.5, epochs: 3, tokenCount, maxTokensPerBatch: 700 };

  it('gives the same batches for the same seed, and different ones for another seed or epoch', () => {
    const data = items(25, 50);
    const a = all(new BatchSampler(data, options).batches());
    const b = all(new BatchSampler(data, options).batches());
    expect(indicesOf(b)).toEqual(indicesOf(a));
    const c = all(new BatchSampler(data, { ...options, seed: 10 }).batches());
    expect(indicesOf(c)).not.toEqual(indicesOf(a));
    const sampler = new BatchSampler(data, options);
    expect(indicesOf(sampler.epochBatches(1))).not.toEqual(indicesOf(sampler.epochBatches(0)));
    expect(a.map((batch) => batch.step)).toEqual(a.map((_, i) => i));
    expect(a.at(-1)?.epoch).toBe(2);
  });

  it('resume(step) reproduces the remaining batches exactly, across epoch boundaries', () => {
    const data = items(25, 50);
    const reference = all(new BatchSampler(data, options).batches());
    const perEpoch = new BatchSampler(data, options).stepsInEpoch(0);
    for (const step of [0, 1, 7, perEpoch - 1, perEpoch, perEpoch + 3, reference.length - 1, reference.length]) {
      const fresh = new BatchSampler(data, options); // a new process resuming from a checkpoint
      const resumed = all(fresh.resume(step));
      expect(resumed).toEqual(reference.slice(step));
    }
    expect(() => all(new BatchSampler(data, options).resume(-1))).toThrow('step must be a non-negative integer, got -1');
  });
});

describe('reports and errors', () => {
  it('reports counts and a summary line', () => {
    const data = items(20, 30);
    const sampler = new BatchSampler(data, { seed: 1, batchSize: 5, harmfulFraction: 0.5, tokenCount, skipped: 4, epochs: 2 });
    const report = sampler.report();
    expect(report).toMatchObject({ examples: 50, harmful: 20, benign: 30, truncated: 5, skipped: 4, examplesPerEpoch: 60, harmfulPerEpoch: 30, benignPerEpoch: 30, epochs: 2 });
    expect(report.tokens).toBe(data.reduce((sum, item) => sum + item.length, 0));
    expect(report.stepsPerEpoch).toEqual([12, 12]);
    expect(report.totalSteps).toBe(24);
    expect(sampler.totalSteps).toBe(24);
    expect(sampler.summary()).toBe(`50 examples (20 harmful, 30 benign; 5 truncated, 4 skipped; ${report.tokens} tokens); 60 per epoch (30 harmful), 2 epoch(s), 24 steps`);
  });

  it('reads lengths from ids by default', () => {
    const encoded = [
      { label: 'harmful' as const, ids: [1, 2, 3] },
      { label: 'benign' as const, ids: [1, 2] },
    ];
    const batches = all(new BatchSampler(encoded, { seed: 1, batchSize: 2 }).batches());
    expect(batches[0]?.tokens).toBe(5);
  });

  it('rejects bad data and options with clear messages', () => {
    const data = items(3, 3);
    expect(() => new BatchSampler([], { seed: 1, batchSize: 2 })).toThrow('the batch sampler needs a non-empty array of examples');
    expect(() => new BatchSampler(data, { seed: 1, tokenCount })).toThrow('set batchSize, maxTokensPerBatch or both');
    expect(() => new BatchSampler(data, { seed: 1, batchSize: 0, tokenCount })).toThrow('batchSize must be an integer ≥ 1, got 0');
    expect(() => new BatchSampler(data, { seed: 1, batchSize: 2, harmfulFraction: 1.5, tokenCount })).toThrow('harmfulFraction must be in [0, 1], got 1.5');
    const benignOnly = data.filter((item) => item.label === 'benign');
    expect(() => new BatchSampler(benignOnly, { seed: 1, batchSize: 2, harmfulFraction: 0.5, tokenCount })).toThrow('harmfulFraction is 0.5 but there are no harmful examples');
    const long = [{ label: 'benign' as const, length: 50, source: 'x.jsonl:4' }];
    expect(() => new BatchSampler(long, { seed: 1, maxTokensPerBatch: 20, tokenCount })).toThrow('example 0 (x.jsonl:4) has 50 tokens, more than maxTokensPerBatch (20)');
    expect(() => new BatchSampler([{ label: 'benign' as const }], { seed: 1, batchSize: 1 })).toThrow('examples have no "ids" array: pass tokenCount');
    expect(() => new BatchSampler(data, { seed: 1, batchSize: 2, tokenCount }).epochBatches(1)).toThrow('epoch must be an integer in [0, 0], got 1');
  });
});
