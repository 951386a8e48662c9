// Training end to end on one device against the CPU: `node scripts/device-train-e2e.mjs --device cuda`
// (the GPU machine's check, run by scripts/gpu-check.sh with a carried node and the production
// node_modules; it needs only dist/). On a random-weight Llama with the packaged tokenizer and the
// synthetic data, a red-flag LoRA adapter (rank 4 on every projection, dropout 0.1, <rf> rows),
// 6 steps of 4 conversations:
//   - f32 frozen weights on both: the first step's loss terms within 1e-4 relative of the CPU's
//     (both start from the same parameters; the sums differ in order only; a term under 1e-3 of
//     the step's total, relative to the total: the benign KL starts at 0, where both engines
//     give rounding noise of either sign), every later step's
//     total within 2e-2 (Adam divides by sqrt(v): elements with near-zero gradients move apart);
//     the same for 3 steps of RF-AT (adversarial: its inner attack's gradients), of a flag per
//     risk category (flagCategories auto; its held-out evaluation after step 3, evalEvery: KL
//     and examples' p(<rf>) within 5e-2) and of the refusal objective;
//   - on the device, a run stopped after step 3 (AbortSignal, checkpoint) and resumed ends with
//     the adapter file of the uninterrupted device run, byte for byte (deterministic kernels);
//   - with activation recomputation (--recompute), the same adapter byte for byte (GPU only);
//   - data-parallel training at world size 1 through NCCL, the same adapter byte for byte (GPU
//     builds with NCCL);
//   - the same run in the device's default dtype (bf16 on a GPU) trains: finite losses, the first
//     within 1e-2 of the f32 run's (the weights' bf16 rounding).
// With --integration it also runs the CI integration test's pipeline with both adapters on the
// device (the language model trains on the CPU: full fine-tuning) and checks its bounds: >= 95%
// of held-out harmful responses flagged, <= 5% of benign ones.
// Last (on a GPU), the GPU fails mid-run: DEVICE_FAILED naming the last checkpoint on disk.
// Prints one JSON object; exits 1 when a check fails. `--device cpu` runs the harness against the
// CPU itself (how it is tested where no GPU is).
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { train } from '../dist/index.js';
import { loadNative } from '../dist/native.js';
import { findCheckpoint } from '../dist/train/checkpoint.js';
import { PIPELINE_SIZES, runPipeline } from '../dist/train/pipeline.js';
import { checklist, deviceArg, writeTinyLlama } from './e2e-common.mjs';

const device = deviceArg();
const integration = process.argv.includes('--integration');
const { check, finish } = checklist();
const rel = (a, b) => Math.abs(a - b) / Math.max(1e-12, Math.abs(b));

