/**
 * Production detection: a model (with its red-flag adapter) generating answers while p(`<rf>`)
 * is read at every step from the same logits the token is chosen from, many requests sharing
 * each decode step; and teacher-forced scoring of existing text. See {@link createDetector}.
 * @module
 */
import { encodeForScoring, encodePrompt } from '../data/encode.js';
import { EncodeThread, LONG_INPUT_CHARS, messageChars } from '../data/encode-thread.js';
import { checkMessages, RowProblem, type Message } from '../data/records.js';
import { RedflagError, abortError } from '../errors.js';
import { checkPickOptions, loadModel, type Model, type Sequence } from '../model/model.js';
import { parseDevice } from '../model/device.js';
import { StopFilter } from '../model/stop-filter.js';
import { IncrementalDecoder, type Tokenizer } from '../model/tokenizer.js';
import { applyAdapter } from '../train/export.js';
import { sizeKvCache } from './kv-budget.js';
import { nonFiniteScore, Scheduler, type StepPick } from './scheduler.js';
import type {
  ClassifyInput,
  ClassifyOptions,
  ClassifyResult,
  DetectedToken,
  DetectGenerateOptions,
  DetectionStream,
  DetectionSummary,
  Detector,
  DetectorMode,
  DetectorOptions,
  DetectorStats,
  FinishReason,
  Reflection,
} from './types.js';

export type * from './types.js';

/** What `'reflect'` continues from when no reflection is configured. */
export const DEFAULT_REFLECTION = ' I notice that this answer could cause harm, so I will stop here and not give those details.';

const MODES: readonly DetectorMode[] = ['block', 'flag', 'reflect'];
/** kvCacheBytes on the CPU unless given (the CPU allocates per sequence: a cap on its RAM). */
export const DEFAULT_KV_CACHE_BYTES = 2 * 2 ** 30;

/** A generation's length when none is asked for. */
export const DEFAULT_MAX_TOKENS = 256;
/** Most prompt tokens of one request read per step. */
const PREFILL_CHUNK = 512;

function invalid(message: string): RedflagError {
  return new RedflagError('INVALID_ARGUMENT', message);
}

function checkThreshold(value: unknown, what: string): number {
  if (typeof value !== 'number' || !(value >= 0 && value <= 1)) throw invalid(`${what} must be a number in [0, 1], got ${String(value)}`);
  return value;
}

function checkMode(value: unknown, what: string): DetectorMode {
  if (!MODES.includes(value as DetectorMode)) throw invalid(`${what} must be 'block', 'flag' or 'reflect', got ${JSON.stringify(value)}`);
  return value as DetectorMode;
}

function checkInteger(value: unknown, what: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw invalid(`${what} must be an integer from ${min} to ${max}, got ${String(value)}`);
  }
  return value;
}

function checkedMessages(value: unknown, what: string, allowPromptOnly: boolean): { messages: Message[]; responseMissing: boolean } {
  try {
    // As chat APIs take them: the template decides what it renders (see checkMessages).
    return checkMessages(value, { allowPromptOnly, field: what, anyOrder: true });
  } catch (error) {
    if (error instanceof RowProblem) throw invalid(error.message);
    throw error;
  }
}

/** The text 'reflect' places after the flag: examples first, then the instruction. */
function reflectionText(r: string | Reflection): string {
  if (typeof r === 'string') return r;
  const examples = (r.examples ?? []).map((e) => `${e.flagged} ${e.continuation}`).join('\n\n');
  return examples ? `\n\n${examples}\n\n${r.instruction}` : r.instruction;
}

/**
 * Creates a detector. With a model directory it loads the model (and frees it on dispose);
 * with `adapter` it applies a red-flag adapter. The model must know `<rf>` (from the adapter or
 * a saved red-flag model) and have a tokenizer.
 */
