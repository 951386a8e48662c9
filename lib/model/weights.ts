/**
 * Access to a model directory's weights: a single `model.safetensors`, or shards listed by
 * `model.safetensors.index.json`. Only headers are read when opening; each tensor is read on
 * demand from its shard.
 *
 * @module
 */
import { readdir, stat } from 'node:fs/promises';
import { isAbsolute, join, normalize, sep } from 'node:path';

import { RedflagError } from '../errors.js';
import { readJsonFile } from './config.js';
import { SafetensorsFile, type DeferredTensor, type RawTensor, type SafetensorsOpenOptions, type TensorInfo } from './safetensors.js';

/** File name of an unsharded checkpoint. */
export const SINGLE_WEIGHTS_FILE = 'model.safetensors';
/** File name of the index of a sharded checkpoint. */
export const WEIGHTS_INDEX_FILE = 'model.safetensors.index.json';

/** Options for {@link WeightStore.open}. */
export interface WeightStoreOptions extends SafetensorsOpenOptions {
  /**
   * What to do with tensors that a shard holds but the index does not map: `'warn'` (default)
   * records a warning in {@link WeightStore.warnings} and ignores them; `'error'` rejects.
   */
  unmappedTensors?: 'warn' | 'error';
  /** Called with each warning as it is found (besides being recorded in `warnings`). */
  onWarning?: (message: string) => void;
}

/** Where a tensor lives: its safetensors entry plus the absolute path of its file. */
export type WeightInfo = TensorInfo & { file: string };

/**
 * Rejects shard names that could reach outside the model directory. The check is lexical on
 * purpose: the Hugging Face cache stores every file as a symlink into a blobs folder, so
 * resolving links would reject ordinary downloads.
 */
function checkShardName(name: string, indexFile: string): void {
  const fail = (why: string): RedflagError =>
    new RedflagError('INVALID_FILE', `weight_map names shard ${JSON.stringify(name)}, which ${why}`, { file: indexFile });
  if (name.length === 0) throw fail('is empty');
  if (name.includes('\0')) throw fail('contains a NUL character');
  if (isAbsolute(name) || /^[a-zA-Z]:/.test(name) || name.startsWith('\\') || name.startsWith('/')) {
    throw fail('is an absolute path; shards must be inside the model directory');
  }
  const parts = name.split(/[\\/]+/);
  if (parts.includes('..')) throw fail('contains ".." and could escape the model directory');
  const normalized = normalize(name);
  if (normalized === '.' || normalized.startsWith(`..${sep}`) || normalized === '..') throw fail('does not name a file inside the model directory');
}

/** The model directory's listing, to say what is there when weights are missing. */
async function describeMissingWeights(dir: string): Promise<RedflagError> {
  const entries = await readdir(dir).catch(() => [] as string[]);
  const pickles = entries.filter((name) => /\.(bin|pt|pth|ckpt)$/i.test(name));
  const otherSafetensors = entries.filter((name) => name.endsWith('.safetensors'));
  if (pickles.length > 0) {
    return new RedflagError(
      'UNSUPPORTED',
      `no ${SINGLE_WEIGHTS_FILE} or ${WEIGHTS_INDEX_FILE}, only PyTorch pickle weights (${pickles.slice(0, 3).join(', ')}), ` +
        'which are not supported (loading them could run arbitrary code): convert them to safetensors first, e.g. ' +
        'with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)',
      { file: dir },
    );
  }
  const also = otherSafetensors.length > 0 ? ` (found ${otherSafetensors.slice(0, 3).join(', ')}, but no index naming them)` : '';
  return new RedflagError(
    'NOT_FOUND',
    `no weights: expected ${SINGLE_WEIGHTS_FILE} or ${WEIGHTS_INDEX_FILE}${also}. ` +
      '.bin / PyTorch pickle weights are not supported; convert them to safetensors.',
    { file: dir },
  );
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Parses and validates the index's weight_map: tensor name → shard file name. */
function parseWeightMap(index: unknown, indexFile: string): Map<string, string> {
  if (typeof index !== 'object' || index === null || Array.isArray(index)) {
    throw new RedflagError('INVALID_FILE', 'index must be a JSON object with a "weight_map"', { file: indexFile });
  }
  const weightMap = (index as Record<string, unknown>)['weight_map'];
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
    throw new RedflagError('INVALID_FILE', 'field "weight_map" must be an object of tensor name → shard file name', { file: indexFile });
  }
  const map = new Map<string, string>();
  for (const [tensor, shard] of Object.entries(weightMap)) {
    if (typeof shard !== 'string') {
      throw new RedflagError('INVALID_FILE', `field "weight_map"."${tensor}" must be a shard file name, got ${JSON.stringify(shard)}`, {
        file: indexFile,
      });
    }
    checkShardName(shard, indexFile);
    map.set(tensor, shard);
  }
  if (map.size === 0) throw new RedflagError('INVALID_FILE', 'field "weight_map" is empty', { file: indexFile });
  return map;
}

/**
 * The weights of a model directory. Open with {@link WeightStore.open}; read tensors with
 * {@link WeightStore.read}; {@link WeightStore.close} when done.
 */
export class WeightStore {
  /** The model directory. */
  readonly dir: string;
  /** Problems that did not stop loading (e.g. tensors a shard holds but the index omits). */
  readonly warnings: readonly string[];
  readonly #files: SafetensorsFile[];
  readonly #locations: Map<string, SafetensorsFile>;
  #closed = false;

