// `redflag eval` end to end on a tiny model (run through tsx, as a user would run the CLI):
// report.json, report.md and the plots are written, a second run reuses every cached unit,
// and bad flags fail with a message naming the flag or field.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { parseEvalConfig, type EvalConfigInput } from '../lib/eval/config.js';
import { evaluate } from '../lib/eval/evaluate.js';
import { evalConfigFromFlags } from '../lib/cli/eval.js';
import { loadModel } from '../lib/model/model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { tinyLlama } from './helpers/tiny-model.js';

const exec = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { cwd: ROOT, timeout: 240_000 });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

let base: string;
let rfModel: string;
let out: string;

beforeAll(async () => {
  base = await tinyLlama();
  // A "merged" red-flag model: the base with <rf> added, saved as a model directory.
  rfModel = await mkdtemp(join(tmpdir(), 'redflag-eval-rf-'));
  const model = await loadModel(base, { threads: 2 });
  try {
    await addRedFlagToken(model);
    await model.save(rfModel, { overwrite: true });
  } finally {
    model.dispose();
  }
  out = await mkdtemp(join(tmpdir(), 'redflag-eval-out-'));
});
afterAll(async () => {
  for (const d of [base, rfModel, out]) await rm(d, { recursive: true, force: true });
});

const ARGS = () => [
  'eval', '--model', base, '--variant', `rf=${rfModel}`, '--synthetic', '--synthetic-per-category', '1',
  '--samples', '2', '--max-tokens', '5', '--prefill-k', '1,2', '--context-k', '0,1', '--bootstrap', '20', '--threads', '2', '--out', out,
];

