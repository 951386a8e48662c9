/**
 * Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling
 * with a seeded generator so the same seed gives the same text.
 * @module
 */

/** Sampling settings (validated by the caller). */
export interface SamplingOptions {
  /** 0 = greedy (argmax). */
  temperature: number;
  /** Keep the k most likely tokens (0 = all). */
  topK: number;
  /** Keep the smallest set of tokens whose probability reaches p (1 = all). */
  topP: number;
}

/** A small, fast, seedable generator (mulberry32): uniform floats in [0, 1). */
export function createRng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Index of the largest logit (the first one on ties, as torch.argmax does). */
export function argmax(logits: Float32Array, offset = 0, length = logits.length - offset): number {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < length; i++) {
    const v = logits[offset + i]!;
    if (v > bestValue) {
      bestValue = v;
      best = i;
    }
  }
  return best;
}

/** Picks a token from one row of logits. */
export function sampleToken(logits: Float32Array, options: SamplingOptions, rng: () => number): number {
  if (options.temperature === 0) return argmax(logits);
  const n = logits.length;
  // Candidates sorted by logit, cut to top-k; softmax at the temperature; cut to top-p.
  let order = Array.from({ length: n }, (_, i) => i);
  const k = options.topK > 0 ? Math.min(options.topK, n) : n;
  if (k < n) {
    order = partialTop(logits, k);
  } else {
    order.sort((a, b) => logits[b]! - logits[a]!);
  }
  const max = logits[order[0]!]!;
  const probs = new Float64Array(order.length);
  let sum = 0;
  for (let i = 0; i < order.length; i++) {
    const p = Math.exp((logits[order[i]!]! - max) / options.temperature);
    probs[i] = p;
    sum += p;
  }
  let keep = order.length;
  if (options.topP < 1) {
    let cumulative = 0;
    for (let i = 0; i < order.length; i++) {
      cumulative += probs[i]! / sum;
      if (cumulative >= options.topP) {
        keep = i + 1;
        break;
      }
    }
  }
  let total = 0;
  for (let i = 0; i < keep; i++) total += probs[i]!;
  let r = rng() * total;
  for (let i = 0; i < keep; i++) {
    r -= probs[i]!;
    if (r < 0) return order[i]!;
  }
  return order[keep - 1]!;
}

/** The k indices with the largest logits, sorted descending. */
function partialTop(logits: Float32Array, k: number): number[] {
  const top: number[] = [];
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i]!;
    if (top.length < k) {
      top.push(i);
      if (top.length === k) top.sort((a, b) => logits[b]! - logits[a]!);
    } else if (v > logits[top[k - 1]!]!) {
      let j = k - 1;
      while (j > 0 && logits[top[j - 1]!]! < v) {
        top[j] = top[j - 1]!;
        j--;
      }
      top[j] = i;
    }
  }
  if (top.length < k) top.sort((a, b) => logits[b]! - logits[a]!);
  return top;
}