  private constructor(dir: string, files: SafetensorsFile[], locations: Map<string, SafetensorsFile>, warnings: string[]) {
    this.dir = dir;
    this.#files = files;
    this.#locations = locations;
    this.warnings = warnings;
  }

  /** Opens the weights of `dir`, validating every header (and the index, when sharded). */
  static async open(dir: string, options: WeightStoreOptions = {}): Promise<WeightStore> {
    const info = await stat(dir).catch((error: unknown) => {
      throw new RedflagError('NOT_FOUND', 'model directory not found', { file: dir, cause: error });
    });
    if (!info.isDirectory()) throw new RedflagError('INVALID_ARGUMENT', 'is not a directory', { file: dir });

    // As transformers: the single file when there is one, else the index's shards.
    const indexFile = join(dir, WEIGHTS_INDEX_FILE);
    const single = join(dir, SINGLE_WEIGHTS_FILE);
    if (!(await exists(single))) {
      if (await exists(indexFile)) return WeightStore.#openSharded(dir, indexFile, options);
      throw await describeMissingWeights(dir);
    }
    const warnings: string[] = [];
    if (await exists(indexFile)) {
      const message = `${dir}: holds both ${SINGLE_WEIGHTS_FILE} and ${WEIGHTS_INDEX_FILE}; reading ${SINGLE_WEIGHTS_FILE}, as transformers does (remove the one that does not belong)`;
      warnings.push(message);
      options.onWarning?.(message);
    }
    const file = await SafetensorsFile.open(single, options);
    return new WeightStore(dir, [file], new Map([...file.tensors.keys()].map((name) => [name, file])), warnings);
  }

  static async #openSharded(dir: string, indexFile: string, options: WeightStoreOptions): Promise<WeightStore> {
    const weightMap = parseWeightMap(await readJsonFile(indexFile), indexFile);
    const shardNames = [...new Set(weightMap.values())];
    const opened = new Map<string, SafetensorsFile>();
    try {
      for (const shard of shardNames) {
        const path = join(dir, shard);
        if (!(await exists(path))) {
          const example = [...weightMap.entries()].find(([, s]) => s === shard)?.[0];
          throw new RedflagError('NOT_FOUND', `shard "${shard}" (holding e.g. tensor "${example}") is missing from the model directory`, {
            file: indexFile,
          });
        }
        opened.set(shard, await SafetensorsFile.open(path, options));
      }

      const locations = new Map<string, SafetensorsFile>();
      for (const [tensor, shard] of weightMap) {
        const file = opened.get(shard) as SafetensorsFile;
        if (!file.tensors.has(tensor)) {
          throw new RedflagError('INVALID_FILE', `weight_map puts tensor "${tensor}" in shard "${shard}", but that shard has no such tensor`, {
            file: indexFile,
          });
        }
        locations.set(tensor, file);
      }

      const warnings: string[] = [];
      for (const [shard, file] of opened) {
        const unmapped = [...file.tensors.keys()].filter((name) => weightMap.get(name) !== shard);
        if (unmapped.length === 0) continue;
        const listed = unmapped.slice(0, 5).map((n) => `"${n}"`).join(', ') + (unmapped.length > 5 ? ', ...' : '');
        const message = `${indexFile}: shard "${shard}" holds ${unmapped.length} tensor(s) the weight_map does not assign to it (${listed})`;
        if (options.unmappedTensors === 'error') throw new RedflagError('INVALID_FILE', message.slice(indexFile.length + 2), { file: indexFile });
        warnings.push(message);
        options.onWarning?.(message);
      }
      return new WeightStore(dir, [...opened.values()], locations, warnings);
    } catch (error) {
      await Promise.all([...opened.values()].map((file) => file.close().catch(() => undefined)));
      throw error;
    }
  }

  /** Every tensor name, sorted. */
  names(): string[] {
    return [...this.#locations.keys()].sort();
  }

  /** Whether a tensor of this name exists. */
  has(name: string): boolean {
    return this.#locations.has(name);
  }

  #fileOf(name: string): SafetensorsFile {
    if (this.#closed) throw new RedflagError('DISPOSED', `cannot access tensor "${name}": the weight store is closed`, { file: this.dir });
    const file = this.#locations.get(name);
    if (file === undefined) {
      throw new RedflagError('NOT_FOUND', `no tensor named "${name}" in the model's weights (${this.#locations.size} tensors)`, { file: this.dir });
    }
    return file;
  }

  /** A tensor's dtype and shape, with its bytes read on demand (what the writer streams). */
  deferred(name: string): DeferredTensor {
    const { dtype, shape } = this.info(name);
    return { dtype, shape: [...shape], read: async () => (await this.read(name)).data };
  }

  /** Where the tensor lives: dtype, shape, byte range and the file that holds it. */
  info(name: string): WeightInfo {
    const file = this.#fileOf(name);
    const info = file.info(name);
    return { ...info, shape: [...info.shape], file: file.path };
  }

  /** Reads one tensor's bytes. */
  read(name: string): Promise<RawTensor> {
    try {
      return this.#fileOf(name).read(name);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Closes every file. Further access rejects with DISPOSED; closing twice is harmless. */
  async close(): Promise<void> {
    this.#closed = true;
    await Promise.all(this.#files.map((file) => file.close()));
  }
}