export async function createDetector(options: DetectorOptions): Promise<Detector> {
  if (typeof options !== 'object' || options === null) throw invalid('createDetector needs an options object');
  const threshold = checkThreshold(options.threshold ?? 0.5, 'threshold');
  const mode = checkMode(options.mode ?? 'block', 'mode');
  const maxBatch = checkInteger(options.maxBatch ?? 32, 'maxBatch', 1, 1024);
  const kvCacheOption = options.kvCacheBytes === 'auto' ? 'auto' : options.kvCacheBytes === undefined ? undefined : checkInteger(options.kvCacheBytes, 'kvCacheBytes', 1, Number.MAX_SAFE_INTEGER);
  const gpuMemoryFraction = options.gpuMemoryFraction ?? 0.9;
  if (typeof gpuMemoryFraction !== 'number' || !(gpuMemoryFraction > 0 && gpuMemoryFraction <= 1)) {
    throw invalid(`gpuMemoryFraction must be a number in (0, 1], got ${String(gpuMemoryFraction)}`);
  }
  const maxStepTokens = checkInteger(options.maxStepTokens ?? Math.max(2048, maxBatch), 'maxStepTokens', maxBatch, 1 << 20);
  const maxQueued = checkInteger(options.maxQueued ?? 256, 'maxQueued', 0, 1_000_000);
  if (options.overlapSteps !== undefined && typeof options.overlapSteps !== 'boolean') throw invalid('overlapSteps must be true or false');
  const reflection = options.reflection ?? DEFAULT_REFLECTION;
  if (typeof reflection !== 'string' && (typeof reflection !== 'object' || typeof reflection.instruction !== 'string')) {
    throw invalid('reflection must be a string or { instruction, examples? }');
  }
  const owned = typeof options.model === 'string';
  if (!owned && options.device !== undefined && parseDevice(options.device).name !== (options.model as Model).device.name) {
    throw invalid(`device ${JSON.stringify(options.device)} was given with a model loaded on '${(options.model as Model).device.name}': load the model there, or pass its directory`);
  }
  if (!owned && options.chatTemplateKwargs !== undefined) throw invalid('chatTemplateKwargs were given with a loaded model: pass them to loadModel, or pass its directory');
  const model =
    typeof options.model === 'string'
      ? await loadModel(options.model, {
        ...(options.device ? { device: options.device } : {}),
        ...(options.dtype ? { dtype: options.dtype } : {}),
        ...(options.threads ? { threads: options.threads } : {}),
        ...(options.chatTemplateKwargs ? { chatTemplateKwargs: options.chatTemplateKwargs } : {}),
      })
      : options.model;
  try {
    if (options.mergeAdapter && options.adapter === undefined) throw invalid('mergeAdapter needs an adapter');
    if (options.adapter !== undefined) await applyAdapter(model, options.adapter, { merge: options.mergeAdapter ?? false });
    const rf = model.redFlagTokenId;
    if (rf === null) {
      throw new RedflagError('INVALID_ARGUMENT', 'the model has no <rf> token: pass the red-flag adapter (`adapter`) or a model saved with one', {
        file: model.dir,
      });
    }
    if (!model.tokenizer) throw new RedflagError('NO_TOKENIZER', 'a detector needs the model\'s tokenizer (tokenizer.json)', { file: model.dir });
    // On a GPU the KV cache is one pool of blocks: size it to the budget (the scheduler keeps
    // the reservations within it), or to the memory left (auto). The CPU allocates per sequence.
    const limits = { maxBatch, maxStepTokens, prefillChunk: PREFILL_CHUNK };
    let kvCacheBytes = typeof kvCacheOption === 'number' ? kvCacheOption : DEFAULT_KV_CACHE_BYTES;
    if (model.device.kind === 'cuda') {
      if (kvCacheOption === undefined || kvCacheOption === 'auto') kvCacheBytes = await sizeKvCache(model, limits, gpuMemoryFraction);
      else await model.runNative(() => model.engine.setKvPoolBytes(kvCacheBytes));
    }
    return new RedFlagDetector(model, owned, {
      threshold,
      mode,
      rf,
      flags: model.flagTokenIds(),
      categories: model.flagCategories.map((c) => c.category),
      reflectionIds: model.tokenizer.encode(reflectionText(reflection), { addSpecialTokens: false }),
      // The model's <rf>: with category flags, every step reads them all (pRf: p of any flag).
      scheduler: new Scheduler(model, { ...limits, kvCacheBytes, maxQueued, rfToken: rf, overlap: options.overlapSteps ?? model.device.kind === 'cuda' }),
      kvCacheBytes,
    });
  } catch (error) {
    if (owned) model.dispose();
    throw error;
  }
}

/** A generation's token stream: a queue the scheduler fills and one iterator drains. */
class Stream implements DetectionStream {
  readonly done: Promise<DetectionSummary>;
  readonly #controller = new AbortController();
  readonly #items: DetectedToken[] = [];
  #wake: (() => void) | null = null;
  #summary: DetectionSummary | null = null;
  #error: unknown = undefined;
  #failed = false;
  #iterated = false;
  #settle!: { resolve: (s: DetectionSummary) => void; reject: (e: unknown) => void };
  #unlisten: (() => void) | null = null;

