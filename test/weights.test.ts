import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { RedflagError } from '../lib/errors.js';
import { fromFloat32, toFloat32, writeSafetensors } from '../lib/model/safetensors.js';
import { WeightStore } from '../lib/model/weights.js';

let root: string;
let counter = 0;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'redflag-weights-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function modelDir(): Promise<string> {
  const dir = join(root, `m${counter++}`);
  await mkdir(dir);
  return dir;
}

const tensor = (...values: number[]) => fromFloat32(new Float32Array(values), [values.length], 'F32');

/** Writes two shards and an index mapping a→shard 1, b and c→shard 2. */
async function shardedModel(weightMap?: Record<string, string>): Promise<string> {
  const dir = await modelDir();
  await writeSafetensors(join(dir, 'model-00001-of-00002.safetensors'), { a: tensor(1, 2) });
  await writeSafetensors(join(dir, 'model-00002-of-00002.safetensors'), { b: tensor(3), c: tensor(4, 5, 6) });
  const map = weightMap ?? {
    a: 'model-00001-of-00002.safetensors',
    b: 'model-00002-of-00002.safetensors',
    c: 'model-00002-of-00002.safetensors',
  };
  await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 24 }, weight_map: map }));
  return dir;
}

async function rejection(promise: Promise<unknown>): Promise<RedflagError> {
  const error = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(RedflagError);
  return error as RedflagError;
}

