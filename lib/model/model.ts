/**
 * A loaded model: the Hugging Face checkpoint's config, tokenizer and weights, running on
 * the native engine. Created by {@link loadModel}.
 * @module
 */
import { availableParallelism } from 'node:os';

import { RedflagError, abortError } from '../errors.js';
import { callNative, callNativeSync, SrcType, type NativeConfig, type NativeModel, type NativeSequence } from '../native.js';
import { addonFor, checkDeviceRoom, CPU, parseDevice, type Device, type DeviceSpec } from './device.js';
import { loadModelConfig, loadGenerationConfig, mergeEosTokenIds, type GenerationConfig, type ModelConfig } from './config.js';
import { toFloat32, fromFloat32, type DeferredTensor, type RawTensor } from './safetensors.js';
import { checkChatTemplateKwargs, Tokenizer } from './tokenizer.js';
import { RED_FLAG_TOKEN, flagTokenCategory, type CategoryFlag } from './red-flag-token.js';
import { planWeights, type WeightPlan } from './weights-map.js';
import { WeightStore } from './weights.js';
import { generate, type GenerateOptions, type GeneratedToken } from './generate.js';
import { saveModel } from './save.js';

/** Options of {@link loadModel}. */
export interface LoadModelOptions {
  /**
   * Where the model runs: `'cpu'` (default), or an NVIDIA GPU, `'cuda'` (device 0) or
   * `'cuda:N'`, which need the CUDA build of the addon (`npm run build:cuda`).
   */
  device?: DeviceSpec;
  /**
   * Element type the engine keeps weights in: `'f32'` (exact) or `'bf16'` (half the memory,
   * faster). Default `'f32'` on the CPU, `'bf16'` on a GPU.
   */
  dtype?: 'f32' | 'bf16';
  /** Threads for native work. Default: the number of cores. */
  threads?: number;
  /**
   * Variables for the chat template's every render (transformers' `chat_template_kwargs`), e.g.
   * `{ enable_thinking: false }` for Qwen3: see {@link Tokenizer.chatTemplateKwargs}.
   */
  chatTemplateKwargs?: Record<string, unknown>;
  /** Cancels loading. */
  signal?: AbortSignal;
  /** Called after each tensor is loaded. */
  onProgress?: (loaded: number, total: number) => void;
}

/** How {@link Model.step} picks one sequence's next token. */
export interface PickOptions {
  /** 0 = greedy. Default 0. */
  temperature?: number;
  /** Default 0 (all tokens). */
  topK?: number;
  /** Default 1. */
  topP?: number;
  /** Integer seed (0 to 2^53 - 1) of the sequence's draws. Default 0. */
  seed?: number;
}

/** What {@link Model.step} returns, one entry per sequence (`topIds` / `topLogprobs`: `topN` each). */
export interface StepResult {
  tokens: Uint32Array;
  /** log p(token) under the model (temperature 1). */
  logprobs: Float32Array;
  /**
   * p(`<rf>`) from the same logits (0 without a red-flag token); with category flags, the
   * probability of emitting any flag (`<rf>` and every `<rf:NAME>`).
   */
  pRf: Float32Array;
  topIds: Uint32Array;
  topLogprobs: Float32Array;
  topN: number;
  /** With category flags: each flag's p, [n × K], flags in {@link Model.flagTokenIds} order. */
  pFlags?: Float32Array;
}

/** Validates pick options, filling defaults. */
export function checkPickOptions(p: PickOptions, what = 'pick'): Required<PickOptions> {
  const temperature = p.temperature ?? 0;
  const topK = p.topK ?? 0;
  const topP = p.topP ?? 1;
  const seed = p.seed ?? 0;
  const bad = (m: string) => new RedflagError('INVALID_ARGUMENT', `${what}: ${m}`);
  if (!(temperature >= 0) || !Number.isFinite(temperature)) throw bad(`temperature must be a finite number >= 0, got ${temperature}`);
  if (!Number.isInteger(topK) || topK < 0) throw bad(`topK must be a non-negative integer, got ${topK}`);
  if (!(topP > 0 && topP <= 1)) throw bad(`topP must be in (0, 1], got ${topP}`);
  if (!Number.isSafeInteger(seed) || seed < 0) throw bad(`seed must be an integer from 0 to 2^53 - 1, got ${seed}`);
  return { temperature, topK, topP, seed };
}

/** Options of {@link Model.logits}. */
export interface LogitsOptions {
  signal?: AbortSignal;
  /** Called after each layer. */
  onProgress?: (done: number, total: number) => void;
}

/** A model directory's files, opened without the engine: enough to read, merge and save tensors. */
export interface ModelFiles {
  dir: string;
  config: ModelConfig;
  generationConfig: GenerationConfig | null;
  tokenizer: Tokenizer | null;
  /** Close it when done. */
  store: WeightStore;
  plan: WeightPlan;
}

