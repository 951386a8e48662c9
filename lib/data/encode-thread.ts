/**
 * Encoding off the event loop. Tokenising is synchronous JavaScript: a request of a megabyte
 * (the server's body limit) takes one to five seconds, during which a server answers nobody and
 * every stream stalls. Inputs past {@link LONG_INPUT_CHARS} go to a worker thread holding a copy
 * of the tokenizer (made at the tokenizer's current revision, with its template kwargs); shorter
 * ones are encoded in place, where a thread's round trip would cost more than it saves. The
 * copy's ids are the tokenizer's own: the same library, files and code (encode.ts).
 * @module
 */
import { Worker } from 'node:worker_threads';

import { RedflagError, type RedflagErrorCode } from '../errors.js';
import type { Tokenizer } from '../model/tokenizer.js';
import type { ScoringInput } from './encode.js';
import type { Message } from './records.js';

/** Characters of input from which encoding goes to the thread (some 20-80 ms of tokenising). */
export const LONG_INPUT_CHARS = 16_384;

/** What the worker rebuilds the tokenizer from. @internal */
export interface TokenizerCopy {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  chatTemplate: string | null;
  chatTemplateKwargs: Record<string, unknown>;
}

/** One conversation to encode for scoring. @internal */
export interface ScoringItem {
  messages: Message[];
  responseMissing: boolean;
  source: string;
}

/** A job for the worker. @internal */
export type EncodeJob =
  | { id: number; kind: 'prompt'; messages: Message[]; extra?: Record<string, unknown> }
  | { id: number; kind: 'text'; text: string; escape: string[] }
  | { id: number; kind: 'scoring'; items: ScoringItem[] };

/** The worker's answer to a job. @internal */
export type EncodeReply = { id: number; result: number[] | ScoringInput[]; error?: never } | { id: number; error: { code: RedflagErrorCode; message: string }; result?: never };

interface Pending {
  resolve: (result: number[] | ScoringInput[]) => void;
  reject: (error: unknown) => void;
}

/** Starts the worker: the compiled file, or under tsx / vitest (TypeScript sources) through tsx's loader. */
function startWorker(copy: TokenizerCopy): Worker {
  const typescript = import.meta.url.endsWith('.ts');
  const url = new URL(`./encode-worker.${typescript ? 'ts' : 'js'}`, import.meta.url);
  if (!typescript) return new Worker(url, { workerData: copy });
  // Node starts no .ts worker itself; tsx registers its loader in the thread first.
  const bootstrap = `import('tsx/esm/api').then(({ register }) => { register(); return import(${JSON.stringify(url.href)}); })`;
  return new Worker(bootstrap, { eval: true, workerData: copy });
}

/** Total characters of some messages (what encoding them costs, roughly). */
export function messageChars(messages: readonly Message[]): number {
  let n = 0;
  for (const m of messages) n += m.content.length;
  return n;
}

/**
 * A worker thread that encodes with a copy of one tokenizer, at the revision it was made at
 * (`revision`: make another after the tokenizer changes). Jobs run one at a time, in order.
 */
export class EncodeThread {
  /** The tokenizer's revision the copy was made at. */
  readonly revision: number;
  #worker: Worker;
  #pending = new Map<number, Pending>();
  #nextId = 0;
  #failure: RedflagError | null = null;
  #retired = false;

  constructor(tokenizer: Tokenizer) {
    this.revision = tokenizer.revision;
    const { tokenizerJson, tokenizerConfig } = tokenizer.toFiles();
    this.#worker = startWorker({ tokenizerJson, tokenizerConfig, chatTemplate: tokenizer.chatTemplate, chatTemplateKwargs: { ...tokenizer.chatTemplateKwargs } });
    // Idle, the thread does not keep the process alive; a job in flight does.
    this.#worker.unref();
    this.#worker.on('message', (reply: EncodeReply) => {
      const pending = this.#pending.get(reply.id);
      if (pending === undefined) return;
      this.#settled(reply.id);
      if (reply.error) pending.reject(new RedflagError(reply.error.code, reply.error.message));
      else pending.resolve(reply.result);
    });
    const fail = (error: RedflagError) => {
      this.#failure ??= error;
      for (const [id, pending] of this.#pending) {
        this.#settled(id);
        pending.reject(this.#failure);
      }
    };
    this.#worker.on('error', (error) => fail(new RedflagError('NATIVE', `the encoding thread failed: ${error.message}`, { cause: error })));
    this.#worker.on('exit', () => fail(new RedflagError('DISPOSED', 'the encoding thread was closed')));
  }

  /** {@link encodePrompt}'s ids for a conversation's prompt (`extra`: its `chatTemplateExtra`). */
  prompt(messages: readonly Message[], extra?: Record<string, unknown>): Promise<number[]> {
    return this.#run({ kind: 'prompt', messages: [...messages], ...(extra === undefined ? {} : { extra }) }) as Promise<number[]>;
  }

  /** Raw text's ids, with `escape`'s strings read as text (see Tokenizer.escapeSpecialTokens). */
  text(text: string, escape: readonly string[]): Promise<number[]> {
    return this.#run({ kind: 'text', text, escape: [...escape] }) as Promise<number[]>;
  }

  /** {@link encodeForScoring} of each conversation, in order. */
  scoring(items: readonly ScoringItem[]): Promise<ScoringInput[]> {
    return this.#run({ kind: 'scoring', items: [...items] }) as Promise<ScoringInput[]>;
  }

  /** Whether the thread failed (it crashed or was closed): it takes no more work; make another. */
  get failed(): boolean {
    return this.#failure !== null;
  }

  /** Stops the thread; jobs in flight fail with DISPOSED. */
  async close(): Promise<void> {
    await this.#worker.terminate();
  }

  /** Closes the thread once the jobs it has are done (a copy gone stale: theirs are still right). */
  retire(): void {
    this.#retired = true;
    if (this.#pending.size === 0) void this.close();
  }

  #run(job: DistributiveOmit<EncodeJob, 'id'>): Promise<number[] | ScoringInput[]> {
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      if (this.#pending.size === 0) this.#worker.ref();
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ ...job, id });
    });
  }

  #settled(id: number): void {
    this.#pending.delete(id);
    if (this.#pending.size > 0) return;
    this.#worker.unref();
    if (this.#retired) void this.close();
  }
}

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;
