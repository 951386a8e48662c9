/**
 * The training loop behind `redflag train` and {@link train}: loads the model and data, adds
 * `<rf>`, runs native training steps with gradient accumulation and a learning-rate schedule,
 * evaluates on held-out data, writes metrics, checkpoints atomically, resumes to the same
 * result as an uninterrupted run, and saves the adapter (PEFT format) and tokenizer.
 * @module
 */
import { appendFile, mkdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { BatchSampler, deriveSeed } from '../data/batches.js';
import { encodeConversation, type EncodedConversation } from '../data/encode.js';
import { loadTrainingFiles } from '../data/formats.js';
import { promptMessages, type Conversation } from '../data/records.js';
import { generateSyntheticData, withRefusals } from '../data/synthetic.js';
import { RedflagError, abortError } from '../errors.js';
import { loadModel, type Model } from '../model/model.js';
import type { DeviceSpec } from '../model/device.js';
import { addRedFlagToken } from '../model/red-flag.js';
import { createRng } from '../model/sampling.js';
import type { NativeEmbeddingOptions, NativeLossTerms } from '../native.js';
import { pathExists } from '../model/safetensors.js';
import { exportAdapter, saveTrainedModel } from './export.js';
import { learningRate, parseTrainConfig, type TrainConfig, type TrainConfigInput } from './config.js';
import { evaluateRedFlag, type EvalResult } from './evaluate.js';
import { dataFingerprints, findCheckpoint, isRunMetrics, lockOutput, metricsHaveEval, readCheckpoint, removeCheckpoints, removeStaleCheckpoints, truncateMetrics, writeCheckpoint } from './checkpoint.js';
import { adversarialDelta, embeddingRowNorms, withPerturbedCopies } from './adversarial.js';
import { exchangeGroupId, groupFormed } from './data-parallel.js';
import { accumulationShares, buildStep, flagFits, termCounts, type StepInput, type TermCounts } from './objectives.js';
import { flagTokenOf, planCategories } from './categories.js';

/** Progress of one optimizer step. */
export interface StepInfo {
  step: number;
  steps: number;
  lr: number;
  loss: { total: number; benign: number; redFlag: number; after: number; ce: number };
  gradNorm: number;
  tokens: number;
  tokensPerSecond: number;
  elapsedSeconds: number;
  etaSeconds: number;
}

/** Hooks and cancellation for {@link train}. */
export interface TrainHooks {
  onStep?: (info: StepInfo) => void;
  onEval?: (step: number, result: EvalResult) => void;
  /** Messages about data, checkpoints and outputs. */
  log?: (message: string) => void;
  /** Stops training after the current step; a checkpoint is written first. */
  signal?: AbortSignal;
  /** Continue from the checkpoint in the output directory. */
  resume?: boolean;
  /** Called with the trained model (adapter applied) after the outputs are written, before it is disposed. */
  onTrained?: (model: Model) => Promise<void>;
}

/** What {@link train} produced. */
export interface TrainResult {
  steps: number;
  output: string;
  /** Where the adapter (LoRA) or the model (full) was saved. */
  saved: string;
  finalEval: EvalResult | null;
  lastLoss: StepInfo['loss'] | null;
}

const DEFAULT_TARGETS: Record<string, string[]> = {
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
};

/**
 * The seeded held-out split: the same seed holds out the same conversations, `fraction` of them.
 * Conversations with the same request (every turn before the response) stay on one side: public
 * sets overlap (AdvBench holds the adaptive-attack behaviours), and the held-out rates would
 * otherwise score requests the run trained on. `repeats` counts the requests seen before.
 * @internal
 */
export function holdOut(conversations: readonly Conversation[], fraction: number, seed: number): { trainSet: Conversation[]; evalSet: Conversation[]; repeats: number } {
  const groups = new Map<string, { key: number; members: Conversation[] }>();
  conversations.forEach((c, i) => {
    const text = JSON.stringify(promptMessages(c));
    const group = groups.get(text);
    if (group) group.members.push(c);
    else groups.set(text, { key: createRng(deriveSeed(seed, 7, i))(), members: [c] });
  });
  const n = Math.round(conversations.length * fraction);
  const evalSet: Conversation[] = [];
  const trainSet: Conversation[] = [];
  for (const group of [...groups.values()].sort((a, b) => a.key - b.key)) (evalSet.length < n ? evalSet : trainSet).push(...group.members);
  return { trainSet, evalSet, repeats: conversations.length - groups.size };
}

/** Loads and encodes training and evaluation conversations. */
async function prepareData(config: TrainConfig, model: Model, log: (m: string) => void) {
  const tokenizer = model.tokenizer;
  if (!tokenizer) throw new RedflagError('NO_TOKENIZER', `${model.dir} has no tokenizer.json; training needs one`);
  let trainSet: Conversation[];
  let evalSet: Conversation[];
  if (config.data === 'synthetic') {
    const data = generateSyntheticData({
      seed: config.seed,
      perCategory: config.syntheticPerCategory,
      ...(config.syntheticMultiTurn ? { multiTurn: config.syntheticMultiTurn } : {}),
    });
    trainSet = data.train;
    evalSet = data.test;
  } else {
    const loaded = await loadTrainingFiles(config.data.map((d) => ({ ...d, skipInvalid: config.skipInvalid })));
    if (loaded.skipped.length) log(`skipped ${loaded.skipped.length} malformed rows (first: ${loaded.skipped[0]!.source}: ${loaded.skipped[0]!.reason})`);
    if (config.evalData) {
      trainSet = loaded.conversations;
      evalSet = (await loadTrainingFiles(config.evalData.map((d) => ({ ...d, skipInvalid: config.skipInvalid })))).conversations;
    } else {
      const split = holdOut(loaded.conversations, config.evalFraction, config.seed);
      ({ evalSet, trainSet } = split);
      if (split.repeats > 0) log(`${split.repeats} conversations repeat an earlier one's request: each stays on the side of the held-out split the first is on`);
    }
  }
  if (config.objective === 'refusal') {
    // The baseline trains harmful prompts towards a refusal answer.
    trainSet = withRefusals(trainSet, { seed: deriveSeed(config.seed, 11) });
  }
  // A harmful sequence grows by the inserted <rf>: it must still fit the model's positions.
  const grows = config.objective === 'redflag' ? 1 : 0;
  const maxTokens = Math.min(config.maxTokens, model.config.maxPositions - grows);
  if (maxTokens < config.maxTokens) {
    log(`maxTokens ${config.maxTokens} lowered to ${maxTokens}: the model has ${model.config.maxPositions} positions${grows ? ', one of them for the inserted <rf>' : ''}`);
  }
  const encode = (convs: Conversation[]) => {
    const out: EncodedConversation[] = [];
    let truncated = 0;
    for (const c of convs) {
      const e = encodeConversation(tokenizer, c, { maxTokens });
      if (e.truncated) truncated++;
      if (e.responseEnd > e.responseStart && e.responseStart > 0) out.push(e);
    }
    return { out, truncated };
  };
  const train = encode(trainSet);
  const evalEncoded = encode(evalSet);
  if (train.truncated) log(`${train.truncated} training conversations were truncated to ${maxTokens} tokens`);
  if (train.out.length === 0) throw new RedflagError('INVALID_ARGUMENT', 'no training conversation has a response to train on');
  if (config.objective === 'redflag' && config.loss.rfPosition !== 'start') {
    const short = train.out.filter((e) => e.label === 'harmful' && !flagFits(e, config.loss.rfOffset)).length;
    if (short > 0) log(`${short} harmful training conversations have responses too short for a flag after rfOffset ${config.loss.rfOffset}: they train nothing`);
  }
  return { train: train.out, eval: evalEncoded.out };
}

/** Adds a micro-batch's terms, each weighted by its share of the rows (see accumulationShares). */
function addTerms(a: StepInfo['loss'], t: NativeLossTerms, share: TermCounts): void {
  a.benign += t.benign * share.benign;
  a.redFlag += t.redFlag * share.redFlag;
  a.after += t.after * share.after;
  a.ce += t.ce * share.ce;
}

/**
 * Trains a red-flag adapter (or the refusal baseline, or a language model) as the config says.
 * The same config and seed give the same result; `resume` continues from the checkpoint.
 */
export async function train(input: TrainConfigInput | TrainConfig, hooks: TrainHooks = {}): Promise<TrainResult> {
  const config = parseTrainConfig(input);
  const log = hooks.log ?? (() => undefined);
  // Data-parallel ranks other than 0 write nothing: rank 0 holds the output (lib/train/data-parallel.ts).
  if ((config.dataParallel?.rank ?? 0) > 0) return trainLocked(config, hooks, log);
  await createOutputDir(config.output);
  const unlock = await lockOutput(config.output);
  try {
    return await trainLocked(config, hooks, log);
  } finally {
    await unlock();
  }
}

/** Creates the output directory, or says in one line why it cannot be one. */
async function createOutputDir(output: string): Promise<void> {
  try {
    await mkdir(output, { recursive: true });
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    const why =
      code === 'EEXIST' ? 'is a file, not a directory' : code === 'ENOTDIR' ? 'is under a file, not a directory' : code === 'EACCES' || code === 'EPERM' ? 'cannot be created here (permission denied)' : `cannot be created (${String(code ?? error)})`;
    throw new RedflagError('INVALID_ARGUMENT', `the output ${output} ${why}`, { cause: error });
  }
  const s = await stat(output);
  if (!s.isDirectory()) throw new RedflagError('INVALID_ARGUMENT', `the output ${output} is a file, not a directory`);
}

/** What a finished run writes into the output directory. */
const RESULT_DIRS = ['adapter', 'model', 'merged'];

async function trainLocked(config: TrainConfig, hooks: TrainHooks, log: (m: string) => void): Promise<TrainResult> {
  const { signal } = hooks;
  const metricsFile = join(config.output, 'metrics.jsonl');
  // The process that writes: the only one, or rank 0 of a data-parallel group.
  const writer = (config.dataParallel?.rank ?? 0) === 0;
  const world = config.dataParallel?.worldSize ?? 1;
  const rank = config.dataParallel?.rank ?? 0;
  // Where the run is, for the message of a failed GPU: the step being run, the last checkpoint on disk.
  const progress: { step: number; checkpoint: number | null } = { step: 0, checkpoint: null };
  // sha256 of the data files, recorded in each checkpoint and checked on resume (set once the data loaded).
  let fingerprints: Record<string, string> = {};
  const checkpoint = async (at: number) => {
    if (writer) await writeCheckpoint(model, config, at, fingerprints);
    progress.checkpoint = at;  // rank 0 writes it for the group
  };
  const found = await findCheckpoint(config.output);
  if (hooks.resume) {
    if (!found) throw new RedflagError('NOT_FOUND', 'no checkpoint to resume from (--resume)', { file: config.output });
  } else if (!writer) {
    // rank 0 checks and clears the output
  } else if (config.overwrite) {
    // Starting over: the previous run's checkpoint and metrics go; its outputs are replaced at the end.
    await removeCheckpoints(config.output);
    await rm(metricsFile, { force: true });
  } else {
    if (found) {
      throw new RedflagError('INVALID_ARGUMENT', `${config.output} holds a checkpoint (step ${found.step}): resume it (--resume), start over (--overwrite) or choose another output directory`, {
        file: config.output,
      });
    }
    for (const name of RESULT_DIRS) {
      if (await pathExists(join(config.output, name))) {
        throw new RedflagError('INVALID_ARGUMENT', `${join(config.output, name)} already exists and no checkpoint of this run is beside it: pass --overwrite (overwrite: true) to replace it, or choose another output directory`);
      }
    }
    // A run's metrics without a checkpoint or results are a run's killed before its first
    // checkpoint (or whose results moved away): started afresh. Any other file is the user's.
    if (await pathExists(metricsFile)) {
      if (!(await isRunMetrics(metricsFile))) {
        throw new RedflagError('INVALID_ARGUMENT', `${metricsFile} already exists and no checkpoint or result of a run is beside it: pass --overwrite (overwrite: true) to replace it, or choose another output directory`, {
          file: metricsFile,
        });
      }
      await rm(metricsFile, { force: true });
      log('metrics.jsonl of a run stopped before its first checkpoint: starting it afresh');
    }
  }
  // Once the run may go on here: what killed runs left (only what this code writes).
  const removed = writer ? await removeStaleCheckpoints(config.output) : [];
  if (removed.length > 0) log(`removed ${removed.length} checkpoint copies left by an interrupted run`);

  const model = await loadModel(config.model, {
    device: config.device as DeviceSpec,
    ...(config.dtype ? { dtype: config.dtype } : {}),
    ...(config.threads ? { threads: config.threads } : {}),
    ...(config.chatTemplateKwargs ? { chatTemplateKwargs: config.chatTemplateKwargs } : {}),
  });
  try {
    const data = await prepareData(config, model, log);
    fingerprints = await dataFingerprints(config);
    let rfToken = -1;
    let flagOf: ((ex: EncodedConversation) => number) | undefined;
    if (config.objective === 'redflag') {
      const plan = await planCategories(config, data.train);
      const wanted = plan?.categories ?? [];
      const have = model.flagCategories.map((c) => c.category);
      if (model.redFlagTokenId === null || (plan !== null && (have.length !== wanted.length || have.some((c, i) => c !== wanted[i])))) {
        await addRedFlagToken(model, model.tokenizer, { categories: wanted });
      }
      rfToken = model.redFlagTokenId!;
      log(`red-flag token <rf> = ${rfToken}${model.flagCategories.length ? `; category flags ${model.flagCategories.map((c) => `<rf:${c.category}> = ${c.id}`).join(', ')}` : ''}`);
      flagOf = flagTokenOf(plan, model.flagCategories, rfToken);
    }
    const arch = model.config.architecture === 'gpt2' ? 'gpt2' : 'llama';
    const targets = config.lora.targets ?? DEFAULT_TARGETS[arch]!;
    const group = config.dataParallel ? await exchangeGroupId(config, signal) : undefined;
    if (group) log(`data-parallel: rank ${group.rank} of ${group.world}: joining the group`);
    const { trainable } = await model.runNative(() =>
      model.engine.trainInit({
        mode: config.mode,
        rank: config.lora.rank,
        alpha: config.lora.alpha,
        dropout: config.lora.dropout,
        rslora: config.lora.rslora,
        targets,
        rfToken,
        ...(model.flagCategories.length > 0 && rfToken >= 0 ? { flagTokens: model.flagTokenIds() } : {}),
        seed: config.seed,
        ...(config.recompute ? { recompute: true } : {}),
        ...(group ? { group } : {}),
      }),
    );
    if (group) await groupFormed(config);
    log(`${data.train.length} training and ${data.eval.length} held-out conversations; ${trainable.toLocaleString()} trainable parameters (${config.mode})`);

    const evaluate = async () => {
      if (!writer || config.objective !== 'redflag' || data.eval.length === 0) return null;
      return evaluateRedFlag(model, data.eval, { rfToken: model.flagTokenIds(), threshold: config.threshold, signal });
    };
    // Evaluates and writes the line of step `at`.
    const evaluateAt = async (at: number) => {
      const result = await evaluate();
      if (!result) return null;
      const { examples: _examples, ...figures } = result;
      await appendFile(metricsFile, JSON.stringify({ type: 'eval', step: at, ...figures }) + '\n');
      hooks.onEval?.(at, result);
      return result;
    };
    const evalDue = (at: number) => config.evalEvery > 0 && at % config.evalEvery === 0 && at < config.steps;

    let step = 0;
    if (hooks.resume) {
      step = await readCheckpoint(model, config, fingerprints);
      progress.checkpoint = step;
      log(`resumed from the checkpoint at step ${step}`);
      // Only once the checkpoint is accepted: a refused resume leaves the metrics as they were.
      const dropped = writer ? await truncateMetrics(metricsFile, step, { finalEval: step >= config.steps }) : 0;
      if (dropped > 0) log(`metrics.jsonl: dropped ${dropped} lines written after the checkpoint at step ${step}`);
      // A run stopped between a step and its evaluation: evaluate now, as the uninterrupted run did.
      if (writer && step > 0 && evalDue(step) && !(await metricsHaveEval(metricsFile, step))) await evaluateAt(step);
    }
    const startStep = step;
    // Every step's micro-batches: gradAccum per process, dealt round-robin over the processes.
    const perStep = config.gradAccum * world;
    const microBatches = config.steps * perStep;
    const probe = new BatchSampler(data.train, { seed: config.seed, batchSize: config.batchSize, harmfulFraction: config.harmfulFraction });
    const epochs = Math.max(1, Math.ceil(microBatches / Math.max(1, probe.stepsInEpoch(0))));
    const sampler = new BatchSampler(data.train, {
      seed: config.seed,
      batchSize: config.batchSize,
      harmfulFraction: config.harmfulFraction,
      epochs,
    });
    const batches = sampler.resume(step * perStep);

    const started = performance.now();
    let tokensDone = 0;
    let lastLoss: StepInfo['loss'] | null = null;
    const cancel = new Int32Array(1);
    let embeddingNorms: Float32Array | undefined;
    const onAbort = () => Atomics.store(cancel, 0, 1);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (; step < config.steps; step++) {
        progress.step = step;
        if (signal?.aborted) {
          await checkpoint(step);
          log(`stopped: checkpoint written at step ${step}`);
          throw abortError(signal);
        }
        const lr = learningRate(step, config.steps, config.optimizer);
        const loss = { total: 0, benign: 0, redFlag: 0, after: 0, ce: 0 };
        let stepTokens = 0;
        // Every micro-batch of the step, this process's and the others' (all draw the same ones):
        // each term's rows over the whole step weight each micro-batch's share of it.
        const micros: { input: StepInput; split: ReturnType<typeof withPerturbedCopies> | null }[] = [];
        for (let micro = 0; micro < perStep; micro++) {
          const next = batches.next();
          if (next.done) throw new RedflagError('NATIVE', 'the batch sampler ran out of batches');
          const rng = createRng(deriveSeed(config.seed, 3, step, micro));
          const input = buildStep(next.value.items, { objective: config.objective, rfToken, ...(flagOf ? { flagOf } : {}), rfOffset: config.loss.rfOffset, rfSamples: config.loss.rfSamples, rfWindow: config.loss.rfAggregation === 'single' ? 1 : config.loss.rfWindow, rfPosition: config.loss.rfPosition, rng });
          const adv = config.adversarial;
          // RF-AT: the red-flag rows on prompts perturbed against the flag (lib/train/adversarial.ts).
          const perturbed = adv && rfToken >= 0 && input.flagged.length > 0 && createRng(deriveSeed(config.seed, 5, step, micro))() < adv.share;
          const split = perturbed ? withPerturbedCopies(input) : null;
          micros.push({ input: split ? split.input : input, split });
        }
        const termRows = micros.map((m) => termCounts(m.input));
        const shares = accumulationShares(termRows);
        // What this process reports: its own micro-batches' terms (with data parallelism, the others add theirs' gradients only).
        const mine = (micro: number) => micro % world === rank;
        const reported = accumulationShares(termRows.filter((_, micro) => mine(micro)));
        for (let micro = 0; micro < perStep; micro++) {
          if (!mine(micro)) continue;  // another process's share
          const share = shares[micro]!;
          const { input, split } = micros[micro]!;
          const flat = (seqs: number[][]) => Uint32Array.from(seqs.flat());
          const counts = (seqs: number[][]) => Uint32Array.from(seqs, (s) => s.length);
          let terms: NativeLossTerms;
          let embeddings: NativeEmbeddingOptions | undefined;
          try {
            const adv = config.adversarial;
            if (adv && split) {
              const epsilon = adv.warmupSteps > 0 ? adv.epsilon * Math.min(1, (step + 1) / adv.warmupSteps) : adv.epsilon;
              embeddingNorms ??= await embeddingRowNorms(model);
              const embedDelta = await adversarialDelta(model, split, embeddingNorms, {
                epsilon,
                steps: adv.steps,
                stepSize: adv.stepSize,
                aggregation: config.loss.rfAggregation,
                dropoutSeed: step * perStep + micro + 1,
                cancel,
              });
              embeddings = { embedDelta };
            }
            const stepInput = input;
            terms = await model.runNative(() =>
              model.engine.trainStep(
                flat(stepInput.batch),
                counts(stepInput.batch),
                flat(stepInput.reference),
                counts(stepInput.reference),
                stepInput.rows,
                {
                  aggregation: config.loss.rfAggregation,
                  alphaBenign: config.loss.alphaBenign * share.benign,
                  alphaRf: config.loss.alphaRf * share.redFlag,
                  alphaAfter: config.loss.alphaAfter * share.after,
                  alphaCe: share.ce,
                  gradScale: 1,
                  dropoutSeed: step * perStep + micro + 1,
                },
                cancel,
                embeddings,
              ),
            );
          } catch (error) {
            if (signal?.aborted) {
              // The step was cut short: gradients are partial, so restart it after resuming.
              await checkpoint(step);
              log(`stopped: checkpoint written at step ${step}`);
              throw abortError(signal);
            }
            if (error instanceof RedflagError && error.code === 'OUT_OF_MEMORY') {
              // The same: nothing of this step was applied. Keep the run's progress, and say how to go on.
              await checkpoint(step);
              throw new RedflagError(
                'OUT_OF_MEMORY',
                `${error.message}. Training stopped at step ${step}${writer ? ' with a checkpoint written' : ''}: resume it (--resume) with recompute on (GPU; it changes no result), or start over with a smaller batchSize (and a larger gradAccum for the same step) or a smaller maxTokens`,
                { cause: error },
              );
            }
            throw error;
          }
          addTerms(loss, terms, reported[Math.floor(micro / world)]!);
          stepTokens += terms.tokens;
        }
        loss.total = config.loss.alphaBenign * loss.benign + config.loss.alphaRf * loss.redFlag + config.loss.alphaAfter * loss.after + loss.ce;
        const gradNorm = await model.runNative(() =>
          model.engine.optimizerStep({
            lr,
            beta1: config.optimizer.beta1,
            beta2: config.optimizer.beta2,
            eps: config.optimizer.eps,
            weightDecay: config.optimizer.weightDecay,
            clipNorm: config.optimizer.clipNorm,
          }),
        );
        tokensDone += stepTokens;
        lastLoss = loss;
        const elapsed = (performance.now() - started) / 1000;
        const done = step + 1;
        const info: StepInfo = {
          step: done,
          steps: config.steps,
          lr,
          loss,
          gradNorm,
          tokens: stepTokens,
          tokensPerSecond: tokensDone / elapsed,
          elapsedSeconds: elapsed,
          etaSeconds: (elapsed / (done - startStep)) * (config.steps - done),
        };
        if (writer) await appendFile(metricsFile, JSON.stringify({ type: 'step', ...info, time: new Date().toISOString() }) + '\n');
        hooks.onStep?.(info);
        if (signal?.aborted) {
          await checkpoint(done);
          log(`stopped: checkpoint written at step ${done}`);
          throw abortError(signal);
        }
        if (evalDue(done)) {
          await evaluateAt(done).catch(async (error: unknown) => {
            if (!signal?.aborted) throw error;
            await checkpoint(done); // interrupted while evaluating: the resumed run evaluates at `done`
            log(`stopped: checkpoint written at step ${done}`);
            throw abortError(signal);
          });
        }
        if (writer && config.checkpointEvery > 0 && done % config.checkpointEvery === 0 && done < config.steps) {
          await checkpoint(done);
          log(`checkpoint written at step ${done}`);
        }
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }

    const finalEval = await evaluateAt(config.steps).catch(async (error: unknown) => {
      if (!signal?.aborted) throw error;
      await checkpoint(config.steps); // interrupted in the last evaluation: keep every step trained
      log(`stopped: checkpoint written at step ${config.steps}`);
      throw abortError(signal);
    });
    await checkpoint(config.steps);
    // Export before ending training: full fine-tuning's f32 masters go with the trainer.
    const saved = !writer ? '' : config.mode === 'lora' ? await exportAdapter(model, config, rfToken, targets) : await saveTrainedModel(model, config);
    model.engine.trainEnd();
    if (writer) {
      log(`saved ${saved}`);
      await hooks.onTrained?.(model);
    }
    return { steps: config.steps, output: config.output, saved, finalEval, lastLoss };
  } catch (error) {
    if (!(error instanceof RedflagError && error.code === 'DEVICE_FAILED')) throw error;
    // Nothing more can be read from the GPU (no checkpoint now): the last one on disk is where to go on from.
    const resume = progress.checkpoint !== null
      ? `start a new process and resume from the checkpoint of step ${progress.checkpoint} (--resume)`
      : 'no checkpoint was written yet: start again in a new process';
    throw new RedflagError('DEVICE_FAILED', `${error.message}. Training stopped at step ${progress.step}: ${resume}`, { cause: error });
  } finally {
    model.dispose();
  }
}
