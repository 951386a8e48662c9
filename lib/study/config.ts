/**
 * The study's configuration (`redflag study --config study.json`), validated with zod: a base
 * training config, a grid of overrides and/or named variants (the cells), the seeds each cell is
 * trained with, and the eval suites each trained adapter is measured with. Every cell's complete
 * training config and the eval config are validated up front, so a mistake anywhere is reported
 * before anything trains, naming the file and the field (`grid["loss.rfAggregation"][2]`,
 * `variants[1].loss.rfPosition`, `train.lora.rank`, `eval.suites[0]`).
 * @module
 */
import { readFile } from 'node:fs/promises';
import { z } from 'zod';

import { RedflagError } from '../errors.js';
import { evalConfigSchema, type EvalConfigInput } from '../eval/config.js';
import { parseJsonText } from '../model/config.js';
import { trainConfigConflicts, trainConfigSchema, type TrainConfigInput } from '../train/config.js';
import { PIPELINE_SIZES, redFlagAdapterConfig, type PipelineOptions } from '../train/pipeline.js';

type Json = unknown;
type JsonObject = Record<string, Json>;

/** Training fields the study sets itself, and where they are set instead. */
const STUDY_TRAIN_FIELDS: Record<string, string> = {
  model: 'the study\'s "model" or "pipeline"',
  output: 'the study (OUT/cells/CELL/seed-N/train)',
  seed: 'the study\'s "seeds"',
  data: 'the study\'s "data"',
  threads: 'the study\'s "threads" (or --threads)',
  overwrite: 'the study (a cell is started over or resumed as needed)',
};
/** Eval fields the study sets itself. */
const STUDY_EVAL_FIELDS: Record<string, string> = {
  model: 'the study',
  variants: 'the study (each cell\'s adapter)',
  out: 'the study (OUT/cells/CELL/seed-N/eval)',
  threads: 'the study\'s "threads" (or --threads)',
  overwrite: 'the study (each cell\'s eval folder is its own)',
};

const cellName = z.string().regex(/^[A-Za-z0-9][\w.=+,-]*$/, 'must start with a letter or digit and hold only letters, digits and . _ = + , -');
const jsonObject = z.record(z.string(), z.unknown());

/** The schema of a study config (cross-field checks and every cell's train config are checked by {@link parseStudyConfig}). */
export const studyConfigSchema = z.strictObject({
  /** Output directory: the language model (with `pipeline`), cells/, study.json, study.md, plots. */
  out: z.string().min(1),
  /** A model directory (with its tokenizer) the adapters are trained on. Exclusive with `pipeline`. */
  model: z.string().min(1).optional(),
  /**
   * The demo's language model instead of `model`: trained once into `OUT/lm` at this size
   * (`small`: `redflag demo --small`'s, `demo`: `redflag demo`'s, `integration`: the integration
   * test's), or taken from `reuseLm` (the `lm` directory of an earlier demo or study). The base
   * training config is then the demo's red-flag adapter config at that size.
   */
  pipeline: z
    .strictObject({
      size: z.enum(['small', 'demo', 'integration']),
      /** Seed of the language model (its initialisation and data). */
      seed: z.number().int().min(0).default(0),
      reuseLm: z.string().min(1).optional(),
    })
    .optional(),
  /** Training data as the training config takes it: `synthetic` (default) or a list of files. */
  data: trainConfigSchema.shape.data.default('synthetic'),
  /** The base training config every cell starts from (any training-config field but those the study sets). */
  train: jsonObject.default({}),
  /**
   * Axes: a dotted training-config path (`loss.rfAggregation`, `lora.rank`, `loss.alphaBenign`,
   * `adversarial`) to the values it takes; the cells are the product of the axes. `null` unsets a
   * field (e.g. `"adversarial": [null, {}]`: RF-AT off and on).
   */
  grid: z.record(z.string().min(1), z.array(z.unknown()).min(1)).default({}),
  /** Named cells besides the grid's: overrides of the base training config, e.g. `{"name": "fixed-pos", "loss": {"rfPosition": "start"}}`. */
  variants: z.array(z.looseObject({ name: cellName })).default([]),
  /** Training seeds: every cell is trained and evaluated once per seed. */
  seeds: z.array(z.number().int().min(0)).min(1).default([0, 1, 2]),
  /** The eval config (suites, settings, data) without `model`, `variants`, `out`: see `redflag eval`. Default data: the synthetic held-out split. */
  eval: jsonObject.default({}),
  /** Metric keys shown in study.md and the plots (default: every one measured; study.json keeps all). */
  metrics: z.array(z.string().min(1)).min(1).optional(),
  /** Threads for native work (training and evaluation). */
  threads: z.number().int().min(1).optional(),
  /**
   * Replace report files in `out` that redflag did not write (a study.json without its marker, a
   * study.md or sensitivity plot with no study.json of redflag's beside it); without it such a folder is refused.
   */
  overwrite: z.boolean().default(false),
});