/** The checkpoint dtypes the engine loads (F64 through an f32 copy). */
const LOADABLE_DTYPES: readonly string[] = ['F32', 'F16', 'BF16', 'F64'];

/** Opens a Hugging Face model directory's config, tokenizer and weight headers (no tensor is read). */
export async function openModelFiles(dir: string): Promise<ModelFiles> {
  const config = await loadModelConfig(dir);
  const generationConfig = await loadGenerationConfig(dir);
  const tokenizer = await Tokenizer.fromDir(dir);
  const store = await WeightStore.open(dir);
  try {
    const plan = planWeights(config, store.names(), (n) => store.info(n).shape, dir);
    // Every tensor's dtype before any is read: the file and tensor named, not the first failure part way.
    for (const t of plan.tensors) {
      for (const source of t.sources) {
        const { dtype, file } = store.info(source);
        if (!LOADABLE_DTYPES.includes(dtype)) {
          throw new RedflagError('UNSUPPORTED', `tensor ${source} has dtype ${dtype}; redflag reads ${LOADABLE_DTYPES.join(', ')} weights`, { file });
        }
      }
    }
    return { dir, config, generationConfig, tokenizer, store, plan };
  } catch (error) {
    await store.close();
    throw error;
  }
}

/** Loads a Hugging Face model directory (config.json + safetensors, tokenizer optional). */
export async function loadModel(dir: string, options: LoadModelOptions = {}): Promise<Model> {
  const device = parseDevice(options.device);
  const dtype = options.dtype ?? (device.kind === 'cuda' ? 'bf16' : 'f32');
  if (dtype !== 'f32' && dtype !== 'bf16') {
    throw new RedflagError('INVALID_ARGUMENT', `dtype must be 'f32' or 'bf16', got ${JSON.stringify(dtype)}`);
  }
  const threads = options.threads ?? availableParallelism();
  if (!Number.isInteger(threads) || threads < 1 || threads > 1024) {
    throw new RedflagError('INVALID_ARGUMENT', `threads must be an integer from 1 to 1024, got ${threads}`);
  }
  const kwargs = options.chatTemplateKwargs === undefined ? undefined : checkChatTemplateKwargs(options.chatTemplateKwargs, 'chatTemplateKwargs');
  // Before any file is read: a device that cannot run fails with the reason at once.
  const addon = addonFor(device);
  const { config, generationConfig, tokenizer, store, plan } = await openModelFiles(dir);
  let engine: NativeModel | undefined;
  try {
    if (kwargs !== undefined) {
      if (tokenizer === null) throw new RedflagError('NO_TOKENIZER', 'chatTemplateKwargs were given but the model has no tokenizer.json', { file: dir });
      tokenizer.chatTemplateKwargs = kwargs;
    }
    // At least every element at the engine's width (vectors are f32 on the device: a little more).
    const elements = plan.tensors.reduce((sum, t) => sum + t.shapes.reduce((n, shape) => n + shape.reduce((a, b) => a * b, 1), 0), 0);
    checkDeviceRoom(addon, device, elements * (dtype === 'bf16' ? 2 : 4), `the weights (${dtype === 'bf16' ? 'bf16' : "f32; dtype 'bf16' halves them"})`, dir);
    engine = await callNative(() => device.kind === 'cpu'
      ? new addon.NativeModel(toNativeConfig(config), dtype, threads)
      : new addon.NativeModel(toNativeConfig(config), dtype, threads, device.index));
    const model = new Model(dir, config, generationConfig, tokenizer, store, plan, engine, dtype, threads, device);
    await model.loadWeights(options.signal, options.onProgress);
    const rf = tokenizer?.tokenToId(RED_FLAG_TOKEN);
    if (rf !== undefined && rf < config.vocabSize) {
      model.redFlagTokenId = rf;
      // Category flags saved with it: the tokenizer's <rf:NAME> tokens, in id order.
      model.flagCategories = (tokenizer?.addedTokens() ?? [])
        .map((t) => ({ category: flagTokenCategory(t.content), id: t.id }))
        .filter((f): f is CategoryFlag => f.category !== null && f.id < config.vocabSize && f.id !== rf)
        .sort((a, b) => a.id - b.id);
    }
    return model;
  } catch (error) {
    engine?.dispose();
    await store.close();
    throw error;
  }
}

