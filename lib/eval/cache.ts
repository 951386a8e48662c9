/**
 * The results cache of an evaluation: every finished unit of work (one variant × suite × item,
 * under a fingerprint of the settings it depends on) is kept in one JSON file in the output
 * directory, rewritten atomically after each unit, so a stopped run resumes where it was and a
 * changed setting recomputes only what it affects.
 * @module
 */
import { createHash } from 'node:crypto';
import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { RedflagError } from '../errors.js';
import { writeFileAtomic } from '../model/safetensors.js';

const VERSION = 1;

/** A short stable hash of a JSON-serialisable value (the settings a unit depends on). */
export function fingerprint(value: unknown): string {
  return createHash('sha256').update(JSON.stringify(value)).digest('hex').slice(0, 16);
}

/** The files a stamp has always named, in their order (a directory holding only these keeps its earlier stamp and cache). */
const STAMPED_FILES = [
  'config.json', 'generation_config.json', 'model.safetensors', 'model.safetensors.index.json', 'adapter_config.json', 'adapter_model.safetensors',
  'redflag_rows.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja',
];

/** Tokenizer files stamped after those: the tokenizer reads its special tokens from them. */
const TOKENIZER_EXTRA_FILES = ['special_tokens_map.json', 'added_tokens.json'];

/**
 * What identifies a model or adapter directory's current contents for the cache: its weight,
 * config, tokenizer and chat-template files' sizes and modification times (retraining into the
 * same directory, or editing the template the prompts are rendered with, invalidates). Every
 * *.safetensors file is stamped, so a sharded model's model-0000N-of-0000M shards count (replacing
 * them served the old results: only the index was stamped).
 */
export async function directoryStamp(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    names = [];
  }
  const shards = names.filter((f) => f.endsWith('.safetensors') && !STAMPED_FILES.includes(f)).sort();
  const files = [...STAMPED_FILES, ...shards, ...TOKENIZER_EXTRA_FILES];
  const stamps = await Promise.all(files.map(async (f) => stat(join(dir, f)).then((s) => `${f}:${s.size}:${Math.round(s.mtimeMs)}`, () => '')));
  return stamps.filter(Boolean);
}

/** See the module description. */
export class ResultsCache {
  readonly file: string | null;
  readonly #entries: Map<string, unknown>;
  #writing: Promise<void> = Promise.resolve();
  /** Units computed (not found in the cache) since this cache was opened. */
  computed = 0;
  /** Units found in the cache. */
  hits = 0;

  private constructor(file: string | null, entries: Map<string, unknown>) {
    this.file = file;
    this.#entries = entries;
  }

  /** An in-memory cache that is never written. */
  static memory(): ResultsCache {
    return new ResultsCache(null, new Map());
  }

  /** Opens (or starts) the cache file; an unreadable one is an error naming it. */
  static async open(file: string): Promise<ResultsCache> {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      if ((error as { code?: unknown }).code === 'ENOENT') return new ResultsCache(file, new Map());
      throw new RedflagError('INVALID_FILE', `cannot read the results cache (${String((error as { code?: unknown }).code ?? error)})`, { file, cause: error });
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (cause) {
      throw new RedflagError('INVALID_FILE', 'the results cache is not valid JSON: delete it to start over', { file, cause });
    }
    const record = parsed as { version?: unknown; entries?: unknown };
    if (typeof record !== 'object' || record === null || record.version !== VERSION || typeof record.entries !== 'object' || record.entries === null) {
      throw new RedflagError('INVALID_FILE', `the results cache has an unknown layout (expected {"version": ${VERSION}, "entries": {...}}): delete it to start over`, { file });
    }
    return new ResultsCache(file, new Map(Object.entries(record.entries as Record<string, unknown>)));
  }

  get size(): number {
    return this.#entries.size;
  }

  has(key: string): boolean {
    return this.#entries.has(key);
  }

  get<T>(key: string): T | undefined {
    return this.#entries.get(key) as T | undefined;
  }

  /** Stores a finished unit and writes the file (writes are serialised; each replaces the file atomically). */
  async put(key: string, value: unknown): Promise<void> {
    this.#entries.set(key, value);
    const file = this.file;
    if (file === null) return;
    const write = async () => {
      const json = JSON.stringify({ version: VERSION, entries: Object.fromEntries(this.#entries) });
      await writeFileAtomic(file, [new TextEncoder().encode(json)], { overwrite: true });
    };
    this.#writing = this.#writing.then(write, write);
    await this.#writing;
  }

  /** The cached value, or `compute()`'s result, stored. */
  async getOrCompute<T>(key: string, compute: () => Promise<T>): Promise<T> {
    if (this.#entries.has(key)) {
      this.hits++;
      return this.#entries.get(key) as T;
    }
    const value = await compute();
    this.computed++;
    await this.put(key, value);
    return value;
  }

  /**
   * Many units at once: those missing are computed together by `computeMissing` (so they can
   * share batched model calls), each stored as it is returned; results in `keys` order.
   */
  async getOrComputeMany<T>(keys: readonly string[], computeMissing: (missing: number[]) => Promise<T[]>): Promise<T[]> {
    const missing = keys.map((k, i) => (this.#entries.has(k) ? -1 : i)).filter((i) => i >= 0);
    this.hits += keys.length - missing.length;
    if (missing.length > 0) {
      const values = await computeMissing(missing);
      missing.forEach((i, j) => this.#entries.set(keys[i]!, values[j]));
      this.computed += missing.length;
      await this.put(keys[missing[0]!]!, values[0]);
    }
    return keys.map((k) => this.#entries.get(k) as T);
  }
}
