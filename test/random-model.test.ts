import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { randomModelShapes, writeRandomModel, type RandomModelSpec } from '../lib/model/random-model.js';
import { createRng, fillUniform } from '../lib/model/sampling.js';
import { SafetensorsFile, toFloat32 } from '../lib/model/safetensors.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'rf-random-model-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('createRng', () => {
  it('skip continues the stream where that many draws leave it, past 2^32 draws too', () => {
    const whole = createRng(42);
    const draws = Array.from({ length: 1200 }, () => whole());
    for (const skip of [0, 1, 7, 1000]) {
      const part = createRng(42, skip);
      expect(Array.from({ length: 200 }, () => part())).toEqual(draws.slice(skip, skip + 200));
    }
    // The state adds a constant per draw, mod 2^32: 2^32 draws bring it back.
    const far = createRng(42, 2 ** 32 + 5);
    expect([far(), far()]).toEqual(draws.slice(5, 7));
    expect(createRng(42, 2 ** 33 + 3)()).toEqual(draws[3]);
  });
});

describe('fillUniform', () => {
  it('gives the float32 values of a loop over createRng from the same point', () => {
    for (const [seed, skip, centre, scale] of [[0, 0, 0, 1], [5, 123, 1, 0.1], [2 ** 32 - 1, 2 ** 32 + 17, 0, Math.sqrt(3 / 2048)]] as const) {
      const rng = createRng(seed, skip);
      const want = Float32Array.from({ length: 1000 }, () => centre + (rng() * 2 - 1) * scale);
      const got = new Float32Array(1000);
      fillUniform(got, seed, skip, centre, scale);
      expect(got).toEqual(want);
    }
  });
});

describe('writeRandomModel', () => {
  const spec: RandomModelSpec = {
    architecture: 'qwen3', vocabSize: 97, hiddenSize: 32, intermediateSize: 48, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 16, seed: 9,
  };

  it('is one random stream over the tensors in shape order, made tensor by tensor as written', async () => {
    const dir = join(root, 'stream');
    await writeRandomModel(dir, spec);
    // The reference: one generator drawn through every tensor in randomModelShapes order.
    const rng = createRng(9);
    const file = await SafetensorsFile.open(join(dir, 'model.safetensors'));
    try {
      const shapes = randomModelShapes(spec);
      expect([...file.tensors.keys()].sort()).toEqual(shapes.map(([name]) => name).sort());
      for (const [name, shape] of shapes) {
        const n = shape.reduce((a, b) => a * b, 1);
        const draws = Float32Array.from({ length: n }, () => rng());
        const got = toFloat32(await file.read(name));
        expect(file.info(name).shape).toEqual(shape);
        // value = centre + (2u - 1)·scale for the stream's draw u: one scale for the whole tensor.
        const centre = /norm\.weight$/.test(name) ? 1 : 0;
        const ratios = [...got].map((x, i) => (x - centre) / (2 * draws[i]! - 1)).filter((_, i) => Math.abs(2 * draws[i]! - 1) > 0.1);
        const scale = ratios[0]!;
        expect(scale, name).toBeGreaterThan(0);
        expect(Math.max(...ratios.map((r) => Math.abs(r / scale - 1))), name).toBeLessThan(1e-5);
      }
    } finally {
      await file.close();
    }
  });

  it('same spec, same bytes; an existing model is replaced only with overwrite, atomically', async () => {
    const tokenizer = { tokenizerJson: { version: '1.0', model: { type: 'BPE' } }, tokenizerConfig: { bos_token: '<s>' } };
    const a = join(root, 'a'), b = join(root, 'b');
    await writeRandomModel(a, { ...spec, dtype: 'BF16', tokenizer });
    await writeRandomModel(b, { ...spec, dtype: 'BF16', tokenizer });
    for (const f of ['model.safetensors', 'config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']) {
      expect((await readFile(join(a, f))).equals(await readFile(join(b, f))), f).toBe(true);
    }
    await expect(writeRandomModel(a, { ...spec, seed: 1, tokenizer })).rejects.toThrow(/model\.safetensors.*refusing to overwrite/);
    const before = await readFile(join(a, 'model.safetensors'));
    expect(before.equals(await readFile(join(b, 'model.safetensors')))).toBe(true);
    await writeRandomModel(a, { ...spec, seed: 1, tokenizer: { ...tokenizer, tokenizerConfig: { bos_token: '<bos>' } } }, { overwrite: true });
    expect((await readFile(join(a, 'model.safetensors'))).equals(before)).toBe(false);
    expect(JSON.parse(await readFile(join(a, 'tokenizer_config.json'), 'utf8'))).toEqual({ bos_token: '<bos>' });
    expect((await readdir(a)).sort()).toEqual(['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
  });
});