/** The engine's description of a checkpoint's config. */
export function toNativeConfig(c: ModelConfig): NativeConfig {
  const s = c.rope.scaling;
  return {
    arch: c.architecture === 'gpt2' ? 'gpt2' : 'llama',
    vocab: c.vocabSize,
    hidden: c.hiddenSize,
    intermediate: c.intermediateSize,
    nLayers: c.numLayers,
    nHeads: c.numHeads,
    nKvHeads: c.numKvHeads,
    headDim: c.headDim,
    maxPositions: c.maxPositions,
    norm: c.normType,
    normEps: c.normEps,
    act: c.activation,
    rope: c.positions === 'rope',
    ropeTheta: c.rope.theta,
    ropeScaling: s ? s.type : 'none',
    ropeFactor: s ? s.factor : 1,
    ropeLowFreqFactor: s?.type === 'llama3' ? s.lowFreqFactor : 1,
    ropeHighFreqFactor: s?.type === 'llama3' ? s.highFreqFactor : 4,
    ropeOriginalMaxPositions: s && s.type !== 'linear' ? s.originalMaxPositions : c.maxPositions,
    qkvBias: c.qkvBias,
    oBias: c.oBias,
    qkNorm: c.qkNorm,
    mlpBias: c.mlpBias,
    tiedEmbeddings: c.tieWordEmbeddings,
    slidingWindow: c.slidingWindow ?? 0,
  };
}

function srcTypeOf(t: RawTensor): SrcType | null {
  return t.dtype === 'F32' ? SrcType.F32 : t.dtype === 'F16' ? SrcType.F16 : t.dtype === 'BF16' ? SrcType.BF16 : null;
}

/** Stacks tensors along dim 0 (same dtype: bytes; mixed: via f32). */
function stack(parts: RawTensor[]): RawTensor {
  if (parts.length === 1) return parts[0]!;
  const rows = parts.reduce((n, p) => n + p.shape[0]!, 0);
  const shape = [rows, ...parts[0]!.shape.slice(1)];
  const dtype = parts[0]!.dtype;
  if (parts.every((p) => p.dtype === dtype)) {
    const data = new Uint8Array(parts.reduce((n, p) => n + p.data.byteLength, 0));
    let offset = 0;
    for (const p of parts) {
      data.set(p.data, offset);
      offset += p.data.byteLength;
    }
    return { dtype, shape, data };
  }
  const floats = parts.map((p) => toFloat32(p));
  const out = new Float32Array(floats.reduce((n, f) => n + f.length, 0));
  let offset = 0;
  for (const f of floats) {
    out.set(f, offset);
    offset += f.length;
  }
  return { dtype: 'F32', shape, data: new Uint8Array(out.buffer) };
}

/** A model running on the native engine. Call {@link Model.dispose} when done with it. */
export class Model {
  /** Checkpoint tensors replaced in memory (e.g. embeddings grown by addRedFlagToken), by checkpoint name. */
  readonly overrides = new Map<string, RawTensor>();
  /** The red-flag token's id, once added (or found in a saved tokenizer), else null. */
  redFlagTokenId: number | null = null;
  /** The risk categories' flag tokens `<rf:NAME>`, when the model has them (in row order). */
  flagCategories: CategoryFlag[] = [];

  /** Every flag token: `<rf>` then the category flags; empty without a red-flag token. */
  flagTokenIds(): number[] {
    return this.redFlagTokenId === null ? [] : [this.redFlagTokenId, ...this.flagCategories.map((f) => f.id)];
  }

  /**
   * The flag tokens an `rfToken` argument stands for: the model's own `<rf>` for all its flags
   * (with category flags, scores are then p of any flag), -1 for none, any other id for itself.
   */
  flagTokensFor(rfToken: number): number[] {
    return rfToken === this.redFlagTokenId ? this.flagTokenIds() : rfToken === -1 ? [] : [rfToken];
  }

  /** What the native calls take for `rfToken`: an Int32Array when it stands for several flags. */
  private flagArgument(rfToken: number): number | Int32Array {
    const ids = this.flagTokensFor(rfToken);
    return ids.length > 1 ? Int32Array.from(ids) : rfToken;
  }
  private queue: Promise<unknown> = Promise.resolve();
  /** Native calls queued or running. */
  private pending = 0;
  private disposed = false;

  /** @internal use {@link loadModel} */
  constructor(
    /** The directory the model was loaded from. */
    readonly dir: string,
    /** The normalised config.json. */
    readonly config: ModelConfig,
    /** generation_config.json, when present. */
    readonly generationConfig: GenerationConfig | null,
    /** The tokenizer, or null when the directory has no tokenizer.json. */
    readonly tokenizer: Tokenizer | null,
    /** @internal */ readonly store: WeightStore,
    /** @internal */ readonly plan: WeightPlan,
    /** @internal */ readonly engine: NativeModel,
    /** Element type of the weights in the engine. */
    readonly dtype: 'f32' | 'bf16',
    /** Threads used for native work. */
    readonly threads: number,
    /** Where it runs. */
    readonly device: Device = CPU,
  ) {}

