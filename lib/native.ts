/**
 * The one typed binding to the native addon. Everything else in lib/ goes through here:
 * arguments are validated in TypeScript before they reach native code, and native
 * errors come back as {@link RedflagError}s.
 * @internal
 * @module
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { RedflagError, type RedflagErrorCode } from './errors.js';

/** The engine's model description (native/model/config.h). */
export interface NativeConfig {
  arch: 'llama' | 'gpt2';
  vocab: number;
  hidden: number;
  intermediate: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  maxPositions: number;
  norm: 'rms' | 'layer';
  normEps: number;
  act: 'silu' | 'gelu_new';
  rope: boolean;
  ropeTheta: number;
  ropeScaling: 'none' | 'linear' | 'dynamic' | 'llama3';
  ropeFactor: number;
  ropeLowFreqFactor: number;
  ropeHighFreqFactor: number;
  ropeOriginalMaxPositions: number;
  qkvBias: boolean;
  oBias: boolean;
  /** Qwen3's per-head q/k RMSNorms (tensors layers.N.q_norm.weight, k_norm.weight). */
  qkNorm: boolean;
  mlpBias: boolean;
  tiedEmbeddings: boolean;
  slidingWindow: number;
}

/** Element type codes of tensors handed to the engine (core/dtype.h SrcType). */
export const enum SrcType {
  F32 = 0,
  F16 = 1,
  BF16 = 2,
}

export interface NativeSequence {
  readonly length: number;
  readonly bytes: number;
  truncate(length: number): void;
  /** Allocates room for exactly n positions now (never shrinks). */
  reserve(n: number): void;
  dispose(): void;
}

/** What NativeModel.decodeStep returns: one entry per sequence (topIds/topLogprobs: topN each). */
export interface NativeStepResult {
  tokens: Uint32Array;
  logprobs: Float32Array;
  /** p of any flag token (their total). */
  pRf: Float32Array;
  topIds: Uint32Array;
  topLogprobs: Float32Array;
  /** With flag tokens given as an Int32Array: each one's p, [n × K]. */
  pFlags?: Float32Array;
}

export interface NativeModelInfo {
  vocab: number;
  threads: number;
  dtype: 'f32' | 'bf16';
  weightBytes: number;
  isa: string;
  /** 'cpu' or 'cuda:N'. */
  device: string;
  /** Positions a cache grows by: 1 on the CPU, the block size of the GPU's paged cache. */
  kvBlockTokens: number;
  /** Bytes a position takes in a cache (K and V of every layer): f32 on the CPU, the weights' dtype on the GPU. */
  kvBytesPerPosition: number;
}

export interface NativeModel {
  loadTensor(name: string, type: SrcType, shape: number[], srcIsKN: boolean, data: Uint8Array): Promise<void>;
  checkComplete(): void;
  newSequence(): NativeSequence;
  forward(
    sequences: NativeSequence[],
    tokens: Uint32Array,
    counts: Uint32Array,
    allLogits: boolean,
    cancel?: Int32Array,
    onProgress?: (done: number, total: number) => void,
  ): Promise<Float32Array>;
  /**
   * The fused decode step (native/model/decode.h): appends each sequence's tokens, then picks
   * each one's next token and reads p(<rf>) from the same logits. params: [n × 4] temperature,
   * topK, topP, seed; rfToken -1 when there is none, or an Int32Array of several flag tokens
   * (pRf their total, pFlags each one's).
   */
  decodeStep(
    sequences: NativeSequence[],
    tokens: Uint32Array,
    counts: Uint32Array,
    params: Float64Array,
    rfToken: number | Int32Array,
    topN: number,
    cancel?: Int32Array,
    /** false: pick only (a plain decode; logprobs NaN, pRf 0). Default true. */
    scores?: boolean,
  ): Promise<NativeStepResult>;
  /** Teacher-forced p(<rf>) after every token, sequences in order. */
  tokenScores(
    sequences: NativeSequence[],
    tokens: Uint32Array,
    counts: Uint32Array,
    rfToken: number,
    cancel?: Int32Array,
    /** [tokens × hidden] added to the input embeddings (embedding-space attacks). */
    embedDelta?: Float32Array,
    logprobs?: false,
  ): Promise<Float32Array>;
  /** The same, with the log-probability of each sequence's next token (NaN after its last); rfToken may be -1. */
  tokenScores(
    sequences: NativeSequence[],
    tokens: Uint32Array,
    counts: Uint32Array,
    rfToken: number,
    cancel: Int32Array | undefined,
    embedDelta: Float32Array | undefined,
    logprobs: true,
  ): Promise<{ pRf: Float32Array; logprobs: Float32Array }>;
  /** Several flag tokens: pRf their total, pFlags [tokens × K] each one's, logprobs with `logprobs`. */
  tokenScores(
    sequences: NativeSequence[],
    tokens: Uint32Array,
    counts: Uint32Array,
    flagTokens: Int32Array,
    cancel: Int32Array | undefined,
    embedDelta: Float32Array | undefined,
    logprobs: boolean,
  ): Promise<{ pRf: Float32Array; pFlags: Float32Array; logprobs?: Float32Array }>;
  info(): NativeModelInfo;
  /** The GPU engine's KV pool for all sequences together (ignored on the CPU); only while no sequence is alive. */
  setKvPoolBytes(bytes: number): void;
  dispose(): void;

