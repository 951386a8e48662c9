/**
 * The detector's public types: production generation with a red-flag score on every token.
 * @module
 */
import type { Message } from '../data/records.js';
import type { DeviceSpec } from '../model/device.js';
import type { Model, PickOptions } from '../model/model.js';

/**
 * What the detector does when the model raises the red flag (samples `<rf>`, or gives it a
 * probability of at least the threshold):
 * - `'block'` stops the answer there, with finish reason `'content_filter'`;
 * - `'flag'` lets the answer continue and marks the tokens from the flag on;
 * - `'reflect'` continues after the flag with a reflective instruction (and optional
 *   in-context examples) placed in the model's context, the paper's soft mode.
 * In every mode `<rf>` itself never appears in the text a user sees.
 */
export type DetectorMode = 'block' | 'flag' | 'reflect';

/** What `'reflect'` puts into the model's context right after the flag (not shown to the user). */
export interface Reflection {
  /** Text the answer continues from, e.g. "I should not help with this, because". */
  instruction: string;
  /** Worked examples of flagged answers and how they continued, placed before the instruction. */
  examples?: { flagged: string; continuation: string }[];
}

/** Options of {@link createDetector}. */
export interface DetectorOptions {
  /** A loaded model, or a Hugging Face model directory to load. */
  model: Model | string;
  /** A red-flag adapter directory (PEFT format, written by `redflag train`), applied to the model. */
  adapter?: string;
  /**
   * GPU only: merge the adapter's LoRA factors into the weights (see `applyAdapter`'s `merge`):
   * decoding at the base model's speed, the model's weights changed for good. Default false.
   */
  mergeAdapter?: boolean;
  /** p(`<rf>`) at or above which a token counts as flagged. Default 0.5. */
  threshold?: number;
  /** Default `'block'`. */
  mode?: DetectorMode;
  /** Used by `'reflect'`; default: a short instruction to stop and answer safely. */
  reflection?: string | Reflection;
  /** When `model` is a directory: where it runs (`cpu`, `cuda`, `cuda:N`), weights' element type and threads (as loadModel takes them). */
  device?: DeviceSpec;
  dtype?: 'f32' | 'bf16';
  threads?: number;
  /** When `model` is a directory: its chat template's variables (see loadModel's `chatTemplateKwargs`). */
  chatTemplateKwargs?: Record<string, unknown>;
  /** Most sequences advanced by one decode step. Default 32. */
  maxBatch?: number;
  /**
   * Bytes of KV cache all generations together may hold. A request reserves what its prompt
   * plus `maxTokens` need when it starts; one that does not fit now waits, one that could never
   * fit is refused. `'auto'` (the default on a GPU): what the GPU has left once the weights and
   * the largest step are in memory, less the share `gpuMemoryFraction` keeps free; on the CPU
   * `'auto'` is the default 2 GiB.
   */
  kvCacheBytes?: number | 'auto';
  /**
   * With `kvCacheBytes: 'auto'` on a GPU: the share of the device's memory redflag fills
   * (weights, a step's activations and the KV cache), the rest kept free for the CUDA context,
   * libraries and other processes. Default 0.9.
   */
  gpuMemoryFraction?: number;
  /**
   * Most tokens one step takes, all generations together (at least `maxBatch`): every running
   * generation gets one, prompts being read share the rest. Bounds a step's memory and how long
   * a long prompt delays the others' next tokens. Default 2048.
   */
  maxStepTokens?: number;
  /** Requests that may wait for a place; more are refused with a `BUSY` error. Default 256. */
  maxQueued?: number;
  /**
   * Start each decode step before the previous one's tokens are handed to their generations, on
   * the guess that each goes on with the token it picked (a generation that stops or reflects
   * instead has that one token dropped), so the device never waits for the host's per-token work
   * (decoding text, stop strings, the server's events). The same answers either way. Default:
   * true on a GPU, false on the CPU (whose cores the host's work would take from the step).
   */
  overlapSteps?: boolean;
}

/**
 * Options of {@link Detector.generate}: sampling as {@link PickOptions} (greedy by default; the
 * seed defaults to a random one), plus the stopping rules and red-flag overrides below.
 */
export interface DetectGenerateOptions extends PickOptions {
  /** Most tokens to generate. Default 256. */
  maxTokens?: number;
  /** Generation ends before the first of these strings. */
  stop?: string[];
  /** Also return the log-probabilities of the n most likely tokens at each step (0 to 20). Default 0. */
  topLogprobs?: number;
  /** Overrides the detector's mode and threshold for this request. */
  mode?: DetectorMode;
  threshold?: number;
  /**
   * Chat-template variables for this request's prompt, over the tokenizer's (e.g.
   * `{ enable_thinking: false }`; vLLM's `chat_template_kwargs`). Not for raw text.
   */
  chatTemplateKwargs?: Record<string, unknown>;
  /** Cancels the request; the iterator then throws the signal's reason. */
  signal?: AbortSignal;
}

