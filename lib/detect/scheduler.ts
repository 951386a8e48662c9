/**
 * Continuous batching: every running generation advances in the same native decode step.
 * A request that arrives mid-flight is admitted at the next step, its prompt prefilled in that
 * step (in chunks, so a long prompt does not stall the others for long) while the others
 * decode. Each admitted request reserves the KV cache its prompt plus its token budget need,
 * so the budget holds without any cache growing later; a request that does not fit waits, one
 * that could never fit is refused. Work outside the steps that makes sequences of its own
 * (classify) holds its share of the same budget first, in the same queue.
 *
 * With `overlap` (the GPU's default) the host's share of a step runs while the device computes
 * the next one: when a step returns, the next is started at once on the tokens it picked (a
 * guess: the job's onPick decides), and the picks are handed to their jobs meanwhile. A job that
 * stops there wastes one speculative token; one that continues otherwise (a reflection) has it
 * cut back before its own tokens go in. The device never waits for JavaScript, which at large
 * batches would otherwise add its per-token work to every step.
 * @module
 */
import { RedflagError, abortError } from '../errors.js';
import type { Model, PickOptions, Sequence } from '../model/model.js';

/** One sequence's result of a decode step. */
export interface StepPick {
  token: number;
  logprob: number;
  pRf: number;
  /** With several flag tokens: each one's p (the model's flag order). */
  pFlags?: Float32Array;
  /** The `topN` most likely tokens and their log-probabilities. */
  topIds: Uint32Array;
  topLogprobs: Float32Array;
}

/** A generation as the scheduler sees it. */
export interface Job {
  /** Prompt token ids (at least one). */
  prompt: number[];
  /** KV positions to reserve: the prompt plus every token the job may still append. */
  positions: number;
  pick: Required<PickOptions>;
  topN: number;
  signal?: AbortSignal;
  /** Called with each pick; returns the tokens to append next (one or more), or null when finished. */
  onPick(pick: StepPick): number[] | null;
  /** Called once if the job fails or is cancelled (not after onPick returned null). */
  onError(error: unknown): void;
}

/** Budget held by work outside the steps (classify): granted, in turn with the jobs, once it fits. */
interface Hold {
  bytes: number;
  signal?: AbortSignal;
  grant(): void;
  onError(error: unknown): void;
}

type Waiter = Job | Hold;
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const isHold = (w: Waiter): w is Hold => 'grant' in w;

/**
 * A NaN red-flag score (NaN or infinite logits: overflowing activations, a corrupt adapter) fails
 * the request: compared with the threshold it would read as "not flagged".
 * @internal
 */
export function nonFiniteScore(): RedflagError {
  return new RedflagError('NATIVE', "the model computed a NaN red-flag score (its logits are not finite: overflowing activations, or corrupt weights); with dtype 'bf16', try 'f32'");
}

/** Limits of a {@link Scheduler}. */
export interface SchedulerOptions {
  /** Most sequences in one step. */
  maxBatch: number;
  /** Bytes of KV cache all admitted jobs may reserve together. */
  kvCacheBytes: number;
  /** Jobs that may wait; more are refused. */
  maxQueued: number;
  /** Most prompt tokens of one job prefilled per step. */
  prefillChunk: number;
  /**
   * Most tokens of all jobs together in one step (at least maxBatch): every running job gets
   * one, and the prompts being prefilled share the rest in order of arrival. It bounds a step's
   * activations (what a GPU must hold besides the weights and the KV cache) and how long a step
   * that prefills keeps the others' next tokens waiting.
   */
  maxStepTokens: number;
  /** The red-flag token read at every step (-1: none); the model's own `<rf>` reads all its flags (Model.step). */
  rfToken: number;
  /** Start each step before the last one's picks are handed out (see the module description). Default false. */
  overlap?: boolean;
}

/** A sequence's share of a step: its pick, or the error that failed it. */
type Outcome = { pick: StepPick } | { error: unknown };

interface Running {
  job: Job;
  seq: Sequence;
  /** Tokens to append at the next step. */
  pending: number[];
  bytes: number;
  /** Overlap: the last pick, put in pending before the job's onPick has accepted it (null: none). */
  guessed: number | null;
  /** Finished: no longer running (its outcomes in records are ignored). */
  done: boolean;
}

/**
 * A step's sequences and outcomes; `continues[i]`: its pick continues the text (no prompt left).
 * An outcome already dealt with (a guess cut back) is null.
 */
