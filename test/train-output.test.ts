// What `redflag train` does with its output directory and the files it reads: a bad output path
// is a one-line error naming it; a user's adapter/model is never overwritten without
// --overwrite; a resume refused for a changed configuration names the fields; the previous
// checkpoint layout, killed between its two renames (no checkpoint/ but two copies beside it),
// still resumes to the uninterrupted result; quoted file contents never carry raw control bytes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { cp, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { findCheckpoint, lockOutput } from '../lib/train/checkpoint.js';
import { loadTrainConfig, type TrainConfigInput } from '../lib/train/config.js';
import { train } from '../lib/train/trainer.js';
import { tinyLlama } from './helpers/tiny-model.js';
import { smallTrainConfig } from './helpers/train-config.js';

const ROOT = join(import.meta.dirname, '..');
let base: string;
let dir: string;

beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, numKvHeads: 1 });
  dir = await mkdtemp(join(tmpdir(), 'redflag-train-output-'));
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(dir, { recursive: true, force: true });
});

const config = (output: string, extra: Partial<TrainConfigInput> = {}) => smallTrainConfig(base, dir, output, extra);

function cli(args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { cwd: ROOT });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.stdout.resume();
    child.on('close', (code) => resolve({ code, stderr }));
  });
}

describe('train: the output directory and error messages', () => {
  it('refuses an output that is a file, or under a file, in one line naming it', async () => {
    const file = join(dir, 'a-file');
    await writeFile(file, 'mine\n');
    for (const [output, why] of [
      [file, 'is a file, not a directory'],
      [join(file, 'sub'), 'is under a file, not a directory'],
    ] as const) {
      const r = await cli(['train', '--model', base, '--output', output, '--synthetic', '--steps', '1']);
      expect(r.code).toBe(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toBe(`redflag: the output ${output} ${why}`);
    }
    expect(await readFile(file, 'utf8')).toBe('mine\n');
  }, 120_000);

  it("never overwrites a user's adapter without --overwrite", async () => {
    const out = join(dir, 'users');
    await mkdir(join(out, 'adapter'), { recursive: true });
    await writeFile(join(out, 'adapter', 'adapter_config.json'), '{"mine": true}');
    await expect(train(config('users'))).rejects.toThrow(/users\/adapter already exists and no checkpoint of this run is beside it: pass --overwrite/);
    expect(await readFile(join(out, 'adapter', 'adapter_config.json'), 'utf8')).toBe('{"mine": true}');
    await train(config('users', { overwrite: true }));
    expect(JSON.parse(await readFile(join(out, 'adapter', 'adapter_config.json'), 'utf8'))).toHaveProperty('peft_type', 'LORA');
    // A finished run's directory: a new run is refused (its checkpoint is there), --overwrite starts over.
    await expect(train(config('users'))).rejects.toThrow(/holds a checkpoint \(step 4\)/);
    // --overwrite starts over: the earlier run's checkpoints (of either layout) and metrics go.
    await cp((await findCheckpoint(out))!.dir, join(out, 'checkpoint.tmp-4242'), { recursive: true });
    await train(config('users', { overwrite: true, steps: 2 }));
    expect((await readdir(out)).filter((n) => n.startsWith('checkpoint')).sort()).toEqual(['checkpoint.json', 'checkpoints']);
    expect(await findCheckpoint(out)).toMatchObject({ step: 2, layout: 'pointer' });
    const metrics = (await readFile(join(out, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { type: string; step: number });
    expect(metrics.filter((m) => m.type === 'step').map((m) => m.step)).toEqual([1, 2]);
  }, 120_000);

  it('names the fields that differ when a resume is refused', async () => {
    const controller = new AbortController();
    await expect(train(config('changed'), { signal: controller.signal, onStep: (s) => s.step === 2 && controller.abort() })).rejects.toMatchObject({ name: 'AbortError' });
    const metrics = await readFile(join(dir, 'changed', 'metrics.jsonl'), 'utf8');
    const refused = train(config('changed', { optimizer: { lr: 2e-2 }, batchSize: 2, steps: 9 }), { resume: true });
    await expect(refused).rejects.toThrow(/different configuration; resume needs the same one \(batchSize: 4 -> 2; optimizer\.lr: 0\.01 -> 0\.02\)/);
    expect(await readFile(join(dir, 'changed', 'metrics.jsonl'), 'utf8'), 'a refused resume leaves the metrics alone').toBe(metrics);
  }, 120_000);

  it('refuses to resume on another model of the same shapes, or with an edited category map, naming the file', async () => {
    const model = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, numKvHeads: 1 });
    const other = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, numKvHeads: 1, seed: 99 });
    try {
      const map = join(dir, 'category-map.json');
      await writeFile(map, JSON.stringify({ weapons: 'weapons' }));
      const run = { ...config('swapped'), model, flagCategories: 'auto' as const, categoryMap: map };
      const stop = async () => {
        const controller = new AbortController();
        await expect(train(run, { signal: controller.signal, onStep: (s) => s.step === 1 && controller.abort() })).rejects.toMatchObject({ name: 'AbortError' });
      };
      await stop();
      await writeFile(map, JSON.stringify({ weapons: 'cyber' }));
      await expect(train(run, { resume: true })).rejects.toThrow(`${map}: changed since the checkpoint was written`);
      await writeFile(map, JSON.stringify({ weapons: 'weapons' }));
      await cp(join(other, 'model.safetensors'), join(model, 'model.safetensors'));
      await expect(train(run, { resume: true })).rejects.toThrow(`${join(model, 'model.safetensors')} (sampled): changed since the checkpoint was written`);
    } finally {
      await rm(model, { recursive: true, force: true });
      await rm(other, { recursive: true, force: true });
    }
  }, 120_000);

  it('resumes the previous layout killed between its two renames, to the uninterrupted result', async () => {
    const reference = await train(config('legacy-ref'));
    const controller = new AbortController();
    await expect(train(config('legacy'), { signal: controller.signal, onStep: (s) => s.step === 2 && controller.abort() })).rejects.toMatchObject({ name: 'AbortError' });
    // Rewrite the output as the previous version left it after a kill between `checkpoint` ->
    // `checkpoint.old-PID` and `checkpoint.tmp-PID` -> `checkpoint`: no checkpoint/, two copies.
    const out = join(dir, 'legacy');
    const found = (await findCheckpoint(out))!;
    await cp(found.dir, join(out, 'checkpoint.tmp-4242'), { recursive: true });
    await mkdir(join(out, 'checkpoint.old-4242'));
    await writeFile(join(out, 'checkpoint.old-4242', 'params.safetensors'), 'incomplete');
    await rm(join(out, 'checkpoint.json'));
    await rm(join(out, 'checkpoints'), { recursive: true });
    expect(await findCheckpoint(out)).toMatchObject({ step: 2, layout: 'legacy' });
    await train(config('legacy'), { resume: true });
    const a = await readFile(join(reference.saved, 'adapter_model.safetensors'));
    const b = await readFile(join(out, 'adapter', 'adapter_model.safetensors'));
    expect(Buffer.compare(a, b)).toBe(0);
    expect((await readdir(out)).filter((n) => n.startsWith('checkpoint.'))).toEqual(['checkpoint.json']);
  }, 120_000);

  it('lets one run at a time write to an output directory, taking over the lock of a killed one', async () => {
    const out = join(dir, 'locked');
    await mkdir(out, { recursive: true });
    // A live process (this test's parent) holds the lock: refused, and the lock stays.
    await writeFile(join(out, '.train.lock'), `${process.ppid}\n`);
    await expect(train(config('locked'))).rejects.toThrow(`another training run (pid ${process.ppid}) is writing to this output directory`);
    expect(await readFile(join(out, '.train.lock'), 'utf8')).toBe(`${process.ppid}\n`);
    // Two runs of one process: the second is refused while the first holds the lock.
    await rm(join(out, '.train.lock'));
    const release = await lockOutput(out);
    await expect(train(config('locked'))).rejects.toThrow('another training run of this process is writing to this output directory');
    await release();
    // A killed run's lock (its process is gone) is taken over, and released at the end.
    const gone = spawn(process.execPath, ['-e', '']);
    await new Promise((resolve) => gone.on('close', resolve));
    await writeFile(join(out, '.train.lock'), `${gone.pid}\n`);
    await train(config('locked', { steps: 1 }));
    expect(await readdir(out)).not.toContain('.train.lock');
  }, 120_000);

  it('a lock whose pid now belongs to another process (the start time differs) is stale; release leaves a lock that is no longer this run\'s', async () => {
    const out = join(dir, 'reused-pid');
    await mkdir(out, { recursive: true });
    // The parent's pid, with a start time it never had: a killed run's pid, reused after it.
    await writeFile(join(out, '.train.lock'), `${process.ppid} 00000000-0000-0000-0000-000000000000:1\n`);
    const release = await lockOutput(out);
    expect((await readFile(join(out, '.train.lock'), 'utf8')).split(' ')[0]).toBe(String(process.pid));
    await writeFile(join(out, '.train.lock'), `${process.ppid}\n`); // say another run took it since
    await release();
    expect(await readFile(join(out, '.train.lock'), 'utf8')).toBe(`${process.ppid}\n`);
    await expect(lockOutput(out)).rejects.toThrow(`(its lock is ${join(out, '.train.lock')}: if no run is writing there, delete that file)`);
    expect((await readdir(out)).filter((n) => n !== '.train.lock')).toEqual([]); // no scratch files left
  });

  it("never removes files it did not write: a user's checkpoints/ and checkpoint/ stay, with and without --overwrite", async () => {
    const out = join(dir, 'user-files');
    await mkdir(join(out, 'checkpoints'), { recursive: true });
    await mkdir(join(out, 'checkpoint'), { recursive: true });
    await writeFile(join(out, 'checkpoints', 'epoch=3.ckpt'), 'mine');
    await writeFile(join(out, 'checkpoint', 'model.pt'), 'mine');
    await mkdir(join(out, 'adapter'));
    // Refused (an adapter without its run's checkpoint): nothing removed.
    await expect(train(config('user-files', { steps: 1 }))).rejects.toThrow(/adapter already exists/);
    expect(await readFile(join(out, 'checkpoints', 'epoch=3.ckpt'), 'utf8')).toBe('mine');
    expect(await readFile(join(out, 'checkpoint', 'model.pt'), 'utf8')).toBe('mine');
    // Run, then run over it: the run's own checkpoints come and go, the user's files stay.
    await rm(join(out, 'adapter'), { recursive: true });
    await train(config('user-files', { steps: 2 }));
    await train(config('user-files', { steps: 2, overwrite: true }));
    expect(await readFile(join(out, 'checkpoints', 'epoch=3.ckpt'), 'utf8')).toBe('mine');
    expect(await readFile(join(out, 'checkpoint', 'model.pt'), 'utf8')).toBe('mine');
    expect((await readdir(join(out, 'checkpoints'))).filter((n) => n !== 'epoch=3.ckpt')).toHaveLength(1); // the run's last
  }, 120_000);

  it('Ctrl-C during the final evaluation checkpoints the last step, and resuming only evaluates and exports', async () => {
    const out = join(dir, 'final-eval');
    const controller = new AbortController();
    const run = config('final-eval', { steps: 3, checkpointEvery: 0, evalFraction: 0.3 });
    const error = await train(run, {
      signal: controller.signal,
      // After the last step's hooks, before its evaluation ends.
      onStep: (info) => void (info.step === info.steps && setTimeout(() => controller.abort(), 0)),
    }).catch((e: unknown) => e);
    expect((error as Error).name).toBe('AbortError');
    expect((await findCheckpoint(out))?.step).toBe(3);
    const steps: number[] = [];
    const result = await train(run, { resume: true, onStep: (info) => steps.push(info.step) });
    expect(steps).toEqual([]);
    expect(result.finalEval).not.toBeNull();
    expect(await readdir(join(out, 'adapter'))).toContain('adapter_config.json');
  }, 120_000);

  it('keeps a metrics.jsonl a run did not write; one a run stopped before its first checkpoint wrote starts afresh', async () => {
    const out = join(dir, 'old-metrics');
    await mkdir(out, { recursive: true });
    await writeFile(join(out, 'metrics.jsonl'), '{"my":"experiment log"}\n');
    await expect(train(config('old-metrics', { steps: 1 }))).rejects.toThrow(/metrics\.jsonl already exists and no checkpoint or result of a run is beside it: pass --overwrite/);
    expect(await readFile(join(out, 'metrics.jsonl'), 'utf8')).toBe('{"my":"experiment log"}\n');
    // A run's lines, the last one cut by the kill that stopped it.
    const run = '{"type":"step","step":1,"loss":{"total":1}}\n';
    await writeFile(join(out, 'metrics.jsonl'), `${run}{"type":"step","st`);
    await train(config('old-metrics', { steps: 1, evalEvery: 0 }));
    const lines = (await readFile(join(out, 'metrics.jsonl'), 'utf8')).trim().split('\n');
    expect(lines).not.toContain(run.trim());
    expect(JSON.parse(lines[0]!)).toMatchObject({ type: 'step', step: 1, time: expect.any(String) });
  }, 120_000);

  it('escapes control characters of a config file quoted in errors', async () => {
    const file = join(dir, 'evil-config.json');
    await writeFile(file, JSON.stringify({ model: base, output: join(dir, 'x'), data: 'synthetic', '\u001b]0;owned\u0007\r\u0000key': 1 }));
    const error = await loadTrainConfig(file).then(() => null, (e: Error) => e);
    expect(error?.message).toContain('Unrecognized key: "\\u001b]0;owned\\u0007\\u000d\\u0000key"');
    expect(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/.test(error!.message)).toBe(false);
  });

  it('escapes control characters of file contents quoted in errors', async () => {
    const data = join(dir, 'evil.jsonl');
    await writeFile(data, `${JSON.stringify({ prompt: 'hi', response: 'there', label: '\u001b[31mred\u009b2J\u202e' })}\n`);
    const r = await cli(['train', '--model', base, '--output', join(dir, 'evil-out'), '--data', data, '--steps', '1']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('evil.jsonl:1: field "label" must be "harmful" or "benign" (or a boolean), got "\\u001b[31mred\\u009b2J\\u202e"');
    expect(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u202a-\u202e]/.test(r.stderr)).toBe(false);
  }, 120_000);
});
