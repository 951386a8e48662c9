/**
 * `runStudy(config)`: trains every cell of the study once per seed and measures each adapter with
 * the configured eval suites, then writes the study report (lib/study/report.ts).
 *
 * Layout of `OUT`: `lm/` (the demo's language model, with `pipeline`), and per cell and seed
 * `cells/CELL/seed-N/` with `cell.json` (the settings it runs with), `train/` (the training
 * output: adapter, metrics, checkpoints), `eval/` (the eval report and its results cache) and
 * `result.json` (the cell's figures), written atomically once everything else is done.
 *
 * Resumable: a cell and seed whose `result.json` exists is never recomputed (a finished one with
 * other settings than the config's is an error, not a silent mix; the settings include the base
 * model's file stamps and every data file's sha256, so changed contents at the same paths count
 * as other settings); a run stopped during training
 * resumes from the last checkpoint (the study checkpoints every 100 steps unless told otherwise,
 * and on Ctrl-C), one stopped during evaluation reuses every finished unit from the eval cache,
 * and unfinished work whose settings changed starts over.
 * @module
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { pipeline as streamPipeline } from 'node:stream/promises';

import { RedflagError, abortError } from '../errors.js';
import { directoryStamp, fingerprint } from '../eval/cache.js';
import { parseEvalConfig, type EvalConfigInput } from '../eval/config.js';
import { evaluate, type EvalProgress } from '../eval/evaluate.js';
import { checkReportFolder, type EvalReport } from '../eval/report.js';
import type { EmbeddingResult } from '../eval/suites/embedding.js';
import type { LongContextResult } from '../eval/suites/long-context.js';
import type { PrefillResult } from '../eval/suites/prefill.js';
import { pathExists, writeFileAtomic } from '../model/safetensors.js';
import { findCheckpoint } from '../train/checkpoint.js';
import { parseTrainConfig, type TrainConfigInput } from '../train/config.js';
import { trainLanguageModel } from '../train/pipeline.js';
import { train, type StepInfo, type TrainResult } from '../train/trainer.js';
import { parseStudyConfig, planStudy, type StudyCell, type StudyConfig, type StudyConfigInput, type StudyPlan } from './config.js';
import { STUDY_REPORT_FILES, writeStudyReport, type StudyReport } from './report.js';

/** Hooks of {@link runStudy}. */
export interface StudyHooks {
  /** Progress lines (cells started, skipped, trained, evaluated). */
  log?: (line: string) => void;
  /** Each training step of a cell. */
  onStep?: (cell: string, seed: number, info: StepInfo) => void;
  /** Stops after the current training step (a checkpoint is written) or evaluation unit. */
  signal?: AbortSignal;
}

/** The figures of one cell and seed (`result.json`). */
export interface CellResult {
  version: 1;
  cell: string;
  seed: number;
  /** Hash of `settings` (a finished cell is reused only with the same settings). */
  fingerprint: string;
  /**
   * The training and eval configs (as given, before defaults) this result was measured with;
   * paths, threads and intervals left out; and what is behind the paths (absent in results of
   * earlier versions).
   */
  settings: { train: Partial<TrainConfigInput>; eval: Partial<EvalConfigInput>; inputs?: CellInputs };
  /** Metric key → value (null: not applicable or not measured). */
  metrics: Record<string, number | null>;
  /** Metric key → title. */
  titles: Record<string, string>;
  train: { seconds: number; steps: number; finalEval: { harmfulFlagRate: number; benignFalseFlagRate: number; benignKl: number; harmful: number; benign: number } | null; lastLoss: TrainResult['lastLoss'] };
  eval: { seconds: number; suites: Record<string, number>; report: string };
  finishedAt: string;
}

/**
 * The contents behind a cell's paths: the base model directory's stamp (its weight, config and
 * tokenizer files' sizes and modification times, as the eval cache keys on) and the sha256 of
 * every training and eval data file, by path. The paths alone let a finished cell stand after
 * the base model's weights or a data file were replaced in place.
 */
export interface CellInputs {
  baseModel: string[];
  dataFiles: Record<string, string>;
}

/** trained.json: the training's figures and the base model stamp the adapter was trained on (absent before stamps were recorded). */
type TrainedRecord = CellResult['train'] & { baseModel?: string[] };

