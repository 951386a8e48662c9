/**
 * The server's life: the detector may still be loading when the server starts listening (model
 * routes then answer 503 `model_loading`); every request that runs the model holds a slot
 * (bounded by `maxConcurrent`, cancelled when its client leaves); and a drain stops taking new
 * work, lets the running requests finish for a while, then cancels the rest.
 * @module
 */
import type { FastifyReply } from 'fastify';

import type { Detector } from '../detect/types.js';
import { RedflagError } from '../errors.js';
import { ApiError, toApiError } from './http-errors.js';

/** Where the server stands, as `/health` reports it. */
export type ServerState = 'loading' | 'ok' | 'draining' | 'failed';

/** What {@link ServerLifecycle.drain} did with the requests running when it began. */
export interface DrainResult {
  /** Requests that ended on their own within the grace period. */
  finished: number;
  /** Requests cancelled when the grace period ran out. */
  cancelled: number;
}

/** How long cancelled requests get to send their last bytes (an error event, a 503) before the drain returns anyway. */
const CANCEL_GRACE_MS = 1000;

function isPromiseLike<T>(value: T | PromiseLike<T>): value is PromiseLike<T> {
  return typeof (value as { then?: unknown }).then === 'function';
}

/** Longest delay setTimeout takes (a longer one fires at once). */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

/** Resolves after `ms`, however long (in steps setTimeout takes); cancel() stops it. */
function sleep(ms: number): { promise: Promise<void>; cancel: () => void } {
  let timer: NodeJS.Timeout | undefined;
  const until = performance.now() + ms;
  const promise = new Promise<void>((resolve) => {
    const wait = (): void => {
      const left = until - performance.now();
      if (left <= 0) resolve();
      else timer = setTimeout(wait, Math.min(left, MAX_TIMEOUT_MS));
    };
    wait();
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

export class ServerLifecycle {
  readonly #maxConcurrent: number;
  /** Running requests: aborting the controller cancels the request's work; the promise settles when it is over. */
  readonly #slots = new Map<AbortController, Promise<void>>();
  /** Requests cancelled by cancelAll (not by their client): a drain counts them as cancelled. */
  readonly #cancelled = new WeakSet<AbortController>();
  #detector: Detector | null = null;
  #failed = false;
  #draining = false;

  /** `onLoadError` hears why a detector promise rejected (the server then answers 503 for good). */
  constructor(detector: Detector | PromiseLike<Detector>, maxConcurrent: number, onLoadError: (error: unknown) => void) {
    this.#maxConcurrent = maxConcurrent;
    if (!isPromiseLike(detector)) {
      this.#detector = detector;
      return;
    }
    detector.then(
      (loaded) => (this.#detector = loaded),
      (error: unknown) => {
        this.#failed = true;
        onLoadError(error);
      },
    );
  }

  get state(): ServerState {
    if (this.#draining) return 'draining';
    if (this.#failed || this.#detector?.stats().deviceFailed) return 'failed';
    return this.#detector ? 'ok' : 'loading';
  }

  get draining(): boolean {
    return this.#draining;
  }

  /** The detector, when loaded. */
  get detector(): Detector | null {
    return this.#detector;
  }

  /** The detector for a request that needs the model, or the 503 that says why there is none. */
  requireDetector(): Detector {
    if (this.#draining) throw new ApiError(503, 'the server is shutting down', { code: 'unavailable' });
    if (this.#failed) throw new ApiError(503, 'the model failed to load (see the server log)', { code: 'model_unavailable' });
    if (this.#detector?.stats().deviceFailed) throw toApiError(new RedflagError('DEVICE_FAILED', 'the GPU failed'));
    if (!this.#detector) throw new ApiError(503, 'the model is still loading; retry shortly', { code: 'model_loading' });
    return this.#detector;
  }

  /**
   * Runs `work` in a slot: refused with 429 when `maxConcurrent` requests are running, and
   * cancelled (its signal aborted) when the client disconnects before the response is complete.
   */
  async withSlot<T>(reply: FastifyReply, work: (signal: AbortSignal) => Promise<T>): Promise<T> {
    if (this.#draining) throw new ApiError(503, 'the server is shutting down', { code: 'unavailable' });
    if (this.#slots.size >= this.#maxConcurrent) {
      throw new ApiError(429, `the server is busy (${this.#maxConcurrent} requests in flight); retry later`, { code: 'rate_limit_exceeded' });
    }
    const controller = new AbortController();
    // 'close' also follows a completed response; only a response not yet finished means the client left.
    const onClose = (): void => {
      if (!reply.raw.writableFinished) controller.abort(new RedflagError('ABORTED', 'the client disconnected'));
    };
    let release!: () => void;
    this.#slots.set(controller, new Promise<void>((resolve) => (release = resolve)));
    reply.raw.on('close', onClose);
    try {
      return await work(controller.signal);
    } finally {
      reply.raw.off('close', onClose);
      this.#slots.delete(controller);
      release();
    }
  }

  /** Cancels every running request. */
  cancelAll(reason: string): void {
    for (const controller of this.#slots.keys()) {
      if (!controller.signal.aborted) this.#cancelled.add(controller);
      controller.abort(new RedflagError('DISPOSED', reason));
    }
  }

  /**
   * Stops taking requests that need the model (they get 503 from now on), waits up to `ms` for
   * the running ones to end, then cancels the rest and waits briefly for them to answer.
   */
  async drain(ms: number): Promise<DrainResult> {
    if (!(ms >= 0)) throw new RedflagError('INVALID_ARGUMENT', `drain: the grace period must be a number of milliseconds >= 0, got ${ms}`);
    this.#draining = true;
    const controllers = [...this.#slots.keys()];
    const running = [...this.#slots.values()];
    const grace = sleep(ms);
    const ended = await Promise.race([Promise.all(running).then(() => true), grace.promise.then(() => false)]);
    grace.cancel();
    // All ended within the grace period, unless a close() meanwhile cancelled some (a second signal).
    if (ended) {
      const cancelled = controllers.filter((c) => this.#cancelled.has(c)).length;
      return { finished: running.length - cancelled, cancelled };
    }
    const cancelled = this.#slots.size;
    this.cancelAll(`the server is shutting down: the request outlived the ${ms / 1000} s drain period`);
    const answered = sleep(CANCEL_GRACE_MS);
    await Promise.race([Promise.all(this.#slots.values()), answered.promise]);
    answered.cancel();
    return { finished: running.length - cancelled, cancelled };
  }
}
