/**
 * A deterministic stand-in for the real detector, for testing the HTTP layer without a model.
 * It answers every prompt with the words of {@link ANSWER}, p(`<rf>`) rising a little per token;
 * what the last user turn contains changes that:
 * - "bomb": p(`<rf>`) rises fast, the second token is `<rf>` (empty text) and the answer is blocked;
 * - "slow": endless "tick" tokens 10 ms apart, until the signal aborts;
 * - "wait": nothing until {@link FakeDetector.release} (or the signal aborts), then the normal answer;
 * - "busy" / "huge" / "oom": the first step fails with a BUSY / TOO_LARGE / OUT_OF_MEMORY RedflagError;
 * - "crash": the first step fails with a plain Error whose message must not reach clients;
 * - "gpu fault": the first step fails with DEVICE_FAILED, and the detector stays failed (as the
 *   real one after a lost CUDA context): stats().deviceFailed, every later request fails too.
 * With `categories` (a model with category flags), the first category's flag carries 0.8 of
 * p(`<rf>`), the others 0.1 / (n - 1) each, at every step and in classify.
 */
import type {
  ClassifyInput,
  ClassifyResult,
  DetectGenerateOptions,
  DetectedToken,
  DetectionStream,
  DetectionSummary,
  Detector,
  DetectorStats,
} from '../../lib/detect/types.js';
import type { Message } from '../../lib/data/records.js';
import { RedflagError } from '../../lib/errors.js';
import type { Model } from '../../lib/model/model.js';

export const ANSWER = ['Sure', ',', ' here', ' is', ' a', ' naïve', ' answer', '.'];
export const SECRET = 'secret-internal-detail /opt/redflag/native.cc:42';

/** What one `generate` call received and did. */
export interface GenerationRecord {
  messages: readonly Message[] | string;
  options: DetectGenerateOptions;
  /** Tokens yielded so far. */
  produced: number;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

function wordCount(messages: readonly Message[] | string): number {
  const text = typeof messages === 'string' ? messages : messages.map((m) => m.content).join(' ');
  return text.split(/\s+/).filter(Boolean).length;
}

function topLogprobs(text: string, logprob: number, count: number): DetectedToken['topLogprobs'] {
  const alternatives = [{ token: 1, text, logprob }];
  for (let i = 1; i < count + 2; i++) alternatives.push({ token: 100 + i, text: `alt${i}`, logprob: logprob - i });
  // Deliberately more than asked: the server must trim to the request's top_logprobs.
  return alternatives;
}

export class FakeDetector implements Detector {
  readonly model = {} as Model;
  readonly mode = 'block' as const;
  readonly threshold = 0.5;
  readonly redFlagTokenId = 999;
  readonly categories: readonly string[];
  readonly generations: GenerationRecord[] = [];
  readonly classifications: { conversations: readonly ClassifyInput[]; signal: AbortSignal | undefined }[] = [];
  /** Set by a "gpu fault" request: the device is lost for good. */
  deviceFailed = false;
  private releaseWaiting: () => void = () => {};
  private waiting = new Promise<void>((resolve) => (this.releaseWaiting = resolve));

  constructor(options: { categories?: string[] } = {}) {
    this.categories = options.categories ?? [];
  }

  /** Each category's share of p(<rf>): 0.8 for the first, the rest split over the others. */
  private shares(pRf: number): Record<string, number> {
    return Object.fromEntries(this.categories.map((c, i) => [c, pRf * (i === 0 ? 0.8 : 0.1 / (this.categories.length - 1))]));
  }

  /** Lets generations of "wait" prompts go on. */
  release(): void {
    this.releaseWaiting();
  }

  generate(messages: readonly Message[] | string, options: DetectGenerateOptions = {}): DetectionStream {
    const record: GenerationRecord = { messages, options, produced: 0 };
    this.generations.push(record);
    const cancel = new AbortController();
    const signal = options.signal ? AbortSignal.any([options.signal, cancel.signal]) : cancel.signal;
    const prompt = typeof messages === 'string' ? messages : (messages.filter((m) => m.role === 'user').at(-1)?.content ?? '');
    const steps = this.steps(prompt, wordCount(messages), options, signal);

    let settle!: { resolve: (summary: DetectionSummary) => void; reject: (error: unknown) => void };
    const done = new Promise<DetectionSummary>((resolve, reject) => (settle = { resolve, reject }));
    done.catch(() => {});
    return {
      done,
      cancel: () => cancel.abort(new RedflagError('ABORTED', 'cancelled')),
      async *[Symbol.asyncIterator]() {
        try {
          for (;;) {
            const step = await steps.next();
            if (step.done) {
              settle.resolve(step.value);
              return;
            }
            record.produced++;
            yield step.value;
          }
        } catch (error) {
          settle.reject(error);
          throw error;
        }
      },
    };
  }