/** A validated study config (defaults filled in). */
export type StudyConfig = z.output<typeof studyConfigSchema>;
/** A study config as written. */
export type StudyConfigInput = z.input<typeof studyConfigSchema>;

/** One cell of the study: a name and its complete training config (model, output, seed and threads are the study's). */
export interface StudyCell {
  name: string;
  /** `grid` (a product of the axes) or `variant`. */
  kind: 'grid' | 'variant';
  /** The overrides that make this cell, as written (grid: path → value). */
  overrides: JsonObject;
  /** Grid cells: axis path → value. */
  axes: Record<string, Json>;
  /** The training config, as input (defaults not yet filled in), without model/output/seed. */
  train: Omit<TrainConfigInput, 'model' | 'output'>;
}

/** What the study runs: the cells, seeds and the eval config. */
export interface StudyPlan {
  cells: StudyCell[];
  seeds: number[];
  /** Grid axes in order (path → values). */
  axes: [string, Json[]][];
  /** The eval config each cell's adapter is measured with, without model, variants and out. */
  eval: Omit<EvalConfigInput, 'model' | 'variants' | 'out'>;
  /** The pipeline options when the language model is the demo's. */
  pipeline: PipelineOptions | null;
}

const isObject = (v: unknown): v is JsonObject => v !== null && typeof v === 'object' && !Array.isArray(v);

/** `b` over `a`: objects merged field by field, everything else replaced; `null` removes the field. */
export function deepMerge(a: JsonObject, b: JsonObject): JsonObject {
  const out: JsonObject = { ...a };
  for (const [k, v] of Object.entries(b)) {
    if (v === null) delete out[k];
    else if (isObject(v) && isObject(out[k])) out[k] = deepMerge(out[k] as JsonObject, v);
    else out[k] = v;
  }
  return out;
}

/** `{a: {b: value}}` for the path `a.b`. */
function nested(path: string, value: Json): JsonObject {
  return path
    .split('.')
    .reverse()
    .reduce<Json>((inner, key) => ({ [key]: inner }), value) as JsonObject;
}

/** A path as written in messages: `train.lora.rank`, `variants[1].name`, `grid["loss.rfOffset"][0]`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let s = '';
  for (const key of path) {
    if (typeof key === 'number') s += `[${key}]`;
    else if (/^[A-Za-z_$][\w$]*$/.test(String(key))) s += s ? `.${String(key)}` : String(key);
    else s += `[${JSON.stringify(String(key))}]`;
  }
  return s || '(root)';
}

/** The label of a grid value in a cell name: `any`, `60`, `off` (null), `on` ({}), `epsilon-0.1`. */
function valueLabel(value: Json): string {
  if (value === null) return 'off';
  if (isObject(value)) {
    const entries = Object.entries(value);
    return entries.length ? entries.map(([k, v]) => `${k}-${valueLabel(v)}`).join(',') : 'on';
  }
  if (Array.isArray(value)) return value.map(valueLabel).join(',');
  return String(value).replace(/[^\w.,+-]/g, '_');
}