interface StepRecord {
  batch: Running[];
  outcomes: (Outcome | null)[];
  continues: boolean[];
}

/** What a job's onPick decided, applied once no step is in flight: stop (error: failed), or go on with `next`. */
type Decision = { r: Running; stop: true; error?: unknown } | { r: Running; stop: false; next: number[] };

/** Runs jobs on a model in shared decode steps; see the module description. */
export class Scheduler {
  readonly #model: Model;
  readonly #o: SchedulerOptions;
  readonly #queue: Waiter[] = [];
  /** Each waiting job's (or hold's) abort-listener removal. */
  readonly #waiting = new Map<Waiter, () => void>();
  readonly #running: Running[] = [];
  readonly #bytesPerPosition: number;
  readonly #blockTokens: number;
  #reserved = 0;
  #loop: Promise<void> | null = null;
  /** A kick came while the loop ran (see #kick). */
  #kickedWhileRunning = false;
  #closed = false;
  /** Counters for stats. */
  steps = 0;
  tokens = 0;
  /** Steps split because memory ran out (see #step). */
  oomSplits = 0;
  /** Overlap: guessed tokens a step computed and its job did not take (it stopped or reflected). */
  guessesDropped = 0;
  /** The device's failure (DEVICE_FAILED), once a step met it: every job fails with it from then on. */
  failure: RedflagError | null = null;

  constructor(model: Model, options: SchedulerOptions) {
    this.#model = model;
    this.#o = options;
    // K and V of every layer: f32 on the CPU, the weights' dtype in the GPU's pool.
    this.#bytesPerPosition = model.kvBytesPerPosition;
    // A paged cache (the GPU's) takes whole blocks.
    this.#blockTokens = model.kvBlockTokens;
  }