  /**
   * The options that load another model onto this one's engine and prompts: the same device,
   * dtype, threads and chat-template kwargs.
   */
  loadOptions(): LoadModelOptions {
    const kwargs = this.tokenizer?.chatTemplateKwargs ?? {};
    return { device: this.device.name as DeviceSpec, dtype: this.dtype, threads: this.threads, ...(Object.keys(kwargs).length > 0 ? { chatTemplateKwargs: { ...kwargs } } : {}) };
  }

  /** @internal Records a grown vocabulary (config.json's vocab_size follows when saved). */
  setVocabSize(rows: number): void {
    this.config.vocabSize = rows;
    this.config.raw['vocab_size'] = rows;
  }

  /**
   * Writes the model back as a Hugging Face directory: config.json, generation_config.json,
   * model.safetensors (sharded with an index above `shardBytes`) and the tokenizer files,
   * including in-memory changes such as the red-flag token. Every file is written atomically;
   * existing files are only replaced with `overwrite: true`.
   */
  async save(dir: string, options: { overwrite?: boolean; shardBytes?: number } = {}): Promise<void> {
    await saveModel(this, dir, options);
  }

  /** Rows of the embedding and LM head (grows when a token is added). */
  get vocabSize(): number {
    return this.config.vocabSize;
  }

  /**
   * Token ids that end generation: config.json's, generation_config.json's, the tokenizer's EOS
   * and its chat template's turn end: training ends each response with one of the last two (a
   * ChatML fine-tune's `<|im_end|>` where the configs still name the base's `</s>`).
   */
  get eosTokenIds(): number[] {
    const ids = mergeEosTokenIds(this.config, this.generationConfig, this.tokenizer?.eosTokenId);
    const turnEnd = this.tokenizer?.turnEndTokenId ?? null;
    return turnEnd === null || ids.includes(turnEnd) ? ids : [...ids, turnEnd];
  }

  /** @internal A checkpoint tensor or its in-memory replacement: dtype and shape, bytes on demand. */
  tensor(name: string): DeferredTensor {
    const o = this.overrides.get(name);
    return o ? { dtype: o.dtype, shape: o.shape, read: async () => o.data } : this.store.deferred(name);
  }

  /** Reads a checkpoint tensor, or its in-memory replacement. */
  async readTensor(name: string): Promise<RawTensor> {
    return this.overrides.get(name) ?? (await this.store.read(name));
  }

  /** @internal Loads every planned tensor into the engine. */
  async loadWeights(signal?: AbortSignal, onProgress?: (loaded: number, total: number) => void): Promise<void> {
    const total = this.plan.tensors.length;
    let loaded = 0;
    for (const t of this.plan.tensors) {
      if (signal?.aborted) throw abortError(signal);
      await this.loadEngineTensor(t.name, t.sources, t.srcIsKN);
      onProgress?.(++loaded, total);
    }
    await callNative(() => this.engine.checkComplete());
  }

  /** @internal (Re)loads one engine tensor from its checkpoint sources. */
  async loadEngineTensor(name: string, sources: string[], srcIsKN: boolean): Promise<void> {
    let tensor = stack(await Promise.all(sources.map((s) => this.readTensor(s))));
    let type = srcTypeOf(tensor);
    if (type === null) {
      if (tensor.dtype !== 'F64') {
        throw new RedflagError('UNSUPPORTED', `tensor ${sources[0]} has dtype ${tensor.dtype}; F32, F16, BF16 or F64 are supported`, {
          file: this.dir,
        });
      }
      tensor = fromFloat32(toFloat32(tensor), tensor.shape, 'F32');
      type = SrcType.F32;
    }
    const t = tensor;
    try {
      await this.run(() => this.engine.loadTensor(name, type, t.shape, srcIsKN, t.data));
    } catch (error) {
      // The engine checks every weight is finite: name the checkpoint's tensor (of those stacked
      // into this one, in order), the element in it and its file.
      const bad = /holds (NaN|an infinity) at element (\d+)/.exec((error as Error).message);
      if (bad === null) throw error;
      let at = Number(bad[2]);
      let source = sources[0]!;
      for (const s of sources) {
        source = s;
        const n = this.store.info(s).shape.reduce((a, b) => a * b, 1);
        if (at < n) break;
        at -= n;
      }
      throw new RedflagError('INVALID_FILE', `tensor ${source} holds ${bad[1]} at element ${at}: the weights are corrupt`, { file: this.store.info(source).file, cause: error });
    }
  }

  /** Serialises native calls: the engine runs one at a time. */
  private run<T>(fn: () => Promise<T> | T): Promise<T> {
    if (this.disposed) return Promise.reject(new RedflagError('DISPOSED', 'the model was disposed'));
    this.pending++;
    const next = this.queue.then(() => callNative(fn)).finally(() => this.pending--);
    this.queue = next.catch(() => undefined);
    return next;
  }

