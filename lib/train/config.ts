/**
 * The training configuration: what `redflag train` takes as flags or a JSON file, validated
 * with zod so every mistake is reported with its field path.
 * @module
 */
import { readFile } from 'node:fs/promises';
import { z } from 'zod';

import { dataFileSchema } from '../data/file-schema.js';
import { RedflagError } from '../errors.js';
import { parseJsonText } from '../model/config.js';
import { CATEGORY_NAME } from '../model/red-flag-token.js';

/** The schema of a training configuration. */
export const trainConfigSchema = z.strictObject({
  /** Hugging Face model directory. */
  model: z.string().min(1),
  /** Output directory: adapter, tokenizer, metrics, checkpoints. */
  output: z.string().min(1),
  /** Training data files; or `synthetic` for the built-in generated set. */
  data: z.union([z.array(dataFileSchema).min(1), z.literal('synthetic')]),
  /** Training conversations per category of the built-in synthetic set. */
  syntheticPerCategory: z.number().int().min(1).max(10000).default(20),
  /**
   * Multi-turn synthetic training conversations: `share` of them get 1 to `maxExchanges` benign
   * exchanges before their request (see `generateSyntheticData`'s `multiTurn`). Absent: single-turn.
   */
  syntheticMultiTurn: z.strictObject({ share: z.number().min(0).max(1), maxExchanges: z.number().int().min(1).max(64) }).optional(),
  /** Held-out evaluation files (default: a fraction of the training data). */
  evalData: z.array(dataFileSchema).optional(),
  /** Share of the data held out for evaluation when evalData is not given. */
  evalFraction: z.number().min(0).max(0.5).default(0.1),
  /** Skip malformed rows (counted) instead of failing. */
  skipInvalid: z.boolean().default(false),

  objective: z.enum(['redflag', 'refusal', 'lm']).default('redflag'),
  mode: z.enum(['lora', 'full']).default('lora'),
  lora: z
    .strictObject({
      rank: z.number().int().min(1).max(1024).default(8),
      alpha: z.number().positive().default(16),
      dropout: z.number().min(0).lt(1).default(0),
      rslora: z.boolean().default(false),
      /** PEFT target_modules; default: every projection of the architecture. */
      targets: z.array(z.string().min(1)).min(1).optional(),
    })
    .prefault({}),
  loss: z
    .strictObject({
      alphaBenign: z.number().min(0).default(1),
      alphaRf: z.number().min(0).default(1),
      alphaAfter: z.number().min(0).default(1),
      /** Response tokens before the first position where `<rf>` may be asked for. */
      rfOffset: z.number().int().min(0).default(0),
      /**
       * How a window's positions combine: `any` (noisy-OR: the flag at least once), `mean` (mean
       * cross-entropy), `single` (the sampled position alone: its window is that one position,
       * whatever rfWindow says).
       */
      rfAggregation: z.enum(['any', 'mean', 'single']).default('any'),
      /**
       * Positions sampled per harmful conversation, one in each of this many equal strata of the
       * response, each with its own red-flag group (window): flag targets spread over the answer.
       */
      rfSamples: z.number().int().min(1).max(64).default(1),
      /** Positions in a window, ending at its sampled position; 0: from `rfOffset` on (the paper's). */
      rfWindow: z.number().int().min(0).default(0),
      /**
       * `sampled` (the paper's method): positions sampled in the answer as above. `start`: the
       * paper's Fixed-Pos RF baseline, the flag trained at the first answer position only
       * (rfOffset, rfSamples and rfWindow do not apply).
       */
      rfPosition: z.enum(['sampled', 'start']).default('sampled'),
    })
    .prefault({}),
  optimizer: z
    .strictObject({
      lr: z.number().positive().default(2e-4),
      beta1: z.number().min(0).lt(1).default(0.9),
      beta2: z.number().min(0).lt(1).default(0.999),
      eps: z.number().positive().default(1e-8),
      weightDecay: z.number().min(0).default(0),
      clipNorm: z.number().min(0).default(1),
      schedule: z.enum(['cosine', 'linear', 'constant']).default('cosine'),
      warmupSteps: z.number().int().min(0).default(10),
      /** The schedule's final learning rate as a fraction of lr. */
      minLrRatio: z.number().min(0).max(1).default(0.1),
    })
    .prefault({}),
  steps: z.number().int().min(1).default(100),
  batchSize: z.number().int().min(1).default(8),
  gradAccum: z.number().int().min(1).default(1),
  /** Longest encoded conversation (prompts are cut from the left to fit). */
  maxTokens: z.number().int().min(8).default(512),
  /** Share of harmful conversations in each batch. */
  harmfulFraction: z.number().min(0).max(1).default(0.5),
  seed: z.number().int().min(0).default(0),
  evalEvery: z.number().int().min(0).default(50),
  checkpointEvery: z.number().int().min(0).default(100),
  /** Flag threshold on max p(<rf>) for the evaluation's flag rates. */
  threshold: z.number().gt(0).lt(1).default(0.5),
  /**
   * Where training runs: 'cpu' (the default), or an NVIDIA GPU, 'cuda' (device 0) or 'cuda:N',
   * with the CUDA build of the addon (`npm run build:cuda`). Full fine-tuning on a GPU trains the
   * `lm` objective only (the other objectives' KL terms need LoRA's reference model).
   */
  device: z.string().regex(/^(cpu|cuda(:\d{1,3})?)$/, "must be 'cpu', 'cuda' or 'cuda:N'").default('cpu'),
  /**
   * Activation recomputation (GPU only): the forward keeps each block's input and the backward
   * recomputes the block's activations (about one more forward of work, less the MLP's down
   * product; activation memory of one block instead of all), for long sequences. Gradients are
   * the same bits either way.
   */
  recompute: z.boolean().default(false),
  /**
   * Data-parallel training over several GPUs, one process per GPU (lib/train/data-parallel.ts):
   * this process's rank, the number of processes, and a file (on a file system every process sees)
   * through which rank 0 hands the others the group id. Needs the CUDA build with NCCL.
   */
  dataParallel: z
    .strictObject({
      worldSize: z.number().int().min(1).max(4096),
      rank: z.number().int().min(0),
      idFile: z.string().min(1),
    })
    .optional(),
  /** Frozen weights in the engine (default: f32 on the CPU, bf16 on a GPU). */
  dtype: z.enum(['f32', 'bf16']).optional(),
  /**
   * Variables for the chat template (transformers' `chat_template_kwargs`), e.g. Qwen3's
   * `{ "enable_thinking": false }`; the adapter records them, so it is served with them.
   */
  chatTemplateKwargs: z.record(z.string(), z.unknown()).optional(),
  threads: z.number().int().min(1).optional(),
  /** Also write the merged full model (HF format) at the end. */
  merge: z.boolean().default(false),
  /**
   * RF-AT: the red-flag term of harmful batches on prompts perturbed in embedding space by an
   * inner attack (lib/train/adversarial.ts). Absent: off. Defaults: ε 0.1 of each prompt token's
   * embedding norm (the radius at which the embedding-space attack broke the plain adapter on
   * the demo), 3 PGD steps of half the radius (about 2.5x the harmful sequences' step cost).
   */
  adversarial: z
    .strictObject({
      epsilon: z.number().min(0).default(0.1),
      steps: z.number().int().min(1).max(100).default(3),
      stepSize: z.number().gt(0).max(1).default(0.5),
      /** Share of micro-batches attacked. */
      share: z.number().min(0).max(1).default(1),
      /** ε grows linearly from 0 over these optimizer steps. */
      warmupSteps: z.number().int().min(0).default(0),
    })
    .optional(),
  /**
   * One flag per risk category (objective `redflag`): `auto` gives every category found in the
   * harmful training data a flag `<rf:NAME>` (names normalised, see {@link flagCategoryName});
   * a list names the flagged categories. Harmful examples of other categories, or of none,
   * train the generic `<rf>`. Absent: `<rf>` alone.
   */
  flagCategories: z.union([z.literal('auto'), z.array(z.string().regex(CATEGORY_NAME, 'a category name: 1-64 letters, digits, "_", "-" or "."')).min(1)]).optional(),
  /**
   * The data's categories to flag categories, e.g. `{ "chemical_biological": "weapons" }`, or
   * the path of a JSON file holding that object. Unmapped categories keep their normalised name.
   */
  categoryMap: z.union([z.record(z.string(), z.string().regex(CATEGORY_NAME, 'a category name: 1-64 letters, digits, "_", "-" or "."')), z.string().min(1)]).optional(),
  /**
   * Start over in an output directory that holds a previous run's checkpoint, metrics or results
   * (adapter/, model/, merged/): they are replaced. Without it such a directory is refused.
   */
  overwrite: z.boolean().default(false),
});

