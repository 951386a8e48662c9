// `redflag study` at tiny sizes: every cell and seed is trained and evaluated, the table's
// mean ± 95% CI matches a hand computation on the stored per-seed values, a rerun recomputes
// nothing, a study stopped during training resumes from the checkpoint, a bad config names the
// field, and the CLI runs end to end.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { generateSyntheticData } from '../lib/data/synthetic.js';
import { parseStudyConfig, planStudy, type StudyConfigInput } from '../lib/study/config.js';
import { formatSummary, type StudyReport } from '../lib/study/report.js';
import { runStudy, type CellResult } from '../lib/study/runner.js';
import { tinyLlama } from './helpers/tiny-model.js';

const exec = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');

let base: string;
let root: string;
beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2 });
  root = await mkdtemp(join(tmpdir(), 'redflag-study-'));
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(root, { recursive: true, force: true });
});

const config = (out: string, extra: Partial<StudyConfigInput> = {}): StudyConfigInput => ({
  out,
  model: base,
  threads: 1,
  train: {
    syntheticPerCategory: 3,
    steps: 4,
    batchSize: 4,
    maxTokens: 96,
    lora: { rank: 4, alpha: 8 },
    loss: { rfOffset: 1 },
    optimizer: { lr: 1e-2, warmupSteps: 1 },
  },
  grid: { 'loss.alphaBenign': [1, 5] },
  seeds: [0, 1],
  eval: { suites: ['detection'], synthetic: { testPerCategory: 1, mcqCount: 0 }, maxTokens: 4, bootstrapResamples: 10 },
  ...extra,
});

const mtime = async (file: string) => (await stat(file)).mtimeMs;