  private checkIds(ids: ArrayLike<number>, what: string): Uint32Array {
    if (ids.length === 0) throw new RedflagError('INVALID_ARGUMENT', `${what} is empty`);
    const out = new Uint32Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (!Number.isInteger(id) || id < 0 || id >= this.config.vocabSize) {
        throw new RedflagError(
          'INVALID_ARGUMENT',
          `${what}[${i}] = ${id} is not a token id of this model (0 to ${this.config.vocabSize - 1})`,
        );
      }
      out[i] = id;
    }
    return out;
  }

  /** Logits for every position of one sequence: row-major [T × vocab]. */
  async logits(ids: Uint32Array | number[], options: LogitsOptions = {}): Promise<Float32Array> {
    const [out] = await this.logitsBatch([ids], options);
    return out!;
  }

  /** Logits for every position of several sequences, run as one batched prefill. */
  async logitsBatch(batch: (Uint32Array | number[])[], options: LogitsOptions = {}): Promise<Float32Array[]> {
    if (!Array.isArray(batch) || batch.length === 0) {
      throw new RedflagError('INVALID_ARGUMENT', 'logitsBatch needs at least one sequence');
    }
    const seqs = batch.map((ids, i) => this.checkIds(ids, `batch[${i}]`));
    const sequences: Sequence[] = [];
    try {
      for (let i = 0; i < seqs.length; i++) sequences.push(this.newSequence());
      const flat = await this.forward(sequences, seqs, { all: true, ...options });
      const V = this.config.vocabSize;
      const out: Float32Array[] = [];
      let row = 0;
      for (const ids of seqs) {
        out.push(flat.slice(row * V, (row + ids.length) * V));
        row += ids.length;
      }
      return out;
    } finally {
      for (const s of sequences) s.dispose();
    }
  }

  /** A new, empty sequence (a KV cache) for incremental decoding. */
  newSequence(): Sequence {
    if (this.disposed) throw new RedflagError('DISPOSED', 'the model was disposed');
    return new Sequence(callNativeSync(() => this.engine.newSequence()));
  }

  /**
   * Appends tokens to each sequence and returns logits: for every new token (`all`) or for
   * the last new token of each sequence, row-major.
   */
  async forward(
    sequences: Sequence[],
    tokens: (Uint32Array | number[])[],
    options: { all?: boolean; signal?: AbortSignal; onProgress?: (done: number, total: number) => void } = {},
  ): Promise<Float32Array> {
    const { flat, counts } = this.checkBatch('forward', sequences, tokens);
    const { onProgress } = options;
    // Progress comes through a thread-safe function whose calls may still be queued when the
    // result arrives: deliver them all before resolving, so callers see every layer.
    let reported = 0;
    // A callback that throws stops the call, which fails with its error (it would otherwise be
    // lost on the native side's thread-safe function).
    let thrown: { error: unknown } | null = null;
    const stop = new AbortController();
    const progress =
      onProgress &&
      ((done: number, total: number) => {
        reported = done;
        if (thrown) return;
        try {
          onProgress(done, total);
        } catch (error) {
          thrown = { error };
          stop.abort();
        }
      });
    const signal = onProgress ? (options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal) : options.signal;
    const native = sequences.map((s) => s.native);
    const out = await this.cancellable(signal, (cancel) => this.engine.forward(native, flat, counts, options.all ?? false, cancel, progress)).catch(
      (error: unknown) => {
        throw thrown ? (thrown as { error: unknown }).error : error;
      },
    );
    for (let i = 0; progress && reported < this.config.numLayers && i < 10_000; i++) {
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    // Thrown by a callback the work outran: still the caller's to see.
    if (thrown) throw (thrown as { error: unknown }).error;
    return out;
  }

  /** Validates one engine call's sequences and new tokens; returns them flattened. */
  private checkBatch(what: string, sequences: Sequence[], tokens: (Uint32Array | number[])[]): { flat: Uint32Array; counts: Uint32Array } {
    if (!Array.isArray(sequences) || sequences.length === 0) {
      throw new RedflagError('INVALID_ARGUMENT', `${what} needs at least one sequence`);
    }
    if (sequences.length !== tokens.length) {
      throw new RedflagError('INVALID_ARGUMENT', `${what} needs one token array per sequence`);
    }
    // One pass into the flat array, no allocation per sequence: a decode step runs this for
    // every running sequence, between the device's steps.
    const counts = new Uint32Array(sequences.length);
    let total = 0;
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      if (t === null || typeof t !== 'object' || typeof t.length !== 'number') throw new RedflagError('INVALID_ARGUMENT', `tokens[${i}] must be an array of token ids`);
      if (t.length === 0) throw new RedflagError('INVALID_ARGUMENT', `tokens[${i}] is empty`);
      counts[i] = t.length;
      total += t.length;
    }
    if (new Set(sequences).size !== sequences.length) {
      throw new RedflagError('INVALID_ARGUMENT', `a sequence appears twice in one ${what} call`);
    }
    const flat = new Uint32Array(total);
    const V = this.config.vocabSize;
    const learned = this.config.positions === 'learned';
    for (let i = 0, offset = 0; i < sequences.length; i++) {
      const s = sequences[i];
      if (!(s instanceof Sequence) || s.disposed) {
        throw new RedflagError('INVALID_ARGUMENT', `sequences[${i}] is not a live sequence of this model`);
      }
      const t = tokens[i]!;
      for (let j = 0; j < t.length; j++) {
        const id = t[j]!;
        if (!Number.isInteger(id) || id < 0 || id >= V) {
          throw new RedflagError('INVALID_ARGUMENT', `tokens[${i}][${j}] = ${id} is not a token id of this model (0 to ${V - 1})`);
        }
        flat[offset++] = id;
      }
      if (learned && s.length + t.length > this.config.maxPositions) {
        throw new RedflagError('INVALID_ARGUMENT', `sequence ${i} would reach ${s.length + t.length} tokens; this model has ${this.config.maxPositions} positions`);
      }
    }
    return { flat, counts };
  }

  /** Runs a cancellable native call: an abort of `signal` stops it between layers. */
  private async cancellable<T>(signal: AbortSignal | undefined, fn: (cancel: Int32Array) => Promise<T>): Promise<T> {
    if (signal?.aborted) throw abortError(signal);
    const cancel = new Int32Array(1);
    const onAbort = () => Atomics.store(cancel, 0, 1);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      return await this.run(() => fn(cancel));
    } catch (error) {
      if (signal?.aborted) throw abortError(signal);
      throw error;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * The fused decode step: appends each sequence's new tokens (a prompt, or the last chosen
   * token) and, from the same logits, picks each sequence's next token and reads p(`<rf>`)
   * and optionally the `topN` most likely tokens. Logits stay in native memory. Random draws
   * depend only on a sequence's seed and position, so a sequence gets the same tokens whatever
   * runs alongside it. `rfToken` defaults to the model's `<rf>`, which with category flags
   * means all of them (`pRf` p of any flag, `pFlags` each one's).
   */
  async step(
    sequences: Sequence[],
    tokens: (Uint32Array | number[])[],
    picks: readonly PickOptions[],
    options: {
      rfToken?: number | null;
      topN?: number;
      signal?: AbortSignal;
      /** false: pick the token only, a plain decode (`logprobs` NaN, `pRf` 0, no top-n). Default true. */
      scores?: boolean;
    } = {},
  ): Promise<StepResult> {
    const { flat, counts } = this.checkBatch('step', sequences, tokens);
    if (picks.length !== sequences.length) throw new RedflagError('INVALID_ARGUMENT', 'step needs one pick option object per sequence');
    const params = new Float64Array(picks.length * 4);
    for (let i = 0; i < picks.length; i++) {
      const p = picks[i]!;
      const temperature = p.temperature ?? 0, topK = p.topK ?? 0, topP = p.topP ?? 1, seed = p.seed ?? 0;
      // The common case checked inline (this runs per sequence and step); checkPickOptions says what is wrong.
      if (!(Number.isFinite(temperature) && temperature >= 0 && Number.isInteger(topK) && topK >= 0 && topP > 0 && topP <= 1 && Number.isSafeInteger(seed) && seed >= 0)) {
        checkPickOptions(p, `picks[${i}]`);
      }
      params[i * 4] = temperature;
      params[i * 4 + 1] = topK;
      params[i * 4 + 2] = topP;
      params[i * 4 + 3] = seed;
    }
    const rfToken = options.rfToken ?? this.redFlagTokenId ?? -1;
    if (!Number.isInteger(rfToken) || rfToken < -1 || rfToken >= this.vocabSize) {
      throw new RedflagError('INVALID_ARGUMENT', `rfToken must be a token id of this model or -1, got ${rfToken}`);
    }
    // Category flags: every flag's p, and pRf their total (the chance of emitting any flag).
    const flags = this.flagArgument(rfToken);
    const topN = options.topN ?? 0;
    if (!Number.isInteger(topN) || topN < 0 || topN > 64) throw new RedflagError('INVALID_ARGUMENT', `topN must be an integer from 0 to 64, got ${topN}`);
    const native = sequences.map((s) => s.native);
    const scores = options.scores ?? true;
    if (!scores && topN > 0) throw new RedflagError('INVALID_ARGUMENT', 'topN needs scores');
    const r = await this.cancellable(options.signal, (cancel) => this.engine.decodeStep(native, flat, counts, params, flags, topN, cancel, scores));
    return { ...r, topN };
  }

  /**
   * Teacher-forced p(`<rf>`) after every token of each sequence's new tokens (appended to the
   * sequences), in order; the LM head runs in row chunks, never over all positions at once.
   * `embedDelta` [tokens × hidden] (the new tokens in order) is added to their input
   * embeddings: the perturbation of an embedding-space attack.
   */
  async tokenScores(
    sequences: Sequence[],
    tokens: (Uint32Array | number[])[],
    options: { rfToken?: number; signal?: AbortSignal; embedDelta?: Float32Array } = {},
  ): Promise<Float32Array> {
    const { flat, counts } = this.checkBatch('tokenScores', sequences, tokens);
    if (options.embedDelta !== undefined && (!(options.embedDelta instanceof Float32Array) || options.embedDelta.length !== flat.length * this.config.hiddenSize)) {
      throw new RedflagError('INVALID_ARGUMENT', `tokenScores: embedDelta must be a Float32Array of tokens x hidden = ${flat.length * this.config.hiddenSize} floats`);
    }
    const rfToken = options.rfToken ?? this.redFlagTokenId;
    if (rfToken == null) throw new RedflagError('INVALID_ARGUMENT', 'tokenScores: the model has no red-flag token (add one or load an adapter)');
    if (!Number.isInteger(rfToken) || rfToken < 0 || rfToken >= this.vocabSize) {
      throw new RedflagError('INVALID_ARGUMENT', `rfToken must be a token id of this model, got ${rfToken}`);
    }
    const native = sequences.map((s) => s.native);
    const flags = this.flagArgument(rfToken);
    if (flags instanceof Int32Array) {
      // Category flags: the chance of emitting any flag.
      return (await this.cancellable(options.signal, (cancel) => this.engine.tokenScores(native, flat, counts, flags, cancel, options.embedDelta, false))).pRf;
    }
    return this.cancellable(options.signal, (cancel) => this.engine.tokenScores(native, flat, counts, rfToken, cancel, options.embedDelta));
  }

  /**
   * Teacher-forced p of every flag token (`<rf>` then the category flags, see
   * {@link Model.flagTokenIds}) after every new token: `pFlags` [tokens × K], and `pRf` their
   * total. For per-category scores of existing text.
   */
  async flagScores(
    sequences: Sequence[],
    tokens: (Uint32Array | number[])[],
    options: { signal?: AbortSignal } = {},
  ): Promise<{ pRf: Float32Array; pFlags: Float32Array; flags: number }> {
    const { flat, counts } = this.checkBatch('flagScores', sequences, tokens);
    const ids = this.flagTokenIds();
    if (ids.length === 0) throw new RedflagError('INVALID_ARGUMENT', 'flagScores: the model has no red-flag token (add one or load an adapter)');
    const native = sequences.map((s) => s.native);
    const r = await this.cancellable(options.signal, (cancel) => this.engine.tokenScores(native, flat, counts, Int32Array.from(ids), cancel, undefined, false));
    return { pRf: r.pRf, pFlags: r.pFlags, flags: ids.length };
  }

  /**
   * Teacher-forced log-likelihood: for every new token of each sequence (appended to the
   * sequences), the log-probability of the sequence's next token (NaN after its last) and
   * p(`<rf>`) (0 when the model has no red-flag token), from the same logits, which never leave
   * native memory. With category flags, pRf is p of any flag and `pFlags` [tokens × K] each
   * one's (as {@link Model.flagScores}). For perplexity, multiple-choice scoring by
   * log-likelihood and attack objectives. `embedDelta` as in {@link Model.tokenScores}.
   */
  async teacherForced(
    sequences: Sequence[],
    tokens: (Uint32Array | number[])[],
    options: { rfToken?: number; signal?: AbortSignal; embedDelta?: Float32Array } = {},
  ): Promise<{ pRf: Float32Array; logprobs: Float32Array; pFlags?: Float32Array }> {
    const { flat, counts } = this.checkBatch('teacherForced', sequences, tokens);
    const rfToken = options.rfToken ?? this.redFlagTokenId ?? -1;
    if (!Number.isInteger(rfToken) || rfToken < -1 || rfToken >= this.vocabSize) {
      throw new RedflagError('INVALID_ARGUMENT', `rfToken must be a token id of this model or -1, got ${rfToken}`);
    }
    if (options.embedDelta !== undefined && (!(options.embedDelta instanceof Float32Array) || options.embedDelta.length !== flat.length * this.config.hiddenSize)) {
      throw new RedflagError('INVALID_ARGUMENT', `teacherForced: embedDelta must be a Float32Array of tokens x hidden = ${flat.length * this.config.hiddenSize} floats`);
    }
    const native = sequences.map((s) => s.native);
    const flags = this.flagArgument(rfToken);
    if (flags instanceof Int32Array) {
      const r = await this.cancellable(options.signal, (cancel) => this.engine.tokenScores(native, flat, counts, flags, cancel, options.embedDelta, true));
      return { pRf: r.pRf, logprobs: r.logprobs!, pFlags: r.pFlags };
    }
    return this.cancellable(options.signal, (cancel) => this.engine.tokenScores(native, flat, counts, rfToken, cancel, options.embedDelta, true));
  }

  /**
   * Generates tokens after a prompt (token ids, or text encoded with the tokenizer).
   * An async iterator of `{ token, text }`; greedy when temperature is 0.
   */
  generate(prompt: Uint32Array | number[] | string, options: GenerateOptions = {}): AsyncGenerator<GeneratedToken> {
    return generate(this, prompt, options);
  }

  /**
   * Turns the adapter (LoRA and trained red-flag rows) on or off; off, the model computes
   * exactly the base model. Queued behind native calls already made, so it applies to the
   * calls made after it.
   */
  async setAdapterEnabled(enabled: boolean): Promise<void> {
    await this.run(() => this.engine.setAdapterEnabled(enabled));
  }

  /** @internal Runs a native call in the model's queue (one native call at a time). */
  runNative<T>(fn: () => Promise<T> | T): Promise<T> {
    return this.run(fn);
  }

  /** The engine's figures; DISPOSED once the model is. */
  #info(): ReturnType<NativeModel['info']> {
    if (this.disposed) throw new RedflagError('DISPOSED', 'the model was disposed');
    return callNativeSync(() => this.engine.info());
  }

  /** Bytes of weights held by the engine. */
  get weightBytes(): number {
    return this.#info().weightBytes;
  }

  /** Positions a sequence's KV cache grows by: 1 on the CPU, the block size of the GPU's paged cache. */
  get kvBlockTokens(): number {
    return this.#info().kvBlockTokens;
  }

  /** Bytes one position takes in a sequence's KV cache (every layer's K and V). */
  get kvBytesPerPosition(): number {
    return this.#info().kvBytesPerPosition;
  }

  /**
   * On a GPU: its free and total bytes now (free cut to what redflag's cap leaves), and what
   * redflag holds; null on the CPU.
   */
  deviceMemory(): { free: number; total: number; held: number } | null {
    if (this.device.kind !== 'cuda') return null;
    const m = addonFor(this.device).cudaMemory?.(this.device.index);
    return m ? { free: m.free, total: m.total, held: m.held } : null;
  }

  /**
   * On a GPU: its name and compute capability, and the GPU architectures the CUDA build holds code
   * for (CMake's list, e.g. `80-real,90`); null on the CPU.
   */
  gpuInfo(): { name: string; computeCapability: string; architectures: string } | null {
    if (this.device.kind !== 'cuda') return null;
    const info = addonFor(this.device).cudaInfo?.(this.device.index);
    return info ? { name: info.name, computeCapability: `${info.smMajor}.${info.smMinor}`, architectures: info.architectures } : null;
  }

  /** The instruction set the CPU kernels use (`avx512` or `avx2`). */
  get isa(): string {
    return this.#info().isa;
  }

  /**
   * Frees the engine's memory and threads; later calls fail with DISPOSED. Calls made before it
   * (running or queued) finish first, then the memory goes; with none, it goes now.
   */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    const free = (): void => {
      this.engine.dispose();
      void this.store.close();
    };
    if (this.pending === 0) free();
    else void this.queue.then(free);
  }
}