  /** Bytes of KV cache a job of `positions` positions reserves (one more with overlap: its guessed token). */
  bytesFor(positions: number): number {
    return this.sequenceBytes(positions + (this.#o.overlap ? 1 : 0));
  }

  /** Bytes a sequence of `length` positions takes in the cache (a paged cache: whole blocks). */
  sequenceBytes(length: number): number {
    return Math.ceil(length / this.#blockTokens) * this.#blockTokens * this.#bytesPerPosition;
  }

  get active(): number {
    return this.#running.length;
  }
  get queued(): number {
    return this.#queue.length;
  }
  get reservedBytes(): number {
    return this.#reserved;
  }

  /** Queues a job; throws TOO_LARGE when it could never fit, BUSY when the queue is full. */
  submit(job: Job): void {
    const bytes = this.bytesFor(job.positions);
    this.#enqueue(job, bytes, `the request needs ${job.positions} positions (${mib(bytes)} of KV cache)`);
  }

  /**
   * Waits, in turn with the jobs, until `bytes` of the budget are free, and holds them for work
   * that makes its own sequences (classify): on a GPU they come from the same pool of blocks, so
   * without this they could find it taken. Resolves with the release (call it once done); rejects
   * as a job would (TOO_LARGE, BUSY, the signal's abort, DISPOSED, DEVICE_FAILED).
   */
  hold(bytes: number, signal?: AbortSignal): Promise<() => void> {
    return new Promise((resolve, reject) => {
      const hold: Hold = {
        bytes,
        ...(signal ? { signal } : {}),
        grant: () => {
          let released = false;
          resolve(() => {
            if (released) return;
            released = true;
            this.#reserved -= bytes;
            // What waited for these bytes may start now.
            this.#kick();
          });
        },
        onError: reject,
      };
      this.#enqueue(hold, bytes, `the classification needs ${mib(bytes)} of KV cache`);
    });
  }

  get kvCacheBytes(): number {
    return this.#o.kvCacheBytes;
  }

  /** Queues a job or hold of `bytes`; `needs` says what it needs, for TOO_LARGE. */
  #enqueue(waiter: Waiter, bytes: number, needs: string): void {
    if (this.#closed) throw new RedflagError('DISPOSED', 'the detector was disposed');
    if (this.failure) throw this.failedError();
    // Cancelled before it came: it takes no place in the queue (an aborted signal fires no more).
    if (waiter.signal?.aborted) throw abortError(waiter.signal);
    if (bytes > this.#o.kvCacheBytes) {
      throw new RedflagError(
        'TOO_LARGE',
        `${needs}, more than the whole budget of ${mib(this.#o.kvCacheBytes)}: shorten the prompt or max tokens`,
      );
    }
    // What the batch and the budget take at once does not wait (maxQueued may be 0): it fits
    // beside everything queued ahead of it, which the next admission takes first.
    let jobsAhead = 0;
    let bytesAhead = 0;
    for (const w of this.#queue) {
      if (!isHold(w)) jobsAhead++;
      bytesAhead += this.#bytesOf(w);
    }
    // (A hold needs no batch slot: #grantHoldsBehind passes what waits only for one.)
    const fitsNow = (isHold(waiter) || this.#running.length + jobsAhead + 1 <= this.#o.maxBatch) && this.#reserved + bytesAhead + bytes <= this.#o.kvCacheBytes;
    if (!fitsNow && this.#queue.length >= this.#o.maxQueued) {
      throw new RedflagError('BUSY', `${this.#queue.length} requests are already waiting: try again later`);
    }
    this.#queue.push(waiter);
    // One cancelled while it waits leaves the queue at once: it no longer holds a place (nor
    // counts in stats). The listener goes when it leaves the queue (a signal may serve many).
    const signal = waiter.signal;
    if (signal) {
      const onAbort = (): void => {
        const i = this.#queue.indexOf(waiter);
        if (i < 0) return;
        this.#removeAt(i);
        waiter.onError(abortError(signal));
        // A hold at the head may have kept others waiting.
        if (i === 0) this.#kick();
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.#waiting.set(waiter, () => signal.removeEventListener('abort', onAbort));
    }
    this.#kick();
  }

  /** Starts the loop unless it runs: what waits may be admitted now (after a release, a departure or an arrival). */
  #kick(): void {
    if (this.#queue.length === 0 || this.#closed) return;
    if (this.#loop !== null) {
      // The loop may be past its last look at the queue: it looks again as it ends.
      this.#kickedWhileRunning = true;
      return;
    }
    this.#kickedWhileRunning = false;
    this.#loop = this.#run().finally(() => {
      this.#loop = null;
      // What came while the loop was ending (a caller awaiting one answer submits the next in
      // the microtask before this one) would wait for another arrival. Only then: a queue that
      // nothing can leave now (holds have the budget) would otherwise spin the loop for ever.
      if (this.#kickedWhileRunning) this.#kick();
    });
  }

  /** The error a job (or a classify) gets once the device has failed: the failure's, the same for everyone. */
  failedError(): RedflagError {
    return new RedflagError('DEVICE_FAILED', this.failure!.message, { cause: this.failure });
  }

  /**
   * Records that the device failed (DEVICE_FAILED: its context is lost), met here or by other
   * work on the model (classify): the running and waiting jobs fail with it, new ones at once.
   */
  noteFailure(error: unknown): void {
    if (this.failure || !(error instanceof RedflagError && error.code === 'DEVICE_FAILED')) return;
    this.failure = error;
    for (const job of this.#dequeueAll()) job.onError(this.failedError());
  }

  /** Fails every job and stops; resolves when the loop has stopped. */
  async close(): Promise<void> {
    this.#closed = true;
    const error = new RedflagError('DISPOSED', 'the detector was disposed');
    for (const job of this.#dequeueAll()) job.onError(error);
    await this.#loop;
  }

  /** Takes the first waiting job (or hold) off the queue, with its abort listener. */
  #dequeue(): Waiter {
    return this.#removeAt(0);
  }

  /** Takes the waiter at `i` off the queue, with its abort listener. */
  #removeAt(i: number): Waiter {
    const [waiter] = this.#queue.splice(i, 1) as [Waiter];
    this.#waiting.get(waiter)?.();
    this.#waiting.delete(waiter);
    return waiter;
  }

  /** The KV bytes a waiter takes once admitted. */
  #bytesOf(w: Waiter): number {
    return isHold(w) ? w.bytes : this.bytesFor(w.positions);
  }

  #dequeueAll(): Waiter[] {
    const jobs: Waiter[] = [];
    while (this.#queue.length > 0) jobs.push(this.#dequeue());
    return jobs;
  }

  /** Admits waiting jobs and holds (first come, first served) while the batch and the budget allow. */
  #admit(): void {
    while (this.#queue.length > 0) {
      const job = this.#queue[0]!;
      if (job.signal?.aborted) {
        this.#dequeue();
        job.onError(abortError(job.signal));
        continue;
      }
      if (isHold(job)) {
        if (this.#reserved + job.bytes > this.#o.kvCacheBytes) break;
        this.#dequeue();
        this.#reserved += job.bytes;
        job.grant();
        continue;
      }
      if (this.#running.length >= this.#o.maxBatch) {
        this.#grantHoldsBehind();
        break;
      }
      const bytes = this.bytesFor(job.positions);
      if (this.#reserved + bytes > this.#o.kvCacheBytes) break;
      this.#dequeue();
      let seq: Sequence | undefined;
      try {
        seq = this.#model.newSequence();
        seq.reserve(job.positions + (this.#o.overlap ? 1 : 0));
      } catch (error) {
        seq?.dispose();
        job.onError(error);
        continue;
      }
      this.#reserved += bytes;
      this.#running.push({ job, seq, pending: job.prompt.slice(), bytes, guessed: null, done: false });
    }
  }

  /**
   * A hold needs no batch slot: while the head of the queue waits for one, each hold behind it
   * whose bytes fit beside everything ahead of it starts now (a classify does not wait for a
   * generation to end only because the batch is full); what is ahead loses nothing by it.
   */
  #grantHoldsBehind(): void {
    let ahead = 0;
    for (let i = 0; i < this.#queue.length; ) {
      const w = this.#queue[i]!;
      if (isHold(w) && !w.signal?.aborted && this.#reserved + ahead + w.bytes <= this.#o.kvCacheBytes) {
        this.#removeAt(i);
        this.#reserved += w.bytes;
        w.grant();
        continue;
      }
      ahead += this.#bytesOf(w);
      i++;
    }
  }

  #finish(r: Running, error?: unknown): void {
    if (r.done) return;
    const i = this.#running.indexOf(r);
    if (i >= 0) this.#running.splice(i, 1);
    r.done = true;
    r.seq.dispose();
    this.#reserved -= r.bytes;
    if (error !== undefined) r.job.onError(error);
  }

  /**
   * Each job's tokens for the next step, taken from its pending ones: one each, then up to
   * prefillChunk each, in order, while the step's budget (maxStepTokens) lasts.
   */
  #feed(batch: Running[]): number[][] {
    let left = this.#o.maxStepTokens - batch.length;
    return batch.map((r) => {
      const more = Math.max(0, Math.min(r.pending.length - 1, this.#o.prefillChunk - 1, left));
      left -= more;
      return r.pending.splice(0, 1 + more);
    });
  }

  /**
   * One native step over `batch`, each sequence fed `feed[i]`. When memory runs out
   * (OUT_OF_MEMORY: the engine then leaves every sequence as it was), the step is split and its
   * parts run one after the other: the batch in halves, and a lone sequence's tokens in halves
   * (the rest go back to its pending tokens, for the next step), so that memory pressure costs
   * speed, not requests. A lone sequence that cannot take even one token fails alone. Each step
   * tries the whole batch first: the pressure may have passed.
   */
  async #step(batch: Running[], feed: number[][]): Promise<Outcome[]> {
    const topN = Math.max(...batch.map((r) => r.job.topN));
    let result;
    try {
      result = await this.#model.step(
        batch.map((r) => r.seq),
        feed,
        batch.map((r) => r.job.pick),
        { rfToken: this.#o.rfToken, topN },
      );
    } catch (error) {
      this.noteFailure(error);
      if (!(error instanceof RedflagError && error.code === 'OUT_OF_MEMORY')) return batch.map(() => ({ error }));
      this.oomSplits++;
      if (batch.length > 1) {
        const h = batch.length >> 1;
        return [...(await this.#step(batch.slice(0, h), feed.slice(0, h))), ...(await this.#step(batch.slice(h), feed.slice(h)))];
      }
      const tokens = feed[0]!;
      if (tokens.length === 1) return [{ error }];
      const h = tokens.length >> 1;
      batch[0]!.pending.unshift(...tokens.slice(h));
      return this.#step(batch, [tokens.slice(0, h)]);
    }
    this.steps++;
    const flags = result.pFlags ? result.pFlags.length / batch.length : 0;
    return batch.map((r, i) => Number.isNaN(result.pRf[i]) ? { error: nonFiniteScore() } : {
      pick: {
        token: result.tokens[i]!,
        logprob: result.logprobs[i]!,
        pRf: result.pRf[i]!,
        ...(result.pFlags ? { pFlags: result.pFlags.subarray(i * flags, (i + 1) * flags) } : {}),
        topIds: result.topIds.subarray(i * topN, i * topN + r.job.topN),
        topLogprobs: result.topLogprobs.subarray(i * topN, i * topN + r.job.topN),
      },
    });
  }

  async #run(): Promise<void> {
    // Overlap: the step whose picks are handed out while the next one runs.
    let unread: StepRecord | null = null;
    for (;;) {
      // No step is in flight here: sequences may be freed, cut and made.
      for (const r of this.#running.slice()) {
        if (r.job.signal?.aborted) this.#finish(r, abortError(r.job.signal));
      }
      if (this.#closed) {
        for (const r of this.#running.slice()) this.#finish(r, new RedflagError('DISPOSED', 'the detector was disposed'));
        return;
      }
      if (this.failure) {
        for (const r of this.#running.slice()) this.#finish(r, this.failedError());
        return;
      }
      this.#admit();
      if (this.#running.length === 0) return;

      const batch = this.#running.slice();
      const running = this.#step(batch, this.#feed(batch));
      // While the device computes: the previous step's picks to their jobs, once the step has
      // reached the engine (the model makes its native calls from a promise chain: one turn of
      // the event loop runs them).
      if (unread) await new Promise<void>((resolve) => setImmediate(resolve));
      const decisions = unread ? this.#read(unread) : [];
      const outcomes = await running;
      // A prompt with tokens left (a chunk, or a step split for memory) is not continued yet.
      const record: StepRecord = { batch, outcomes, continues: batch.map((r) => r.pending.length === 0) };
      this.#apply(decisions, record);
      if (this.#o.overlap) {
        record.batch.forEach((r, i) => {
          const o = record.outcomes[i];
          if (!o || r.done) return;
          if ('error' in o) {
            // Failed: finished now, as one step after another would (it has nothing to feed).
            this.#finish(r, o.error);
            record.outcomes[i] = null;
          } else if (record.continues[i]) {
            // Guess that the job goes on with its pick, so the next step can start before it says.
            r.pending = [o.pick.token];
            r.guessed = o.pick.token;
          }
        });
        unread = record;
      } else {
        this.#apply(this.#read(record), null);
      }
    }
  }

  /**
   * Hands a step's picks to their jobs (JavaScript only: no native call, so it may run while a
   * step is in flight) and returns what each decided; a failed sequence's outcome stops it.
   */
  #read(record: StepRecord): Decision[] {
    const decisions: Decision[] = [];
    record.batch.forEach((r, i) => {
      const outcome = record.outcomes[i];
      if (!outcome || r.done) return;
      if ('error' in outcome) {
        decisions.push({ r, stop: true, error: outcome.error });
        return;
      }
      // A prompt still being prefilled in chunks: this step's pick is not a continuation yet.
      if (!record.continues[i]) return;
      this.tokens++;
      try {
        const next = r.job.onPick(outcome.pick);
        decisions.push(next === null ? { r, stop: true } : { r, stop: false, next });
      } catch (error) {
        decisions.push({ r, stop: true, error });
      }
    });
    return decisions;
  }

  /**
   * Applies the jobs' decisions once no step is in flight. `after`: the step that ran while they
   * were made (overlap), in which a job may have appended the guessed token: a stopped job's
   * outcome there is dropped; a job that goes on with other tokens has the guess cut back (or,
   * had its guessed step failed for memory, which leaves a sequence as it was, simply goes on).
   */
  #apply(decisions: Decision[], after: StepRecord | null): void {
    const index = new Map(after ? after.batch.map((r, i) => [r, i]) : []);
    for (const d of decisions) {
      const r = d.r;
      if (r.done) continue;
      const at = index.get(r) ?? -1;
      const guessed = r.guessed;
      const guess = at >= 0 && guessed !== null ? (after!.outcomes[at] ?? null) : null;
      r.guessed = null;
      // The guess was right: the token is in, and the step's pick continues the job (read next).
      const right = !d.stop && guess !== null && 'pick' in guess && d.next.length === 1 && d.next[0] === guessed;
      if (guess && 'pick' in guess && !right) this.guessesDropped++;
      if (d.stop) {
        this.#finish(r, d.error);
        continue;
      }
      if (!right) {
        if (guess) {
          const failed = 'error' in guess;
          if (failed && !(guess.error instanceof RedflagError && guess.error.code === 'OUT_OF_MEMORY')) {
            this.#finish(r, guess.error);
            continue;
          }
          if (!failed) r.seq.truncate(r.seq.length - 1);
          after!.outcomes[at] = null;  // not a continuation of the job's text
        }
        r.pending = d.next;
      }
      if (r.seq.length + r.pending.length > r.job.positions) {
        this.#finish(r, new RedflagError('NATIVE', `a generation asked for more than the ${r.job.positions} positions it reserved`));
      }
    }
  }
}
