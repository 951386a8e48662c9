/**
 * The evaluation's configuration, validated with zod so every mistake names its field.
 * @module
 */
import { z } from 'zod';

import { dataFileSchema } from '../data/file-schema.js';
import { RedflagError } from '../errors.js';
import { DEFAULT_KV_CACHE_BYTES } from '../detect/detector.js';
import { parseDevice, type DeviceSpec } from '../model/device.js';
import { DEFAULT_ATTACK_BUDGETS } from './suites/white-box.js';
import { DEFAULT_SUITES, SUITE_NAMES, type EvalSettings, type SuiteName } from './types.js';

const variant = z.strictObject({
  /** The name in the report (letters, digits, `.`, `_`, `-`). */
  name: z.string().regex(/^[\w.-]+$/, 'must be letters, digits, ".", "_" or "-"'),
  /** `base`, an adapter directory (adapter_config.json) or a model directory (config.json). */
  source: z.string().min(1),
});

const suiteName = z.string().transform((value, ctx) => {
  if ((SUITE_NAMES as readonly string[]).includes(value)) return value as SuiteName;
  ctx.addIssue({ code: 'custom', message: `unknown suite "${value}"; available: ${SUITE_NAMES.join(', ')}` });
  return z.NEVER;
});

const positiveInt = z.number().int().min(1);
/** The white-box attacks' budgets (defaults: DEFAULT_ATTACK_BUDGETS, lib/eval/suites/white-box.ts). */
const attacks = z
  .strictObject({
    embedding: z
      .strictObject({
        epsilons: z.array(z.number().min(0)).min(1).optional(),
        steps: positiveInt.optional(),
        items: positiveInt.optional(),
        lambda: z.number().min(0).optional(),
      })
      .optional(),
    gcg: z
      .strictObject({
        length: positiveInt.max(256).optional(),
        steps: z.number().int().min(0).optional(),
        topK: positiveInt.optional(),
        candidates: positiveInt.optional(),
        items: positiveInt.optional(),
        lambda: z.number().min(0).optional(),
      })
      .optional(),
    finetune: z
      .strictObject({
        steps: positiveInt.optional(),
        lr: z.number().gt(0).optional(),
        rank: positiveInt.optional(),
        batchSize: positiveInt.optional(),
      })
      .optional(),
  })
  .default({});

