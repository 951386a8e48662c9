/**
 * The project's seeded random generator (shuffles, synthetic data, random weights). Token
 * sampling happens natively, in the fused decode step (native/model/decode.h).
 * @module
 */

/**
 * A small, fast, seedable generator (mulberry32): uniform floats in [0, 1). `skip` starts it
 * where `skip` earlier draws would have left it (its state only ever adds a constant), so a
 * stream can be cut into parts made independently: `createRng(s, n)` continues `createRng(s)`
 * after n draws.
 */
export function createRng(seed: number, skip = 0): () => number {
  // The state is kept as int32 (`| 0`: the same bits as the uint32, so the same draws), which V8
  // stores without boxing a number above 2^31 on every draw.
  let a = rngState(seed, skip);
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** createRng's state after `skip` draws: seed + skip·0x6d2b79f5 mod 2^32 (skip reduced first: it may pass 2^32). */
function rngState(seed: number, skip: number): number {
  return ((seed >>> 0) + Math.imul(skip % 4294967296, 0x6d2b79f5)) | 0;
}

/**
 * Fills `out` with `centre + (2u - 1)·scale` for the draws u of `createRng(seed, skip)`, the same
 * float32 values a loop over that generator gives; the generator is inlined here because a call
 * per draw costs three times the draw (random weights: a 1B model is 1.2 billion draws).
 */
export function fillUniform(out: Float32Array, seed: number, skip: number, centre: number, scale: number): void {
  let a = rngState(seed, skip);
  for (let i = 0; i < out.length; i++) {
    a = (a + 0x6d2b79f5) | 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = centre + ((((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1) * scale;
  }
}
