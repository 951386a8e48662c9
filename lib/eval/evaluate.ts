/**
 * `evaluate(config)`: runs the chosen suites against the base model and every variant, caching
 * each finished unit in `OUT/cache.json` (a stopped run resumes without recomputing), and
 * writes `report.json`, `report.md` and the plots (SVG and PNG) into `OUT`.
 * @module
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';

import { loadEvalFile, type StoredVerdict } from '../data/formats.js';
import { promptMessages, type Conversation } from '../data/records.js';
import { generateSyntheticData } from '../data/synthetic.js';
import { createDetector } from '../detect/detector.js';
import { RedflagError, abortError } from '../errors.js';
import { addonFor, parseDevice } from '../model/device.js';
import { loadModel, type LoadModelOptions, type Model } from '../model/model.js';
import { applyAdapter } from '../train/export.js';
import { pathExists } from '../model/safetensors.js';
import { directoryStamp, fingerprint, ResultsCache } from './cache.js';
import { parseEvalConfig, settingsOf, suitesOf, type EvalConfig, type EvalConfigInput } from './config.js';
import { generateSyntheticMcq, loadMcQuestions, type McQuestion } from './mcq.js';
import { nonRefusalJudge, RefusalMatcher, syntheticJudge, type Judge } from './refusal.js';
import { checkReportFolder, EVAL_REPORT_FILES, writeReport, type EvalReport } from './report.js';
import { SUITES } from './suites/index.js';
import type { EvalData, LoadedVariant, SuiteName } from './types.js';

/** A progress event: a suite on a variant started, advanced or ended. */
export interface EvalProgress {
  phase: 'load' | 'start' | 'progress' | 'end';
  variant: string;
  suite?: SuiteName;
  done: number;
  total: number;
  /** Seconds the suite took (at `end`). */
  seconds?: number;
}

/** Hooks of {@link evaluate}. */
export interface EvaluateHooks {
  onProgress?: (event: EvalProgress) => void;
  signal?: AbortSignal;
  /** Replaces the configured judge (e.g. a model-based one). */
  judge?: Judge;
}

/** The data set the config names: files (every format the project reads) and/or the synthetic test split. */
export async function loadEvalData(config: EvalConfig): Promise<EvalData & { storedVerdicts: Record<string, StoredVerdict>; sources: string[] }> {
  const harmful: Conversation[] = [];
  const benign: Conversation[] = [];
  const storedVerdicts: Record<string, StoredVerdict> = {};
  const sources: string[] = [];
  const responseOnly: Conversation[] = [];
  const add = (c: Conversation) => {
    if (c.promptLabel === undefined || c.promptLabel === c.label || c.responseMissing) return (c.label === 'harmful' ? harmful : benign).push(c);
    // A response labelled against its request: the response is scored as labelled, the request
    // asked as what it is (a refused jailbreak is no benign prompt).
    responseOnly.push(c);
    const { messages: _, promptLabel, ...rest } = c;
    return (promptLabel === 'harmful' ? harmful : benign).push({ ...rest, messages: promptMessages(c), label: promptLabel, responseMissing: true });
  };
  const files = [
    ...config.harmful.map((f) => ({ ...f, label: 'harmful' as const })),
    ...config.benign.map((f) => ({ ...f, label: 'benign' as const })),
    ...config.data,
  ];
  for (const entry of files) {
    const loaded = await loadEvalFile(entry);
    loaded.conversations.forEach(add);
    Object.assign(storedVerdicts, loaded.storedVerdicts);
    sources.push(`${entry.file} (${loaded.format}, ${loaded.conversations.length} rows${loaded.skipped.length ? `, ${loaded.skipped.length} skipped` : ''})`);
  }
  let mcq: McQuestion[] = [];
  if (config.synthetic) {
    const s = config.synthetic;
    const testPerCategory = s.testPerCategory ?? Math.ceil(s.perCategory / 4);
    generateSyntheticData({ seed: s.seed, perCategory: s.perCategory, testPerCategory }).test.forEach(add);
    sources.push(`synthetic test split (seed ${s.seed}, ${testPerCategory} per category beside ${s.perCategory} for training, held-out templates)`);
    if (s.mcqCount > 0) mcq = generateSyntheticMcq({ seed: s.seed, count: s.mcqCount });
  }
  if (config.mcq !== undefined) mcq = await loadMcQuestions(config.mcq);
  const limit = config.limit ?? Infinity;
  return { harmful: harmful.slice(0, limit), benign: benign.slice(0, limit), responseOnly: responseOnly.slice(0, limit), mcq, storedVerdicts, sources };
}

