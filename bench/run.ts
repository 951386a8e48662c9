/**
 * Benchmarks: `npm run bench -- <gemm|prefill|decode|all> [--quick]`. Each prints one JSON
 * object. Speeds are reported as ratios to ceilings measured in the same run (FMA peak with a
 * register-only loop, memory bandwidth with a STREAM-like copy) and to peers measured in the
 * same run where installed (PyTorch CPU via Debian's python3-torch).
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { loadModel } from '../lib/model/model.js';
import { writeRandomModel, type RandomModelSpec } from '../lib/model/random-model.js';
import { loadNative } from '../lib/native.js';

const run = promisify(execFile);
const args = process.argv.slice(2);
const which = args.find((a) => !a.startsWith('--')) ?? 'all';
const quick = args.includes('--quick');
const THREADS = [1, 2];

/** SmolLM2-135M shapes, random weights (no download). */
const SMOLLM2: RandomModelSpec = {
  architecture: 'llama',
  vocabSize: 49152,
  hiddenSize: 576,
  intermediateSize: 1536,
  numLayers: 30,
  numHeads: 9,
  numKvHeads: 3,
  headDim: 64,
  tieWordEmbeddings: true,
  ropeTheta: 100000,
  maxPositions: 8192,
  seed: 135,
};
const SMOLLM2_PARAMS = 134_515_008; // 2·N FLOPs per token for a forward pass

const round = (x: number, digits = 3) => Number(x.toPrecision(digits + 1));

async function ceilings(threads: number[]) {
  const { bench } = loadNative();
  const out: Record<string, Record<string, number>> = {};
  for (const t of threads) {
    out[`threads${t}`] = {
      fmaF32Gflops: round(await bench.fmaPeak(t, false, quick ? 0.2 : 0.5)),
      fmaBf16Gflops: round(await bench.fmaPeak(t, true, quick ? 0.2 : 0.5)),
      copyGBs: round(await bench.memBandwidth(t, quick ? 256e6 : 512e6, true)),
      readGBs: round(await bench.memBandwidth(t, quick ? 256e6 : 512e6, false)),
    };
  }
  return out;
}

async function benchGemm() {
  const { bench } = loadNative();
  const peaks = await ceilings(THREADS);
  const shapes: [number, number, number][] = [[1024, 1024, 1024]];
  for (const m of quick ? [128] : [128, 256, 512]) {
    for (const [n, k] of [[576, 576], [1536, 576], [576, 1536], [49152, 576]] as const) shapes.push([m, n, k]);
  }
  const results = [];
  for (const [m, n, k] of shapes) {
    for (const dtype of ['f32', 'bf16'] as const) {
      for (const t of THREADS) {
        const seconds = await bench.gemmTime(m, n, k, dtype, t, quick ? 0.1 : 0.3);
        const gflops = (2 * m * n * k) / seconds / 1e9;
        const peak = peaks[`threads${t}`]![dtype === 'f32' ? 'fmaF32Gflops' : 'fmaBf16Gflops']!;
        results.push({ m, n, k, dtype, threads: t, gflops: round(gflops), ofFmaPeak: round(gflops / peak) });
      }
    }
  }
  return { bench: 'gemm', ceilings: peaks, results };
}

async function smolModel(dtype: 'F32' | 'BF16'): Promise<string> {
  const dir = join(tmpdir(), `redflag-bench-smollm2-135m-${dtype.toLowerCase()}`);
  if (!existsSync(join(dir, 'config.json'))) {
    process.stderr.write(`writing a SmolLM2-135M-shaped random model to ${dir}\n`);
    await writeRandomModel(dir, { ...SMOLLM2, dtype }, { overwrite: true });
  }
  return dir;
}