/** Whether a dotted path names a field of the training config, or why not. */
function checkTrainPath(path: string): string | null {
  const keys = path.split('.');
  if (keys[0]! in STUDY_TRAIN_FIELDS) return `"${keys[0]}" is set by ${STUDY_TRAIN_FIELDS[keys[0]!]}`;
  let schema: z.ZodType = trainConfigSchema;
  for (let i = 0; i < keys.length; i++) {
    // Unwrap defaults and optionals to the object whose fields the path names.
    for (;;) {
      const type = schema._zod.def.type;
      if (type === 'default' || type === 'prefault' || type === 'optional') schema = (schema as unknown as { unwrap(): z.ZodType }).unwrap();
      else break;
    }
    if (schema._zod.def.type !== 'object') return `"${keys.slice(0, i).join('.')}" has no fields`;
    const shape = (schema as unknown as z.ZodObject).shape as Record<string, z.ZodType>;
    const next = shape[keys[i]!];
    if (!next) return `no training-config field "${keys.slice(0, i + 1).join('.')}"${i > 0 ? `; ${keys.slice(0, i).join('.')} has ${Object.keys(shape).join(', ')}` : ''}`;
    schema = next;
  }
  return null;
}

/** The pipeline's options at a size (the language model and the base adapter config). */
function pipelineOptions(config: StudyConfig): PipelineOptions | null {
  if (!config.pipeline) return null;
  const size = PIPELINE_SIZES[config.pipeline.size];
  return {
    dir: config.out,
    model: { ...size.model },
    perCategory: size.perCategory,
    lmSteps: size.lmSteps,
    adapterSteps: size.adapterSteps,
    batchSize: 8,
    seed: config.pipeline.seed,
    ...(config.pipeline.reuseLm ? { reuseLm: config.pipeline.reuseLm } : {}),
    ...(config.threads ? { threads: config.threads } : {}),
  };
}

/**
 * The cells and the eval config of a valid study config, with `problems` collecting every
 * mistake found on the way (path → message) instead of failing at the first.
 */
