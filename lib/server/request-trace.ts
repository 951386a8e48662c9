/**
 * What the server records about each request: timings and token counts as the generation runs
 * (feeding the metrics), then, when the response is over, one structured log line (JSON, through
 * Fastify's pino logger) and the request counters.
 * @module
 */
import type { FastifyReply, FastifyRequest } from 'fastify';

import type { DetectionSummary } from '../detect/types.js';
import type { ServerMetrics } from './metrics.js';

/** What chat and text completions report while they generate. */
export interface GenerationObserver {
  /** A token came from the detector (shown or not: `<rf>` and partial characters count too). */
  token(): void;
  /** The generation ended; `summary` is the detector's. */
  finished(summary: DetectionSummary): void;
  /** A streamed answer failed after its 200 went out; `code` is the error event's. */
  failed(code: string | null): void;
}

/** nginx's "client closed request": the response did not finish because the client left. */
const CLIENT_CLOSED = 499;

const milliseconds = (ms: number) => Math.round(ms * 1000) / 1000;

/** One request's record, from its arrival to the end of its response. */
export class RequestTrace implements GenerationObserver {
  readonly #metrics: ServerMetrics;
  readonly #start = performance.now();
  #firstToken: number | null = null;
  #lastToken = 0;
  #summary: DetectionSummary | null = null;
  /** OpenAI error code of a failure answered (or sent in a stream), if any. */
  error: string | null = null;
  /** For moderation requests: whether any input was flagged. */
  moderationFlagged: boolean | null = null;
  /** The request's text (messages, prompt or moderation input), kept only when content is logged. */
  prompt: unknown = undefined;
  /** Which completions API generated (their finished answers are counted apart). */
  api: 'chat' | 'text' = 'chat';

  constructor(metrics: ServerMetrics) {
    this.#metrics = metrics;
  }

  token(): void {
    const now = performance.now();
    if (this.#firstToken === null) {
      this.#firstToken = now;
      this.#metrics.timeToFirstToken.observe((now - this.#start) / 1000);
    } else {
      this.#metrics.interTokenLatency.observe((now - this.#lastToken) / 1000);
    }
    this.#lastToken = now;
  }

  finished(summary: DetectionSummary): void {
    this.#summary = summary;
    const m = this.#metrics;
    (this.api === 'text' ? m.textAnswers : m.answers).inc({ finish_reason: summary.finishReason });
    if (summary.flagged) m.flaggedAnswers.inc();
    m.promptTokens.inc(summary.promptTokens);
    m.completionTokens.inc(summary.completionTokens);
  }

  failed(code: string | null): void {
    this.error = code;
  }

  /**
   * Counts the request and returns its log line. `content` adds the prompt and the answer,
   * which are otherwise never logged (they may be personal or harmful).
   */
  end(request: FastifyRequest, reply: FastifyReply, content: boolean): Record<string, unknown> {
    const latencyMs = performance.now() - this.#start;
    const status = reply.raw.writableFinished ? reply.raw.statusCode : CLIENT_CLOSED;
    const route = request.routeOptions.url ?? 'unmatched';
    this.#metrics.requests.inc({ route, method: request.method, status: String(status) });
    this.#metrics.requestSeconds.observe({ route }, latencyMs / 1000);
    const s = this.#summary;
    // The request's `id` is on every line of its logger already.
    return {
      method: request.method,
      route,
      status,
      promptTokens: s?.promptTokens ?? null,
      completionTokens: s?.completionTokens ?? null,
      finishReason: s?.finishReason ?? null,
      flagged: s?.flagged ?? this.moderationFlagged,
      ttftMs: this.#firstToken === null ? null : milliseconds(this.#firstToken - this.#start),
      latencyMs: milliseconds(latencyMs),
      error: this.error,
      ...(content ? { prompt: this.prompt ?? null, answer: s?.text ?? null } : {}),
    };
  }
}
