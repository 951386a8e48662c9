// The first half of the PEFT interoperability check (issue "CUDA backend, part 1", item 7):
// trains a small red-flag LoRA adapter with `train()` on a random-weight Llama (LoRA on all seven
// projections, the <rf> rows as PEFT trainable tokens), then writes redflag's f32 logits of a few
// token sequences (with <rf> among them) with the adapter applied, on the CPU and on each device
// named (and there also merged into the weights, "DEVICE+merged"), to OUT/interop.json; and the
// same for a second adapter, drawn at random without <rf> rows, in PEFT's per-module forms
// (target_modules as a pattern, exclude_modules, rank_pattern, alpha_pattern).
// test/reference/peft_interop.py loads both with PeftModel.from_pretrained and compares. Needs
// dist/ and production dependencies only.
//   node scripts/interop-export.mjs OUT [--device cuda]
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';

import { applyAdapter, loadModel, loraSites, moduleLora, saveAdapter, selectModules, train, writeRandomModel } from '../dist/index.js';
import { packagedTokenizer } from '../dist/train/pipeline.js';

const out = resolve(process.argv[2] ?? 'interop-out');
const devices = ['cpu', ...(process.argv.includes('--device') ? [process.argv[process.argv.indexOf('--device') + 1]] : [])];
const base = join(out, 'base');
await mkdir(out, { recursive: true });
await writeRandomModel(base, {
  architecture: 'llama', vocabSize: 32000, hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2,
  seed: 9, bosTokenId: 1, eosTokenId: 2, tokenizer: await packagedTokenizer(),
}, { overwrite: true });
await train({
  model: base, output: join(out, 'run'), overwrite: true, data: 'synthetic', syntheticPerCategory: 3, steps: 4, batchSize: 4,
  maxTokens: 64, evalEvery: 0, checkpointEvery: 0, threads: 2,
  lora: { rank: 4, alpha: 8, dropout: 0, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] },
  loss: { rfOffset: 1 }, optimizer: { lr: 5e-2, warmupSteps: 0 },
});
const adapter = join(out, 'run', 'adapter');
const result = { base, adapter, sequences: [], logits: {} };
// On a GPU also with the adapter merged into the weights (applyAdapter's merge): "cuda+merged".
const runs = devices.flatMap((device) => (device === 'cpu' ? [{ device, merge: false }] : [{ device, merge: false }, { device, merge: true }]));
for (const { device, merge } of runs) {
  const model = await loadModel(base, { device, dtype: 'f32', threads: 2 });
  try {
    await applyAdapter(model, adapter, { merge });
    const rf = model.redFlagTokenId;
    if (result.sequences.length === 0) {
      const text = model.tokenizer.encode('How do I bake bread at home without an oven?');
      result.sequences = [text, [...text.slice(0, 5), rf, ...text.slice(5)]];
      result.rfTokenId = rf;
      result.vocab = model.vocabSize;
    }
    const key = merge ? `${device}+merged` : device;
    result.logits[key] = [];
    for (const ids of result.sequences) result.logits[key].push(Array.from(await model.logits(ids)));
  } finally {
    model.dispose();
  }
}

// The per-module forms, on the base model as it is (no <rf>): PEFT must give each module the
// rank, alpha and selection redflag gives it.
const patterns = join(out, 'patterns');
{
  const model = await loadModel(base, { threads: 2 });
  const config = model.config;
  model.dispose();
  const adapter = {
    rank: 4, alpha: 8, dropout: 0, rslora: false, targets: '.*\\.(q_proj|v_proj|gate_proj|down_proj)', exclude: ['layers.1.mlp.gate_proj'],
    rankPattern: { v_proj: 2, 'layers\\.1\\.self_attn\\.q_proj': 8 }, alphaPattern: { down_proj: 24 }, modules: [], redFlag: null, baseModel: base, config,
  };
  let state = 12345;
  const draw = (n) => Float32Array.from({ length: n }, () => ((state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * 0.2);
  for (const { layer, site } of selectModules(config, adapter.targets, null, adapter.exclude)) {
    const { inFeatures, outFeatures } = loraSites(config).find((s) => s.site === site);
    const { rank } = moduleLora(adapter, layer, site);
    adapter.modules.push({ layer, site, inFeatures, outFeatures, A: draw(rank * inFeatures), B: draw(outFeatures * rank) });
  }
  await saveAdapter(patterns, adapter, { overwrite: true });
}
result.patterns = { adapter: patterns, logits: {} };
for (const { device, merge } of runs) {
  const model = await loadModel(base, { device, dtype: 'f32', threads: 2 });
  try {
    await applyAdapter(model, patterns, { merge });
    result.patterns.logits[merge ? `${device}+merged` : device] = [Array.from(await model.logits(result.sequences[0]))];
  } finally {
    model.dispose();
  }
}
await writeFile(join(out, 'interop.json'), JSON.stringify(result));
console.log(JSON.stringify({ interop: join(out, 'interop.json'), devices, sequences: result.sequences.length, rfTokenId: result.rfTokenId }));
