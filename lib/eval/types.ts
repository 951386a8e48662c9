/**
 * The evaluation's shared types: settings, the variants under test, and the suite interface
 * every suite implements (a suite is run once per variant and returns a JSON-serialisable
 * result; the report reads each suite's {@link SuiteSummary} for the comparison table and its
 * series for the plots). A new suite implements {@link Suite} in its own file and registers in
 * `suites/index.ts` and `SUITE_NAMES`.
 * @module
 */
import type { StoredVerdict } from '../data/formats.js';
import type { Conversation } from '../data/records.js';
import type { Detector } from '../detect/types.js';
import type { Model } from '../model/model.js';
import type { ResultsCache } from './cache.js';
import type { McQuestion } from './mcq.js';
import type { Judge, RefusalMatcher } from './refusal.js';

/** The suites, in the order they run. */
export const SUITE_NAMES = ['detection', 'sampling', 'prefill', 'long-context', 'suppression', 'utility', 'embedding', 'gcg', 'finetune'] as const;
export type SuiteName = (typeof SUITE_NAMES)[number];
/**
 * The suites run when none are named: all but the white-box attacks, which train a model
 * (finetune) or search with gradients (embedding, gcg) and cost far more on a large model.
 */
export const DEFAULT_SUITES: readonly SuiteName[] = ['detection', 'sampling', 'prefill', 'long-context', 'suppression', 'utility'];

/** The budgets of the white-box attacks (lib/attack); defaults in suites/white-box.ts. */
export interface AttackBudgets {
  embedding: {
    /** Radii relative to each prompt token's embedding norm; 0 is the unattacked baseline. */
    epsilons: number[];
    steps: number;
    /** Harmful conversations attacked. */
    items: number;
    /** Weight of the red-flag term against the answer's cross-entropy. */
    lambda: number;
  };
  gcg: { length: number; steps: number; topK: number; candidates: number; items: number; lambda: number };
  finetune: { steps: number; lr: number; rank: number; batchSize: number };
}

/** The settings every suite reads (see `config.ts` for defaults and validation). */
export interface EvalSettings {
  /** p(`<rf>`) at which an answer counts as flagged. */
  threshold: number;
  /** Most generated tokens per answer. */
  maxTokens: number;
  /** Sampling attack: answers per prompt and their temperature. */
  samples: number;
  temperature: number;
  /** Prefill attack: answer-start lengths, in `prefillUnit`s. */
  prefillK: number[];
  prefillUnit: 'words' | 'tokens';
  /** Long-context attack: benign exchanges before the harmful request. */
  contextK: number[];
  /** Share of the labelled data set aside to choose a threshold on. */
  devFraction: number;
  /** The false-flag rate the dev threshold aims at. */
  devMaxFpr: number;
  /** Bootstrap resamples of the AUROC, AUPRC and TPR-at-FPR intervals (rates use Wilson's interval). */
  bootstrapResamples: number;
  seed: number;
  /** Sequences decoded together. */
  batchSize: number;
  /** KV-cache budget of each detector the run holds. */
  kvCacheBytes: number;
  /** The white-box attacks' budgets. */
  attacks: AttackBudgets;
}

/** A model under test, loaded. */
export interface LoadedVariant {
  name: string;
  /** What it was loaded from: `base`, an adapter directory or a model directory. */
  source: string;
  kind: 'base' | 'adapter' | 'model';
  model: Model;
  /** Whether the model knows `<rf>` (red-flag scores mean something). */
  detects: boolean;
  /** The `<rf>` id, when it detects. */
  rfToken: number | null;
  /** A detector over the model, when it detects (teacher-forced classify). */
  detector: Detector | null;
}

/** The data every suite draws from. */
export interface EvalData {
  /** Harmful conversations: with a response (detection, prefill) or prompt-only (generation suites). */
  harmful: Conversation[];
  /** Benign conversations, with responses where utility needs them. */
  benign: Conversation[];
  /**
   * Responses labelled against their request's class (a refusal to a harmful request: benign),
   * scored by teacher-forced detection only; their requests are in `harmful`/`benign` as
   * prompt-only conversations of the request's class.
   */
  responseOnly?: Conversation[];
  /** Multiple-choice questions for utility. */
  mcq: McQuestion[];
  /** Verdicts stored in the data (JailbreakBench artifacts), by conversation source. */
  storedVerdicts?: Record<string, StoredVerdict>;
}

/** Progress of a suite on one variant. */
export interface SuiteProgress {
  variant: string;
  suite: string;
  done: number;
  total: number;
}

/** What a suite runs with. */
export interface SuiteContext {
  variant: LoadedVariant;
  /**
   * The base model (utility compares with it), loaded at the first call; the same object as
   * `variant` for the base variant. Outside the base variant it is freed after the suite, so the
   * copy a white-box attack loads never sits beside it.
   */
  base: () => Promise<LoadedVariant>;
  /** The base model's directory (what adapter variants are applied on). */
  baseDir: string;
  data: EvalData;
  settings: EvalSettings;
  judge: Judge;
  refusals: RefusalMatcher;
  cache: ResultsCache;
  /** A prefix every cache key of this variant and suite starts with (variant, suite, settings fingerprint). */
  cacheKey: (item: string) => string;
  /** A key for units every variant shares (e.g. the base model's reference answers). */
  sharedCacheKey: (item: string) => string;
  progress: (done: number, total: number) => void;
  signal?: AbortSignal;
}

/** One series of a plot: y against x for a variant. */
export interface SeriesPoint {
  x: number;
  y: number;
}

/** What the report takes from a suite's result. */
export interface SuiteSummary {
  /** Headline numbers for the comparison table: column name → value (null: not applicable). */
  headline: Record<string, number | null>;
}

/** A suite; see the module description. */
export interface Suite<R = unknown> {
  readonly name: SuiteName;
  /** One-line description for the report. */
  readonly description: string;
  /** Work units for the progress bar (a guess is fine). */
  units(ctx: Pick<SuiteContext, 'data' | 'settings' | 'variant'>): number;
  /** Throws (INVALID_ARGUMENT) when the data cannot serve this suite: checked for every suite before any runs. */
  check?(ctx: Pick<SuiteContext, 'data' | 'settings'>): void;
  run(ctx: SuiteContext): Promise<R>;
  summarize(result: R): SuiteSummary;
}