function buildPlan(config: StudyConfig, problems: { path: PropertyKey[]; message: string }[]): StudyPlan {
  const add = (path: PropertyKey[], message: string) => {
    if (!problems.some((p) => formatPath(p.path) === formatPath(path) && p.message === message)) problems.push({ path, message });
  };
  if (config.model === undefined && config.pipeline === undefined) add(['model'], 'give "model" (a model directory) or "pipeline" (the demo\'s language model)');
  if (config.model !== undefined && config.pipeline !== undefined) add(['pipeline'], '"model" and "pipeline" exclude each other');
  for (const key of Object.keys(config.train)) if (key in STUDY_TRAIN_FIELDS) add(['train', key], `set by ${STUDY_TRAIN_FIELDS[key]}`);
  for (const key of Object.keys(config.eval)) if (key in STUDY_EVAL_FIELDS) add(['eval', key], `set by ${STUDY_EVAL_FIELDS[key]}`);
  config.seeds.forEach((s, i) => {
    if (config.seeds.indexOf(s) !== i) add(['seeds', i], `duplicate seed ${s}`);
  });

  // The base training config: the pipeline's red-flag adapter config (with a pipeline), the
  // study's defaults (no periodic held-out evaluation, a checkpoint every 100 steps so a killed
  // cell resumes), then the study's `train`.
  const pipeline = pipelineOptions(config);
  const fromPipeline: JsonObject = pipeline ? (redFlagAdapterConfig(pipeline, 'MODEL', 'OUTPUT') as JsonObject) : {};
  const { model: _m, output: _o, overwrite: _w, threads: _t, seed: _s, ...pipelineBase } = fromPipeline;
  const base = deepMerge(deepMerge({ ...pipelineBase, evalEvery: 0, checkpointEvery: 100 }, config.train), { data: config.data as Json });

  const axes = Object.entries(config.grid);
  const badAxes = new Set<string>();
  for (const [path, values] of axes) {
    const why = checkTrainPath(path);
    if (why) {
      add(['grid', path], why);
      badAxes.add(path);
    }
    values.forEach((v, i) => {
      if (values.findIndex((w) => JSON.stringify(w) === JSON.stringify(v)) !== i) add(['grid', path, i], `duplicate value ${JSON.stringify(v)}`);
    });
  }
  // Cell names: each axis by its last path segment (the full path where two share it).
  const short = axes.map(([path]) => path.split('.').at(-1)!);
  const label = (path: string, i: number) => (short.filter((s) => s === short[i]).length > 1 ? path : short[i]!);
  const cells: StudyCell[] = [];
  const sources: { cell: StudyCell; source: (path: PropertyKey[]) => PropertyKey[] }[] = [];
  if (axes.length > 0) {
    let combos: [number, Json][][] = [[]];
    for (const [, values] of axes) combos = combos.flatMap((c) => values.map((v, i) => [...c, [i, v] as [number, Json]]));
    for (const combo of combos) {
      const cellAxes = Object.fromEntries(combo.map(([, v], a) => [axes[a]![0], v]));
      // A null value removes the field (back to its default), as deepMerge does.
      const train = combo.reduce<JsonObject>((acc, [, v], a) => deepMerge(acc, nested(axes[a]![0], v)), base);
      const name = combo.map(([, v], a) => `${label(axes[a]![0], a)}=${valueLabel(v)}`).join('+');
      const cell: StudyCell = { name, kind: 'grid', overrides: cellAxes, axes: cellAxes, train: train as StudyCell['train'] };
      cells.push(cell);
      sources.push({
        cell,
        source: (path) => {
          const joined = path.map(String).join('.');
          const a = axes.findIndex(([p]) => joined === p || joined.startsWith(`${p}.`));
          if (a >= 0) return ['grid', axes[a]![0], combo[a]![0], ...path.slice(axes[a]![0].split('.').length)];
          return ['train', ...path];
        },
      });
    }
  }
  config.variants.forEach((variant, i) => {
    const { name, ...overrides } = variant as JsonObject & { name: string };
    for (const key of Object.keys(overrides)) if (key in STUDY_TRAIN_FIELDS) add(['variants', i, key], `set by ${STUDY_TRAIN_FIELDS[key]}`);
    const cell: StudyCell = { name, kind: 'variant', overrides, axes: {}, train: deepMerge(base, overrides) as StudyCell['train'] };
    cells.push(cell);
    sources.push({
      cell,
      source: (path) => {
        let o: Json = overrides;
        for (const k of path) {
          if (!isObject(o) || !(String(k) in o)) return ['train', ...path];
          o = o[String(k)];
        }
        return ['variants', i, ...path];
      },
    });
  });
  if (cells.length === 0) {
    const cell: StudyCell = { name: 'default', kind: 'variant', overrides: {}, axes: {}, train: base as StudyCell['train'] };
    cells.push(cell);
    sources.push({ cell, source: (path) => ['train', ...path] });
  }
  const gridCells = cells.filter((c) => c.kind === 'grid').length;
  const names = new Set<string>();
  cells.forEach((c, i) => {
    if (names.has(c.name)) add(c.kind === 'variant' ? ['variants', i - gridCells, 'name'] : ['grid'], `two cells are named "${c.name}"`);
    names.add(c.name);
  });

  // Every cell's complete training config, as train() will parse it.
  for (const { cell, source } of sources) {
    const result = trainConfigSchema.safeParse({ ...cell.train, model: 'MODEL', output: 'OUTPUT', seed: 0 });
    if (result.success) {
      // Mistakes between fields, which train() would meet only once the cells before had trained.
      for (const p of trainConfigConflicts(result.data)) add(source(p.path), `cell "${cell.name}": ${p.message}`);
      continue;
    }
    for (const issue of result.error.issues) {
      const path: PropertyKey[] = [...issue.path];
      if (issue.code === 'unrecognized_keys' && issue.keys.length) path.push(issue.keys[0]!);
      const where = path[0] === 'data' ? ['data', ...path.slice(1)] : source(path);
      if (where[0] === 'grid' && badAxes.has(String(where[1]))) continue; // reported above
      add(where, issue.code === 'unrecognized_keys' ? `unknown field (${issue.message})` : issue.message);
    }
  }

  // The eval config: the synthetic held-out split by default when training on synthetic data.
  const trainPerCategory = (base['syntheticPerCategory'] as number | undefined) ?? 20;
  const evalFiles = ['harmful', 'benign', 'data'].some((k) => Array.isArray(config.eval[k]) && (config.eval[k] as unknown[]).length > 0);
  const evalDefaults: JsonObject = { png: false, ...(config.data === 'synthetic' && !evalFiles ? { synthetic: { seed: 0, perCategory: trainPerCategory } } : {}) };
  const evalInput = deepMerge(evalDefaults, config.eval);
  const evalResult = evalConfigSchema.safeParse({ ...evalInput, model: 'MODEL', out: 'OUT', variants: [{ name: 'cell', source: 'ADAPTER' }] });
  if (!evalResult.success) {
    for (const issue of evalResult.error.issues) {
      const path: PropertyKey[] = ['eval', ...issue.path];
      if (issue.code === 'unrecognized_keys' && issue.keys.length) path.push(issue.keys[0]!);
      add(path, issue.code === 'unrecognized_keys' ? `unknown field (${issue.message})` : issue.message);
    }
  }
  return { cells, seeds: config.seeds, axes, eval: evalInput as StudyPlan['eval'], pipeline };
}

