// Training that runs out of (GPU) memory mid-run: the engine's train step fails with
// OUT_OF_MEMORY (here injected into the CPU engine, as a GPU's would fail), the run stops with a
// checkpoint of the steps done and a message saying how to go on, and --resume, with recompute
// changed (it changes memory, not results), finishes the run as if nothing had happened. And a
// GPU that fails (DEVICE_FAILED: nothing more can be read from it): the run stops without a
// checkpoint, naming the last one on disk, from which --resume finishes the run the same.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { RedflagError } from '../lib/errors.js';
import { configDifferences, findCheckpoint } from '../lib/train/checkpoint.js';
import { parseTrainConfig } from '../lib/train/config.js';
import { train } from '../lib/train/trainer.js';
import { tinyLlama } from './helpers/tiny-model.js';
import { smallTrainConfig } from './helpers/train-config.js';

// Which engine train step (counted from 1) fails, and how; null: none.
let failAt: number | null = null;
let failure = new RedflagError('OUT_OF_MEMORY', 'out of GPU memory on cuda:0 allocating scratch (a test\'s failure)');
let trainSteps = 0;

vi.mock('../lib/model/model.js', async (importOriginal) => {
  const original = await importOriginal<typeof import('../lib/model/model.js')>();
  return {
    ...original,
    loadModel: async (...args: Parameters<typeof original.loadModel>) => {
      const model = await original.loadModel(...args);
      const engine = model.engine;
      // The native object's methods are read-only: a proxy stands in for it.
      const proxy = new Proxy(engine, {
        get(target, key) {
          if (key === 'trainStep' && failAt !== null && ++trainSteps === failAt) {
            return () => {
              throw failure;
            };
          }
          const value: unknown = Reflect.get(target, key);
          return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
        },
      });
      Object.defineProperty(model, 'engine', { value: proxy });
      return model;
    },
  };
});

let base: string;
let dir: string;

beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, numKvHeads: 1 });
  dir = await mkdtemp(join(tmpdir(), 'redflag-train-oom-'));
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(dir, { recursive: true, force: true });
});

// Five steps, checkpoints only when the run stops.
const config = (output: string) => smallTrainConfig(base, dir, output, { steps: 5, checkpointEvery: 0 });

describe('train: out of memory', () => {
  it('stops with a checkpoint of the steps done, and --resume finishes the run as an uninterrupted one', async () => {
    failAt = null;
    const whole = await train(parseTrainConfig(config('whole')));
    expect(whole.steps).toBe(5);

    failAt = 4; // the fourth step: three are done
    trainSteps = 0;
    const stopped = train(parseTrainConfig(config('oom')));
    await expect(stopped).rejects.toMatchObject({ code: 'OUT_OF_MEMORY' });
    await expect(stopped).rejects.toThrow(/out of GPU memory on cuda:0.*Training stopped at step 3 with a checkpoint written: resume it \(--resume\) with recompute on/);
    expect((await findCheckpoint(join(dir, 'oom')))?.step).toBe(3);

    // Resumed. The message's advice holds: recompute (a GPU option) is no difference to a resume.
    const saved = parseTrainConfig(config('oom'));
    expect(configDifferences(saved, { ...saved, recompute: true })).toEqual([]);
    failAt = null;
    const resumed = await train(parseTrainConfig(config('oom')), { resume: true });
    expect(resumed.steps).toBe(5);
    const adapter = (name: string) => readFile(join(dir, name, 'adapter', 'adapter_model.safetensors'));
    expect((await adapter('oom')).equals(await adapter('whole'))).toBe(true);
  });

  it('a GPU that fails stops the run, naming the last checkpoint on disk, and --resume from it finishes the run the same', async () => {
    failAt = null;
    const whole = await train(parseTrainConfig(config('whole-dev')));
    failure = new RedflagError('DEVICE_FAILED', 'the GPU cuda:0 failed (a test\'s fault); its CUDA context is lost');
    try {
      const every2 = (output: string) => ({ ...parseTrainConfig(config(output)), checkpointEvery: 2 });
      failAt = 4; // in the fourth step: checkpoint at 2, none written when the GPU fails
      trainSteps = 0;
      const stopped = train(every2('dev'));
      await expect(stopped).rejects.toMatchObject({ code: 'DEVICE_FAILED' });
      await expect(stopped).rejects.toThrow(/a test's fault.*Training stopped at step 3: start a new process and resume from the checkpoint of step 2 \(--resume\)/);
      expect((await findCheckpoint(join(dir, 'dev')))?.step).toBe(2);
      failAt = null;
      expect((await train(every2('dev'), { resume: true })).steps).toBe(5);
      const adapter = (name: string) => readFile(join(dir, name, 'adapter', 'adapter_model.safetensors'));
      expect((await adapter('dev')).equals(await adapter('whole-dev'))).toBe(true);

      failAt = 1;
      trainSteps = 0;
      await expect(train(every2('dev-first'))).rejects.toThrow(/Training stopped at step 0: no checkpoint was written yet: start again in a new process/);
      expect(await findCheckpoint(join(dir, 'dev-first'))).toBeNull();
      expect(whole.steps).toBe(5);
    } finally {
      failAt = null;
      failure = new RedflagError('OUT_OF_MEMORY', 'out of GPU memory on cuda:0 allocating scratch (a test\'s failure)');
    }
  });
});
