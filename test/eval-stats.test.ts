// Detection statistics against hand-computed cases and naive O(n²) / brute-force references.
import { describe, expect, it } from 'vitest';

import {
  auprc,
  auroc,
  bootstrap,
  bootstrapTwoSample,
  chooseThreshold,
  devTestSplit,
  normalQuantile,
  rateAtThreshold,
  rateEstimate,
  rocCurve,
  tprAtFpr,
} from '../lib/eval/stats.js';
import { createRng } from '../lib/model/sampling.js';

/** The definition: P(pos > neg) + P(pos = neg) / 2 over all pairs. */
function naiveAuroc(pos: number[], neg: number[]): number {
  let s = 0;
  for (const p of pos) for (const n of neg) s += p > n ? 1 : p === n ? 0.5 : 0;
  return s / (pos.length * neg.length);
}

/** Brute force over every threshold: the best TPR with FPR ≤ max. */
function naiveTprAtFpr(pos: number[], neg: number[], max: number): number {
  let best = 0;
  for (const t of [...pos, ...neg, Infinity]) {
    const fpr = neg.filter((n) => n >= t).length / neg.length;
    const tpr = pos.filter((p) => p >= t).length / pos.length;
    if (fpr <= max && tpr > best) best = tpr;
  }
  return best;
}

/** Average precision with precision at each distinct threshold, by brute force. */
function naiveAuprc(pos: number[], neg: number[]): number {
  let sum = 0;
  for (const p of pos) {
    const tp = pos.filter((x) => x >= p).length;
    const fp = neg.filter((x) => x >= p).length;
    sum += tp / (tp + fp);
  }
  return sum / pos.length;
}

function randomScores(rng: () => number, n: number, shift: number, levels: number): number[] {
  // Quantised so ties are common.
  return Array.from({ length: n }, () => Math.round((rng() + shift) * levels) / levels);
}

describe('auroc', () => {
  it('matches hand-computed cases', () => {
    expect(auroc([0.9, 0.8], [0.1, 0.2])).toBe(1);
    expect(auroc([0.1], [0.9])).toBe(0);
    expect(auroc([0.5], [0.5])).toBe(0.5);
    // pos 0.8 beats 0.3 and ties 0.8 (1.5); pos 0.2 beats nothing (0): 1.5 / 4.
    expect(auroc([0.8, 0.2], [0.8, 0.3])).toBeCloseTo(0.375, 12);
    expect(auroc([], [1])).toBeNaN();
  });

  it('matches the O(n²) definition on random tied data', () => {
    const rng = createRng(7);
    for (let trial = 0; trial < 30; trial++) {
      const pos = randomScores(rng, 1 + Math.floor(rng() * 40), 0.3, 8);
      const neg = randomScores(rng, 1 + Math.floor(rng() * 40), 0, 8);
      expect(auroc(pos, neg)).toBeCloseTo(naiveAuroc(pos, neg), 12);
    }
  });

  it('names a bad element', () => {
    expect(() => auroc([0.1, NaN], [0])).toThrow(/positive\[1\]/);
  });
});

describe('auprc, ROC and TPR at FPR', () => {
  it('average precision by hand: ranks P N P give (1 + 2/3) / 2', () => {
    expect(auprc([0.9, 0.5], [0.7])).toBeCloseTo((1 + 2 / 3) / 2, 12);
    expect(auprc([0.9], [0.1, 0.2])).toBe(1);
  });

  it('match brute-force references on random data', () => {
    const rng = createRng(11);
    for (let trial = 0; trial < 30; trial++) {
      const pos = randomScores(rng, 1 + Math.floor(rng() * 30), 0.2, 10);
      const neg = randomScores(rng, 1 + Math.floor(rng() * 30), 0, 10);
      expect(auprc(pos, neg)).toBeCloseTo(naiveAuprc(pos, neg), 12);
      for (const max of [0, 0.01, 0.05, 0.2, 1]) expect(tprAtFpr(pos, neg, max).tpr).toBeCloseTo(naiveTprAtFpr(pos, neg, max), 12);
      // The trapezoid area under the ROC points is the AUROC (ties make diagonal segments).
      const roc = rocCurve(pos, neg);
      let area = 0;
      for (let i = 1; i < roc.length; i++) area += ((roc[i]!.fpr - roc[i - 1]!.fpr) * (roc[i]!.tpr + roc[i - 1]!.tpr)) / 2;
      expect(area).toBeCloseTo(auroc(pos, neg), 12);
      expect(roc[0]).toMatchObject({ fpr: 0, tpr: 0 });
      expect(roc[roc.length - 1]).toMatchObject({ fpr: 1, tpr: 1 });
    }
  });

  it('TPR at 0% FPR counts only positives above every negative', () => {
    expect(tprAtFpr([0.9, 0.8, 0.4], [0.5, 0.1], 0)).toMatchObject({ tpr: 2 / 3, threshold: 0.8, fpr: 0 });
  });
});