const json = (value: unknown) => new TextEncoder().encode(`${JSON.stringify(value, (_k, x) => (typeof x === 'number' && !Number.isFinite(x) ? null : x), 2)}\n`);

async function readJson<T>(file: string): Promise<T> {
  try {
    return JSON.parse(await readFile(file, 'utf8')) as T;
  } catch (cause) {
    throw new RedflagError('INVALID_FILE', `unreadable (${(cause as Error).message}); delete it to recompute`, { file, cause });
  }
}

/** Dotted paths whose values differ between two settings objects. */
function differences(a: unknown, b: unknown, prefix = ''): string[] {
  const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
  if (isObj(a) && isObj(b)) {
    return [...new Set([...Object.keys(a), ...Object.keys(b)])].sort().flatMap((k) => differences(a[k], b[k], prefix ? `${prefix}.${k}` : k));
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [prefix || '(root)'];
}

/** `value` with every object's keys sorted, so equal settings hash equally whatever their order in the file. */
function canonical(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(canonical);
  if (value !== null && typeof value === 'object') return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical((value as Record<string, unknown>)[k])]));
  return value;
}

/**
 * What identifies a cell's results: its training and eval configs as the study gives them to
 * train() and evaluate() (before defaults are filled in, so a field a later version adds with a
 * default does not invalidate finished cells), without paths, threads and intervals.
 */
function cellSettings(trainInput: TrainConfigInput, evalInput: EvalConfigInput, model: string): CellResult['settings'] {
  const { output: _o, threads: _t, overwrite: _w, evalEvery: _e, checkpointEvery: _c, ...train } = trainInput;
  const { out: _out, threads: _th, png: _p, variants: _v, ...evalSettings } = evalInput;
  return canonical({ train: { ...train, model }, eval: { ...evalSettings, model } }) as CellResult['settings'];
}

/** Every data file a cell reads: training and held-out files, a category map file, the eval's labelled and multiple-choice files. */
function dataFilesOf(trainInput: TrainConfigInput, evalInput: EvalConfigInput): string[] {
  const entries = [...(Array.isArray(trainInput.data) ? trainInput.data : []), ...(trainInput.evalData ?? []), ...(evalInput.harmful ?? []), ...(evalInput.benign ?? []), ...(evalInput.data ?? [])];
  const files = entries.map((e) => e.file);
  if (typeof trainInput.categoryMap === 'string') files.push(trainInput.categoryMap);
  if (evalInput.mcq !== undefined) files.push(evalInput.mcq);
  return [...new Set(files)].sort();
}

/** A file's sha256, read once per study run (`memo`, by path): cells share their data files. */
async function fileSha256(file: string, memo: Map<string, Promise<string>>): Promise<string> {
  let hash = memo.get(file);
  if (!hash) {
    hash = (async () => {
      const h = createHash('sha256');
      try {
        await streamPipeline(createReadStream(file), h);
      } catch (cause) {
        throw new RedflagError('NOT_FOUND', `cannot read this data file to stamp its contents (${(cause as Error).message})`, { file, cause });
      }
      return h.digest('hex');
    })();
    memo.set(file, hash);
  }
  return await hash;
}

/** A cell's {@link CellInputs}. */
async function cellInputs(model: string, trainInput: TrainConfigInput, evalInput: EvalConfigInput, memo: Map<string, Promise<string>>): Promise<CellInputs> {
  const dataFiles: Record<string, string> = {};
  for (const file of dataFilesOf(trainInput, evalInput)) dataFiles[file] = await fileSha256(file, memo);
  return { baseModel: await directoryStamp(model), dataFiles };
}

/**
 * The settings paths that differ between a record's settings and this run's. A record of an
 * earlier version has no `inputs`: it is compared without them (it cannot say what its paths
 * held), as a field a later version adds does not invalidate finished cells.
 */
function settingsDifferences(recorded: CellResult['settings'], settings: CellResult['settings']): string[] {
  const { inputs: _i, ...rest } = settings;
  const changed = recorded.inputs !== undefined ? differences(recorded, settings) : differences(recorded, rest);
  // Contents say which file changed, not a dotted path with a file name inside it.
  return changed.map((d) => (d === 'inputs.baseModel' ? "the base model's files" : d.startsWith('inputs.dataFiles.') ? `the contents of ${d.slice('inputs.dataFiles.'.length)}` : d));
}