describe('WeightStore', () => {
  it('opens a single model.safetensors', async () => {
    const dir = await modelDir();
    await writeSafetensors(join(dir, 'model.safetensors'), { 'lm_head.weight': tensor(1), 'model.embed_tokens.weight': tensor(2, 3) });
    const store = await WeightStore.open(dir);
    expect(store.names()).toEqual(['lm_head.weight', 'model.embed_tokens.weight']);
    expect(store.has('lm_head.weight')).toBe(true);
    expect(store.has('nope')).toBe(false);
    expect(store.info('model.embed_tokens.weight')).toMatchObject({ dtype: 'F32', shape: [2], byteLength: 8, file: join(dir, 'model.safetensors') });
    expect([...toFloat32(await store.read('model.embed_tokens.weight'))]).toEqual([2, 3]);
    await store.close();
    await expect(store.read('lm_head.weight')).rejects.toMatchObject({ code: 'DISPOSED' });
  });

  it('opens shards listed by model.safetensors.index.json', async () => {
    const dir = await shardedModel();
    const store = await WeightStore.open(dir);
    expect(store.names()).toEqual(['a', 'b', 'c']);
    expect(store.info('c').file).toBe(join(dir, 'model-00002-of-00002.safetensors'));
    expect([...toFloat32(await store.read('a'))]).toEqual([1, 2]);
    expect([...toFloat32(await store.read('c'))]).toEqual([4, 5, 6]);
    expect(store.warnings).toEqual([]);
    const missing = await rejection(store.read('d'));
    expect(missing.code).toBe('NOT_FOUND');
    expect(missing.message).toMatch(/no tensor named "d"/);
    await store.close();
  });

  it('reads model.safetensors when an index is there too, as transformers does, and says so', async () => {
    const dir = await shardedModel();
    await writeSafetensors(join(dir, 'model.safetensors'), { a: tensor(7, 8) });
    const seen: string[] = [];
    const store = await WeightStore.open(dir, { onWarning: (m) => seen.push(m) });
    expect(store.names()).toEqual(['a']);
    expect([...toFloat32(await store.read('a'))]).toEqual([7, 8]);
    expect(store.warnings).toEqual(seen);
    expect(seen).toEqual([expect.stringMatching(/holds both model\.safetensors and model\.safetensors\.index\.json; reading model\.safetensors/)]);
    await store.close();
  });

  it('names the missing shard', async () => {
    const dir = await shardedModel({ a: 'model-00001-of-00002.safetensors', b: 'model-00003-of-00003.safetensors' });
    const error = await rejection(WeightStore.open(dir));
    expect(error.code).toBe('NOT_FOUND');
    expect(error.message).toContain('model.safetensors.index.json');
    expect(error.message).toMatch(/shard "model-00003-of-00003.safetensors" \(holding e.g. tensor "b"\) is missing/);
  });

  it('rejects shard names that escape the directory', async () => {
    for (const name of ['../outside.safetensors', '/etc/passwd', 'sub/../../x.safetensors', 'C:\\x.safetensors', '..\\x.safetensors']) {
      const dir = await shardedModel({ a: name });
      const error = await rejection(WeightStore.open(dir));
      expect(error.code).toBe('INVALID_FILE');
      expect(error.message).toContain(JSON.stringify(name));
      expect(error.message).toMatch(/escape|absolute/);
    }
  });

  it('rejects a tensor the index puts in the wrong shard', async () => {
    const dir = await shardedModel({ a: 'model-00002-of-00002.safetensors', b: 'model-00002-of-00002.safetensors', c: 'model-00002-of-00002.safetensors' });
    const error = await rejection(WeightStore.open(dir));
    expect(error.message).toMatch(/puts tensor "a" in shard "model-00002-of-00002.safetensors", but that shard has no such tensor/);
  });

  it('warns (or, if asked, fails) about tensors a shard holds but the index omits', async () => {
    const map = { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' };
    const seen: string[] = [];
    const store = await WeightStore.open(await shardedModel(map), { onWarning: (m) => seen.push(m) });
    expect(store.names()).toEqual(['a', 'b']);
    expect(store.warnings).toHaveLength(1);
    expect(store.warnings[0]).toMatch(/shard "model-00002-of-00002.safetensors" holds 1 tensor\(s\) the weight_map does not assign to it \("c"\)/);
    expect(seen).toEqual(store.warnings);
    await store.close();
    const error = await rejection(WeightStore.open(await shardedModel(map), { unmappedTensors: 'error' }));
    expect(error.message).toMatch(/does not assign/);
  });

  it('validates the index itself', async () => {
    const dir = await modelDir();
    await writeFile(join(dir, 'model.safetensors.index.json'), '{"weight_map": {"a": 3}}');
    expect((await rejection(WeightStore.open(dir))).message).toMatch(/"weight_map"."a" must be a shard file name, got 3/);
    await writeFile(join(dir, 'model.safetensors.index.json'), '{"weight_map": []}');
    expect((await rejection(WeightStore.open(dir))).message).toMatch(/"weight_map" must be an object/);
    await writeFile(join(dir, 'model.safetensors.index.json'), '{"weight_map": {\n  "a": }');
    expect((await rejection(WeightStore.open(dir))).message).toMatch(/model.safetensors.index.json: invalid JSON at line 2/);
  });

  it('explains missing weights, and that pickles are not supported', async () => {
    const empty = await modelDir();
    const none = await rejection(WeightStore.open(empty));
    expect(none.code).toBe('NOT_FOUND');
    expect(none.message).toContain(empty);
    expect(none.message).toMatch(/expected model.safetensors or model.safetensors.index.json.*not supported; convert them to safetensors/);

    const pickled = await modelDir();
    await writeFile(join(pickled, 'pytorch_model.bin'), 'not really');
    const pickle = await rejection(WeightStore.open(pickled));
    expect(pickle.code).toBe('UNSUPPORTED');
    expect(pickle.message).toMatch(/pytorch_model.bin.*not supported.*convert them to safetensors/);

    expect((await rejection(WeightStore.open(join(root, 'no-such-dir')))).code).toBe('NOT_FOUND');
  });

  it('passes strict: false through to the shards', async () => {
    const dir = await modelDir();
    const json = new TextEncoder().encode(JSON.stringify({ a: { dtype: 'U8', shape: [1], data_offsets: [0, 1] } }));
    const bytes = new Uint8Array(8 + json.length + 3);
    new DataView(bytes.buffer).setBigUint64(0, BigInt(json.length), true);
    bytes.set(json, 8);
    bytes[8 + json.length] = 7;
    await writeFile(join(dir, 'model.safetensors'), bytes);
    expect((await rejection(WeightStore.open(dir))).message).toMatch(/2 trailing bytes/);
    const store = await WeightStore.open(dir, { strict: false });
    expect([...(await store.read('a')).data]).toEqual([7]);
    await store.close();
  });
});