/** Validates a study config; the error lists every bad field by its path, after `where` (the file). */
export function parseStudyConfig(input: unknown, where = 'study config'): StudyConfig {
  const fail = (problems: { path: readonly PropertyKey[]; message: string }[]) =>
    new RedflagError('INVALID_ARGUMENT', `${where}: ${problems.map((p) => `${formatPath(p.path)}: ${p.message}`).join('; ')}`);
  const result = studyConfigSchema.safeParse(input);
  if (!result.success) throw fail(result.error.issues.map((i) => ({ path: i.code === 'unrecognized_keys' && i.keys.length ? [...i.path, i.keys[0]!] : i.path, message: i.message })));
  const problems: { path: PropertyKey[]; message: string }[] = [];
  buildPlan(result.data, problems);
  if (problems.length) throw fail(problems);
  return result.data;
}

/** The cells, seeds and eval config of a validated study config. */
export function planStudy(config: StudyConfig): StudyPlan {
  const problems: { path: PropertyKey[]; message: string }[] = [];
  const plan = buildPlan(config, problems);
  if (problems.length) throw new RedflagError('INVALID_ARGUMENT', `study config: ${problems.map((p) => `${formatPath(p.path)}: ${p.message}`).join('; ')}`);
  return plan;
}

/** Reads and validates a study config file; `overrides` (e.g. `out`, `threads` from flags) replace its fields. */
export async function loadStudyConfig(file: string, overrides: Partial<StudyConfigInput> = {}): Promise<StudyConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (cause) {
    throw new RedflagError('NOT_FOUND', `cannot read the study config (${(cause as Error).message})`, { file, cause });
  }
  const json = parseJsonText(text, file);
  if (!isObject(json)) throw new RedflagError('INVALID_FILE', 'the study config must be a JSON object', { file });
  return parseStudyConfig({ ...json, ...overrides }, file);
}