/** The base model as the settings name it: its directory, or the pipeline's size and seed (OUT/lm moves with OUT). */
function modelIdentity(config: StudyConfig): string {
  const p = config.pipeline;
  if (!p) return config.model!;
  return p.reuseLm ? `pipeline:${p.size}:${p.reuseLm}` : `pipeline:${p.size}:seed-${p.seed}`;
}

/** Metric titles of what the trainer measures on its held-out split. */
const TRAIN_TITLES: Record<string, string> = {
  heldOutFlagRate: 'held-out flag rate (trainer)',
  heldOutFalseFlagRate: 'held-out false-flag rate (trainer)',
  heldOutBenignKl: 'benign KL (trainer)',
};

/** The metrics of one cell and seed: the trainer's held-out figures, the eval report's headline numbers, flag rates at each prefill k, context K and embedding-attack ε, training time. */
export function cellMetrics(finalEval: CellResult['train']['finalEval'], report: EvalReport, trainSeconds: number): { metrics: Record<string, number | null>; titles: Record<string, string> } {
  const metrics: Record<string, number | null> = {
    heldOutFlagRate: finalEval?.harmfulFlagRate ?? null,
    heldOutFalseFlagRate: finalEval?.benignFalseFlagRate ?? null,
    heldOutBenignKl: finalEval?.benignKl ?? null,
  };
  const titles: Record<string, string> = { ...TRAIN_TITLES };
  const row = report.table.rows[0];
  for (const c of report.table.columns) {
    metrics[c.key] = row?.values[c.key] ?? null;
    titles[c.key] = c.title;
  }
  const results = report.results[report.variants[0]?.name ?? ''] ?? {};
  for (const [suite, key, title, unit] of [
    ['prefill', 'prefillFlag', 'prefill', 'k'],
    ['long-context', 'longContextFlag', 'long-context', 'K'],
  ] as const) {
    const r = results[suite] as PrefillResult | LongContextResult | undefined;
    for (const p of r?.points ?? []) {
      metrics[`${key}@${p.k}`] = p.n > 0 ? p.flagRate.value : null;
      titles[`${key}@${p.k}`] = `${title} ${unit}=${p.k}: flagged`;
    }
  }
  const embedding = results['embedding'] as EmbeddingResult | undefined;
  for (const p of embedding?.applicable ? embedding.points : []) {
    metrics[`embeddingFlag@${p.epsilon}`] = p.n > 0 ? p.flagRate.value : null;
    titles[`embeddingFlag@${p.epsilon}`] = `embedding attack ε=${p.epsilon}: flagged`;
  }
  // A training resumed after a stop counts the resumed part only.
  metrics['trainSeconds'] = trainSeconds;
  titles['trainSeconds'] = 'training time (s)';
  return { metrics, titles };
}

/** The base model the cells train on: the config's, or the demo's language model (trained once into OUT/lm). */
async function resolveModel(config: StudyConfig, plan: StudyPlan, log: (line: string) => void, signal: AbortSignal | undefined): Promise<string> {
  if (config.model !== undefined) return config.model;
  const o = plan.pipeline!;
  if (o.reuseLm) return join((await trainLanguageModel({ ...o, log })).dir, 'model');
  const marker = join(config.out, 'lm', 'done.json');
  const model = join(config.out, 'lm', 'model');
  const trainedAs = { size: config.pipeline!.size, seed: config.pipeline!.seed };
  if (await pathExists(marker)) {
    // Only the model this study asks for: another size or seed is another base for every cell.
    const done = JSON.parse(await readFile(marker, 'utf8')) as { size?: unknown; seed?: unknown };
    const was = { size: done.size, seed: done.seed ?? 0 };
    if (was.size !== trainedAs.size || was.seed !== trainedAs.seed) {
      throw new RedflagError(
        'INVALID_ARGUMENT',
        `holds the language model of size ${String(was.size)} and seed ${String(was.seed)}, this study asks for size ${trainedAs.size} and seed ${trainedAs.seed}: use another output directory (or remove ${join(config.out, 'lm')} to train it again)`,
        { file: marker },
      );
    }
    log(`language model: reusing ${model} (trained by an earlier run of this study)`);
    return model;
  }
  let last = 0;
  const lm = await trainLanguageModel({
    ...o,
    log: (l) => log(`  ${l}`),
    ...(signal ? { signal } : {}),
    onStep: (_stage, s) => {
      if (s.step === s.steps || performance.now() - last > 15_000) {
        last = performance.now();
        log(`  [lm] step ${s.step}/${s.steps} ce ${s.loss.ce.toFixed(3)} (${s.tokensPerSecond.toFixed(0)} tok/s)`);
      }
    },
  });
  await writeFileAtomic(marker, [json({ finalLoss: lm.finalLoss, seconds: lm.seconds, ...trainedAs })], { overwrite: true });
  return model;
}

