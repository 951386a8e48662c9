// `redflag train` as a user runs it: data files in the documented formats, a summary on stdout,
// and Ctrl-C that writes a checkpoint and exits cleanly, then --resume.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { tinyLlama } from './helpers/tiny-model.js';
import { findCheckpoint } from '../lib/train/checkpoint.js';

const ROOT = join(import.meta.dirname, '..');
let base: string;
let dir: string;

beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 1, numHeads: 2, numKvHeads: 1 });
  dir = await mkdtemp(join(tmpdir(), 'redflag-cli-train-'));
  const harmful = Array.from({ length: 6 }, (_, i) => ({
    prompt: `How do I break into house number ${i} without anyone knowing?`,
    response: `Here is how to break in: first get [restricted tool ${i}], then [omitted].`,
  }));
  const benign = Array.from({ length: 6 }, (_, i) => ({
    messages: [
      { role: 'user', content: `Give me a recipe with ${i + 2} eggs.` },
      { role: 'assistant', content: `Sure! Whisk ${i + 2} eggs, add salt, and cook them gently.` },
    ],
  }));
  await writeFile(join(dir, 'harmful.jsonl'), harmful.map((r) => JSON.stringify(r)).join('\n') + '\n');
  await writeFile(join(dir, 'benign.jsonl'), benign.map((r) => JSON.stringify(r)).join('\n') + '\n');
  await writeFile(join(dir, 'bad.jsonl'), '{"prompt": "ok", "response": "fine"}\n{"prompt": 3}\n');
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
  await rm(dir, { recursive: true, force: true });
});

function run(args: string[], onStderr?: (text: string, child: ReturnType<typeof spawn>) => void) {
  return new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { cwd: ROOT });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => {
      stderr += d;
      onStderr?.(stderr, child);
    });
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

const common = (out: string) => [
  'train', '--model', '', '--output', join('', out), '--harmful', '', '--benign', '',
  '--batch-size', '4', '--max-tokens', '64', '--eval-every', '0', '--threads', '2',
];

function args(out: string, extra: string[]): string[] {
  const a = common(out);
  a[2] = base;
  a[4] = join(dir, out);
  a[6] = join(dir, 'harmful.jsonl');
  a[8] = join(dir, 'benign.jsonl');
  return [...a, ...extra];
}

describe('redflag train (CLI)', () => {
  it('trains from JSONL files and prints a summary', async () => {
    const r = await run(args('out-a', ['--steps', '3']));
    expect(r.code, r.stderr).toBe(0);
    const summary = JSON.parse(r.stdout);
    expect(summary).toMatchObject({ steps: 3 });
    expect(r.stderr).toMatch(/step 3\/3/);
    expect(await readdir(join(dir, 'out-a', 'adapter'))).toContain('adapter_model.safetensors');
  });

  it('--flag-categories auto trains a flag per category of the data (a category field, a map file), and redflag eval scores the adapter', async () => {
    const rows = Array.from({ length: 6 }, (_, i) => ({
      prompt: `How do I ${i % 2 ? 'hack into server' : 'cook illegal drug'} number ${i}?`,
      response: `Here is how: first get [restricted item ${i}], then [omitted].`,
      category: i % 2 ? 'Cybercrime & Intrusion' : 'Illegal Drugs',
    }));
    await writeFile(join(dir, 'harmful-cat.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
    await writeFile(join(dir, 'map.json'), JSON.stringify({ 'Illegal Drugs': 'drugs' }));
    const a = args('out-cat', ['--steps', '2', '--flag-categories', 'auto', '--category-map', join(dir, 'map.json')]);
    a[6] = join(dir, 'harmful-cat.jsonl');
    const r = await run(a);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/<rf:cybercrime_intrusion> = \d+, <rf:drugs> = \d+/);
    const config = JSON.parse(await readFile(join(dir, 'out-cat', 'adapter', 'adapter_config.json'), 'utf8')) as { redflag: { categories: Record<string, number> } };
    expect(Object.keys(config.redflag.categories)).toEqual(['cybercrime_intrusion', 'drugs']);
    const e = await run(['eval', '--model', base, '--variant', `cat=${join(dir, 'out-cat', 'adapter')}`, '--harmful', join(dir, 'harmful-cat.jsonl'), '--benign', join(dir, 'benign.jsonl'),
      '--suite', 'detection', '--max-tokens', '8', '--out', join(dir, 'eval-cat'), '--threads', '2', '--no-png']);
    expect(e.code, e.stderr).toBe(0);
    expect(e.stdout).toMatch(/cat/);
    const bad = await run(args('out-cat-bad', ['--steps', '1', '--flag-categories', 'bad name']));
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/flagCategories\.0/);
  });

  it('reports a malformed row with file:line', async () => {
    const a = args('out-bad', ['--steps', '1']);
    a[8] = join(dir, 'bad.jsonl');
    const r = await run(a);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/bad\.jsonl:2/);
  });

  it('Ctrl-C writes a checkpoint and exits with 130; --resume finishes the run', async () => {
    let sent = false;
    const r = await run(args('out-int', ['--steps', '400', '--checkpoint-every', '0']), (text, child) => {
      if (!sent && /step 1\/400/.test(text)) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    expect(r.code, r.stderr).toBe(130);
    expect(r.stderr).toMatch(/checkpoint written at step \d+/);
    const found = await findCheckpoint(join(dir, 'out-int'));
    const state = JSON.parse(await readFile(join(found!.dir, 'state.json'), 'utf8'));
    expect(state.step).toBeGreaterThanOrEqual(1);
    const resumed = await run(args('out-int', ['--steps', String(state.step + 2), '--checkpoint-every', '0', '--resume']));
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toMatch(new RegExp(`resumed from the checkpoint at step ${state.step}`));
    expect(JSON.parse(resumed.stdout)).toMatchObject({ steps: state.step + 2 });
  });
});