describe('redflag study', () => {
  it('trains and evaluates every cell and seed; the table is mean ± t·sd/√n; a rerun recomputes nothing', async () => {
    const out = join(root, 'grid');
    const lines: string[] = [];
    const steps: string[] = [];
    const report = await runStudy(config(out), { log: (l) => lines.push(l), onStep: (cell, seed, s) => steps.push(`${cell}/${seed}/${s.step}`) });
    const cells = ['alphaBenign=1', 'alphaBenign=5'];
    expect(report.cells.map((c) => c.name)).toEqual(cells);
    expect(steps).toHaveLength(2 * 2 * 4);
    expect(lines.filter((l) => / training 4 steps$/.test(l))).toHaveLength(4);

    const results: Record<string, CellResult> = {};
    for (const cell of cells) {
      for (const seed of [0, 1]) {
        const r = JSON.parse(await readFile(join(out, 'cells', cell, `seed-${seed}`, 'result.json'), 'utf8')) as CellResult;
        expect(r).toMatchObject({ cell, seed });
        expect(r.settings.train).toMatchObject({ seed, loss: { alphaBenign: cell === cells[0] ? 1 : 5 } });
        expect(typeof r.metrics['auroc']).toBe('number');
        expect(typeof r.metrics['heldOutBenignKl']).toBe('number');
        results[`${cell}/${seed}`] = r;
      }
    }
    // The interval by hand: two seeds, t(0.975, 1) = 12.7062, sd = |a - b| / √2.
    const json = JSON.parse(await readFile(join(out, 'study.json'), 'utf8')) as StudyReport;
    const md = await readFile(join(out, 'study.md'), 'utf8');
    for (const [i, cell] of cells.entries()) {
      for (const key of ['heldOutBenignKl', 'auroc', 'falseFlagRate']) {
        const [a, b] = [results[`${cell}/0`]!.metrics[key]!, results[`${cell}/1`]!.metrics[key]!];
        const s = json.cells[i]!.summary[key]!;
        expect(s.values).toEqual([a, b]);
        expect(s.n).toBe(2);
        expect(s.mean).toBeCloseTo((a + b) / 2, 12);
        expect(s.halfWidth!).toBeCloseTo((12.706205 * (Math.abs(a - b) / Math.SQRT2)) / Math.SQRT2, 9);
        expect(s.low!).toBeCloseTo(s.mean - s.halfWidth!, 12);
      }
      const row = md.split('\n').find((l) => l.startsWith(`| ${cell} |`))!;
      expect(row).toContain(`| 2 | ${formatSummary(json.cells[i]!.summary['heldOutFlagRate'])} |`);
      expect(row).toContain(formatSummary(json.cells[i]!.summary['heldOutBenignKl']));
    }
    expect(md).toMatch(/^\| cell \| seeds \| held-out flag rate \(trainer\) \|.* AUROC \|/m);
    // The α axis's sensitivity plot.
    expect(json.plots).toEqual(['sensitivity-loss.alphaBenign.svg', 'sensitivity-loss.alphaBenign.png']);
    expect(await readFile(join(out, 'sensitivity-loss.alphaBenign.svg'), 'utf8')).toMatch(/^<svg/);

    // A rerun: every cell is skipped, nothing trains or evaluates, no result file is rewritten.
    const files = Object.keys(results).map((k) => join(out, 'cells', k.replace('/', '/seed-'), 'result.json'));
    const before = await Promise.all(files.map(mtime));
    const again: string[] = [];
    const againSteps: number[] = [];
    const second = await runStudy(config(out), { log: (l) => again.push(l), onStep: (_c, _s, s) => againSteps.push(s.step) });
    expect(again.filter((l) => l.endsWith('finished earlier, skipped'))).toHaveLength(4);
    expect(again.some((l) => /training|evaluating/.test(l))).toBe(false);
    expect(againSteps).toEqual([]);
    expect(await Promise.all(files.map(mtime))).toEqual(before);
    expect(second.cells.map((c) => c.summary)).toEqual(json.cells.map((c) => c.summary));

    // A finished cell is never recomputed, so one finished with other settings is an error.
    const changed = config(out);
    (changed.train as Record<string, unknown>)['steps'] = 5;
    await expect(runStudy(changed)).rejects.toThrow(/cell "alphaBenign=1" seed 0 was finished with other settings \(train\.steps\)/);
  }, 120_000);

  it("a changed base model or data file at the same path: a finished cell is an error naming it, unfinished work and an adapter of the old base start over", async () => {
    const out = join(root, 'inputs');
    const own = join(root, 'inputs-base');
    await cp(base, own, { recursive: true });
    const other = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2, seed: 11 });
    const test = generateSyntheticData({ seed: 5, perCategory: 0, testPerCategory: 1 }).test;
    const jsonl = (label: string) => test.filter((c) => c.label === label).map((c) => JSON.stringify({ messages: c.messages })).join('\n') + '\n';
    const [harmful, benign] = [join(root, 'inputs-harmful.jsonl'), join(root, 'inputs-benign.jsonl')];
    await writeFile(harmful, jsonl('harmful'));
    await writeFile(benign, jsonl('benign'));
    const study = config(out, { model: own, grid: {}, seeds: [0, 1], eval: { suites: ['detection'], harmful: [{ file: harmful }], benign: [{ file: benign }], maxTokens: 4, bootstrapResamples: 10 } });
    (study.train as Record<string, unknown>)['steps'] = 2;
    await runStudy(study);
    const seed = (n: number, file = '') => join(out, 'cells', 'default', `seed-${n}`, file);
    // Seed 1 stopped after training (its trained.json stays, the evaluation never finished).
    await rm(seed(1, 'result.json'));
    await rm(seed(1, 'eval'), { recursive: true });

    // The eval's harmful file now holds other rows: seed 0's figures are not of this data.
    await writeFile(harmful, jsonl('harmful').split('\n')[0]!.concat('\n').repeat(3));
    await expect(runStudy(study)).rejects.toThrow(/cell "default" seed 0 was finished with other settings \(the contents of .*inputs-harmful\.jsonl\)/);
    await writeFile(harmful, jsonl('harmful'));
    // The base model's weights replaced in place: the same error, naming the base model.
    await cp(join(other, 'model.safetensors'), join(own, 'model.safetensors'));
    await expect(runStudy(study)).rejects.toThrow(/cell "default" seed 0 was finished with other settings \(the base model's files\)/);

    // Seed 0 removed as the error says: it trains again, and seed 1's adapter of the old base is not evaluated.
    await rm(seed(0), { recursive: true });
    const lines: string[] = [];
    await runStudy(study, { log: (l) => lines.push(l) });
    expect(lines).toContain("[2/2] default seed 1: unfinished work with other settings (the base model's files): starting over");
    expect(lines.filter((l) => / training 2 steps$/.test(l))).toHaveLength(2);
    const trained = JSON.parse(await readFile(seed(1, 'train/trained.json'), 'utf8')) as { baseModel: string[] };
    const result = JSON.parse(await readFile(seed(1, 'result.json'), 'utf8')) as CellResult;
    expect(trained.baseModel).toEqual(result.settings.inputs!.baseModel);
    expect(Object.keys(result.settings.inputs!.dataFiles)).toEqual([benign, harmful].sort());

    // Records of an earlier version (no inputs): a finished result is reused; an adapter whose
    // trained.json names other base files is trained again even where cell.json cannot tell.
    const strip = async (file: string, edit: (j: { settings: Record<string, unknown>; baseModel?: string[] }) => void) => {
      const j = JSON.parse(await readFile(file, 'utf8')) as { settings: Record<string, unknown>; baseModel?: string[] };
      edit(j);
      await writeFile(file, JSON.stringify(j));
    };
    await strip(seed(0, 'result.json'), (j) => delete j.settings['inputs']);
    await rm(seed(1, 'result.json'));
    await strip(seed(1, 'cell.json'), (j) => delete j.settings['inputs']);
    await strip(seed(1, 'train/trained.json'), (j) => (j.baseModel = ['config.json:1:1']));
    const again: string[] = [];
    await runStudy(study, { log: (l) => again.push(l) });
    expect(again).toContain('[1/2] default seed 0: finished earlier, skipped');
    expect(again).toContain('[2/2] default seed 1: the trained adapter is of other base model files: training again');
    expect(again).toContain('[2/2] default seed 1: training 2 steps');
    await rm(other, { recursive: true, force: true });
  }, 120_000);

  it('a study stopped during training resumes from the checkpoint', async () => {
    const out = join(root, 'stopped');
    const stopped = config(out, { grid: {}, variants: [{ name: 'fixed-pos', loss: { rfPosition: 'start' } }], seeds: [3] });
    (stopped.train as Record<string, unknown>)['steps'] = 6;
    const controller = new AbortController();
    const first: number[] = [];
    await expect(
      runStudy(stopped, {
        signal: controller.signal,
        onStep: (_c, _s, s) => {
          first.push(s.step);
          if (s.step === 2) controller.abort();
        },
      }),
    ).rejects.toThrow();
    expect(first).toEqual([1, 2]);
    const lines: string[] = [];
    const steps: number[] = [];
    const report = await runStudy(stopped, { log: (l) => lines.push(l), onStep: (_c, _s, s) => steps.push(s.step) });
    expect(lines).toContain('[1/1] fixed-pos seed 3: training 6 steps (resuming from the checkpoint)');
    expect(steps).toEqual([3, 4, 5, 6]);
    // One seed: the value, no interval.
    const s = report.cells[0]!.summary['auroc']!;
    expect(s).toMatchObject({ n: 1, halfWidth: null, low: null });
    expect(formatSummary(s)).not.toContain('±');
  }, 60_000);

  it("reuses OUT/lm only when it is the language model the study asks for (size and seed)", async () => {
    const out = join(root, 'lm-mismatch');
    await mkdir(join(out, 'lm', 'model'), { recursive: true });
    await writeFile(join(out, 'lm', 'done.json'), JSON.stringify({ finalLoss: 1, seconds: 1, size: 'small', seed: 0 }));
    const { model: _model, ...rest } = config(out);
    await expect(runStudy({ ...rest, pipeline: { size: 'small', seed: 5 } })).rejects.toThrow(
      /lm[\\/]done\.json: holds the language model of size small and seed 0, this study asks for size small and seed 5/,
    );
  });

  it("refuses an out folder whose study.md or study.json redflag did not write, before anything trains", async () => {
    const out = join(root, 'own-notes');
    await mkdir(out, { recursive: true });
    await writeFile(join(out, 'study.md'), 'MY NOTES\n');
    const steps: number[] = [];
    await expect(runStudy(config(out, { grid: {}, seeds: [0] }), { onStep: (_c, _s, s) => steps.push(s.step) })).rejects.toThrow(
      /study\.md: not written by redflag study \(no study\.json of its beside it\), and the report would replace it: choose another out \(--out\), or pass --overwrite/,
    );
    expect(steps).toEqual([]);
    await expect(stat(join(out, 'cells'))).rejects.toThrow(/ENOENT/);
    await writeFile(join(out, 'study.json'), '{"notes": []}');
    await expect(runStudy(config(out, { grid: {}, seeds: [0] }))).rejects.toThrow(/study\.json: not a report of redflag study/);
    expect(await readFile(join(out, 'study.md'), 'utf8')).toBe('MY NOTES\n');
    // The cells' eval folders are the study's own: an eval config cannot set overwrite.
    expect(() => planStudy(parseStudyConfig({ ...config(out), eval: { overwrite: true } }, 'study.json'))).toThrow(/eval\.overwrite: set by the study/);
  });

  it('names the file and field of a bad config', async () => {
    const bad = (extra: Record<string, unknown>) => () => planStudy(parseStudyConfig({ ...config(join(root, 'bad')), ...extra }, 'study.json'));
    expect(bad({ grid: { 'loss.rfAggregation': ['any', 'most'] } })).toThrow(/^study\.json: grid\["loss\.rfAggregation"\]\[1\]: Invalid option/);
    expect(bad({ grid: { 'lora.rnak': [2] } })).toThrow(/grid\["lora\.rnak"\]: no training-config field "lora\.rnak"/);
    expect(bad({ variants: [{ name: 'fixed', loss: { rfPosition: 'middle' } }] })).toThrow(/variants\[0\]\.loss\.rfPosition: Invalid option/);
    expect(bad({ train: { lora: { rank: 0 } } })).toThrow(/train\.lora\.rank: Too small/);
    expect(bad({ eval: { suites: ['nope'] } })).toThrow(/eval\.suites\[0\]: unknown suite "nope"/);
    expect(bad({ train: { seed: 4 } })).toThrow(/train\.seed: set by the study's "seeds"/);
    expect(bad({ seeds: [1, 1] })).toThrow(/seeds\[1\]: duplicate seed 1/);
    expect(bad({ model: undefined })).toThrow(/model: give "model"/);
    // Mistakes between fields, found before the first cell trains.
    expect(bad({ grid: { recompute: [false, true] } })).toThrow(/grid\.recompute\[1\]: cell "recompute=true": activation recomputation is a GPU trainer option/);
    expect(bad({ grid: {}, variants: [{ name: 'whole', mode: 'full' }] })).toThrow(/variants\[0\]\.mode: cell "whole": 'full' \(full fine-tuning\) trains the 'lm' objective/);
  });

  it('evaluates a fully fine-tuned cell\'s model', async () => {
    const out = join(root, 'full');
    const report = await runStudy(config(out, { grid: {}, seeds: [0], variants: [{ name: 'whole', mode: 'full', objective: 'lm' }] }));
    expect(report.cells.map((c) => c.name)).toEqual(['whole']);
    await stat(join(out, 'cells', 'whole', 'seed-0', 'result.json'));
    await expect(stat(join(out, 'cells', 'whole', 'seed-0', 'train', 'adapter'))).rejects.toThrow();
  });

  it('redflag study --config FILE runs end to end; a bad file names the file and field', async () => {
    const out = join(root, 'cli');
    const file = join(root, 'study.json');
    await writeFile(file, JSON.stringify(config(join(root, 'ignored'), { grid: {}, variants: [{ name: 'plain' }], seeds: [0] })));
    const cli = (...args: string[]) => exec(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'study', ...args], { cwd: ROOT, timeout: 60_000 });
    const { stdout, stderr } = await cli('--config', file, '--out', out, '--threads', '1');
    expect(stderr).toContain('[1/1] plain seed 0: training 4 steps');
    expect(stdout).toMatch(/^\| plain \| 1 \| /m);
    expect(JSON.parse(await readFile(join(out, 'study.json'), 'utf8')).cells.map((c: { name: string }) => c.name)).toEqual(['plain']);

    await writeFile(file, JSON.stringify({ ...config(out), grid: { 'loss.rfOffset': [-1] } }));
    const failed = await cli('--config', file).then(
      () => null,
      (e: { code: number; stderr: string }) => e,
    );
    expect(failed?.code).toBe(1);
    expect(failed?.stderr).toContain(`redflag: ${file}: grid["loss.rfOffset"][0]: Too small`);
  }, 60_000);
});
