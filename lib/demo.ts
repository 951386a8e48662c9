/**
 * `redflag demo` (`npm start`): the end-to-end job on built-in defaults, needing no download.
 * A random-initialised Llama-architecture model (with a real 32000-token tokenizer) learns the
 * language of the project's synthetic chat set; a red-flag LoRA adapter and a refusal LoRA
 * baseline are trained on it; both are measured on held-out templates; the red-flag model
 * then answers a held-out harmful prompt with p(`<rf>`) shown at every step; a multi-flag adapter
 * (one flag `<rf:NAME>` per risk category) is trained the same way and its per-category confusion
 * matrix shown; and `redflag eval` compares base, red-flag and refusal models under attacks
 * (lib/demo-eval.ts). With `device` ('cuda', 'cuda:N') the adapters train there, the detector
 * answers there and the evaluation runs there; the language model still trains on the CPU, where
 * the pipeline's reference figures were measured.
 * @module
 */
import { mkdtemp, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { runDemoEval } from './demo-eval.js';
import { createDetector } from './detect/detector.js';
import { generateSyntheticData } from './data/synthetic.js';
import { addonFor, parseDevice, type DeviceSpec } from './model/device.js';
import { loadModel } from './model/model.js';
import { RedflagError } from './errors.js';
import { formatConfusion, trainCategoryFlags } from './train/category-flags.js';
import { applyAdapter } from './train/export.js';
import { PIPELINE_SIZES, runPipeline } from './train/pipeline.js';
import type { StepInfo } from './train/trainer.js';

function log(line: string): void {
  process.stderr.write(`${line}\n`);
}

/** Runs the demo and prints its figures as JSON on stdout. */
export async function runDemo(options: { out?: string; threads?: number; small?: boolean; device?: DeviceSpec; overwrite?: boolean } = {}): Promise<Record<string, unknown>> {
  const spec = parseDevice(options.device ?? 'cpu', 'device');
  // A device that cannot run fails now, with its reason, before the language model trains.
  addonFor(spec);
  const device = spec.name as DeviceSpec;
  // The demo rewrites its working directory: one that holds anything is the user's to give up.
  if (options.out !== undefined && !options.overwrite) {
    const held = await readdir(options.out).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return [];
      throw new RedflagError('INVALID_ARGUMENT', `cannot use it as the demo's working directory (${error.message})`, { file: options.out!, cause: error });
    });
    if (held.length > 0) {
      throw new RedflagError('INVALID_ARGUMENT', `is not empty, and the demo replaces what it writes there: choose a new directory, or pass --overwrite`, { file: options.out });
    }
  }
  const dir = options.out ?? (await mkdtemp(join(tmpdir(), 'redflag-demo-')));
  log(`redflag demo: working in ${dir}${device === 'cpu' ? '' : ` (adapters, detector and evaluation on ${device})`}`);
  const size = PIPELINE_SIZES[options.small ? 'small' : 'demo'];
  let lastReport = 0;
  const pipeline = {
    dir,
    ...size,
    batchSize: 8,
    ...(options.threads ? { threads: options.threads } : {}),
    ...(device !== 'cpu' ? { adapterDevice: device } : {}),
    log: (l: string) => log(`  ${l}`),
    onStep: (stage: string, s: StepInfo) => {
      const now = performance.now();
      if (s.step === s.steps || now - lastReport > 5000) {
        lastReport = now;
        const l = s.loss;
        const loss = stage === 'redflag' ? `rf ${l.redFlag.toFixed(3)} benign KL ${l.benign.toFixed(3)} after-flag KL ${l.after.toFixed(3)}` : `ce ${l.ce.toFixed(3)}`;
        log(`  [${stage}] step ${s.step}/${s.steps} ${loss} ${s.tokensPerSecond.toFixed(0)} tok/s`);
      }
    },
  };
  const result = await runPipeline(pipeline);
  const rf = result.redflag;
  log('');
  log(`held-out templates: ${rf.harmful} harmful, ${rf.benign} benign conversations`);
  log(`  red-flag adapter: ${(100 * rf.harmfulFlagRate).toFixed(1)}% of harmful responses flagged, ${(100 * rf.benignFalseFlagRate).toFixed(1)}% of benign ones; benign KL ${rf.benignKl.toExponential(2)} nats/token`);
  log(`  refusal adapter:  refuses ${(100 * result.refusal.harmfulRefusalRate).toFixed(1)}% of harmful prompts; benign KL ${result.refusal.benignKl.toExponential(2)} nats/token`);

  // Detection as it happens: the detector answers a held-out harmful prompt (greedy, block
  // mode) with p(<rf>) at every step, and stops the answer when the red flag goes up.
  const model = await loadModel(join(result.dirs.lm, 'model'), { device, ...(options.threads ? { threads: options.threads } : {}) });
  const trace: { text: string; pRf: number }[] = [];
  let detection: { finishReason: string; flagIndex: number; maxPRf: number } | null = null;
  try {
    await applyAdapter(model, join(result.dirs.redflag, 'adapter'));
    const detector = await createDetector({ model, threshold: 0.5, mode: 'block' });
    const example = generateSyntheticData({ seed: 0, perCategory: size.perCategory }).test.find((c) => c.label === 'harmful')!;
    const prompt = example.messages.slice(0, -1);
    log('');
    log(`prompt (held out): ${JSON.stringify(prompt[prompt.length - 1]!.content)}`);
    const answer = detector.generate(prompt, { maxTokens: 40 });
    for await (const t of answer) trace.push({ text: t.text, pRf: t.pRf });
    const summary = await answer.done;
    detection = { finishReason: summary.finishReason, flagIndex: summary.flagIndex, maxPRf: summary.maxPRf };
    log(`answer with p(<rf>) per token: ${trace.map((t) => `${t.text}[${t.pRf.toFixed(2)}]`).join(' ')}`);
    log(
      summary.finishReason === 'content_filter'
        ? `  blocked at token ${summary.flagIndex} (${summary.maxPRf >= 0.5 ? `p(<rf>) ${summary.maxPRf.toFixed(2)} >= 0.5` : 'the model chose <rf>'}): finish reason content_filter`
        : `  not flagged (max p(<rf>) ${summary.maxPRf.toFixed(2)}): finish reason ${summary.finishReason}`,
    );
    await detector.dispose();
  } finally {
    model.dispose();
  }
  // One flag per risk category: the same adapter training with a flag <rf:NAME> for each
  // harmful category of the synthetic set; which flag it raises on held-out harmful templates.
  log('');
  log('multi-flag adapter: one flag per risk category, same loss and steps');
  const multi = await trainCategoryFlags(pipeline, join(result.dirs.lm, 'model'), join(dir, 'redflag-categories'));
  log(`  ${(100 * multi.eval.harmfulFlagRate).toFixed(1)}% of harmful responses flagged (any flag), ${(100 * multi.eval.benignFalseFlagRate).toFixed(1)}% of benign ones; benign KL ${multi.eval.benignKl.toExponential(2)} nats/token`);
  log(`  flag raised on held-out harmful responses (rows: true category); right category for ${(100 * multi.confusion.accuracy).toFixed(1)}% of the flagged`);
  for (const line of formatConfusion(multi.confusion)) log(`    ${line}`);

  // The eval suite over base / red-flag / refusal on the same held-out templates: attacks,
  // detection quality and utility in one comparison table, with plots.
  log('');
  log('evaluation (redflag eval): detection, sampling, prefill, long-context, suppression, utility and white-box attacks');
  const evaluation = await runDemoEval(result, size.perCategory, dir, log, options.threads, device);
  const figures = {
    demo: 'redflag',
    dir,
    device,
    heldOut: { harmful: rf.harmful, benign: rf.benign },
    redflag: { harmfulFlagRate: rf.harmfulFlagRate, benignFalseFlagRate: rf.benignFalseFlagRate, benignKl: rf.benignKl },
    refusal: result.refusal,
    lmFinalLoss: result.lmFinalLoss,
    seconds: result.seconds,
    detection: { ...detection, trace },
    categories: {
      harmfulFlagRate: multi.eval.harmfulFlagRate,
      benignFalseFlagRate: multi.eval.benignFalseFlagRate,
      benignKl: multi.eval.benignKl,
      confusion: multi.confusion,
      seconds: multi.seconds,
    },
    eval: evaluation,
  };
  console.log(JSON.stringify(figures, null, 2));
  return figures;
}
