// The native boundary: one clear load error, argument checks, and serialised concurrent calls.
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';

import { loadModel } from '../lib/model/model.js';
import { loadAddonFrom, loadNative } from '../lib/native.js';
import { FIXTURES, relL2 } from './helpers/fixtures.js';

describe('the addon', () => {
  it('reports one clear error when the binary is missing', () => {
    expect(() => loadAddonFrom(['/nonexistent/build/Release/redflag.node'])).toThrow(
      /native addon is not built .*npm run build:native/,
    );
  });

  it('reports the CPU features it dispatches on', () => {
    const cpu = loadNative().cpuInfo();
    expect(cpu.avx2).toBe(true);
    expect(['avx2', 'avx512']).toContain(cpu.isa);
  });

  it('rejects calls with bad arguments instead of crashing', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    try {
      const seq = model.newSequence();
      await expect(model.forward([seq, seq], [[1], [2]])).rejects.toThrow(/twice/);
      await expect(model.forward([seq], [[1], [2]])).rejects.toThrow(/one token array per sequence/);
      await expect(model.forward([seq], [[]])).rejects.toThrow(/empty/);
      await expect(model.forward([seq], [[-1]])).rejects.toThrow(/not a token id/);
      // The native layer checks too, for callers that bypass the TypeScript checks.
      const native = model.engine;
      expect(() => native.forward([seq.native], new Uint32Array([1, 2]), new Uint32Array([1]), true)).toThrow(/do not add up/);
      await expect(native.forward([seq.native], new Uint32Array([100000]), new Uint32Array([1]), true)).rejects.toMatchObject({
        code: 'INVALID_ARGUMENT',
        message: expect.stringMatching(/outside the vocabulary/),
      });
      expect(seq.length).toBe(0);
      seq.dispose();
      await expect(model.forward([seq], [[1]])).rejects.toThrow(/not a live sequence/);
      expect(() => seq.truncate(1)).toThrow();
    } finally {
      model.dispose();
    }
  });

  it('serialises concurrent calls on one model and gets the same results', async () => {
    const model = await loadModel(join(FIXTURES, 'qwen2-bias'), { threads: 2 });
    try {
      const inputs = Array.from({ length: 8 }, (_, i) => Array.from({ length: 3 + i }, (_, j) => (i * 31 + j * 7) % 192));
      const together = await Promise.all(inputs.map((ids) => model.logits(ids)));
      for (const [i, ids] of inputs.entries()) expect(together[i]).toEqual(await model.logits(ids));
    } finally {
      model.dispose();
    }
  });

  it('keeps a sequence usable across calls and truncates it', async () => {
    const model = await loadModel(join(FIXTURES, 'mistral-swa'), { threads: 1 });
    try {
      const seq = model.newSequence();
      await model.forward([seq], [[5, 6, 7, 8]]);
      expect(seq.length).toBe(4);
      expect(seq.bytes).toBeGreaterThan(0);
      seq.truncate(2);
      const a = await model.forward([seq], [[9]]);
      const b = (await model.logits([5, 6, 9])).slice(2 * model.vocabSize);
      expect(relL2(a, b)).toBeLessThan(1e-6); // one-row and three-row GEMMs round differently
      seq.dispose();
    } finally {
      model.dispose();
    }
  });
});