describe('redflag eval', () => {
  it('writes report.json, report.md and the plots; a second run recomputes nothing', async () => {
    const first = await cli(...ARGS());
    expect(first.stderr).not.toMatch(/Error/);
    expect(first.code).toBe(0);
    expect(first.stdout).toMatch(/^variant\s+AUROC/m);
    const report = JSON.parse(await readFile(join(out, 'report.json'), 'utf8'));
    expect(report.table.rows.map((r: { variant: string }) => r.variant)).toEqual(['base', 'rf']);
    expect(report.suites).toEqual(['detection', 'sampling', 'prefill', 'long-context', 'suppression', 'utility']);
    expect(report.table.rows[0].values.auroc).toBeNull(); // the base has no <rf>
    expect(typeof report.table.rows[1].values.auroc).toBe('number');
    expect(report.cache.computed).toBeGreaterThan(0);
    expect(Object.keys(report.seconds.rf)).toHaveLength(6);
    const md = await readFile(join(out, 'report.md'), 'utf8');
    expect(md).toMatch(/^\| variant \| AUROC \| TPR@1%FPR \|/m);
    expect(md).toMatch(/^\| rf \| /m);
    expect(md).toMatch(/ · cpu, f32 weights · /);
    expect(md).toMatch(/^\| category \| label \| responses \| prompts \| base \| rf \|$/m);
    expect([report.settings.device, report.settings.dtype]).toEqual(['cpu', 'f32']);
    for (const plot of ['roc', 'asr-vs-n', 'prefill-vs-k', 'long-context-vs-k']) {
      expect(report.plots).toContain(`${plot}.png`);
      const png = await readFile(join(out, `${plot}.png`));
      expect([...png.subarray(0, 8)]).toEqual([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
      expect(await readFile(join(out, `${plot}.svg`), 'utf8')).toMatch(/^<svg/);
    }

    const second = await cli(...ARGS());
    expect(second.code).toBe(0);
    const again = JSON.parse(await readFile(join(out, 'report.json'), 'utf8'));
    expect(again.cache.computed).toBe(0);
    expect(again.cache.hits).toBeGreaterThan(0);
    expect(again.table).toEqual(report.table);
  }, 300_000);

  it('names the flag or field of a bad value', async () => {
    const unknown = await cli('eval', '--model', base, '--synthetic', '--suite', 'detection,nope', '--out', out);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/suites\.1: unknown suite "nope"/);
    await mkdir(out, { recursive: true });
    await writeFile(join(out, 'bad-budget.json'), JSON.stringify({ attacks: { gcg: { steps: -1 } } }));
    const budget = await cli('eval', '--model', base, '--synthetic', '--suite', 'gcg', '--config', join(out, 'bad-budget.json'), '--out', out);
    expect(budget.stderr).toMatch(/attacks\.gcg\.steps/);
    const variant = await cli('eval', '--model', base, '--synthetic', '--variant', 'nameonly', '--out', out);
    expect(variant.stderr).toMatch(/--variant #1 must be NAME=PATH/);
    const k = await cli('eval', '--model', base, '--synthetic', '--prefill-k', '2,x', '--out', out);
    expect(k.stderr).toMatch(/--prefill-k must be a comma-separated list/);
    // List flags: an empty item is a mistake, never a 0.
    await expect(evalConfigFromFlags({ model: base, out, synthetic: true, epsilons: '0.1,,0.2' })).rejects.toThrow(/--epsilons must be a comma-separated list of numbers >= 0, got "0\.1,,0\.2"/);
    await expect(evalConfigFromFlags({ model: base, out, synthetic: true, prefillK: '1,,2' })).rejects.toThrow(/--prefill-k must be a comma-separated list of integers/);
    // --synthetic-per-category sizes the synthetic split, from the flag or the config file; alone it says what is missing.
    await expect(evalConfigFromFlags({ model: base, out, syntheticPerCategory: 60 })).rejects.toThrow(/--synthetic-per-category sizes the synthetic split: add --synthetic/);
    await writeFile(join(out, 'synthetic.json'), JSON.stringify({ synthetic: { seed: 3 } }));
    expect((await evalConfigFromFlags({ model: base, out, config: join(out, 'synthetic.json'), syntheticPerCategory: 60 })).synthetic).toMatchObject({ seed: 3, perCategory: 60 });
    const noData = await cli('eval', '--model', base, '--out', out);
    expect(noData.stderr).toMatch(/harmful: no data/);
    // Before the base variant's suites run: nothing is computed or written.
    const fresh = join(out, 'missing-variant');
    const missing = await cli('eval', '--model', base, '--synthetic', '--variant', `x=${join(out, 'nowhere')}`, '--suite', 'detection', '--out', fresh);
    expect(missing.stderr).toMatch(/variants\[1\] "x": neither an adapter/);
    await expect(readFile(join(fresh, 'cache.json'))).rejects.toThrow(/ENOENT/);
  }, 120_000);

  it('--device: where every model runs, with the device\'s default dtype; a device that cannot run fails before any data is read', async () => {
    const cfg = (extra: Partial<EvalConfigInput>) => parseEvalConfig({ model: base, out, synthetic: {}, ...extra });
    expect([cfg({}).device, cfg({}).dtype]).toEqual(['cpu', 'f32']);
    expect([cfg({ device: 'cuda' }).device, cfg({ device: 'cuda' }).dtype]).toEqual(['cuda:0', 'bf16']);
    expect([cfg({ device: 'cuda:1', dtype: 'f32' }).device, cfg({ device: 'cuda:1', dtype: 'f32' }).dtype]).toEqual(['cuda:1', 'f32']);
    expect(() => cfg({ device: 'gpu' })).toThrow(/device: must be 'cpu', 'cuda' or 'cuda:N'/);
    expect(cfg({}).kvCacheBytes).toBe(2 * 2 ** 30);
    expect(() => cfg({ kvCacheBytes: 1000 })).toThrow(/kvCacheBytes/);
    const flag = await cli('eval', '--model', base, '--synthetic', '--device', 'gpu', '--out', out);
    expect(flag.code).toBe(1);
    expect(flag.stderr).toMatch(/--device.*must be 'cpu', 'cuda' or 'cuda:N'/);
    const small = await evalConfigFromFlags({ model: base, out, synthetic: true, kvCacheMb: 64, device: 'cuda:0' });
    expect([small.kvCacheBytes, small.device, small.dtype, small.batchSize]).toEqual([64 * 2 ** 20, 'cuda:0', 'bf16', 64]);
    expect([cfg({}).batchSize, cfg({ device: 'cuda', batchSize: 8 }).batchSize]).toEqual([16, 8]);
    // No GPU here: the device's own reason, before the (missing) data file is read or the output made.
    const where = join(out, 'on-cuda');
    const error = await evaluate({ model: base, out: where, harmful: [{ file: join(out, 'absent.jsonl') }], device: 'cuda' }).then(() => null, (e: unknown) => e);
    expect(error).toMatchObject({ code: expect.stringMatching(/^(NATIVE|UNSUPPORTED)$/) });
    expect(String((error as Error).message)).toMatch(/cuda/i);
    await expect(readFile(join(where, 'cache.json'))).rejects.toThrow(/ENOENT/);
  }, 120_000);

  it("refuses to write its report over files redflag did not write, unless overwrite", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'redflag-eval-own-'));
    try {
      const config = (o: string, extra: Partial<EvalConfigInput> = {}): EvalConfigInput => ({
        model: base, variants: [{ name: 'rf', source: rfModel }], synthetic: { testPerCategory: 1, mcqCount: 0 }, suites: ['detection'],
        maxTokens: 3, bootstrapResamples: 10, threads: 2, png: false, out: o, ...extra,
      });
      const own = async (name: string, text: string) => {
        const o = join(dir, name.replace('.', '-'));
        await mkdir(o, { recursive: true });
        await writeFile(join(o, name), text);
        return o;
      };
      // A user's notes, a report.json of their own, a plot of the same name: each refused by name, untouched.
      const notes = await own('report.md', 'MY NOTES\n');
      await expect(evaluate(config(notes))).rejects.toThrow(/report\.md: not written by redflag eval \(no report\.json of its beside it\), and the report would replace it: choose another --out, or pass --overwrite/);
      expect(await readFile(join(notes, 'report.md'), 'utf8')).toBe('MY NOTES\n');
      await expect(evaluate(config(await own('report.json', '{"mine": 1}')))).rejects.toThrow(/report\.json: not a report of redflag eval/);
      await expect(evaluate(config(await own('roc.svg', '<svg/>')))).rejects.toThrow(/roc\.svg: not written by redflag eval/);
      await expect(evaluate(config(await own('report.md', 'x'), { overwrite: 'yes' as unknown as boolean }))).rejects.toThrow(/overwrite/);
      expect((await evalConfigFromFlags({ model: base, out: notes, synthetic: true, overwrite: true })).overwrite).toBe(true);

      // overwrite replaces them; then the folder is a report of redflag's, run again without it.
      await evaluate(config(notes, { overwrite: true }));
      expect(await readFile(join(notes, 'report.md'), 'utf8')).toMatch(/^# redflag evaluation/);
      expect(JSON.parse(await readFile(join(notes, 'report.json'), 'utf8')).generator).toBe('redflag eval');
      // A report.json of an earlier version (no marker) is redflag's too.
      const { generator: _g, ...legacy } = JSON.parse(await readFile(join(notes, 'report.json'), 'utf8')) as Record<string, unknown>;
      await writeFile(join(notes, 'report.json'), JSON.stringify(legacy));
      expect((await evaluate(config(notes))).cache.computed).toBe(0);
      // A stopped run's cache.json beside a report.md: the folder is the run's.
      await rm(join(notes, 'report.json'));
      expect((await evaluate(config(notes))).cache.computed).toBe(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 120_000);

  it('evaluate(): a stopped run resumes from the cache, recomputing only what was not finished; changed weights recompute', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'redflag-eval-resume-'));
    try {
      const config: EvalConfigInput = {
        model: base,
        variants: [{ name: 'rf', source: rfModel }],
        synthetic: { testPerCategory: 1, mcqCount: 2 },
        suites: ['detection', 'sampling'],
        samples: 2,
        maxTokens: 4,
        bootstrapResamples: 10,
        threads: 2,
        png: false,
        out: dir,
      };
      const controller = new AbortController();
      const stopped = evaluate(config, { signal: controller.signal, onProgress: (e) => e.phase === 'end' && e.suite === 'detection' && controller.abort() });
      await expect(stopped).rejects.toThrow(/aborted/);
      const resumed = await evaluate(config);
      // Detection came from the cache; only the sampling units (5 prompts × 2) were computed.
      expect(resumed.cache.computed).toBe(10);
      expect(resumed.cache.hits).toBeGreaterThan(0);
      expect(resumed.plots.every((p) => p.endsWith('.svg'))).toBe(true);
      // Weights rewritten in place (a retrained model): nothing of that variant is reused.
      const later = new Date(Date.now() + 60_000);
      await utimes(join(rfModel, 'model.safetensors'), later, later);
      const retrained = await evaluate(config);
      expect(retrained.cache.hits).toBe(0);
      expect(retrained.cache.computed).toBeGreaterThan(10);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 120_000);
});