/** Where and how every model of the run is loaded. */
function engineOptions(config: EvalConfig): LoadModelOptions {
  return {
    device: config.device,
    dtype: config.dtype,
    ...(config.threads ? { threads: config.threads } : {}),
    ...(config.chatTemplateKwargs ? { chatTemplateKwargs: config.chatTemplateKwargs } : {}),
  };
}

/**
 * The device and template kwargs in a cache fingerprint: absent on the CPU and without kwargs, so
 * caches written before they were settings stay valid.
 */
function engineFingerprint(config: EvalConfig): { device?: string; chatTemplateKwargs?: Record<string, unknown> } {
  return { ...(config.device === 'cpu' ? {} : { device: config.device }), ...(config.chatTemplateKwargs ? { chatTemplateKwargs: config.chatTemplateKwargs } : {}) };
}

/** What a variant's source is: an adapter or a model directory; NOT_FOUND naming it otherwise. */
async function variantKind(config: EvalConfig, index: number): Promise<'adapter' | 'model'> {
  const v = config.variants[index]!;
  if (await pathExists(join(v.source, 'adapter_config.json'))) return 'adapter';
  if (await pathExists(join(v.source, 'config.json'))) return 'model';
  throw new RedflagError('NOT_FOUND', `variants[${index}] "${v.name}": neither an adapter (adapter_config.json) nor a model directory (config.json), nor "base"`, { file: v.source });
}

/** Loads one variant: an adapter on the base, or a model directory (the base itself is BaseModel's). */
async function loadVariant(config: EvalConfig, index: number): Promise<LoadedVariant> {
  const v = config.variants[index]!;
  const options = engineOptions(config);
  let model: Model;
  let kind: LoadedVariant['kind'];
  if ((await variantKind(config, index)) === 'adapter') {
    model = await loadModel(config.model, options);
    try {
      await applyAdapter(model, v.source);
    } catch (error) {
      model.dispose();
      throw error;
    }
    kind = 'adapter';
  } else {
    model = await loadModel(v.source, options);
    kind = 'model';
  }
  return withDetector({ name: v.name, source: v.source, kind, model, detects: false, rfToken: null, detector: null }, config);
}

async function withDetector(variant: LoadedVariant, config: EvalConfig): Promise<LoadedVariant> {
  const rf = variant.model.redFlagTokenId;
  if (rf === null) return variant;
  try {
    const detector = await createDetector({ model: variant.model, threshold: config.threshold, mode: 'flag', maxBatch: config.batchSize, kvCacheBytes: config.kvCacheBytes });
    return { ...variant, detects: true, rfToken: rf, detector };
  } catch (error) {
    variant.model.dispose();
    throw error;
  }
}

/**
 * The base model, loaded when first asked for: as the base variant, or by a suite that compares
 * with it (utility). Outside the base variant it is freed after each suite, so a run holds two
 * copies of the weights only while utility runs (the white-box attacks take none: they run on the
 * variant's own model, lib/eval/suites/white-box.ts).
 */
class BaseModel {
  #loading: Promise<LoadedVariant> | null = null;
  constructor(
    private readonly config: EvalConfig,
    private readonly emit: (event: EvalProgress) => void,
  ) {}

  get(): Promise<LoadedVariant> {
    this.#loading ??= (async () => {
      this.emit({ phase: 'load', variant: 'base', done: 0, total: 1 });
      const model = await loadModel(this.config.model, engineOptions(this.config));
      return withDetector({ name: 'base', source: 'base', kind: 'base', model, detects: false, rfToken: null, detector: null }, this.config);
    })();
    return this.#loading;
  }

  async release(): Promise<void> {
    const loading = this.#loading;
    this.#loading = null;
    const base = await loading?.catch(() => null);
    await base?.detector?.dispose();
    base?.model.dispose();
  }
}