async function torchPeer(extra: string[]): Promise<Record<string, unknown> | { skipped: string }> {
  const script = join(import.meta.dirname, 'peers', 'torch_model.py');
  try {
    const { stdout } = await run('/usr/bin/python3', [script, '--threads', '2', '--best-settings', ...extra], {
      maxBuffer: 1 << 20,
      timeout: 15 * 60_000,
    });
    return JSON.parse(stdout.trim().split('\n').pop()!) as Record<string, unknown>;
  } catch (error) {
    const e = error as { stdout?: string; message?: string };
    try {
      return JSON.parse(String(e.stdout).trim().split('\n').pop()!) as { skipped: string };
    } catch {
      return { skipped: `PyTorch peer unavailable (${e.message?.split('\n')[0]}); install Debian's python3-torch` };
    }
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function benchDecode() {
  const peaks = await ceilings(THREADS);
  const newTokens = quick ? 32 : 128;
  const results = [];
  for (const dtype of ['f32', 'bf16'] as const) {
    const dir = await smolModel('F32');
    for (const t of THREADS) {
      const model = await loadModel(dir, { dtype, threads: t });
      try {
        const runs: number[] = [];
        for (let r = 0; r < 3; r++) {
          const seq = model.newSequence();
          let logits = await model.forward([seq], [Array.from({ length: 16 }, (_, i) => (i * 7919) % SMOLLM2.vocabSize)]);
          let token = 0;
          const started = performance.now();
          for (let i = 0; i < newTokens; i++) {
            token = argmaxRow(logits);
            logits = await model.forward([seq], [[token]]);
          }
          runs.push(newTokens / ((performance.now() - started) / 1000));
          seq.dispose();
        }
        const tokS = median(runs);
        const bytes = model.weightBytes;
        const c = peaks[`threads${t}`]!;
        results.push({
          dtype, threads: t, tokensPerSecond: round(tokS), weightBytesPerToken: bytes,
          effectiveGBs: round((tokS * bytes) / 1e9),
          ofCopyBound: round((tokS * bytes) / 1e9 / c.copyGBs!),
          ofReadBound: round((tokS * bytes) / 1e9 / c.readGBs!),
        });
      } finally {
        model.dispose();
      }
    }
  }
  const peer = quick ? { skipped: '--quick' } : await torchPeer(['--dtypes', 'f32,bf16', '--new-tokens', String(newTokens)]);
  return { bench: 'decode', model: 'SmolLM2-135M shapes, random weights, batch 1, after a 16-token prompt', ceilings: peaks, results, pytorch: peer };
}

function argmaxRow(logits: Float32Array): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
  return best;
}

async function benchPrefill() {
  const peaks = await ceilings([2]);
  const tokens = quick ? 128 : 512;
  const ids = Array.from({ length: tokens }, (_, i) => (i * 7919 + 13) % SMOLLM2.vocabSize);
  const results = [];
  for (const dtype of ['f32', 'bf16'] as const) {
    const model = await loadModel(await smolModel('F32'), { dtype, threads: 2 });
    try {
      const runs: number[] = [];
      for (let r = 0; r < (quick ? 2 : 4); r++) {
        const seq = model.newSequence();
        const started = performance.now();
        await model.forward([seq], [ids]); // logits for the last position, as generation needs
        if (r > 0) runs.push(tokens / ((performance.now() - started) / 1000));
        seq.dispose();
      }
      const tokS = median(runs);
      const peak = peaks['threads2']![dtype === 'f32' ? 'fmaF32Gflops' : 'fmaBf16Gflops']!;
      results.push({ dtype, threads: 2, tokens, tokensPerSecond: round(tokS), ofFmaPeak: round((2 * SMOLLM2_PARAMS * tokS) / 1e9 / peak) });
    } finally {
      model.dispose();
    }
  }
  const peer = quick ? { skipped: '--quick' } : await torchPeer(['--dtypes', 'f32,bf16', '--prefill-tokens', String(tokens), '--new-tokens', '8']);
  const vsPytorch: Record<string, number> = {};
  const peerPrefill = (peer as { prefill?: Record<string, number> }).prefill;
  if (peerPrefill) for (const r of results) if (peerPrefill[r.dtype]) vsPytorch[r.dtype] = round(r.tokensPerSecond / peerPrefill[r.dtype]!);
  return { bench: 'prefill', model: 'SmolLM2-135M shapes, random weights', ceilings: peaks, results, pytorch: peer, vsPytorch };
}

const benches: Record<string, () => Promise<unknown>> = { gemm: benchGemm, prefill: benchPrefill, decode: benchDecode };
const names = which === 'all' ? Object.keys(benches) : [which];
for (const name of names) {
  const fn = benches[name];
  if (!fn) {
    console.error(`unknown bench ${name}; choose one of ${Object.keys(benches).join(', ')}, all`);
    process.exit(2);
  }
  console.log(JSON.stringify(await fn(), null, 2));
}
