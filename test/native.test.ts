// The native boundary: one clear load error, argument checks, and serialised concurrent calls.
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';

import { rm } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { execFile, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';

import { RedflagError } from '../lib/errors.js';
import { loadModel } from '../lib/model/model.js';
import { loadAddonFrom, loadHint, loadNative, nativeError } from '../lib/native.js';
import { FIXTURES, relL2 } from './helpers/fixtures.js';
import { tinyLlama } from './helpers/tiny-model.js';

describe('the addon', () => {
  it('reports one clear error when the binary is missing', () => {
    expect(() => loadAddonFrom(['/nonexistent/build/Release/redflag.node'])).toThrow(
      /native addon is not built .*npm run build:native/,
    );
  });

  it('says what to do when a CUDA library the CUDA build needs cannot be found, and only then', () => {
    const missing = 'libcublasLt.so.12: cannot open shared object file: No such file or directory';
    expect(loadHint(missing)).toMatch(/^\. The CUDA build was linked against libcublasLt\.so\.12, which the loader no longer finds: put its folder on LD_LIBRARY_PATH, or rebuild/);
    expect(loadHint('libnccl.so.2: cannot open shared object file: No such file or directory')).toMatch(/libnccl\.so\.2/);
    expect(loadHint('/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38\' not found')).toBe('');
    expect(loadHint('libfoo.so.1: cannot open shared object file')).toBe('');
  });

  it("keeps the codes the addon's errors carry, and calls the rest NATIVE", () => {
    for (const code of ['ABORTED', 'INVALID_ARGUMENT', 'OUT_OF_MEMORY', 'DEVICE_FAILED']) {
      expect(nativeError(Object.assign(new Error('x'), { code }))).toMatchObject({ code, message: 'x' });
    }
    expect(nativeError(Object.assign(new Error('y'), { code: 'SOMETHING_ELSE' }))).toMatchObject({ code: 'NATIVE', message: 'y' });
  });

  // Each kernel source is compiled once per instruction set; an inline function or template they
  // share is then defined in both units, and the linker keeps one copy. An AVX-512 copy kept would
  // run on AVX2-only machines (illegal instruction) and no AVX-512 machine would notice.
  const addonFile = join(import.meta.dirname, '..', 'build', 'Release', 'redflag.node');
  const objdump = spawnSync('objdump', ['--version']).status === 0 && existsSync(addonFile);
  it.skipIf(!objdump)('uses AVX-512 registers only in its AVX-512 kernels', () => {
    const listing = spawnSync('objdump', ['-d', '--no-show-raw-insn', '-C', addonFile], { encoding: 'utf8', maxBuffer: 1 << 30 }).stdout;
    const offenders = new Set<string>();
    let name = '';
    let functions = 0;
    for (const line of listing.split('\n')) {
      const head = /^[0-9a-f]+ <(.*)>:$/.exec(line);
      if (head) {
        name = head[1]!;
        functions++;
      } else if (/%zmm|%k[1-7]\b/.test(line) && !name.includes('avx512::') && !name.includes('(anonymous namespace)')) offenders.add(name); // an anonymous namespace's copy is its own unit's
    }
    expect(functions).toBeGreaterThan(100);
    expect(listing).toMatch(/rf::avx512::[^\n]*>:\n(?:[^\n]*\n)*?[^\n]*%zmm/); // the scan sees the kernels' own
    expect([...offenders]).toEqual([]);
  });

  it('reports the CPU features it dispatches on', () => {
    const cpu = loadNative().cpuInfo();
    expect(cpu.avx2).toBe(true);
    expect(['avx2', 'avx512']).toContain(cpu.isa);
  });

  it('measures a bf16 FMA peak on the AVX2 path too (its bf16 kernels run f32 FMAs), so ratios to it are finite', async () => {
    const addon = process.env.REDFLAG_ADDON ?? join(import.meta.dirname, '..', 'build', 'Release', 'redflag.node');
    const code = `require(${JSON.stringify(addon)}).bench.fmaPeak(1, true, 0.05).then((g) => console.log(g))`;
    const { stdout } = await promisify(execFile)(process.execPath, ['-e', code], { env: { ...process.env, REDFLAG_ISA: 'avx2' } });
    expect(Number(stdout)).toBeGreaterThan(0);
  });

  it('counts live KV caches and the allocator\'s bytes in use (the soak\'s leak checks)', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    try {
      const before = loadNative().memoryInfo();
      const seqs = [model.newSequence(), model.newSequence(), model.newSequence()];
      seqs[0]!.native.reserve(4096);
      const during = loadNative().memoryInfo();
      expect(during.liveSequences - before.liveSequences).toBe(3);
      // glibc (the only C library this project builds against on Linux) reports bytes in use; the
      // reserved cache alone is 2 (k, v) × layers × kv heads × 4096 × head_dim f32.
      const cacheBytes = seqs[0]!.native.bytes;
      expect(cacheBytes).toBeGreaterThan(1 << 20);
      expect(during.mallocInUseBytes! - before.mallocInUseBytes!).toBeGreaterThanOrEqual(cacheBytes);
      for (const s of seqs) s.dispose();
      const after = loadNative().memoryInfo();
      expect(after.liveSequences).toBe(before.liveSequences);
      // Freed again (a little slack for what the calls themselves allocate).
      expect(after.mallocInUseBytes! - before.mallocInUseBytes!).toBeLessThan(cacheBytes / 4);
    } finally {
      model.dispose();
    }
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
      // The benchmarks' sizes too (a negative size overran a buffer).
      const { bench } = loadNative();
      expect(() => bench.memBandwidth(1, -1e6, true)).toThrow(/memBandwidth: bytesPerArray must be a number from 4096 to/);
      expect(() => bench.gemmTime(0, 8, 8, 'f32', 1, 0)).toThrow(/gemmTime: M must be a number from 1/);
      expect(() => bench.fmaPeak(1, false, Number.NaN)).toThrow(/fmaPeak: seconds must be a number from 0 to 3600/);
      const other = model.newSequence();
      expect(() => native.forward([seq.native, other.native], new Uint32Array([1]), new Uint32Array([1, 0]), false)).toThrow(/sequences\[1\] has no tokens/);
      other.dispose();
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

  it('checks every decode step\'s tokens and pick options, naming the bad one, and leaves the sequences as they were', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    try {
      const [a, b] = [model.newSequence(), model.newSequence()];
      const ok = { temperature: 0.7, topK: 5, topP: 0.9, seed: 3 };
      const cases: Array<[unknown[][], object[], RegExp]> = [
        [[[1], [2, 256]], [ok, ok], /tokens\[1\]\[1\] = 256 is not a token id of this model \(0 to 255\)/],
        [[[1], []], [ok, ok], /tokens\[1\] is empty/],
        [[[1], [2.5]], [ok, ok], /tokens\[1\]\[0\] = 2\.5 is not a token id/],
        [[[1], [2]], [ok], /one pick option object per sequence/],
        [[[1], [2]], [ok, { ...ok, temperature: -1 }], /picks\[1\]: temperature must be a finite number >= 0, got -1/],
        [[[1], [2]], [ok, { ...ok, temperature: Number.NaN }], /picks\[1\]: temperature must be a finite number/],
        [[[1], [2]], [ok, { ...ok, temperature: '0.5' }], /picks\[1\]: temperature must be a finite number/],
        [[[1], [2]], [{ ...ok, topK: 1.5 }, ok], /picks\[0\]: topK must be a non-negative integer, got 1\.5/],
        [[[1], [2]], [ok, { ...ok, topP: 0 }], /picks\[1\]: topP must be in \(0, 1\], got 0/],
        [[[1], [2]], [ok, { ...ok, topP: 1.5 }], /picks\[1\]: topP must be in \(0, 1\]/],
        [[[1], [2]], [ok, { ...ok, seed: -1 }], /picks\[1\]: seed must be an integer from 0 to 2\^53 - 1, got -1/],
        [[[1], [2]], [ok, { ...ok, seed: 2 ** 53 }], /picks\[1\]: seed must be an integer/],
      ];
      for (const [tokens, picks, message] of cases) {
        await expect(model.step([a, b], tokens as number[][], picks), String(message)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(message) });
      }
      expect([a.length, b.length]).toEqual([0, 0]);
      await expect(model.step([a, a], [[1], [2]], [ok, ok])).rejects.toThrow(/a sequence appears twice in one step call/);
      // Defaults filled in: greedy, and the same token as an explicit greedy pick.
      const greedy = await model.step([a], [[1, 2, 3]], [{}]);
      const explicit = await model.step([b], [[1, 2, 3]], [{ temperature: 0, topK: 0, topP: 1, seed: 0 }]);
      expect(greedy.tokens).toEqual(explicit.tokens);
      expect([a.length, b.length]).toEqual([3, 3]);
    } finally {
      model.dispose();
    }
  });

  it('dispose() lets the calls made before it finish, then frees; later calls fail with DISPOSED', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    const want = await model.logits([1, 2, 3]);
    const [a, b] = [model.newSequence(), model.newSequence()];
    const running = model.forward([a], [[1, 2, 3]], { all: true });
    const queued = model.forward([b], [[1, 2, 3]], { all: true });
    model.dispose();
    expect(await running).toEqual(want);
    expect(await queued).toEqual(want);
    await expect(model.logits([1])).rejects.toMatchObject({ code: 'DISPOSED' });
    expect(() => model.weightBytes).toThrow(expect.objectContaining({ code: 'DISPOSED' }));
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

  it('refuses to re-lay-out or cut a sequence while a call on it is in flight', async () => {
    const dir = await tinyLlama();
    const model = await loadModel(dir, { threads: 1 });
    try {
      const [seq, idle] = [model.newSequence(), model.newSequence()];
      const ids = Array.from({ length: 100 }, (_, i) => (i * 7) % 192);
      // The raw binding starts the work at once (Model.forward would queue it a microtask later);
      // every position's logits make it last long enough (milliseconds) to be in flight below.
      const running = model.engine.forward([seq.native], Uint32Array.from(ids), Uint32Array.of(ids.length), true);
      for (const change of [() => seq.reserve(4096), () => seq.truncate(0)]) {
        expect(change).toThrow(RedflagError);
        expect(change).toThrow(/in use by a call in flight; change it once that call has settled/);
      }
      idle.reserve(64); // another sequence is free to change
      const logits = await running;
      expect(relL2(logits, await model.logits(ids))).toBeLessThan(1e-6);
      seq.reserve(4096);
      seq.truncate(1);
      expect(seq.length).toBe(1);
      seq.dispose();
      idle.dispose();
    } finally {
      model.dispose();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('samples from every token with a topK at or past the vocabulary, however large', async () => {
    const dir = await tinyLlama({ hiddenSize: 32, intermediateSize: 64 });
    const model = await loadModel(dir, { threads: 1 });
    try {
      const draw = async (topK: number) => {
        const seqs = Array.from({ length: 32 }, () => model.newSequence());
        const r = await model.step(seqs, seqs.map(() => [1, 450]), seqs.map((_, i) => ({ temperature: 50, topK, seed: i })));
        for (const q of seqs) q.dispose();
        return Array.from(r.tokens);
      };
      const all = await draw(0);
      expect(await draw(model.vocabSize)).toEqual(all);
      expect(await draw(2 ** 31)).toEqual(all);
      expect(await draw(2 ** 40)).toEqual(all);
    } finally {
      model.dispose();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('works in worker threads beside the main thread (each environment its own classes)', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    try {
      const want = await model.logits([1, 2, 3]);
      // A worker loads the addon too and makes a sequence, then exits; the main thread goes on.
      const addon = process.env.REDFLAG_ADDON ?? join(import.meta.dirname, '..', 'build', 'Release', 'redflag.node');
      const code = `
        const { parentPort, workerData } = require('node:worker_threads');
        const addon = require(workerData);
        const config = { arch: 'llama', vocab: 16, hidden: 8, intermediate: 16, nLayers: 1, nHeads: 2, nKvHeads: 2, headDim: 4, maxPositions: 8,
          norm: 'rms', normEps: 1e-5, act: 'silu', rope: true, ropeTheta: 10000, ropeScaling: 'none', ropeFactor: 1, ropeLowFreqFactor: 1,
          ropeHighFreqFactor: 4, ropeOriginalMaxPositions: 8, qkvBias: false, oBias: false, qkNorm: false, mlpBias: false, tiedEmbeddings: true, slidingWindow: 0 };
        const m = new addon.NativeModel(config, 'f32', 1);
        parentPort.postMessage(m.newSequence().constructor.name);`;
      const worker = new Worker(code, { eval: true, workerData: addon });
      const made = await new Promise((resolve, reject) => worker.once('message', resolve).once('error', reject));
      expect(made).toBe('NativeSequence');
      expect(await model.logits([1, 2, 3])).toEqual(want); // while the worker is alive
      await worker.terminate();
      expect(await model.logits([1, 2, 3])).toEqual(want); // and after it is gone
    } finally {
      model.dispose();
    }
  });

  it('a refused adapter or trainer call leaves the model as it was; a trainer started as the model is disposed goes with it', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    const native = model.engine;
    const lora = { mode: 'lora' as const, rank: 2, alpha: 4, dropout: 0, rslora: false, targets: ['q_proj'], seed: 1 };
    try {
      await expect(native.trainInit({ ...lora, rfToken: 100000 })).rejects.toThrow(/red-flag token outside the vocabulary/);
      expect(native.params()).toEqual([]);
      await native.trainInit({ ...lora, rfToken: -1 });
      native.trainEnd();
      native.clearAdapters();
      const H = model.config.hiddenSize;
      expect(() => native.setTokenRows(100000, new Float32Array(H), new Float32Array(H))).toThrow(/outside the vocabulary/);
      native.setTokenRows(7, new Float32Array(H), new Float32Array(H));
      const [A, B] = [new Float32Array(2 * H), new Float32Array(2 * H)];
      expect(() => native.addLora(99, 'o_proj', A, B, 2, 1)).toThrow(/LoRA layer out of range/);
      native.addLora(0, 'o_proj', A, B, 2, 1);
      native.clearAdapters();
      const starting = native.trainInit({ ...lora, rfToken: -1 });
      model.dispose();
      await expect(starting).rejects.toThrow(/the model was disposed/);
      expect(() => native.params()).toThrow(/the model was disposed/);
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

  // The plumbing of trainStep's input-embedding options (native/tests/test_train.cpp checks the
  // gradient itself against finite differences element by element): a zero perturbation changes
  // nothing, the returned gradient predicts the loss change along a random direction, and a
  // perturbation of the wrong size is refused.
  it('perturbs the input embeddings and returns their gradient from trainStep', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 2 });
    const native = model.engine;
    try {
      await native.trainInit({ mode: 'lora', rank: 2, alpha: 4, dropout: 0, rslora: false, targets: ['q_proj', 'down_proj'], rfToken: -1, seed: 1 });
      const tokens = Uint32Array.of(3, 17, 40, 9, 120, 77, 5, 31, 64, 200);
      const counts = Uint32Array.of(6, 4);
      const rows = Int32Array.from(Array.from({ length: 9 }, (_, r) => (r === 5 ? [] : [3, r, -1, -1, (r * 37 + 11) % 256])).flat());
      const options = { aggregation: 'any' as const, alphaBenign: 1, alphaRf: 1, alphaAfter: 1, alphaCe: 1, gradScale: 1, dropoutSeed: 0 };
      const H = model.config.hiddenSize;
      const none = new Uint32Array(0);
      const loss = async (delta?: Float32Array, grad = false) =>
        native.trainStep(tokens, counts, none, none, rows, options, undefined, { ...(delta ? { embedDelta: delta } : {}), embedGrad: grad });

      const plain = await loss();
      expect(plain.embedGrad).toBeUndefined();
      expect((await loss(new Float32Array(tokens.length * H))).total).toBe(plain.total);

      let seed = 7;
      const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * 0.1;
      const delta = Float32Array.from({ length: tokens.length * H }, random);
      const direction = Float32Array.from({ length: tokens.length * H }, random);
      const { embedGrad } = await loss(delta, true);
      expect(embedGrad).toBeInstanceOf(Float32Array);
      expect(embedGrad!.length).toBe(tokens.length * H);
      const eps = 1e-2;
      const along = (s: number) => Float32Array.from(delta, (d, i) => d + s * eps * direction[i]!);
      const numeric = ((await loss(along(1))).total - (await loss(along(-1))).total) / (2 * eps);
      const analytic = embedGrad!.reduce((sum, g, i) => sum + g * direction[i]!, 0);
      expect(Math.abs(numeric)).toBeGreaterThan(1e-4);
      expect(Math.abs(analytic - numeric)).toBeLessThan(0.03 * Math.abs(numeric) + 1e-4);

      await expect(loss(new Float32Array(5))).rejects.toThrow(/embedDelta must hold tokens x hidden/);
    } finally {
      native.trainEnd();
      model.dispose();
    }
  });
});