  constructor(signal?: AbortSignal) {
    this.done = new Promise((resolve, reject) => (this.#settle = { resolve, reject }));
    this.done.catch(() => undefined); // a caller who only iterates still sees the error there
    // First, so a signal already aborted fails the stream at once.
    this.#controller.signal.addEventListener('abort', () => this.fail(abortError(this.#controller.signal)), { once: true });
    if (signal) {
      if (signal.aborted) this.#controller.abort(signal.reason);
      else {
        // Removed when the stream ends: a signal may serve many requests, and its listeners
        // would keep every finished stream alive.
        const onAbort = () => this.#controller.abort(signal.reason);
        signal.addEventListener('abort', onAbort, { once: true });
        this.#unlisten = () => signal.removeEventListener('abort', onAbort);
      }
    }
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  get finished(): boolean {
    return this.#summary !== null || this.#failed;
  }

  cancel(): void {
    this.#controller.abort();
  }

  push(items: DetectedToken[]): void {
    if (this.finished || items.length === 0) return;
    this.#items.push(...items);
    this.#wake?.();
  }

  end(summary: DetectionSummary): void {
    if (this.finished) return;
    this.#summary = summary;
    this.#unlisten?.();
    this.#settle.resolve(summary);
    this.#wake?.();
  }

  fail(error: unknown): void {
    if (this.finished) return;
    this.#failed = true;
    this.#unlisten?.();
    this.#error = error;
    this.#settle.reject(error);
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<DetectedToken> {
    if (this.#iterated) throw invalid('a detection stream can be iterated once');
    this.#iterated = true;
    try {
      for (;;) {
        if (this.#items.length > 0) {
          yield this.#items.shift()!;
        } else if (this.#failed) {
          throw this.#error;
        } else if (this.#summary) {
          return;
        } else {
          await new Promise<void>((resolve) => (this.#wake = resolve));
          this.#wake = null;
        }
      }
    } finally {
      // The consumer stopped early (break or return): nobody wants the rest.
      if (!this.finished) this.cancel();
    }
  }
}

interface DetectorState {
  threshold: number;
  mode: DetectorMode;
  rf: number;
  /** Every flag token: <rf>, then the category flags. */
  flags: number[];
  /** The category flags' names, in the order of flags[1..]. */
  categories: string[];
  reflectionIds: number[];
  scheduler: Scheduler;
  kvCacheBytes: number;
}

class RedFlagDetector implements Detector {
  readonly model: Model;
  readonly mode: DetectorMode;
  readonly threshold: number;
  readonly redFlagTokenId: number;
  readonly categories: readonly string[];
  readonly #owned: boolean;
  readonly #s: DetectorState;
  readonly #tokenizer: Tokenizer;
  readonly #eos: Set<number>;
  #disposed = false;
  #encodeThread: EncodeThread | null = null;
  /** Threads made stale by a tokenizer change, finishing their jobs (closed on dispose). */
  #retiredThreads = new Set<EncodeThread>();

  constructor(model: Model, owned: boolean, state: DetectorState) {
    this.model = model;
    this.mode = state.mode;
    this.threshold = state.threshold;
    this.redFlagTokenId = state.rf;
    this.categories = state.categories;
    this.#owned = owned;
    this.#s = state;
    this.#tokenizer = model.tokenizer!;
    this.#eos = new Set(model.eosTokenIds);
  }

  /** The flag tokens' strings (`<rf>`, `<rf:NAME>`). */
  #flagStrings(): string[] {
    return this.#s.flags.map((id) => this.#tokenizer.idToToken(id)).filter((t): t is string => t !== undefined);
  }

  generate(input: readonly Message[] | string, options: DetectGenerateOptions = {}): DetectionStream {
    if (this.#disposed) throw new RedflagError('DISPOSED', 'the detector was disposed');
    const maxTokens = checkInteger(options.maxTokens ?? DEFAULT_MAX_TOKENS, 'maxTokens', 1, 1_000_000);
    const topN = checkInteger(options.topLogprobs ?? 0, 'topLogprobs', 0, 20);
    const threshold = checkThreshold(options.threshold ?? this.threshold, 'threshold');
    const mode = checkMode(options.mode ?? this.mode, 'mode');
    const filter = new StopFilter<DetectedToken>(options.stop ?? []);
    const pick = checkPickOptions({ ...options, seed: options.seed ?? Math.floor(Math.random() * 2 ** 31) }, 'generate');
    // A long input is encoded on the encoding thread (the answer starts once it has); a short one here.
    let prompt: number[] = [];
    let encoding: Promise<number[]> | null = null;
    // A request's kwargs are read as its messages are: they may not set the tokenizer's variables, and their text is text.
    const extra = options.chatTemplateKwargs === undefined ? undefined : this.#tokenizer.clientTemplateKwargs(options.chatTemplateKwargs, 'chatTemplateKwargs');
    if (typeof input === 'string') {
      if (input.length === 0) throw invalid('the prompt is empty');
      if (extra !== undefined) throw invalid('chatTemplateKwargs are for messages: raw text is not rendered with the chat template');
      // Raw text may write a chat template's tokens, but never a flag: the flag is the model's to emit.
      if (input.length >= LONG_INPUT_CHARS) encoding = this.#encoder().text(input, this.#flagStrings());
      else prompt = this.#tokenizer.encode(this.#tokenizer.escapeSpecialTokens(input, this.#flagStrings()));
    } else {
      const { messages } = checkedMessages(input, 'messages', true);
      if (messageChars(messages) >= LONG_INPUT_CHARS) encoding = this.#encoder().prompt(messages, extra);
      else prompt = encodePrompt(this.#tokenizer, messages, extra === undefined ? {} : { chatTemplateExtra: extra });
    }
    if (encoding === null && prompt.length === 0) throw invalid('the prompt encodes to no tokens');

    const s = this.#s;
    const stream = new Stream(options.signal);
    const decoder = new IncrementalDecoder(this.#tokenizer);
    let completion = 0;
    let flagged = false;
    let flagIndex = -1;
    let maxPRf = 0;
    let reflected = false;
    const flagIds = new Set(s.flags);
    const multi = s.categories.length > 0;
    const maxCategory: Record<string, number> = Object.fromEntries(s.categories.map((c) => [c, 0]));
    let category: string | null = null;
    // Each category's p at a step (pFlags[0] is <rf>'s), and the most likely flag's index.
    const categoryScores = (p: StepPick): Record<string, number> => Object.fromEntries(s.categories.map((c, k) => [c, p.pFlags?.[k + 1] ?? 0]));
    const likeliestFlag = (p: StepPick): number => {
      let best = 0;
      for (let k = 1; k < (p.pFlags?.length ?? 0); k++) if (p.pFlags![k]! > p.pFlags![best]!) best = k;
      return best;
    };
    let budget = maxTokens;
    let text = '';
    const show = (items: DetectedToken[]) => {
      for (const t of items) text += t.text;
      stream.push(items);
    };
    const finish = (reason: FinishReason, flushText: boolean): null => {
      if (flushText) {
        // The end of the answer: what the stop filter and the decoder held back (a stop string
        // the decoder's tail completes still stops it).
        const { ready, stopped } = filter.flush(decoder.flush());
        show(ready);
        if (stopped && reason !== 'content_filter') reason = 'stop';
      }
      stream.end({
        finishReason: reason,
        flagged,
        maxPRf,
        flagIndex,
        ...(multi ? { categoryScores: { ...maxCategory }, category } : {}),
        text,
        promptTokens: prompt.length,
        completionTokens: completion,
      });
      return null;
    };
    const topOf = (p: StepPick) => {
      const out: { token: number; text: string; logprob: number }[] = [];
      // <rf> (and every category flag) is never shown, not even among the alternatives.
      for (let i = 0; i < p.topIds.length && out.length < topN; i++) {
        if (flagIds.has(p.topIds[i]!)) continue;
        // In context, as the chosen token's text is (decoded alone, a SentencePiece token loses its space).
        out.push({ token: p.topIds[i]!, text: decoder.textOf(p.topIds[i]!), logprob: p.topLogprobs[i]! });
      }
      return out;
    };

    const onPick = (p: StepPick): number[] | null => {
      if (stream.finished) return null;
      completion++;
      if (p.pRf > maxPRf) maxPRf = p.pRf;
      const scores = multi ? categoryScores(p) : undefined;
      if (scores) for (const c of s.categories) maxCategory[c] = Math.max(maxCategory[c]!, scores[c]!);
      const isFlag = flagIds.has(p.token);
      const raised = isFlag || p.pRf >= threshold;
      // The flag raised: the one sampled, else the most likely one.
      const flagToken = isFlag ? p.token : multi ? s.flags[likeliestFlag(p)]! : s.rf;
      if (raised && !flagged) {
        flagged = true;
        flagIndex = completion - 1;
        if (multi) category = flagToken === s.rf ? null : s.categories[s.flags.indexOf(flagToken) - 1]!;
      }
      // Blocked: the flagged step's token is never shown; what came before it and was held back is.
      if (raised && mode === 'block') return finish('content_filter', true);
      if (this.#eos.has(p.token)) return finish('stop', true);
      let next = [p.token];
      if (raised && mode === 'reflect' && !reflected) {
        // The paper's soft mode: the flag and a reflective instruction go into the context
        // (not into the user's text) and the answer continues from there.
        reflected = true;
        next = [flagToken, ...s.reflectionIds];
      } else if (!isFlag) {
        // The alternatives read in the context the chosen token is pushed into.
        const top = topN > 0 ? topOf(p) : null;
        const token: DetectedToken = { token: p.token, text: decoder.push(p.token), logprob: p.logprob, pRf: p.pRf, ...(scores ? { categoryScores: scores } : {}), flagged };
        if (top) {
          // The chosen token among them reads as it is shown.
          for (const alt of top) if (alt.token === p.token && token.text !== '') alt.text = token.text;
          token.topLogprobs = top;
        }
        const { ready, stopped } = filter.push(token, decoder.holding);
        show(ready);
        if (stopped) return finish('stop', false);
      }
      if (completion >= budget) return finish('length', true);
      return next;
    };

    const reflectRoom = mode === 'reflect' ? 1 + s.reflectionIds.length : 0;
    const submit = () => {
      try {
        // The model's positions bound the answer: a prompt that leaves no room is refused, a
        // token budget beyond them ends with 'length' where they run out.
        const room = this.model.config.maxPositions - prompt.length - reflectRoom;
        if (room < 1) {
          throw new RedflagError('TOO_LARGE', `the prompt has ${prompt.length} tokens; this model has ${this.model.config.maxPositions} positions`);
        }
        budget = Math.min(maxTokens, room);
        s.scheduler.submit({
          prompt,
          positions: prompt.length + budget + reflectRoom,
          pick,
          // Room for the flags (<rf> and each category's), dropped from the alternatives shown.
          topN: topN > 0 ? Math.min(64, topN + s.flags.length) : 0,
          signal: stream.signal,
          onPick,
          onError: (error) => stream.fail(error),
        });
      } catch (error) {
        stream.fail(error);
      }
    };
    if (encoding === null) submit();
    else {
      encoding.then(
        (ids) => {
          if (stream.finished) return; // cancelled meanwhile
          if (ids.length === 0) return stream.fail(invalid('the prompt encodes to no tokens'));
          prompt = ids;
          submit();
        },
        (error: unknown) => stream.fail(error),
      );
    }
    return stream;
  }

  async classify(conversations: readonly ClassifyInput[], options: ClassifyOptions = {}): Promise<ClassifyResult[]> {
    if (this.#disposed) throw new RedflagError('DISPOSED', 'the detector was disposed');
    if (this.#s.scheduler.failure) throw this.#s.scheduler.failedError();
    if (!Array.isArray(conversations)) throw invalid('classify expects an array of conversations');
    const threshold = checkThreshold(options.threshold ?? this.threshold, 'threshold');
    const batchSize = checkInteger(options.batchSize ?? 8, 'batchSize', 1, 1024);
    // Each conversation as the ids to feed and where its response starts: on the encoding thread
    // when there is much text (a moderation of 256 strings is one call), else here.
    const items = conversations.map((c, i) => {
      const raw = Array.isArray(c) ? c : (c as { messages?: unknown })?.messages;
      return { ...checkedMessages(raw, `conversations[${i}].messages`, true), source: `conversations[${i}]` };
    });
    const chars = items.reduce((n, item) => n + messageChars(item.messages), 0);
    const encoded = chars >= LONG_INPUT_CHARS
      ? await this.#encoder().scoring(items)
      : items.map((item) => encodeForScoring(this.#tokenizer, item.messages, item.responseMissing, item.source));
    if (this.#disposed) throw new RedflagError('DISPOSED', 'the detector was disposed');
    if (options.signal?.aborted) throw abortError(options.signal);
    // Positions past the model's are never scored (their rotary angles were never trained).
    const maxPositions = this.model.config.maxPositions;
    encoded.forEach((e, i) => {
      if (e.ids.length > maxPositions) throw new RedflagError('TOO_LARGE', `conversations[${i}] has ${e.ids.length} tokens; this model has ${maxPositions} positions`);
    });
    // Batches of up to batchSize within the KV budget, each holding its share of it while it runs
    // (on a GPU its sequences take blocks from the pool the generations use).
    const scheduler = this.#s.scheduler;
    const chunks: { items: typeof encoded; bytes: number }[] = [];
    for (const [i, e] of encoded.entries()) {
      const bytes = scheduler.sequenceBytes(e.ids.length);
      if (bytes > scheduler.kvCacheBytes) {
        throw new RedflagError('TOO_LARGE', `conversations[${i}] needs ${(bytes / 2 ** 20).toFixed(1)} MiB of KV cache for its ${e.ids.length} tokens, more than the whole budget of ${(scheduler.kvCacheBytes / 2 ** 20).toFixed(1)} MiB`);
      }
      const last = chunks.at(-1);
      if (last && last.items.length < batchSize && last.bytes + bytes <= scheduler.kvCacheBytes) {
        last.items.push(e);
        last.bytes += bytes;
      } else {
        chunks.push({ items: [e], bytes });
      }
    }
    const results: ClassifyResult[] = [];
    for (const { items: chunk, bytes } of chunks) {
      if (options.signal?.aborted) throw abortError(options.signal);
      const release = await scheduler.hold(bytes, options.signal);
      const seqs: Sequence[] = [];
      let scores: Float32Array;
      let perFlag: Float32Array | null = null;
      const K = this.#s.flags.length;
      try {
        for (const _ of chunk) seqs.push(this.model.newSequence());
        const signal = options.signal ? { signal: options.signal } : {};
        if (this.#s.categories.length > 0) {
          const r = await this.model.flagScores(seqs, chunk.map((e) => e.ids), signal);
          scores = r.pRf;
          perFlag = r.pFlags;
        } else {
          scores = await this.model.tokenScores(seqs, chunk.map((e) => e.ids), { rfToken: this.#s.rf, ...signal });
        }
      } catch (error) {
        this.#s.scheduler.noteFailure(error);
        throw error;
      } finally {
        for (const q of seqs) q.dispose();
        release();
      }
      let offset = 0;
      for (const e of chunk) {
        // scores[offset + t] is p(<rf>) after token t, i.e. before token t + 1.
        const pRf = scores.slice(offset + e.responseStart - 1, offset + e.responseStart + e.responseLength);
        if (pRf.some(Number.isNaN)) throw nonFiniteScore();
        let maxPRf = 0;
        let firstFlag = -1;
        pRf.forEach((p, j) => {
          if (p > maxPRf) maxPRf = p;
          if (firstFlag < 0 && p >= threshold) firstFlag = j;
        });
        const result: ClassifyResult = { tokens: e.ids.slice(e.responseStart), pRf, maxPRf, firstFlag, flagged: firstFlag >= 0 };
        if (perFlag !== null) {
          const first = offset + e.responseStart - 1;
          result.categoryScores = Object.fromEntries(
            this.#s.categories.map((c, k) => [c, Float32Array.from({ length: pRf.length }, (_, j) => perFlag![(first + j) * K + k + 1]!)]),
          );
        }
        results.push(result);
        offset += e.ids.length;
      }
    }
    return results;
  }

  stats(): DetectorStats {
    const q = this.#s.scheduler;
    return {
      active: q.active,
      queued: q.queued,
      kvCacheBytes: q.reservedBytes,
      kvCacheBudget: this.#s.kvCacheBytes,
      steps: q.steps,
      tokensGenerated: q.tokens,
      oomSplits: q.oomSplits,
      guessesDropped: q.guessesDropped,
      deviceFailed: q.failure !== null,
    };
  }

  /**
   * The encoding thread, made at the tokenizer's current revision: again after the tokenizer
   * changed (the old one finishes the jobs it has, which were asked before the change) or after
   * the thread failed.
   */
  #encoder(): EncodeThread {
    for (const t of this.#retiredThreads) if (t.failed) this.#retiredThreads.delete(t); // closed since
    let current = this.#encodeThread;
    if (current === null || current.failed || current.revision !== this.#tokenizer.revision) {
      if (current !== null) {
        current.retire();
        this.#retiredThreads.add(current);
      }
      current = this.#encodeThread = new EncodeThread(this.#tokenizer);
    }
    return current;
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await Promise.all([this.#encodeThread, ...this.#retiredThreads].map((t) => t?.close()));
    await this.#s.scheduler.close();
    if (this.#owned) this.model.dispose();
  }
}