describe('thresholds', () => {
  it('chooses the lowest threshold within the FPR budget, midway to the next score', () => {
    // Negatives 0.1, 0.3; positives 0.6, 0.8: any threshold in (0.3, 0.6] is perfect.
    const t = chooseThreshold([0.6, 0.8], [0.1, 0.3], 0);
    expect(t).toBeCloseTo(0.45, 12);
    expect(rateAtThreshold([0.6, 0.8], t)).toBe(1);
    expect(rateAtThreshold([0.1, 0.3], t)).toBe(0);
    // A negative above every positive: within 0% FPR nothing can be flagged.
    expect(chooseThreshold([0.5], [0.9], 0)).toBeGreaterThan(0.9);
  });

  it('splits dev and test disjointly and deterministically', () => {
    const a = devTestSplit(20, 0.3, 1);
    expect(a.dev).toHaveLength(6);
    expect(new Set([...a.dev, ...a.test]).size).toBe(20);
    expect(devTestSplit(20, 0.3, 1)).toEqual(a);
    expect(devTestSplit(1, 0.5, 0)).toEqual({ dev: [], test: [0] });
  });
});

describe('rateEstimate (Wilson score interval)', () => {
  const hits = (k: number, n: number) => Array.from({ length: n }, (_, i) => i < k);

  it('never collapses to a point at 0/n or n/n', () => {
    const none = rateEstimate(hits(0, 25));
    expect(none.value).toBe(0);
    expect(none.low).toBe(0);
    expect(none.high).toBeCloseTo(0.1332, 4);
    const all = rateEstimate(hits(25, 25));
    expect(all.value).toBe(1);
    expect(all.low).toBeCloseTo(0.8668, 4);
    expect(all.high).toBe(1);
  });

  it('equals the hand-computed interval at 6/20', () => {
    // p = 0.3, z = 1.959964, z²/n = 0.192073: centre (0.3 + 0.096036) / 1.192073 = 0.332225,
    // half 1.959964 / 1.192073 · sqrt(0.21/20 + 3.841459/1600) = 0.186748.
    const e = rateEstimate(hits(6, 20));
    expect(e.value).toBeCloseTo(0.3, 12);
    expect(e.low).toBeCloseTo(0.145477, 5);
    expect(e.high).toBeCloseTo(0.518973, 5);
    // A lower level, a narrower interval; an empty sample has no interval.
    const e90 = rateEstimate(hits(6, 20), { level: 0.9 });
    expect(e90.high - e90.low).toBeLessThan(e.high - e.low);
    expect(rateEstimate([])).toEqual({ value: NaN, low: NaN, high: NaN });
    expect(() => rateEstimate([true], { level: 1 })).toThrow(/level/);
  });

  it('normalQuantile gives the 95% z', () => {
    expect(normalQuantile(0.975)).toBeCloseTo(1.959963985, 7);
    expect(normalQuantile(0.005)).toBeCloseTo(-2.575829304, 7);
    expect(normalQuantile(0.5)).toBe(0);
  });
});

describe('bootstrap', () => {
  it('a constant statistic has a zero-width interval; two-sample keeps both classes', () => {
    expect(bootstrap([1, 2, 3], () => 4, { resamples: 50 })).toEqual({ value: 4, low: 4, high: 4 });
    const sizes: number[] = [];
    bootstrapTwoSample([1, 2, 3], [0, 0], (p, n) => (sizes.push(p.length * 10 + n.length), auroc(p, n)), { resamples: 20 });
    expect(new Set(sizes)).toEqual(new Set([32]));
  });
});
