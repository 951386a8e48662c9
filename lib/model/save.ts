/**
 * Writing a model back in Hugging Face format.
 * @module
 */
import { mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';

import { RedflagError } from '../errors.js';
import type { Model } from './model.js';
import { writeFileAtomic, writeSafetensors, type RawTensor } from './safetensors.js';

const DEFAULT_SHARD_BYTES = 5 * 1024 ** 3; // transformers' default max_shard_size

function json(value: unknown): Uint8Array[] {
  return [new TextEncoder().encode(JSON.stringify(value, null, 2) + '\n')];
}

/** See {@link Model.save}. */
export async function saveModel(
  model: Model,
  dir: string,
  options: { overwrite?: boolean; shardBytes?: number } = {},
): Promise<void> {
  const overwrite = options.overwrite ?? false;
  const shardBytes = options.shardBytes ?? DEFAULT_SHARD_BYTES;
  if (!(shardBytes > 0)) throw new RedflagError('INVALID_ARGUMENT', 'shardBytes must be positive');
  await mkdir(dir, { recursive: true });
  if (!overwrite) {
    const existing = await readdir(dir);
    if (existing.length > 0) {
      throw new RedflagError('INVALID_ARGUMENT', `${dir} is not empty; pass overwrite: true to write into it`, { file: dir });
    }
  }

  // Every checkpoint tensor the engine uses, with in-memory replacements, under its own name.
  const names = new Set<string>();
  for (const t of model.plan.tensors) for (const s of t.sources) names.add(s);
  const tensors = new Map<string, RawTensor>();
  for (const name of [...names].sort()) tensors.set(name, await model.readTensor(name));

  // Shards in name order, each below shardBytes (a larger tensor gets a shard of its own).
  const shards: Map<string, RawTensor>[] = [new Map()];
  let size = 0;
  let total = 0;
  for (const [name, t] of tensors) {
    if (size > 0 && size + t.data.byteLength > shardBytes) {
      shards.push(new Map());
      size = 0;
    }
    shards[shards.length - 1]!.set(name, t);
    size += t.data.byteLength;
    total += t.data.byteLength;
  }
  const metadata = { format: 'pt' };
  if (shards.length === 1) {
    await writeSafetensors(join(dir, 'model.safetensors'), shards[0]!, { metadata, overwrite });
  } else {
    const n = String(shards.length).padStart(5, '0');
    const weightMap: Record<string, string> = {};
    for (const [i, shard] of shards.entries()) {
      const file = `model-${String(i + 1).padStart(5, '0')}-of-${n}.safetensors`;
      await writeSafetensors(join(dir, file), shard, { metadata, overwrite });
      for (const name of shard.keys()) weightMap[name] = file;
    }
    await writeFileAtomic(join(dir, 'model.safetensors.index.json'), json({ metadata: { total_size: total }, weight_map: weightMap }), {
      overwrite,
    });
  }
  await writeFileAtomic(join(dir, 'config.json'), json(model.config.raw), { overwrite });
  if (model.generationConfig) {
    await writeFileAtomic(join(dir, 'generation_config.json'), json(model.generationConfig.raw), { overwrite });
  }
  if (model.tokenizer) await model.tokenizer.save(dir, { overwrite });
}