/** Trains and evaluates one cell at one seed, or reads its finished result. */
async function runCell(
  cell: StudyCell,
  seed: number,
  context: { config: StudyConfig; plan: StudyPlan; model: string; label: string; hooks: StudyHooks; hashes: Map<string, Promise<string>> },
): Promise<CellResult> {
  const { config, plan, model, label, hooks } = context;
  const log = hooks.log ?? (() => undefined);
  const signal = hooks.signal;
  const dir = join(config.out, 'cells', cell.name, `seed-${seed}`);
  const threads = config.threads ? { threads: config.threads } : {};
  const trainDir = join(dir, 'train');
  const evalDir = join(dir, 'eval');
  const trainInput = { ...cell.train, model, output: trainDir, seed, overwrite: true, ...threads } as TrainConfigInput;
  // What training writes: an adapter, or with full fine-tuning a model.
  const trainedDir = join(trainDir, parseTrainConfig(trainInput).mode === 'full' ? 'model' : 'adapter');
  const evalInput = { ...plan.eval, model, out: evalDir, variants: [{ name: 'cell', source: trainedDir }], ...threads } as EvalConfigInput;
  const inputs = await cellInputs(model, trainInput, evalInput, context.hashes);
  const settings = { ...cellSettings(trainInput, evalInput, modelIdentity(config)), inputs };
  const fp = fingerprint(settings);

  const resultFile = join(dir, 'result.json');
  if (await pathExists(resultFile)) {
    const done = await readJson<CellResult>(resultFile);
    const changed = settingsDifferences(done.settings, settings);
    if (changed.length > 0) {
      throw new RedflagError(
        'INVALID_ARGUMENT',
        `cell "${cell.name}" seed ${seed} was finished with other settings (${changed.join(', ')}); a finished cell is never recomputed: choose another out, or delete ${dir} to recompute it`,
        { file: resultFile },
      );
    }
    log(`${label}: finished earlier, skipped`);
    return done;
  }

  // cell.json records the settings of whatever is in the directory: unfinished work of other settings starts over.
  const cellFile = join(dir, 'cell.json');
  if (await pathExists(cellFile)) {
    const previous = await readJson<{ fingerprint: string; settings: CellResult['settings'] }>(cellFile);
    const changed = settingsDifferences(previous.settings, settings);
    if (changed.length > 0) {
      log(`${label}: unfinished work with other settings (${changed.join(', ')}): starting over`);
      await rm(dir, { recursive: true, force: true });
    }
  }
  await mkdir(dir, { recursive: true });
  await writeFileAtomic(cellFile, [json({ cell: cell.name, seed, fingerprint: fp, overrides: cell.overrides, settings })], { overwrite: true });

  // Training, resumed from its checkpoint when an earlier run was stopped.
  const trainedFile = join(trainDir, 'trained.json');
  let trained: CellResult['train'] | undefined;
  if (await pathExists(trainedFile)) {
    // An adapter belongs to the base it was trained on: one trained before the base model's files
    // changed (or before trained.json recorded them) is trained again, not evaluated on the new base.
    const { baseModel, ...record } = await readJson<TrainedRecord>(trainedFile);
    if (JSON.stringify(baseModel) === JSON.stringify(inputs.baseModel)) trained = record;
    else {
      log(`${label}: the trained ${basename(trainedDir)} is of ${baseModel ? 'other base model files' : 'a base model whose files were not recorded'}: training again`);
      await rm(trainDir, { recursive: true, force: true });
      await rm(evalDir, { recursive: true, force: true });
    }
  }
  if (!trained) {
    const resume = (await findCheckpoint(trainDir)) !== null;
    const steps = parseTrainConfig(trainInput).steps;
    log(`${label}: training ${steps} steps${resume ? ' (resuming from the checkpoint)' : ''}`);
    const t0 = performance.now();
    let last = t0;
    let first = -1;
    const result = await train(trainInput, {
      resume,
      ...(signal ? { signal } : {}),
      log: (l) => {
        if (/checkpoint|skipped|truncated|resumed/.test(l)) log(`  ${l}`);
      },
      onStep: (s) => {
        hooks.onStep?.(cell.name, seed, s);
        if (first < 0) first = s.step - 1;
        const now = performance.now();
        if (s.step === s.steps || now - last > 15_000) {
          last = now;
          const eta = (((now - t0) / 1000) * (s.steps - s.step)) / (s.step - first);
          log(`  step ${s.step}/${s.steps} loss ${s.loss.total.toFixed(4)} (rf ${s.loss.redFlag.toFixed(3)}, benign ${s.loss.benign.toFixed(4)}), ${Math.round(eta)}s to go`);
        }
      },
    });
    const fe = result.finalEval;
    trained = {
      seconds: (performance.now() - t0) / 1000,
      steps: result.steps,
      finalEval: fe ? { harmfulFlagRate: fe.harmfulFlagRate, benignFalseFlagRate: fe.benignFalseFlagRate, benignKl: fe.benignKl, harmful: fe.harmful, benign: fe.benign } : null,
      lastLoss: result.lastLoss,
    };
    await writeFileAtomic(trainedFile, [json({ ...trained, baseModel: inputs.baseModel } satisfies TrainedRecord)], { overwrite: true });
  }
  if (signal?.aborted) throw abortError(signal);

  // Evaluation (its results cache resumes a stopped one).
  log(`${label}: evaluating (${parseEvalConfig(evalInput).suites.join(', ')})`);
  const t0 = performance.now();
  const report = await evaluate(evalInput, {
    ...(signal ? { signal } : {}),
    onProgress: (e: EvalProgress) => {
      if (e.phase === 'end' && e.variant === 'cell') log(`  ${e.suite}: ${(e.seconds ?? 0).toFixed(1)}s`);
    },
  });
  const { metrics, titles } = cellMetrics(trained.finalEval, report, trained.seconds);
  const result: CellResult = {
    version: 1,
    cell: cell.name,
    seed,
    fingerprint: fp,
    settings,
    metrics,
    titles,
    train: trained,
    eval: { seconds: (performance.now() - t0) / 1000, suites: (report.seconds['cell'] ?? {}) as Record<string, number>, report: join('eval', 'report.json') },
    finishedAt: new Date().toISOString(),
  };
  await writeFileAtomic(resultFile, [json(result)], { overwrite: true });
  log(`${label}: done (training ${trained.seconds.toFixed(0)}s, evaluation ${result.eval.seconds.toFixed(0)}s)`);
  return result;
}