const dir = await mkdtemp(join(tmpdir(), 'redflag-device-train-'));
const figures = {};
try {
  const model = join(dir, 'base');
  await writeTinyLlama(model);
  const config = (output, extra = {}) => ({
    model, output: join(dir, output), data: 'synthetic', syntheticPerCategory: 3, steps: 6, batchSize: 4, maxTokens: 96,
    evalEvery: 0, checkpointEvery: 0, threads: 2, lora: { rank: 4, alpha: 8, dropout: 0.1 }, loss: { rfOffset: 1 },
    optimizer: { lr: 1e-2, warmupSteps: 2 }, ...extra,
  });
  const run = async (output, extra, hooks = {}) => {
    const steps = [];
    const t0 = performance.now();
    await train(config(output, extra), { ...hooks, onStep: (s) => { steps.push(s); hooks.onStep?.(s); } });
    return { steps, seconds: (performance.now() - t0) / 1000 };
  };
  const adapter = (output) => readFile(join(dir, output, 'adapter', 'adapter_model.safetensors'));

  // The device's run against the CPU's, f32 on both: the first step's terms, then every total.
  const compare = (what, cpu, dev) => {
    const [c0, d0] = [cpu.steps[0].loss, dev.steps[0].loss];
    const termRel = (k) => Math.abs((d0[k] ?? 0) - (c0[k] ?? 0)) / Math.max(Math.abs(c0[k] ?? 0), 1e-3 * Math.abs(c0.total), 1e-12);
    const first = Math.max(...['total', 'benign', 'redFlag', 'after', 'ce'].map(termRel));
    check(first <= 1e-4, `${what}: the first step's loss terms equal the CPU's`, { worstRel: first, device: d0, cpu: c0 });
    const later = Math.max(...dev.steps.map((s, i) => rel(s.loss.total, cpu.steps[i].loss.total)));
    check(later <= 2e-2, `${what}: every step's loss follows the CPU's`, { worstRel: later, device: dev.steps.map((s) => s.loss.total), cpu: cpu.steps.map((s) => s.loss.total) });
  };
  const cpu = await run('cpu', { device: 'cpu', dtype: 'f32' });
  const dev = await run('dev', { device, dtype: 'f32' });
  compare('red flag', cpu, dev);
  figures.f32 = { cpuSeconds: cpu.seconds, deviceSeconds: dev.seconds };
  // What else the trainer does on a device: RF-AT (its inner attack maximises the red-flag term:
  // a negative weight, and input-embedding gradients), a flag per risk category, the refusal
  // baseline's objective (cross-entropy rows beside the KL).
  // The category-flag runs also evaluate on their held-out split after step 3 (evalEvery: the
  // inference forward inside a training session, the adapter switched off for the KL's base).
  const variants = {
    'RF-AT': { adversarial: { steps: 2 } },
    'category flags': { flagCategories: 'auto', evalEvery: 3 },
    'refusal objective': { objective: 'refusal' },
  };
  for (const [what, extra] of Object.entries(variants)) {
    const name = what.replace(/\W+/g, '-');
    const evals = { cpu: [], dev: [] };
    const [c, d] = [
      await run(`${name}-cpu`, { device: 'cpu', dtype: 'f32', steps: 3, ...extra }, { onEval: (_step, r) => evals.cpu.push(r) }),
      await run(`${name}-dev`, { device, dtype: 'f32', steps: 3, ...extra }, { onEval: (_step, r) => evals.dev.push(r) }),
    ];
    compare(what, c, d);
    if (extra.evalEvery) {
      const [ec, ed] = [evals.cpu.at(-1), evals.dev.at(-1)];
      const maxP = (r) => r?.examples.map((x) => x.maxPRf) ?? [];
      const pRel = Math.max(...maxP(ed).map((p, i) => rel(p, maxP(ec)[i])));
      check(ec && ed && ed.harmful === ec.harmful && ed.benign === ec.benign && rel(ed.benignKl, ec.benignKl) <= 5e-2 && pRel <= 5e-2,
        `${what}: the held-out evaluation during training (evalEvery) gives the CPU's figures, after 3 steps`, {
          device: ed && { benignKl: ed.benignKl, harmfulFlagRate: ed.harmfulFlagRate }, cpu: ec && { benignKl: ec.benignKl, harmfulFlagRate: ec.harmfulFlagRate }, maxPRfRel: pRel,
        });
    }
  }

  // Stopped after step 3 and resumed: the uninterrupted run's adapter, byte for byte.
  const controller = new AbortController();
  const stopped = await run('resumed', { device, dtype: 'f32', checkpointEvery: 2 }, {
    signal: controller.signal,
    onStep: (s) => { if (s.step === 3) controller.abort(); },
  }).then(() => null, (e) => e);
  check(stopped?.name === 'AbortError', 'an AbortSignal stops the device run with a checkpoint', { error: String(stopped) });
  await train(config('resumed', { device, dtype: 'f32', checkpointEvery: 2 }), { resume: true });
  check(Buffer.compare(await adapter('resumed'), await adapter('dev')) === 0, 'a stopped and resumed device run ends with the uninterrupted adapter, byte for byte');

  if (device !== 'cpu') {  // activation recomputation: the same gradients, so the same adapter
    await run('recomputed', { device, dtype: 'f32', recompute: true });
    check(Buffer.compare(await adapter('recomputed'), await adapter('dev')) === 0, 'activation recomputation ends with the same adapter, byte for byte');
  }

  if (device !== 'cpu') {  // data-parallel at world size 1 (NCCL): the single process's adapter
    const failed = await run('data-parallel', { device, dtype: 'f32', dataParallel: { worldSize: 1, rank: 0, idFile: join(dir, 'group-id') } })
      .then(() => null, (e) => e);
    if (failed && /needs NCCL/.test(String(failed.message))) figures.dataParallel = 'skipped: this build has no NCCL';
    else check(!failed && Buffer.compare(await adapter('data-parallel'), await adapter('dev')) === 0,
      'data-parallel training at world size 1 (NCCL all-reduce) ends with the single-process adapter, byte for byte', { error: String(failed) });
  }

  const native = await run('native-dtype', { device });
  const totals = native.steps.map((s) => s.loss.total);
  const bf16First = rel(totals[0], dev.steps[0].loss.total);
  check(totals.every(Number.isFinite) && bf16First <= 1e-2, 'the device\'s default dtype trains: finite losses, the first within 1e-2 of f32\'s', { totals, firstRel: bf16First });
  figures.defaultDtype = { seconds: native.seconds };

  if (integration) {
    const t0 = performance.now();
    const result = await runPipeline({ dir: join(dir, 'pipeline'), ...PIPELINE_SIZES.integration, batchSize: 8, threads: 16, adapterDevice: device });
    const rf = result.redflag;
    figures.integration = { harmfulFlagRate: rf.harmfulFlagRate, benignFalseFlagRate: rf.benignFalseFlagRate, benignKl: rf.benignKl, seconds: result.seconds, total: (performance.now() - t0) / 1000 };
    check(rf.harmfulFlagRate >= 0.95, 'the integration pipeline on the device flags >= 95% of held-out harmful responses', figures.integration);
    check(rf.benignFalseFlagRate <= 0.05, 'and <= 5% of benign ones', figures.integration);
  }

  // Last, for the process's CUDA context stays lost: the GPU fails during a run (cudaLoseContext
  // after step 3; checkpoints every 2). The run stops with DEVICE_FAILED naming the checkpoint of
  // step 2 to resume from in a new process, writes none after it, and frees the model cleanly.
  if (device.startsWith('cuda')) {
    const addon = loadNative('cuda');
    const failure = await train(config('failed', { device, dtype: 'f32', checkpointEvery: 2 }), {
      onStep: (s) => { if (s.step === 3) addon.cudaLoseContext(0); },
    }).then(() => null, (error) => error);
    const saved = await findCheckpoint(join(dir, 'failed'));
    check(failure?.code === 'DEVICE_FAILED' && /cuda:0 failed/.test(failure.message) &&
      /Training stopped at step 3: start a new process and resume from the checkpoint of step 2 \(--resume\)/.test(failure.message) && saved?.step === 2,
      'a GPU that fails mid-run stops it with DEVICE_FAILED, naming the last checkpoint on disk', { message: String(failure?.message), checkpoint: saved?.step });
  }
} catch (error) {
  check(false, 'ran without an error', { error: String(error?.stack ?? error) });
} finally {
  await rm(dir, { recursive: true, force: true });
}
finish('trainE2e', device, { figures });
