// What the device end-to-end scripts (device-e2e, device-train-e2e, device-eval-e2e) share: their
// command-line arguments, the list of checks they print as one JSON object, and the random-weight
// Llama they run on (the packaged tokenizer, so text round-trips).
import { writeRandomModel } from '../dist/index.js';
import { packagedTokenizer } from '../dist/train/pipeline.js';

/** The value after `name` on the command line, else `fallback`. */
export const arg = (name, fallback) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : fallback);

/** The device the script checks against the CPU (`--device`, default cuda). */
export const deviceArg = () => arg('--device', 'cuda');

/** What `loadModel(dir, { device })` reports as its device's name. */
export const deviceName = (device) => (device === 'cuda' ? 'cuda:0' : device);

/** Relative L2 distance of `a` from `b`. */
export function relL2(a, b) {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / (den || 1e-300));
}

/**
 * The checks of one script: `check(ok, what, detail)` records one; `finish(key, device, extra)`
 * prints `{ [key]: device, passed, failed, ...extra, checks }` and exits 1 when one failed.
 */
export function checklist() {
  const checks = [];
  return {
    checks,
    check: (ok, what, detail = {}) => checks.push({ ok: Boolean(ok), what, ...detail }),
    finish(key, device, extra = {}) {
      const failed = checks.filter((c) => !c.ok);
      console.log(JSON.stringify({ [key]: device, passed: checks.length - failed.length, failed: failed.length, ...extra, checks }, null, 1));
      process.exit(failed.length ? 1 : 0);
    },
  };
}

/**
 * A random-weight Llama (vocabulary 32000, 2 layers, GQA 4:2) in `dir`, with the packaged tokenizer;
 * or another Llama-family architecture (`architecture: 'qwen3'`), with `headDim` when given.
 */
export async function writeTinyLlama(dir, { hiddenSize = 64, seed = 3, architecture = 'llama', headDim } = {}) {
  const tokenizer = await packagedTokenizer();
  await writeRandomModel(dir, {
    architecture, vocabSize: 32000, hiddenSize, intermediateSize: 2 * hiddenSize, numLayers: 2, numHeads: 4, numKvHeads: 2,
    ...(headDim ? { headDim } : {}), seed, bosTokenId: 1, eosTokenId: 2, tokenizer,
  }, { overwrite: true });
}