/** A validated training configuration (defaults filled in). */
export type TrainConfig = z.output<typeof trainConfigSchema>;
/** A training configuration as written (defaults optional). */
export type TrainConfigInput = z.input<typeof trainConfigSchema>;

/** Validates a configuration object; errors name each bad field by its path. */
export function parseTrainConfig(input: unknown, where = 'training config', flagOf: (field: string) => string | undefined = () => undefined): TrainConfig {
  const result = trainConfigSchema.safeParse(input);
  const problems = result.success ? trainConfigConflicts(result.data) : result.error.issues.map((i) => ({ path: i.path, message: i.message }));
  if (problems.length === 0) return result.data!;
  const field = (path: PropertyKey[]) => {
    const name = path.length ? path.join('.') : '(root)';
    const flag = flagOf(name);
    return flag ? `${name} (${flag})` : name;
  };
  throw new RedflagError('INVALID_ARGUMENT', `${where}: ${problems.map((p) => `${field(p.path)}: ${p.message}`).join('; ')}`);
}

/** The mistakes of a config the schema accepts that lie between its fields (path: the field to change). */
export function trainConfigConflicts(config: TrainConfig): { path: PropertyKey[]; message: string }[] {
  const problems: { path: PropertyKey[]; message: string }[] = [];
  if (config.recompute && config.device === 'cpu') {
    problems.push({ path: ['recompute'], message: "activation recomputation is a GPU trainer option (device 'cuda'); the CPU trainer keeps every activation" });
  }
  const dp = config.dataParallel;
  if (dp && dp.rank >= dp.worldSize) problems.push({ path: ['dataParallel', 'rank'], message: `${dp.rank} must be below worldSize ${dp.worldSize}` });
  if (dp && config.device === 'cpu') problems.push({ path: ['dataParallel'], message: "runs one process per GPU (device 'cuda:N'), not on the CPU" });
  if (config.merge && config.mode === 'full') {
    problems.push({ path: ['merge'], message: "merges a LoRA adapter into the weights; mode 'full' writes the whole fine-tuned model already" });
  }
  if (config.flagCategories !== undefined && config.objective !== 'redflag') {
    problems.push({ path: ['flagCategories'], message: `are flag tokens the 'redflag' objective trains; the '${config.objective}' objective has none` });
  }
  if (config.mode === 'full' && config.objective !== 'lm') {
    problems.push({
      path: ['mode'],
      message: `'full' (full fine-tuning) trains the 'lm' objective; the '${config.objective}' objective's KL terms need the reference model: train a LoRA adapter (mode 'lora')`,
    });
  }
  return problems;
}

/** Reads and validates a JSON configuration file. */
export async function loadTrainConfig(file: string, overrides: Record<string, unknown> = {}): Promise<TrainConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (cause) {
    throw new RedflagError('NOT_FOUND', `cannot read the training config (${(cause as Error).message})`, { file, cause });
  }
  const json = parseJsonText(text, file); // names line and column of a syntax error
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new RedflagError('INVALID_FILE', 'the training config must be a JSON object', { file });
  }
  return parseTrainConfig({ ...json, ...overrides }, file);
}

/** Learning rate at an optimizer step: linear warmup, then the schedule down to minLrRatio · lr. */
export function learningRate(step: number, total: number, o: TrainConfig['optimizer']): number {
  if (o.warmupSteps > 0 && step < o.warmupSteps) return (o.lr * (step + 1)) / o.warmupSteps;
  if (o.schedule === 'constant') return o.lr;
  const span = Math.max(1, total - o.warmupSteps);
  const t = Math.min(1, (step - o.warmupSteps) / span);
  const floor = o.lr * o.minLrRatio;
  if (o.schedule === 'linear') return o.lr - (o.lr - floor) * t;
  return floor + 0.5 * (o.lr - floor) * (1 + Math.cos(Math.PI * t));
}