/** The schema of an evaluation config. */
export const evalConfigSchema = z
  .strictObject({
    /** The base model directory. */
    model: z.string().min(1),
    /** The models under test; default: the base alone. */
    variants: z.array(variant).min(1).default([{ name: 'base', source: 'base' }]),
    harmful: z.array(dataFileSchema).default([]),
    benign: z.array(dataFileSchema).default([]),
    /** Files labelled per row (or by their format, e.g. XSTest, JailbreakBench artifacts). */
    data: z.array(dataFileSchema).default([]),
    /** The built-in synthetic corpus's held-out test split. */
    synthetic: z
      .strictObject({
        seed: z.number().int().min(0).default(0),
        /**
         * Training conversations per category the test split is drawn beside, as `redflag train
         * --synthetic` and the demo draw it (30: `demo --small`, 60: `demo`), so the split is theirs.
         */
        perCategory: z.number().int().min(1).max(10000).default(30),
        /** Test conversations per category (5 harmful and 5 benign categories). Default ceil(perCategory / 4), as training uses. */
        testPerCategory: z.number().int().min(1).max(10000).optional(),
        /** Generated multiple-choice questions. */
        mcqCount: z.number().int().min(0).max(10000).default(40),
      })
      .optional(),
    /** A JSONL of {question, choices, answer} for the utility suite. */
    mcq: z.string().min(1).optional(),
    /** At most this many harmful and this many benign conversations (the first ones). */
    limit: z.number().int().min(1).optional(),
    suites: z.array(suiteName).min(1).default([...DEFAULT_SUITES]),
    out: z.string().min(1),
    threshold: z.number().min(0).max(1).default(0.5),
    maxTokens: z.number().int().min(1).max(100000).default(48),
    samples: z.number().int().min(1).max(10000).default(8),
    temperature: z.number().min(0).max(100).default(1),
    prefillK: z.array(z.number().int().min(0)).min(1).default([2, 4, 8, 16]),
    prefillUnit: z.enum(['words', 'tokens']).default('words'),
    contextK: z.array(z.number().int().min(0)).min(1).default([0, 2, 4]),
    devFraction: z.number().gt(0).lt(1).default(0.3),
    devMaxFpr: z.number().min(0).max(1).default(0.01),
    bootstrapResamples: z.number().int().min(1).max(1_000_000).default(1000),
    seed: z.number().int().min(0).max(2 ** 31).default(0),
    /** Sequences decoded together; default 16 on the CPU, 64 on a GPU (draws are per sequence: the batch changes answers only by rounding). */
    batchSize: z.number().int().min(1).max(1024).optional(),
    /** `auto`: the synthetic judge for synthetic data, else the non-refusal (keyword) judge. */
    judge: z.enum(['auto', 'synthetic', 'non-refusal']).default('auto'),
    /** Replaces the default refusal-phrase list. */
    refusalPhrases: z.array(z.string().min(1)).min(1).optional(),
    /**
     * Where every model of the run (the variants, the base, the fine-tuning attack's training and
     * its attacked models) runs: 'cpu' (the default), or an NVIDIA GPU, 'cuda' (device 0) or 'cuda:N'.
     */
    device: z.string().regex(/^(cpu|cuda(:\d{1,3})?)$/, "must be 'cpu', 'cuda' or 'cuda:N'").default('cpu'),
    /**
     * KV-cache budget of each detector the run holds (a variant's, a fine-tuned attacked model's).
     * On a GPU it is allocated up front, beside the other model of the run (the base during
     * utility, an attacked model), so it is fixed rather than sized to the free memory as a
     * server's is. Default 2 GiB.
     */
    kvCacheBytes: z.number().int().min(2 ** 20).max(Number.MAX_SAFE_INTEGER).default(DEFAULT_KV_CACHE_BYTES),
    /** Weights in the engine; default the device's: f32 on the CPU, bf16 on a GPU. */
    dtype: z.enum(['f32', 'bf16']).optional(),
    /**
     * Variables for the base model's chat template (transformers' `chat_template_kwargs`), e.g.
     * `{ "enable_thinking": false }`; an adapter variant adds the ones it was trained with.
     */
    chatTemplateKwargs: z.record(z.string(), z.unknown()).optional(),
    threads: z.number().int().min(1).optional(),
    /** Also write PNGs beside the SVG plots. */
    png: z.boolean().default(true),
    /**
     * Replace report files in `out` that redflag did not write (a report.json without its marker,
     * a report.md or plot with no report of redflag's beside it); without it such a folder is refused.
     */
    overwrite: z.boolean().default(false),
    /** The white-box attacks' budgets (embedding, gcg, finetune). */
    attacks,
  })
  .superRefine((c, ctx) => {
    const names = new Set<string>();
    c.variants.forEach((v, i) => {
      if (names.has(v.name)) ctx.addIssue({ code: 'custom', path: ['variants', i, 'name'], message: `duplicate variant name "${v.name}"` });
      names.add(v.name);
    });
    if (!c.synthetic && c.harmful.length + c.benign.length + c.data.length === 0) {
      ctx.addIssue({ code: 'custom', path: ['harmful'], message: 'no data: give harmful/benign/data files or synthetic' });
    }
  })
  // One spelling per device ('cuda' is 'cuda:0'), and the dtype and batch its engine takes by default.
  .transform((c) => {
    const device = parseDevice(c.device);
    const gpu = device.kind === 'cuda';
    return { ...c, device: device.name as DeviceSpec, dtype: c.dtype ?? (gpu ? ('bf16' as const) : ('f32' as const)), batchSize: c.batchSize ?? (gpu ? 64 : 16) };
  });

/** A validated evaluation config (defaults filled in). */
export type EvalConfig = z.output<typeof evalConfigSchema>;
/** An evaluation config as written (defaults optional). */
export type EvalConfigInput = z.input<typeof evalConfigSchema>;

/** Validates a config; the error lists every bad field by its path. */
export function parseEvalConfig(input: unknown, where = 'eval config'): EvalConfig {
  const result = evalConfigSchema.safeParse(input);
  if (result.success) return result.data;
  const problems = result.error.issues.map((i) => `${i.path.length ? i.path.join('.') : '(root)'}: ${i.message}`);
  throw new RedflagError('INVALID_ARGUMENT', `${where}: ${problems.join('; ')}`);
}

/** A list of numbers sorted ascending, each once. */
const ascending = (xs: readonly number[]): number[] => [...new Set(xs)].sort((a, b) => a - b);

/** The settings suites read. */
export function settingsOf(c: EvalConfig): EvalSettings {
  return {
    threshold: c.threshold,
    maxTokens: c.maxTokens,
    samples: c.samples,
    temperature: c.temperature,
    prefillK: ascending(c.prefillK),
    prefillUnit: c.prefillUnit,
    contextK: ascending(c.contextK),
    devFraction: c.devFraction,
    devMaxFpr: c.devMaxFpr,
    bootstrapResamples: c.bootstrapResamples,
    seed: c.seed,
    batchSize: c.batchSize,
    kvCacheBytes: c.kvCacheBytes,
    attacks: {
      // Radii ascending and once each, as prefillK and contextK: the points, the plot and the
      // "largest ε" headline follow this order.
      embedding: { ...DEFAULT_ATTACK_BUDGETS.embedding, ...c.attacks.embedding, epsilons: ascending(c.attacks.embedding?.epsilons ?? DEFAULT_ATTACK_BUDGETS.embedding.epsilons) },
      gcg: { ...DEFAULT_ATTACK_BUDGETS.gcg, ...c.attacks.gcg },
      finetune: { ...DEFAULT_ATTACK_BUDGETS.finetune, ...c.attacks.finetune },
    },
  };
}

/** The suites to run, in their fixed order. */
export function suitesOf(c: EvalConfig): SuiteName[] {
  return SUITE_NAMES.filter((s) => c.suites.includes(s));
}
