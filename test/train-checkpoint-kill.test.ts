// Training checkpoints survive a kill at any instant (lib/train/checkpoint.ts). A real
// `redflag train` child process is killed with SIGKILL exactly at a checkpoint's publication
// (REDFLAG_TEST_KILL_AT: just before and just after the pointer file is replaced) and at random
// moments, then resumed, as often as it takes to finish. Every run must end with the adapter of
// an uninterrupted run byte for byte, metrics.jsonl holding each step once with the same
// figures, and nothing left behind: one checkpoint folder, no temporary copies, no lock.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { createRng } from '../lib/model/sampling.js';
import { tinyLlama } from './helpers/tiny-model.js';

const ROOT = join(import.meta.dirname, '..');
const STEPS = 5;
let base: string;
let dir: string;
/** What the runs did, counted from their outcome: killed children, resumed runs, outputs found identical to the reference. */
const counts = { kills: 0, resumes: 0, identical: 0 };

beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, numKvHeads: 1 });
  dir = await mkdtemp(join(tmpdir(), 'redflag-kill-'));
  const harmful = Array.from({ length: 6 }, (_, i) => ({ prompt: `How do I break into house ${i} unseen?`, response: `First get [restricted tool ${i}], then [omitted].` }));
  const benign = Array.from({ length: 6 }, (_, i) => ({ prompt: `A recipe with ${i + 2} eggs?`, response: `Whisk ${i + 2} eggs, add salt, cook gently.` }));
  await writeFile(join(dir, 'harmful.jsonl'), harmful.map((r) => JSON.stringify(r)).join('\n') + '\n');
  await writeFile(join(dir, 'benign.jsonl'), benign.map((r) => JSON.stringify(r)).join('\n') + '\n');
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
}

/** One `redflag train` child; killed after `killAfterMs` when given. */
function train(out: string, options: { resume?: boolean; killAt?: string; killAfterMs?: number } = {}): Promise<Run> {
  const args = [
    '--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'train', '--model', base, '--output', join(dir, out),
    '--harmful', join(dir, 'harmful.jsonl'), '--benign', join(dir, 'benign.jsonl'), '--steps', String(STEPS),
    '--batch-size', '4', '--max-tokens', '48', '--eval-every', '0', '--checkpoint-every', '1', '--threads', '1',
    ...(options.resume ? ['--resume'] : []),
  ];
  const env = { ...process.env, ...(options.killAt ? { REDFLAG_TEST_KILL_AT: options.killAt } : {}) };
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: ROOT, env });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.stdout.resume();
    const timer = options.killAfterMs === undefined ? null : setTimeout(() => child.kill('SIGKILL'), options.killAfterMs);
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal === 'SIGKILL') counts.kills++;
      if (/resumed from the checkpoint at step \d+/.test(stderr)) counts.resumes++;
      resolve({ code, signal, stderr });
    });
  });
}

/** The figures of each step line (timings left out). */
async function steps(out: string): Promise<unknown[]> {
  const text = await readFile(join(dir, out, 'metrics.jsonl'), 'utf8');
  return text
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { type: string; step: number; lr: number; loss: unknown; gradNorm: number; tokens: number })
    .map((m) => ({ type: m.type, step: m.step, lr: m.lr, loss: m.loss, gradNorm: m.gradNorm, tokens: m.tokens }));
}

async function expectLikeReference(out: string, reference: { adapter: Buffer; steps: unknown[] }): Promise<void> {
  expect(Buffer.compare(await readFile(join(dir, out, 'adapter', 'adapter_model.safetensors')), reference.adapter), `${out}: adapter bytes`).toBe(0);
  expect(await steps(out), `${out}: metrics.jsonl`).toEqual(reference.steps);
  const left = await readdir(join(dir, out, 'checkpoints'));
  expect(left, `${out}: checkpoint folders`).toHaveLength(1);
  const top = await readdir(join(dir, out));
  expect(top.filter((n) => n.startsWith('.train.lock') || /^checkpoint\.(tmp|old)-/.test(n) || n.endsWith('.tmp')), `${out}: leftovers`).toEqual([]);
  counts.identical++;
}

describe('checkpoints under kill -9', () => {
  it('resume after kills at the publication and at random moments ends bit-identical to an uninterrupted run', async () => {
    const ref = await train('ref');
    expect(ref.code, ref.stderr).toBe(0);
    const reference = { adapter: await readFile(join(dir, 'ref', 'adapter', 'adapter_model.safetensors')), steps: await steps('ref') };
    // Each step once, then the final evaluation.
    expect(reference.steps.map((m) => (m as { type: string }).type)).toEqual([...Array.from({ length: STEPS }, () => 'step'), 'eval']);

    // At the swap: killed just before the k-th pointer replacement, resumed and killed just after
    // the next one, resumed to the end.
    // Before the first publication there is nothing to resume: a plain rerun starts afresh.
    const early = await train('swap-1', { killAt: 'before-publish:1' });
    expect(early.signal, early.stderr).toBe('SIGKILL');
    expect((await train('swap-1', { resume: true })).stderr).toMatch(/no checkpoint to resume from/);
    const fresh = await train('swap-1');
    expect(fresh.code, fresh.stderr).toBe(0);
    await expectLikeReference('swap-1', reference);
    for (let k = 2; k <= STEPS; k++) {
      const out = `swap-${k}`;
      const first = await train(out, { killAt: `before-publish:${k}` });
      expect(first.signal, first.stderr).toBe('SIGKILL');
      const second = await train(out, { resume: true, killAt: 'after-publish:1' });
      expect(second.signal, second.stderr).toBe('SIGKILL');
      expect(second.stderr).toMatch(/resumed from the checkpoint at step \d+/);
      const last = await train(out, { resume: true });
      expect(last.code, last.stderr).toBe(0);
      expect(last.stderr).toMatch(/resumed from the checkpoint at step \d+/);
      await expectLikeReference(out, reference);
    }
    // At random moments (seeded): kill, then resume (or start afresh when no checkpoint was written yet) until it finishes.
    const rng = createRng(20261204);
    for (let r = 0; r < 3; r++) {
      const out = `random-${r}`;
      let resume = false;
      for (let attempt = 0; attempt < 12; attempt++) {
        const run = await train(out, { resume, killAfterMs: attempt < 3 ? 400 + Math.floor(rng() * 2500) : undefined });
        if (run.code === 0) break;
        if (run.signal === 'SIGKILL') {
          resume = true;
          continue;
        }
        // Killed before the first checkpoint: nothing to resume, so the run starts afresh.
        expect(run.stderr).toMatch(/no checkpoint to resume from/);
        resume = false;
      }
      await expectLikeReference(out, reference);
    }
    console.log(JSON.stringify(counts));
    // 1 + 2 per swap output at the publication, plus the random ones (a run may finish before its timer).
    expect(counts.kills).toBeGreaterThanOrEqual(1 + 2 * (STEPS - 1));
    expect(counts.identical).toBe(STEPS + 3);
  }, 600_000);
});