  // Training (native/model/train.h).
  trainInit(options: NativeTrainOptions): Promise<{ trainable: number }>;
  trainStep(
    tokens: Uint32Array,
    counts: Uint32Array,
    refTokens: Uint32Array,
    refCounts: Uint32Array,
    rows: Int32Array,
    options: NativeLossOptions,
    cancel?: Int32Array,
    embeddings?: NativeEmbeddingOptions,
  ): Promise<NativeLossTerms>;
  optimizerStep(options: NativeAdamWOptions): Promise<number>;
  setOptimizerStep(step: number): void;
  /**
   * Makes values written by setParam during training reach the engine now (the CPU trainer's
   * packed weights, the GPU's copies). Optional: the next forward, decodeStep, tokenScores,
   * trainStep, optimizerStep or trainEnd does it first.
   */
  paramsChanged(): void;
  trainEnd(): void;
  params(): { name: string; shape: number[] }[];
  getParam(name: string, part?: 'value' | 'grad' | 'm' | 'v'): Float32Array;
  setParam(name: string, part: 'value' | 'grad' | 'm' | 'v', data: Float32Array): void;
  addLora(layer: number, target: string, a: Float32Array, b: Float32Array, rank: number, scale: number): void;
  /** addLora's arguments, folded into the weight (CUDA engine only; irreversible). */
  mergeLora(layer: number, target: string, a: Float32Array, b: Float32Array, rank: number, scale: number): void;
  /** Rows [K × hidden] for K tokens (a number: one). */
  setTokenRows(token: number | Int32Array, embed: Float32Array | null, head: Float32Array | null): void;
  clearAdapters(): void;
  setAdapterEnabled(enabled: boolean): void;
}

/** Options of NativeModel.trainInit. */
export interface NativeTrainOptions {
  mode: 'lora' | 'full';
  rank: number;
  alpha: number;
  dropout: number;
  rslora: boolean;
  /** PEFT target_modules, matched by suffix against the block's module paths. */
  targets: string[];
  /** The red-flag token whose rows train (-1: none). */
  rfToken: number;
  /** Or several flag tokens (`<rf>` first, then one per category): rfToken is then ignored. */
  flagTokens?: number[];
  seed: number;
  /** Activation recomputation (the GPU trainer): keep each block's input only, recompute the rest in the backward. */
  recompute?: boolean;
  /** Data-parallel training: join this NCCL group (lib/train/data-parallel.ts); resolves once every rank joined. */
  group?: { id: string; rank: number; world: number };
}

/** Options of NativeModel.trainStep. */
export interface NativeLossOptions {
  aggregation: 'any' | 'mean' | 'single';
  alphaBenign: number;
  alphaRf: number;
  alphaAfter: number;
  alphaCe: number;
  gradScale: number;
  dropoutSeed: number;
  /** false: leave the parameters' gradients as they were (steps that only want input-embedding gradients). Default true. */
  paramGrads?: boolean;
}

