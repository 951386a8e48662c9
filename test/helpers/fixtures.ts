// Reading the golden fixtures written by test/reference/make_fixtures.py.
import { join } from 'node:path';

import { SafetensorsFile, toFloat32 } from '../../lib/model/safetensors.js';

export const FIXTURES = join(import.meta.dirname, '..', 'fixtures', 'models');

export const FIXTURE_NAMES = [
  'llama-gqa',
  'llama3-rope-tied',
  'llama-rope-linear',
  'llama-rope-dynamic',
  'llama-bf16-sharded',
  'llama-f16',
  'mistral-swa',
  'qwen2-bias',
  'qwen3-qk-norm',
  'gpt2',
  'gpt2-noprefix',
] as const;

export interface ReferenceCase {
  name: string;
  ids: number[];
  logits: Float32Array;
}

/** The expected outputs of one fixture: each case's ids and logits, plus extra tensors. */
export async function readReference(fixture: string): Promise<{ cases: ReferenceCase[]; extra: Map<string, Float32Array>; metadata: Record<string, string> }> {
  const file = await SafetensorsFile.open(join(FIXTURES, fixture, 'reference.safetensors'));
  try {
    const cases: ReferenceCase[] = [];
    for (const name of (file.metadata['cases'] ?? '').split(',').filter(Boolean)) {
      const idsRaw = await file.read(`ids.${name}`);
      const ids = Array.from(new BigInt64Array(idsRaw.data.slice().buffer), (v) => Number(v));
      cases.push({ name, ids, logits: toFloat32(await file.read(`logits.${name}`)) });
    }
    // A fixture without its case list would let every loop over the cases pass with no assertion.
    if (cases.length === 0) throw new Error(`${fixture}/reference.safetensors lists no cases (metadata "cases")`);
    const extra = new Map<string, Float32Array>();
    for (const name of file.tensors.keys()) {
      if (!name.startsWith('ids.') && !name.startsWith('logits.')) extra.set(name, toFloat32(await file.read(name)));
    }
    return { cases, extra, metadata: { ...file.metadata } };
  } finally {
    await file.close();
  }
}

/** ||a - b|| / ||b|| over whole arrays. */
export function relL2(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i]! - b[i]!;
    num += d * d;
    den += b[i]! * b[i]!;
  }
  return Math.sqrt(num / Math.max(den, 1e-300));
}

/** float64 log-softmax of one logits row. */
export function logSoftmax(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) if (v > max) max = v;
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(row, (v) => v - lse);
}