/** Runs the evaluation; see the module description. Returns the report it wrote. */
export async function evaluate(input: EvalConfigInput | EvalConfig, hooks: EvaluateHooks = {}): Promise<EvalReport> {
  const config = parseEvalConfig(input);
  // A device that cannot run fails now, with its reason, before any data is read.
  addonFor(parseDevice(config.device));
  const settings = settingsOf(config);
  const suites = suitesOf(config);
  const { signal } = hooks;
  const emit = hooks.onProgress ?? (() => undefined);
  // Before anything runs: the report must not replace a user's own report.md or report.json.
  await checkReportFolder(config.out, EVAL_REPORT_FILES, config.overwrite);
  const data = await loadEvalData(config);
  if (data.harmful.length === 0) throw new RedflagError('INVALID_ARGUMENT', 'harmful: the data has no harmful conversations; every suite needs some');
  // What each suite needs of the data, and every variant's source, before any runs (not after hours of the others).
  for (const name of suites) SUITES[name].check?.({ data, settings });
  for (const [i, v] of config.variants.entries()) if (v.source !== 'base') await variantKind(config, i);
  const refusals = new RefusalMatcher(config.refusalPhrases);
  const judge = hooks.judge ?? (config.judge === 'synthetic' || (config.judge === 'auto' && config.synthetic && config.harmful.length + config.data.length === 0) ? syntheticJudge() : nonRefusalJudge(refusals));
  await mkdir(config.out, { recursive: true });
  const cache = await ResultsCache.open(join(config.out, 'cache.json'));

  const baseStamp = [config.model, ...(await directoryStamp(config.model))];
  const described: EvalReport['variants'] = [];
  const results: EvalReport['results'] = {};
  const seconds: EvalReport['seconds'] = {};
  const base = new BaseModel(config, emit);
  let current: LoadedVariant | null = null;
  const release = async (v: LoadedVariant | null) => {
    if (v === null) return;
    if (v.kind === 'base') return base.release();
    await v.detector?.dispose();
    v.model.dispose();
  };
  try {
    for (let i = 0; i < config.variants.length; i++) {
      if (signal?.aborted) throw abortError(signal);
      const spec = config.variants[i]!;
      if (spec.source !== 'base') emit({ phase: 'load', variant: spec.name, done: 0, total: 1 });
      const variant = spec.source === 'base' ? await base.get() : await loadVariant(config, i);
      current = variant;
      described.push({ name: spec.name, source: spec.source, kind: variant.kind, detects: variant.detects });
      results[spec.name] = {};
      seconds[spec.name] = {};
      // Units of the same model and settings share cache entries across runs.
      const sourceStamp = spec.source === 'base' ? [] : await directoryStamp(spec.source);
      const fp = fingerprint({ model: baseStamp, source: spec.source, sourceStamp, ...engineFingerprint(config), dtype: config.dtype, maxTokens: settings.maxTokens, threshold: settings.threshold, temperature: settings.temperature, seed: settings.seed });
      // The base is compared with the variant on the variant's prompts: rendered with its
      // template kwargs (an adapter's own, over the config's), which its shared units are keyed by.
      const kwargs = { ...(variant.model.tokenizer?.chatTemplateKwargs ?? {}) };
      const promptKwargs = Object.keys(kwargs).length > 0 ? { chatTemplateKwargs: kwargs } : {};
      const sharedFp = fingerprint({ model: baseStamp, ...engineFingerprint(config), ...promptKwargs, dtype: config.dtype, maxTokens: settings.maxTokens, seed: settings.seed });
      const baseForVariant = async () => {
        const b = await base.get();
        if (b.model.tokenizer) b.model.tokenizer.chatTemplateKwargs = kwargs;
        return b;
      };
      for (const name of suites) {
        const suite = SUITES[name];
        const t0 = performance.now();
        const total = suite.units({ data, settings, variant });
        emit({ phase: 'start', variant: spec.name, suite: name, done: 0, total });
        results[spec.name]![name] = await suite.run({
          variant,
          base: baseForVariant,
          baseDir: config.model,
          data,
          settings,
          judge,
          refusals,
          cache,
          cacheKey: (item: string) => `${spec.name}|${name}|${fp}|${item}`,
          sharedCacheKey: (item: string) => `shared|${name}|${sharedFp}|${item}`,
          progress: (done: number, t: number) => emit({ phase: 'progress', variant: spec.name, suite: name, done, total: t }),
          ...(signal ? { signal } : {}),
        });
        const s = (performance.now() - t0) / 1000;
        seconds[spec.name]![name] = s;
        emit({ phase: 'end', variant: spec.name, suite: name, done: total, total, seconds: s });
        if (variant.kind !== 'base') await base.release();
      }
      current = null;
      await release(variant);
    }
  } finally {
    await release(current);
    await base.release();
  }
  return writeReport(config, {
    variants: described,
    suites,
    results,
    seconds,
    data: { harmful: data.harmful.length, benign: data.benign.length, mcq: data.mcq.length, sources: data.sources },
    judge: judge.name,
    refusalPhrases: refusals.phrases,
    storedVerdicts: Object.keys(data.storedVerdicts).length,
    cache: { hits: cache.hits, computed: cache.computed },
  });
}