/** One generated token with its red-flag score. */
export interface DetectedToken {
  token: number;
  /** Text this token adds (empty for `<rf>` and while a character is incomplete). */
  text: string;
  /** log p(token) under the model. */
  logprob: number;
  /**
   * p(`<rf>`) at this decode step, from the same logits the token was chosen from; with
   * category flags, the probability of emitting any flag (`<rf>` or a `<rf:NAME>`).
   */
  pRf: number;
  /** With category flags: p of each category's flag `<rf:NAME>` at this step, by name. */
  categoryScores?: Record<string, number>;
  /** True once the answer has been flagged (this step or before). */
  flagged: boolean;
  /** When asked for: the most likely tokens at this step, descending. */
  topLogprobs?: { token: number; text: string; logprob: number }[];
}

/** Why generation ended. */
export type FinishReason = 'stop' | 'length' | 'content_filter';

/** The summary of a finished generation. */
export interface DetectionSummary {
  finishReason: FinishReason;
  /** Whether the red flag was raised. */
  flagged: boolean;
  /** The largest p(`<rf>`) seen. */
  maxPRf: number;
  /** Index among the generated tokens where the flag was raised, or -1. */
  flagIndex: number;
  /** With category flags: the largest p of each category's flag over the answer. */
  categoryScores?: Record<string, number>;
  /**
   * With category flags: the category whose flag was the most likely where the flag was raised
   * (null when that was the generic `<rf>`, or nothing was flagged).
   */
  category?: string | null;
  /** The text shown to the user. */
  text: string;
  promptTokens: number;
  completionTokens: number;
}

/**
 * A running generation: iterate it for tokens; `done` resolves with the summary (also after
 * an error or cancellation it settles: it rejects with the same error).
 */
export interface DetectionStream extends AsyncIterable<DetectedToken> {
  readonly done: Promise<DetectionSummary>;
  /** Stops the generation (as an abort of its signal would). */
  cancel(): void;
}

/** A conversation to score: messages ending with the assistant response to score (or with a prompt). */
export type ClassifyInput = readonly Message[] | { messages: readonly Message[] };

/** Scores of one conversation's last assistant message, teacher-forced. */
export interface ClassifyResult {
  /** The response's tokens (their ids). */
  tokens: number[];
  /** p(`<rf>`) before each response token (length = tokens.length + 1: the last is after the response); with category flags, p of any flag. */
  pRf: Float32Array;
  maxPRf: number;
  /** With category flags: each category's flag p at the same positions as pRf, by name. */
  categoryScores?: Record<string, Float32Array>;
  /** First position with p(`<rf>`) ≥ threshold, or -1. */
  firstFlag: number;
  flagged: boolean;
}

/** Options of {@link Detector.classify}. */
export interface ClassifyOptions {
  threshold?: number;
  /** Conversations scored together in one batched forward. Default 8. */
  batchSize?: number;
  signal?: AbortSignal;
}

/** Load and throughput counters (for the server's health endpoint and the benches). */
export interface DetectorStats {
  active: number;
  queued: number;
  kvCacheBytes: number;
  kvCacheBudget: number;
  steps: number;
  tokensGenerated: number;
  /** Steps that ran out of device memory and were split into smaller ones (none when memory suffices). */
  oomSplits: number;
  /** With overlapSteps: tokens computed on the guess that a generation goes on, which it did not take (it stopped or reflected). */
  guessesDropped: number;
  /** The GPU failed (DEVICE_FAILED): the detector fails every request; the process must be restarted. */
  deviceFailed: boolean;
}

/** A model serving generations with red-flag scores; see {@link createDetector}. */
export interface Detector {
  readonly model: Model;
  readonly mode: DetectorMode;
  readonly threshold: number;
  /** The red-flag token's id. */
  readonly redFlagTokenId: number;
  /** The category flags `<rf:NAME>` the model has (empty for `<rf>` alone). */
  readonly categories: readonly string[];
  /** Generates an answer to a conversation (or to raw prompt text), streaming scored tokens. */
  generate(messages: readonly Message[] | string, options?: DetectGenerateOptions): DetectionStream;
  /** Scores existing conversations' last assistant message (teacher-forced, batched). */
  classify(conversations: readonly ClassifyInput[], options?: ClassifyOptions): Promise<ClassifyResult[]>;
  stats(): DetectorStats;
  /** Stops every generation and frees the model when the detector loaded it. */
  dispose(): Promise<void>;
}