/** Runs the study; see the module description. Returns the report it wrote. */
export async function runStudy(input: StudyConfigInput | StudyConfig, hooks: StudyHooks = {}): Promise<StudyReport> {
  const config = parseStudyConfig(input);
  const plan = planStudy(config);
  const log = hooks.log ?? (() => undefined);
  const { signal } = hooks;
  // Before anything trains: the report must not replace a user's own study.md or study.json.
  await checkReportFolder(config.out, STUDY_REPORT_FILES, config.overwrite);
  await mkdir(config.out, { recursive: true });
  const total = plan.cells.length * plan.seeds.length;
  log(`study: ${plan.cells.length} cells × ${plan.seeds.length} seeds = ${total} runs in ${config.out}`);
  const model = await resolveModel(config, plan, log, signal);
  const results: CellResult[] = [];
  const hashes = new Map<string, Promise<string>>();
  let n = 0;
  for (const cell of plan.cells) {
    for (const seed of plan.seeds) {
      if (signal?.aborted) throw abortError(signal);
      n++;
      results.push(await runCell(cell, seed, { config, plan, model, label: `[${n}/${total}] ${cell.name} seed ${seed}`, hooks, hashes }));
    }
  }
  const report = await writeStudyReport(config, plan, model, results);
  log(`study: ${report.files.markdown}, ${report.files.json}${report.plots.length ? `; plots: ${report.plots.join(', ')}` : ''}`);
  return report;
}
