/**
 * Writing a model back in Hugging Face format.
 * @module
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';

import { RedflagError } from '../errors.js';
import type { GenerationConfig, ModelConfig } from './config.js';
import { tensorByteLength, writeFileAtomic, writeSafetensors, type DeferredTensor } from './safetensors.js';
import type { Tokenizer } from './tokenizer.js';
import type { WeightPlan } from './weights-map.js';
import { SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE } from './weights.js';

const DEFAULT_SHARD_BYTES = 5 * 1024 ** 3; // transformers' default max_shard_size

function json(value: unknown): Uint8Array[] {
  return [new TextEncoder().encode(JSON.stringify(value, null, 2) + '\n')];
}

/** What {@link saveModel} writes from: a model's config, tokenizer and checkpoint tensors. */
export interface SaveSource {
  readonly plan: Pick<WeightPlan, 'tensors'>;
  readonly config: Pick<ModelConfig, 'raw'>;
  readonly generationConfig: GenerationConfig | null;
  readonly tokenizer: Tokenizer | null;
  /** A checkpoint tensor by name (with in-memory changes): dtype and shape now, bytes when read. */
  tensor(name: string): DeferredTensor;
}

/** Options of {@link saveModel}. */
export interface SaveModelOptions {
  /** Replace files in `dir`. Default false: a non-empty `dir` is an error. */
  overwrite?: boolean;
  /** Largest shard (a larger tensor gets a shard of its own). Default 5 GiB, as transformers. */
  shardBytes?: number;
  /** Tensors written instead of the source's, by checkpoint name (e.g. merged weights). */
  replace?: ReadonlyMap<string, DeferredTensor>;
}

/**
 * See {@link Model.save}. Tensors are read one at a time as each shard is written, so the
 * process holds one tensor of the checkpoint beyond the source's own memory, whatever its size.
 */
export async function saveModel(source: SaveSource, dir: string, options: SaveModelOptions = {}): Promise<void> {
  const overwrite = options.overwrite ?? false;
  const shardBytes = options.shardBytes ?? DEFAULT_SHARD_BYTES;
  if (!(shardBytes > 0)) throw new RedflagError('INVALID_ARGUMENT', 'shardBytes must be positive');
  await mkdir(dir, { recursive: true });
  if (!overwrite) {
    const existing = await readdir(dir);
    if (existing.length > 0) {
      throw new RedflagError('INVALID_ARGUMENT', `${dir} is not empty; pass overwrite: true (on the command line: --overwrite) to write into it`, { file: dir });
    }
  }

  // config.json goes last: a folder holding one is a complete model (a stopped overwrite leaves
  // none, rather than the old one beside new weights).
  if (overwrite) await rm(join(dir, 'config.json'), { force: true });

  // Every checkpoint tensor the engine uses, with in-memory replacements, under its own name.
  const names = new Set<string>();
  for (const t of source.plan.tensors) for (const s of t.sources) names.add(s);
  const tensors = new Map<string, DeferredTensor>();
  for (const name of [...names].sort()) tensors.set(name, options.replace?.get(name) ?? source.tensor(name));

  // Shards in name order, each below shardBytes (a larger tensor gets a shard of its own).
  const shards: Map<string, DeferredTensor>[] = [new Map()];
  let size = 0;
  let total = 0;
  for (const [name, t] of tensors) {
    const bytes = tensorByteLength(t.dtype, t.shape);
    if (size > 0 && size + bytes > shardBytes) {
      shards.push(new Map());
      size = 0;
    }
    shards[shards.length - 1]!.set(name, t);
    size += bytes;
    total += bytes;
  }
  const metadata = { format: 'pt' };
  const written = new Set<string>();
  if (shards.length === 1) {
    await writeSafetensors(join(dir, SINGLE_WEIGHTS_FILE), shards[0]!, { metadata, overwrite });
    written.add(SINGLE_WEIGHTS_FILE);
  } else {
    const n = String(shards.length).padStart(5, '0');
    const weightMap: Record<string, string> = {};
    for (const [i, shard] of shards.entries()) {
      const file = `model-${String(i + 1).padStart(5, '0')}-of-${n}.safetensors`;
      await writeSafetensors(join(dir, file), shard, { metadata, overwrite });
      written.add(file);
      for (const name of shard.keys()) weightMap[name] = file;
    }
    await writeFileAtomic(join(dir, WEIGHTS_INDEX_FILE), json({ metadata: { total_size: total }, weight_map: weightMap }), {
      overwrite,
    });
    written.add(WEIGHTS_INDEX_FILE);
  }
  if (source.generationConfig) {
    await writeFileAtomic(join(dir, 'generation_config.json'), json(source.generationConfig.raw), { overwrite });
    written.add('generation_config.json');
  }
  if (source.tokenizer) await source.tokenizer.save(dir, { overwrite });
  if (overwrite) await removeStaleFiles(dir, written);
  await writeFileAtomic(join(dir, 'config.json'), json(source.config.raw), { overwrite });
}

/**
 * After an overwrite, the weight files of the model that was there before and not written now:
 * a stale single file would make loaders read it instead of the new shards.
 */
async function removeStaleFiles(dir: string, written: ReadonlySet<string>): Promise<void> {
  const weights = /^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|generation_config\.json)$/;
  for (const name of await readdir(dir)) {
    if (weights.test(name) && !written.has(name)) await rm(join(dir, name), { force: true });
  }
}
