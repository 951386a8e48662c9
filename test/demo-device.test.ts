// `redflag demo --device`: where the demo's adapters train, its detector answers and its
// evaluation runs. The demo itself runs in CI as `npm start`; here only what the flag changes:
// it reaches the adapters' training configs and the evaluation config, a misspelt device is
// refused naming the flag, and a device that cannot run fails with its reason before the
// language model trains or the working directory is made.
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { access, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { runDemo } from '../lib/demo.js';
import { demoEvalConfig } from '../lib/demo-eval.js';
import { parseEvalConfig } from '../lib/eval/config.js';
import { PIPELINE_SIZES, redFlagAdapterConfig, type PipelineResult } from '../lib/train/pipeline.js';
import { parseTrainConfig } from '../lib/train/config.js';

const ROOT = join(import.meta.dirname, '..');

describe('redflag demo --device', () => {
  it('the evaluation and the adapters run on the device named; the CPU stays the default', () => {
    const result = { dirs: { lm: '/w/lm', redflag: '/w/redflag', refusal: '/w/refusal' } } as PipelineResult;
    const onGpu = parseEvalConfig(demoEvalConfig(result, 8, '/w/eval', 2, 'cuda:0'));
    expect([onGpu.device, onGpu.dtype]).toEqual(['cuda:0', 'bf16']);
    const onCpu = parseEvalConfig(demoEvalConfig(result, 8, '/w/eval', 2));
    expect([onCpu.device, onCpu.dtype]).toEqual(['cpu', 'f32']);
    const options = { dir: '/w', ...PIPELINE_SIZES.small, batchSize: 8 };
    expect(parseTrainConfig(redFlagAdapterConfig({ ...options, adapterDevice: 'cuda:0' }, '/w/lm/model', '/w/rf')).device).toBe('cuda:0');
    expect(parseTrainConfig(redFlagAdapterConfig(options, '/w/lm/model', '/w/rf')).device).toBe('cpu');
  });

  it('a device that cannot run fails with its reason before anything is trained or written', async () => {
    const parent = await mkdtemp(join(tmpdir(), 'redflag-demo-device-'));
    try {
      const out = join(parent, 'demo');
      const error = await runDemo({ out, device: 'cuda' }).then(() => null, (e: unknown) => e);
      // No GPU here: the CPU build has no CUDA engine, or the CUDA build finds no device.
      expect(error).toMatchObject({ code: expect.stringMatching(/^(NATIVE|UNSUPPORTED)$/) });
      expect(String((error as Error).message)).toMatch(/cuda/i);
      await expect(access(out)).rejects.toThrow(/ENOENT/);
    } finally {
      await rm(parent, { recursive: true, force: true });
    }
  });

  it('an --out directory that holds anything is refused without --overwrite, and left as it was', async () => {
    const parent = await mkdtemp(join(tmpdir(), 'redflag-demo-out-'));
    try {
      await writeFile(join(parent, 'notes.txt'), 'mine');
      await expect(runDemo({ out: parent, small: true })).rejects.toMatchObject({
        code: 'INVALID_ARGUMENT',
        file: parent,
        message: expect.stringMatching(/is not empty, and the demo replaces what it writes there: choose a new directory, or pass --overwrite/),
      });
      expect(await readdir(parent)).toEqual(['notes.txt']);
    } finally {
      await rm(parent, { recursive: true, force: true });
    }
  });

  it('a misspelt device is refused, naming the flag', async () => {
    const run = promisify(execFile)(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'demo', '--device', 'gpu'], { cwd: ROOT, timeout: 60_000 });
    await expect(run).rejects.toMatchObject({ code: 1, stderr: expect.stringMatching(/--device.*must be 'cpu', 'cuda' or 'cuda:N'/) });
  }, 60_000);
});