/** A sequence's KV cache in the engine. */
export class Sequence {
  /** @internal */
  disposed = false;
  /** @internal */
  readonly native: NativeSequence;
  /** @internal use {@link Model.newSequence} */
  constructor(native: NativeSequence) {
    this.native = native;
  }
  /** Tokens held. */
  get length(): number {
    return this.native.length;
  }
  /** Bytes of KV cache held. */
  get bytes(): number {
    return this.native.bytes;
  }
  /** Allocates room for `positions` tokens now, so appending up to that never allocates. */
  reserve(positions: number): void {
    if (!Number.isInteger(positions) || positions < 0 || positions > 2 ** 31) {
      throw new RedflagError('INVALID_ARGUMENT', `reserve needs an integer from 0 to 2^31, got ${positions}`);
    }
    callNativeSync(() => this.native.reserve(positions));
  }
  /** Forgets tokens from `length` on. */
  truncate(length: number): void {
    if (!Number.isInteger(length) || length < 0 || length > this.length) {
      throw new RedflagError('INVALID_ARGUMENT', `truncate length must be an integer from 0 to ${this.length}`);
    }
    callNativeSync(() => this.native.truncate(length));
  }
  /** Frees the cache. */
  dispose(): void {
    this.disposed = true;
    this.native.dispose();
  }
}