/**
 * The input-embedding side of NativeModel.trainStep (embedding-space attacks, adversarial
 * training): a perturbation added to the trained batch's input embeddings, and whether to
 * return dL/d(input embeddings).
 */
export interface NativeEmbeddingOptions {
  /** [tokens × hidden], the trained batch's rows in order. */
  embedDelta?: Float32Array;
  embedGrad?: boolean;
}

/** Loss terms of one step (each a mean over its rows or groups). */
export interface NativeLossTerms {
  /** dL/d(input embeddings) [tokens × hidden], when asked for. */
  embedGrad?: Float32Array;
  benign: number;
  redFlag: number;
  after: number;
  ce: number;
  total: number;
  nBenign: number;
  nGroups: number;
  nAfter: number;
  nCe: number;
  tokens: number;
}

/** Options of NativeModel.optimizerStep (AdamW). */
export interface NativeAdamWOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  clipNorm: number;
}

export interface NativeBench {
  fmaPeak(threads: number, bf16: boolean, seconds: number): Promise<number>;
  memBandwidth(threads: number, bytesPerArray: number, copy: boolean): Promise<number>;
  gemmTime(m: number, n: number, k: number, dtype: 'f32' | 'bf16', threads: number, minSeconds: number): Promise<number>;
  /** Median seconds of one greedy logits_pick over a row, with or without the scores (log-sum-exp, p(<rf>)). */
  pickTime(vocab: number, scores: boolean, minSeconds: number): Promise<number>;
}

/** What the CUDA build says of the GPUs (`cudaInfo`). */
export interface CudaInfo {
  /** GPUs visible; 0 where there is no driver or GPU (`error` says which). */
  count: number;
  /** The device asked about: its name and compute capability (empty past the last device). */
  name: string;
  smMajor: number;
  smMinor: number;
  memoryGiB: number;
  error: string;
  /** Why this build cannot run on the device (too old a GPU, or no code for it); empty when it can. */
  unsupported: string;
  /** The GPU architectures the build holds code for, as CMake named them (`80-real,90`). */
  architectures: string;
  /** Whether the build has the CUDA engine, which needs cuBLASLt (a build without it only describes GPUs). */
  cublasLt?: boolean;
  /** Whether the build has NCCL (data-parallel training). */
  nccl?: boolean;
}

export interface NativeAddon {
  /** device: -1 (or absent) the CPU engine, N the CUDA engine on GPU N (the CUDA build only). */
  NativeModel: new (config: NativeConfig, dtype: 'f32' | 'bf16', threads: number, device?: number) => NativeModel;
  cpuInfo(): { avx2: boolean; avx512: boolean; avx512bf16: boolean; isa: string };
  /** Live KV caches (every model) and the C allocator's bytes in use (glibc; null elsewhere). */
  memoryInfo(): { liveSequences: number; mallocInUseBytes: number | null };
  bench: NativeBench;
  /** The CUDA build (`npm run build:cuda`): the GPUs it sees, and `device` (default 0) among them. */
  cudaInfo?: (device?: number) => CudaInfo;
  /** The CUDA build: a new NCCL group id (hex) for data-parallel training; throws without NCCL. */
  collectiveId?: () => string;
  /** The CUDA build: a device's free and total bytes (free cut to the limit) and the bytes redflag holds on all devices, with its limit (0: none). */
  cudaMemory?: (device: number) => { free: number; total: number; held: number; limit: number };
  /** The CUDA build: caps the bytes redflag may hold on the devices (0: no cap); past it an allocation fails with OUT_OF_MEMORY. */
  cudaSetMemoryLimit?: (bytes: number) => void;
  /** The CUDA build, for tests: traps a kernel on the device, which loses the process's CUDA context for good (every later call fails with DEVICE_FAILED). */
  cudaLoseContext?: (device: number) => string;
}

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
/**
 * Where the addon may be: an explicit REDFLAG_ADDON path, the CUDA build (first with
 * REDFLAG_BACKEND=cuda; alone for the CUDA backend), then node-gyp's.
 */