  private async *steps(
    prompt: string,
    promptTokens: number,
    options: DetectGenerateOptions,
    signal: AbortSignal,
  ): AsyncGenerator<DetectedToken, DetectionSummary> {
    await sleep(0, signal);
    if (prompt.includes('busy')) throw new RedflagError('BUSY', 'the detector queue is full');
    if (prompt.includes('huge')) throw new RedflagError('TOO_LARGE', 'the prompt needs more KV cache than the budget');
    if (prompt.includes('oom')) throw new RedflagError('OUT_OF_MEMORY', `out of GPU memory on cuda:0 allocating scratch (${SECRET})`);
    if (prompt.includes('crash')) throw new Error(SECRET);
    if (prompt.includes('gpu fault') || this.deviceFailed) {
      this.deviceFailed = true;
      throw new RedflagError('DEVICE_FAILED', `the GPU cuda:0 failed (${SECRET}: cudaErrorIllegalAddress)`);
    }
    if (prompt.includes('wait')) {
      const stopWaiting = new AbortController();
      try {
        await Promise.race([this.waiting, sleep(60_000, AbortSignal.any([signal, stopWaiting.signal]))]);
      } finally {
        stopWaiting.abort();
      }
      if (signal.aborted) throw signal.reason;
    }
    const topCount = options.topLogprobs ?? 0;
    const token = (text: string, index: number, pRf: number, flagged: boolean): DetectedToken => {
      const logprob = -0.1 * (index + 1);
      return {
        token: index,
        text,
        logprob,
        pRf,
        ...(this.categories.length ? { categoryScores: this.shares(pRf) } : {}),
        flagged,
        ...(topCount > 0 ? { topLogprobs: topLogprobs(text, logprob, topCount) } : {}),
      };
    };

    if (prompt.includes('slow')) {
      for (let i = 0; ; i++) {
        await sleep(10, signal);
        yield token(' tick', i, 0, false);
      }
    }

    const harmful = prompt.includes('bomb');
    const maxTokens = options.maxTokens ?? 256;
    let text = '';
    let maxPRf = 0;
    let flagged = false;
    let completionTokens = 0;
    let finishReason: DetectionSummary['finishReason'] = 'stop';
    for (let i = 0; i < ANSWER.length; i++) {
      if (completionTokens >= maxTokens) {
        finishReason = 'length';
        break;
      }
      const word = ANSWER[i] as string;
      if (options.stop?.includes(word.trim())) break;
      const pRf = harmful ? 0.3 * (i + 1) : 0.01 * (i + 1);
      maxPRf = Math.max(maxPRf, pRf);
      completionTokens++;
      if (pRf >= this.threshold) {
        // Blocked: the flagged step's token is not shown (as the detector does).
        flagged = true;
        finishReason = 'content_filter';
        break;
      }
      text += word;
      // "split": a character whose bytes span two tokens, the first showing no text yet.
      if (prompt.includes('split') && i === 1) {
        completionTokens++;
        yield token('', i, pRf, false);
      }
      yield token(word, i, pRf, false);
    }
    const categories = this.categories.length ? { categoryScores: this.shares(maxPRf), category: flagged ? this.categories[0]! : null } : {};
    return { finishReason, flagged, maxPRf, flagIndex: flagged ? completionTokens - 1 : -1, ...categories, text, promptTokens, completionTokens };
  }

  async classify(conversations: readonly ClassifyInput[], options: { signal?: AbortSignal } = {}): Promise<ClassifyResult[]> {
    this.classifications.push({ conversations, signal: options.signal });
    // A text scores 0.9 when it mentions a bomb, else 0.05: p(<rf>) after the prompt is the last
    // user turn's score, after the answer's first token the answer's; a prompt-only
    // conversation has the one score after its prompt, as the real detector's.
    const score = (text: string) => (text.includes('bomb') ? 0.9 : 0.05);
    return conversations.map((conversation) => {
      const messages = ('messages' in conversation ? conversation.messages : conversation) as readonly Message[];
      const last = messages.at(-1)!;
      const request = score(messages.findLast((m) => m.role === 'user')?.content ?? '');
      const pRf = last.role === 'assistant' ? Float32Array.of(request, score(last.content), 0.01) : Float32Array.of(request);
      const maxPRf = Math.max(...pRf);
      const firstFlag = pRf.findIndex((p) => p >= 0.5);
      const categoryScores = this.categories.length
        ? Object.fromEntries(this.categories.map((c) => [c, pRf.map((p) => this.shares(p)[c]!)]))
        : undefined;
      return { tokens: last.role === 'assistant' ? [1, 2] : [], pRf, maxPRf, firstFlag, flagged: firstFlag >= 0, ...(categoryScores ? { categoryScores } : {}) };
    });
  }

  stats(): DetectorStats {
    return { active: 0, queued: 0, kvCacheBytes: 0, kvCacheBudget: 1 << 30, steps: 7, tokensGenerated: 42, oomSplits: 3, guessesDropped: 2, deviceFailed: this.deviceFailed };
  }

  async dispose(): Promise<void> {}
}