function candidatePaths(backend: 'default' | 'cuda'): string[] {
  const cuda = join(packageRoot, 'build-cuda', 'Release', 'redflag_cuda.node');
  const paths: string[] = [];
  if (process.env.REDFLAG_ADDON) paths.push(process.env.REDFLAG_ADDON);
  if (backend === 'cuda') return [...paths, cuda];
  if (process.env.REDFLAG_BACKEND === 'cuda') paths.push(cuda);
  paths.push(join(packageRoot, 'build', 'Release', 'redflag.node'));
  return paths;
}

const loaded = new Map<string, NativeAddon>();

/**
 * Loads the addon once; throws one clear error when it has not been built. `cuda`: the CUDA
 * build (`npm run build:cuda`), which devices other than the CPU need.
 */
export function loadNative(backend: 'default' | 'cuda' = 'default'): NativeAddon {
  let addon = loaded.get(backend);
  if (!addon) {
    try {
      addon = loadAddonFrom(candidatePaths(backend));
    } catch (error) {
      if (backend === 'cuda' && error instanceof RedflagError && /not built/.test(error.message)) {
        throw new RedflagError('NATIVE', `the CUDA backend needs the CUDA build of the addon, which is not built (looked for ${candidatePaths('cuda').join(', ')}). Run \`npm run build:cuda\` on a machine with nvcc and cuBLAS.`);
      }
      throw error;
    }
    loaded.set(backend, addon);
  }
  return addon;
}

/** Loads the first addon binary that exists among `paths`. @internal */
export function loadAddonFrom(paths: string[]): NativeAddon {
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  for (const path of paths) {
    tried.push(path);
    if (!existsSync(path)) continue;
    try {
      return require(path) as NativeAddon;
    } catch (cause) {
      const message = (cause as Error).message;
      throw new RedflagError('NATIVE', `the redflag native addon at ${path} failed to load: ${message}${loadHint(message)}`, { cause });
    }
  }
  throw new RedflagError(
    'NATIVE',
    `the redflag native addon is not built (looked for ${tried.join(', ')}). ` +
      'Run `npm run build:native` (needs a C++17 compiler and Python for node-gyp) or `npm run build:cuda`.',
  );
}

/**
 * What to do about a load failure the message names: a CUDA library the CUDA build was linked
 * against (cuBLASLt, the CUDA runtime, NCCL) that the loader cannot find, which is how a build
 * moved away from its toolkit, or its pip wheel uninstalled, fails. '' for anything else. @internal
 */
export function loadHint(message: string): string {
  const lib = /\b(lib(?:cublasLt|cublas|cudart|nccl)\.so[.\d]*): cannot open shared object file/.exec(message)?.[1];
  if (lib === undefined) return '';
  return `. The CUDA build was linked against ${lib}, which the loader no longer finds: put its folder on LD_LIBRARY_PATH, or rebuild with \`npm run build:cuda\` (RF_CUBLASLT_ROOT / RF_NCCL_ROOT name where they are)`;
}

/** Maps an error from native code (which carries a `code`) to a RedflagError. */
export function nativeError(error: unknown): RedflagError {
  if (error instanceof RedflagError) return error;
  const e = error as { code?: unknown; message?: unknown };
  const code: RedflagErrorCode =
    e?.code === 'ABORTED' || e?.code === 'INVALID_ARGUMENT' || e?.code === 'OUT_OF_MEMORY' || e?.code === 'DEVICE_FAILED' ? e.code : 'NATIVE';
  return new RedflagError(code, String(e?.message ?? error), { cause: error });
}

/** Runs a synchronous native call, mapping its errors. */
export function callNativeSync<T>(fn: () => T): T {
  try {
    return fn();
  } catch (error) {
    throw nativeError(error);
  }
}

/** Runs a native call, mapping its errors (sync throws and rejections). */
export async function callNative<T>(fn: () => Promise<T> | T): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    throw nativeError(error);
  }
}
