// The library end to end on one device against the CPU: `node scripts/device-e2e.mjs --device cuda`
// (the GPU machine's check, run by scripts/gpu-check.sh with a carried node and the production
// node_modules; it needs only dist/ and production dependencies). On a random-weight Llama with
// the packaged tokenizer and a red-flag token, f32 on both engines:
//   - logits of a prompt: relative L2 <= 1e-4 against the CPU; the same, and greedy tokens, on a
//     Qwen3 (per-head q/k norms, head_dim 48 with hidden 128);
//   - greedy generation of 4 prompts: the CPU's tokens;
//   - teacher-forced flag scores: within 1e-4 relative, also with a per-token embedding offset
//     (embedDelta);
//   - a forward's progress reports: the CPU's, layer by layer;
//   - the detector with continuous batching (8 requests at once, mode flag): each answer equals
//     the CPU detector's, and its p(<rf>) within 1e-4 relative; modes block and reflect flagged
//     mid-answer: the CPU's text, flag index and finish reason; a stop string cuts the CPU's
//     text; a request cancelled mid-answer throws AbortError and frees its KV cache;
//   - the OpenAI-compatible server over HTTP: chat completions (whole and streamed) equal the
//     detector's answer, and /v1/moderations' score within 1e-4 relative of the CPU's;
//   - a sequence cut back (Sequence.truncate) and continued: the logits of a fresh sequence, and
//     the CPU's, relative L2 <= 1e-4, with the blocks past the cut freed;
//   - a saved adapter (LoRA on every projection, trained <rf> rows) applied live (applyAdapter's
//     default) and merged into the weights: logits and teacher-forced p(<rf>) as the CPU's with
//     the adapter live, greedy tokens the CPU's;
//   - on a GPU, out of device memory on purpose: a model, a KV cache and an adapter that do not
//     fit fail with OUT_OF_MEMORY (the adapter leaving none of itself applied), and concurrent
//     requests whose batched steps do not fit are split into steps that do, each answer as alone.
// Prints one JSON object; exits 1 when a check fails. `--device cpu` runs the harness against
// the CPU itself (how it is tested where no GPU is).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { addRedFlagToken, applyAdapter, createDetector, createRng, loadModel, loraSites, saveAdapter, serve } from '../dist/index.js';
import { loadNative } from '../dist/native.js';
import { checklist, deviceArg, deviceName, relL2, writeTinyLlama } from './e2e-common.mjs';

const device = deviceArg();
const { check, finish } = checklist();

async function answer(detector, messages, maxTokens, options = {}) {
  const stream = detector.generate(messages, { maxTokens, ...options });
  const pRf = [];
  for await (const t of stream) pRf.push(t.pRf);
  return { ...(await stream.done), pRf };
}

const dir = await mkdtemp(join(tmpdir(), 'redflag-device-e2e-'));
let cpu;
let dev;
let merged;
let tight;
let server;
let cpuServer;
const detectors = [];
try {
  await writeTinyLlama(dir, { hiddenSize: 128, seed: 5 });
  cpu = await loadModel(dir, { threads: 2 });
  dev = await loadModel(dir, { device, dtype: 'f32', threads: 2 });
  for (const m of [cpu, dev]) await addRedFlagToken(m);
  check(dev.device.name === deviceName(device), 'the model runs where it was asked to', { device: dev.device.name });
  if (device !== 'cpu') {
    const gpu = dev.gpuInfo();
    check(gpu && gpu.name && /^\d+\.\d$/.test(gpu.computeCapability) && /^\d/.test(gpu.architectures),
      'the GPU is named, with its compute capability and the architectures the build holds', { gpu });
  }

  const prompt = dev.tokenizer.encode('The river runs through a valley where birds sing and old stones keep the memory of rain');
  const e = relL2(await dev.logits(prompt), await cpu.logits(prompt));
  check(e <= 1e-4, 'logits equal the CPU engine', { relL2: e });

  // Qwen3: the per-head q/k norms before rope, a head wider than hidden / heads.
  {
    const qdir = join(dir, 'qwen3');
    await writeTinyLlama(qdir, { hiddenSize: 128, seed: 6, architecture: 'qwen3', headDim: 48 });
    const qcpu = await loadModel(qdir, { threads: 2 });
    const qdev = await loadModel(qdir, { device, dtype: 'f32', threads: 2 });
    try {
      const eq = relL2(await qdev.logits(prompt), await qcpu.logits(prompt));
      const greedy = async (m) => {
        const out = [];
        for await (const t of m.generate(prompt, { maxTokens: 16 })) out.push(t.id);
        return out.join();
      };
      const [a, b] = [await greedy(qdev), await greedy(qcpu)];
      check(eq <= 1e-4 && a === b, 'a Qwen3 model: logits and greedy tokens equal the CPU engine', { relL2: eq, sameTokens: a === b });
    } finally {
      qcpu.dispose();
      qdev.dispose();
    }
  }

  const prompts = ['Tell me about tomatoes.', 'Why is the sky blue?', 'Count to ten.', 'Write a haiku about rain.'];
  for (const [i, p] of prompts.entries()) {
    const ids = dev.tokenizer.encode(p);
    const take = async (m) => {
      const out = [];
      for await (const t of m.generate(ids, { maxTokens: 24 })) out.push(t.id);
      return out;
    };
    const [a, b] = [await take(dev), await take(cpu)];
    check(a.join() === b.join(), `greedy generation ${i} equals the CPU engine`, a.join() === b.join() ? {} : { device: a, cpu: b });
  }

  const seq = [...prompt, ...dev.tokenizer.encode(' and more words follow here')];
  const scores = async (m) => {
    const s = m.newSequence();
    try {
      return await m.tokenScores([s], [seq]);
    } finally {
      s.dispose();
    }
  };
  // Relative: p(<rf>) of the random model is about 2e-5, where an absolute bound says nothing.
  const relMax = (a, b) => Math.max(...Array.from(a, (v, i) => Math.abs(v - b[i]) / Math.max(Math.abs(b[i]), 1e-30)));
  const [sd, sc] = [await scores(dev), await scores(cpu)];
  const worst = relMax(sd, sc);
  check(worst <= 1e-4, 'teacher-forced p(<rf>) equals the CPU engine', { worstRel: worst });

  // A per-token offset to the input embeddings (embedDelta, the embedding attack's input) moves
  // the scores as on the CPU; a forward reports its layers (onProgress) as on the CPU.
  const rngDelta = createRng(3);
  const delta = Float32Array.from({ length: seq.length * dev.config.hiddenSize }, () => (rngDelta() * 2 - 1) * 2);
  const shifted = async (m) => {
    const s = m.newSequence();
    try {
      return await m.tokenScores([s], [seq], { embedDelta: delta });
    } finally {
      s.dispose();
    }
  };
  const [dd, dc] = [await shifted(dev), await shifted(cpu)];
  const worstDelta = relMax(dd, dc), movedDelta = relMax(dc, sc);
  check(worstDelta <= 1e-4 && movedDelta > 1e-3, 'teacher-forced p(<rf>) with embedDelta equals the CPU engine', { worstRel: worstDelta, movedRel: movedDelta });
  const layers = async (m) => {
    const s = m.newSequence();
    const seen = [];
    try {
      await m.forward([s], [prompt], { onProgress: (done, total) => seen.push(`${done}/${total}`) });
    } finally {
      s.dispose();
    }
    return seen.join(' ');
  };
  const [pDev, pCpu] = [await layers(dev), await layers(cpu)];
  check(pDev === pCpu && pDev.length > 0, 'a forward reports its layers as on the CPU', { device: pDev, cpu: pCpu });

  const [dDev, dCpu] = [await createDetector({ model: dev, threshold: 1, mode: 'flag' }), await createDetector({ model: cpu, threshold: 1, mode: 'flag' })];
  detectors.push(dDev, dCpu);
  if (dev.device.kind === 'cuda') {
    // The GPU's default KV cache ('auto', gpuMemoryFraction 0.9): what is left after the weights
    // and the largest step, less a tenth of the device kept free, in whole blocks.
    const m = dev.deviceMemory(), block = dev.kvBlockTokens * dev.kvBytesPerPosition, budget = dDev.stats().kvCacheBudget;
    check(budget % block === 0 && m.free >= 0.1 * m.total - 4 * 2 ** 20 && m.free < 0.1 * m.total + block + 4 * 2 ** 20,
      "the GPU's default KV cache fills the device to 90%, in whole blocks", { budget, free: m.free, total: m.total, block });
  }
  const questions = Array.from({ length: 8 }, (_, i) => [{ role: 'user', content: `Question ${i}: ${'why is the sky blue? '.repeat(1 + (i % 4))}` }]);
  const together = await Promise.all(questions.map((q) => answer(dDev, q, 16)));
  for (const [i, q] of questions.entries()) {
    const alone = await answer(dCpu, q, 16);
    const dp = together[i].pRf.length === alone.pRf.length ? relMax(together[i].pRf, alone.pRf) : Infinity;
    check(together[i].text === alone.text && dp <= 1e-4, `detector answer ${i} (batched) equals the CPU's alone`, { maxPRfRel: dp });
  }
  // Block and reflect at a threshold the CPU's answer crosses by its fourth token (a thousandth
  // under its p(<rf>) there, beyond a device's rounding). On a GPU the detector overlaps its
  // steps (its default there, not on the CPU): it must take back the token it guessed past the
  // flag, and for reflect continue from the reflection instead.
  const probe = together[2];
  const threshold = probe.pRf[3] * (1 - 1e-3);
  for (const mode of ['block', 'reflect']) {
    const [a, b] = [await answer(dDev, questions[2], 16, { mode, threshold }), await answer(dCpu, questions[2], 16, { mode, threshold })];
    const same = a.text === b.text && a.finishReason === b.finishReason && a.flagIndex === b.flagIndex && a.pRf.length === b.pRf.length;
    check(same && b.flagIndex >= 0 && b.flagIndex <= 3, `mode ${mode}: the answer, where it was flagged and how it ended equal the CPU's`, {
      device: { text: a.text, finishReason: a.finishReason, flagIndex: a.flagIndex }, cpu: { text: b.text, finishReason: b.finishReason, flagIndex: b.flagIndex },
    });
  }

  // A stop string from the middle of the CPU's answer: the same text, cut at the same place, on
  // the device (whose overlapped step guessed past it). Then a request cancelled after its third
  // token: it throws the AbortError, its KV cache is released, and the next answer is the CPU's.
  const full = together[3];
  const stopAt = full.text.slice(Math.floor(full.text.length / 2), Math.floor(full.text.length / 2) + 3);
  const [stopDev, stopCpu] = [await answer(dDev, questions[3], 16, { stop: [stopAt] }), await answer(dCpu, questions[3], 16, { stop: [stopAt] })];
  check(stopAt.length === 3 && stopDev.text === stopCpu.text && stopDev.finishReason === 'stop' && stopCpu.finishReason === 'stop' && stopDev.text.length < full.text.length,
    'a stop string ends the device\'s answer where it ends the CPU\'s', { stop: stopAt, device: stopDev.text, cpu: stopCpu.text, finishReason: stopDev.finishReason });
  const controller = new AbortController();
  const cancelled = dDev.generate(questions[4], { maxTokens: 64, signal: controller.signal });
  let seen = 0;
  const thrown = await (async () => {
    for await (const _t of cancelled) if (++seen === 3) controller.abort();
  })().then(() => null, (e) => e);
  await cancelled.done.catch(() => undefined);
  const again = await answer(dDev, questions[4], 16);
  const againCpu = await answer(dCpu, questions[4], 16);
  // The scheduler lets go of a request at its next step, after `done` has settled (with
  // overlapped steps, once the step it guessed ahead has come back): wait for it to be idle.
  let after = dDev.stats();
  for (const t0 = Date.now(); (after.active > 0 || after.kvCacheBytes > 0) && Date.now() - t0 < 60_000; after = dDev.stats()) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  check(thrown?.name === 'AbortError' && seen === 3 && after.active === 0 && after.kvCacheBytes === 0 && again.text === againCpu.text,
    'a cancelled request stops with AbortError and releases its KV cache; the next answer is the CPU\'s', {
      error: String(thrown), tokensSeen: seen, active: after.active, kvCacheBytes: after.kvCacheBytes,
    });

  server = await serve({ detector: dDev, port: 0, modelName: 'e2e' });
  cpuServer = await serve({ detector: dCpu, port: 0, modelName: 'e2e' });
  const post = async (srv, path, payload) =>
    fetch(`${srv.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload) });
  const chat = { model: 'e2e', messages: questions[1], max_tokens: 16 };
  const expected = await answer(dCpu, questions[1], 16);
  const whole = await (await post(server, '/v1/chat/completions', chat)).json();
  check(whole.choices?.[0]?.message?.content === expected.text, 'the server answers as the CPU detector');
  const streamed = await (await post(server, '/v1/chat/completions', { ...chat, stream: true })).text();
  const text = streamed.split('\n').filter((l) => l.startsWith('data: {')).map((l) => JSON.parse(l.slice(6)).choices?.[0]?.delta?.content ?? '').join('');
  check(text === expected.text, 'the server streams what the CPU detector answers');
  const moderation = { input: 'How do I bake bread without yeast?' };
  const [md, mc] = [await (await post(server, '/v1/moderations', moderation)).json(), await (await post(cpuServer, '/v1/moderations', moderation)).json()];
  const modDev = md.results?.[0]?.category_scores?.red_flag, modCpu = mc.results?.[0]?.category_scores?.red_flag;
  check(Number.isFinite(modDev) && Math.abs(modDev - modCpu) <= 1e-4 * modCpu, "/v1/moderations scores as on the CPU", { device: modDev, cpu: modCpu });

  // Sequence.truncate: 40 tokens (three 16-token blocks) cut back to 5 and continued compute
  // what a fresh sequence of the same 5 + 12 tokens computes; the cut frees two blocks, and the
  // 12 tokens overwrite the cut ones.
  const head = [...seq, ...seq].slice(0, 40), rest = head.slice(22, 34); // rest: other tokens than the cut ones
  const continued = async (m, cut) => {
    const s = m.newSequence();
    try {
      let freed = true;
      if (cut) {
        await m.forward([s], [head]);
        const before = s.bytes;
        s.truncate(5);
        freed = s.length === 5 && (m.device.kind !== 'cuda' || s.bytes < before); // the CPU's cache keeps its capacity
      } else await m.forward([s], [head.slice(0, 5)]);
      return { logits: await m.forward([s], [rest], { all: true }), freed };
    } finally {
      s.dispose();
    }
  };
  const [cutDev, freshDev, cutCpu] = [await continued(dev, true), await continued(dev, false), await continued(cpu, true)];
  const eCut = relL2(cutDev.logits, freshDev.logits), eCutCpu = relL2(cutDev.logits, cutCpu.logits);
  check(cutDev.freed && eCut <= 1e-4 && eCutCpu <= 1e-4, 'a truncated sequence continues as a fresh one, and as on the CPU', {
    relL2Fresh: eCut, relL2Cpu: eCutCpu, blocksFreed: cutDev.freed,
  });

  // An adapter as training saves it: LoRA (rank 4) on every projection of both layers and the
  // <rf> rows, random, large enough to move the logits. Live (the engine's add_lora: the factors
  // beside the weights) on the device and the CPU, and merged into a second device model's weights.
  const rng = createRng(11);
  const uniform = (n, a) => Float32Array.from({ length: n }, () => (rng() * 2 - 1) * a);
  const H = dev.config.hiddenSize, rank = 4;
  const modules = [];
  for (let layer = 0; layer < dev.config.numLayers; layer++) {
    for (const site of loraSites(dev.config)) {
      modules.push({ layer, site: site.site, inFeatures: site.inFeatures, outFeatures: site.outFeatures,
        A: uniform(rank * site.inFeatures, 0.2), B: uniform(site.outFeatures * rank, 0.2) });
    }
  }
  const adapterDir = join(dir, 'adapter');
  await saveAdapter(adapterDir, {
    rank, alpha: 8, dropout: 0, rslora: false, targets: loraSites(dev.config).map((x) => x.site.split('.')[1]), modules,
    redFlag: { tokenId: dev.redFlagTokenId, categories: [], embed: uniform(H, 0.5), head: uniform(H, 0.5), baseEmbed: new Float32Array(H), baseHead: new Float32Array(H) },
    baseModel: dir, config: dev.config,
  });
  const lBase = await cpu.logits(prompt);
  for (const m of [dev, cpu]) await applyAdapter(m, adapterDir);
  merged = await loadModel(dir, { device, dtype: 'f32', threads: 2 });
  await addRedFlagToken(merged);
  if (device === 'cuda') await applyAdapter(merged, adapterDir, { merge: true });
  else await applyAdapter(merged, adapterDir);
  const [lDev, lCpu, lMerged] = [await dev.logits(prompt), await cpu.logits(prompt), await merged.logits(prompt)];
  const eLive = relL2(lDev, lCpu), eMerged = relL2(lMerged, lCpu), moved = relL2(lBase, lCpu);
  check(moved > 1e-2 && eLive <= 1e-4, 'logits with the adapter live equal the CPU engine', { relL2: eLive, adapterMoved: moved });
  check(eMerged <= 1e-4, 'logits with the adapter merged equal the CPU engine with it live', { relL2: eMerged });
  const [aDev, aCpu, aMerged] = [await scores(dev), await scores(cpu), await scores(merged)];
  const worstLive = relMax(aDev, aCpu), worstMerged = relMax(aMerged, aCpu);
  check(worstLive <= 1e-4 && worstMerged <= 1e-4, 'teacher-forced p(<rf>) with the adapter (live, merged) equals the CPU engine', {
    worstRelLive: worstLive, worstRelMerged: worstMerged,
  });
  for (const [i, p] of prompts.slice(0, 2).entries()) {
    const ids = dev.tokenizer.encode(p);
    const take = async (m) => {
      const out = [];
      for await (const t of m.generate(ids, { maxTokens: 16 })) out.push(t.id);
      return out.join();
    };
    const [a, b, c] = [await take(dev), await take(cpu), await take(merged)];
    check(a === b && c === b, `greedy generation ${i} with the adapter (live, merged) equals the CPU engine`, a === b && c === b ? {} : { live: a, merged: c, cpu: b });
  }

  // Out of device memory, on purpose (the addon's cudaSetMemoryLimit: past it an allocation
  // fails as on a full GPU): a model that does not fit is refused before its weights are read, a
  // KV cache that does not fit when the detector is created, and concurrent requests whose
  // batched steps do not fit are split into steps that do, each answer what it is alone.
  if (dev.device.kind === 'cuda') {
    const native = loadNative('cuda');
    try {
      const base = native.cudaMemory(0).held;
      native.cudaSetMemoryLimit(base + 2 ** 20);
      const tooBig = await loadModel(dir, { device, dtype: 'f32', threads: 2 }).then((m) => (m.dispose(), null), (error) => error);
      check(tooBig?.code === 'OUT_OF_MEMORY' && /the weights/.test(tooBig.message) && native.cudaMemory(0).held === base,
        'a model that does not fit fails to load with OUT_OF_MEMORY, naming the weights, and holds nothing', { message: String(tooBig?.message) });
      native.cudaSetMemoryLimit(0);
      tight = await loadModel(dir, { device, dtype: 'f32', threads: 2 });
      await addRedFlagToken(tight);
      const held = native.cudaMemory(0).held;
      native.cudaSetMemoryLimit(held + 2 ** 20);
      const memory = tight.deviceMemory();
      check(memory?.total > 0 && memory.held === held && memory.free <= 2 ** 20, "the model reports its GPU's memory, the free bytes cut to redflag's cap", { memory });
      const kv = await createDetector({ model: tight, threshold: 1, mode: 'flag', kvCacheBytes: 64 * 2 ** 20 }).then(async (d) => (await d.dispose(), null), (error) => error);
      check(kv?.code === 'OUT_OF_MEMORY' && /kvCacheBytes/.test(kv.message), 'a KV cache that does not fit fails createDetector with OUT_OF_MEMORY', { message: String(kv?.message) });
      native.cudaSetMemoryLimit(0);
      const d = await createDetector({ model: tight, threshold: 1, mode: 'flag', kvCacheBytes: 32 * 2 ** 20 });
      detectors.push(d);
      const asked = questions.slice(0, 4);
      const alone = [];
      for (const q of asked) alone.push(await answer(d, q, 12));
      native.cudaSetMemoryLimit(native.cudaMemory(0).held); // no buffer may grow past what one request alone used
      const together = await Promise.all(asked.map((q) => answer(d, q, 12)));
      native.cudaSetMemoryLimit(0);
      const worst = Math.max(...together.map((t, i) => (t.pRf.length === alone[i].pRf.length ? relMax(t.pRf, alone[i].pRf) : Infinity)));
      check(together.every((t, i) => t.text === alone[i].text) && worst <= 1e-5 && d.stats().oomSplits > 0,
        'out of device memory, batched steps are split and every answer equals the one alone', { oomSplits: d.stats().oomSplits, maxPRfRel: worst });
      // An adapter whose factors do not all fit: none of it stays applied.
      const lPlain = await tight.logits(prompt);
      native.cudaSetMemoryLimit(native.cudaMemory(0).held + 16 * 1024);
      const half = await applyAdapter(tight, adapterDir).then(() => null, (error) => error);
      native.cudaSetMemoryLimit(0);
      const lAfter = await tight.logits(prompt);
      check(half?.code === 'OUT_OF_MEMORY' && relL2(lAfter, lPlain) === 0, 'an adapter that does not fit fails applyAdapter with OUT_OF_MEMORY and leaves none of it applied', {
        message: String(half?.message), relL2: relL2(lAfter, lPlain),
      });
      // kvCacheBytes 'auto', last: its probe grows the engine's buffers to a full step's.
      await d.dispose();
      native.cudaSetMemoryLimit(1); // no room for anything: the probe's pool fails
      const noStep = await createDetector({ model: tight, threshold: 1, mode: 'flag' }).then(async (d) => (await d.dispose(), null), (error) => error);
      check(noStep?.code === 'OUT_OF_MEMORY' && /sizing the KV cache/.test(noStep.message) && /maxStepTokens/.test(noStep.message),
        "kvCacheBytes 'auto' with no room for a step says so", { message: String(noStep?.message) });
      // 'auto' under redflag's cap with gpuMemoryFraction 1: the cache takes all the cap leaves
      // after the weights and a step, to the block.
      const block = tight.kvBlockTokens * tight.kvBytesPerPosition;
      native.cudaSetMemoryLimit(native.cudaMemory(0).held + 48 * 2 ** 20);
      const auto = await createDetector({ model: tight, threshold: 1, mode: 'flag', kvCacheBytes: 'auto', gpuMemoryFraction: 1 });
      const [autoBudget, autoLeft] = [auto.stats().kvCacheBudget, native.cudaMemory(0).free];
      const autoAnswer = await answer(auto, questions[0], 12);
      await auto.dispose();
      native.cudaSetMemoryLimit(0);
      check(autoBudget >= 16 * 2 ** 20 && autoBudget % block === 0 && autoLeft < block, "kvCacheBytes 'auto' takes what the cap leaves after the weights and a step, in whole blocks", {
        budget: autoBudget, left: autoLeft, block,
      });
      const noRoom = await createDetector({ model: tight, threshold: 1, mode: 'flag', gpuMemoryFraction: 0.01 }).then(async (d) => (await d.dispose(), null), (error) => error);
      check(noRoom?.code === 'OUT_OF_MEMORY' && /no GPU memory is left for the KV cache/.test(noRoom.message), "kvCacheBytes 'auto' with no room left for a block says so", { message: String(noRoom?.message) });
      check(autoAnswer.text === alone[0].text && relMax(autoAnswer.pRf, alone[0].pRf) <= 1e-6, "a detector with the 'auto' cache answers as one with a fixed cache");
    } finally {
      native.cudaSetMemoryLimit(0);
    }

    // Last, for the process's CUDA context stays lost: the GPU fails mid-request (cudaLoseContext:
    // a kernel traps, as after any fault in a kernel). The running request fails with
    // DEVICE_FAILED, so does every later one, the server's /health answers 503 failed and its
    // requests 503 device_failed; freeing every model afterwards is clean (the finally below).
    const stream = dDev.generate(questions[2], { maxTokens: 64 });
    const tokens = stream[Symbol.asyncIterator]();
    const first = await tokens.next();
    const trapped = await dev.runNative(() => native.cudaLoseContext(0)); // between two of its steps (the emulation is one thread)
    const failure = await stream.done.then(() => null, (error) => error);
    await (async () => {
      for (;;) if ((await tokens.next()).done) return;
    })().catch(() => {});
    const later = await dDev.generate(questions[3], { maxTokens: 4 }).done.then(() => null, (error) => error);
    const health = await fetch(`${server.url}/health`);
    const healthBody = await health.json();
    const chatAfter = await post(server, '/v1/chat/completions', chat);
    const chatBody = await chatAfter.json();
    check(!first.done && trapped === 'cudaErrorLaunchFailure' && failure?.code === 'DEVICE_FAILED' && /cuda:0 failed/.test(failure.message) &&
      later?.code === 'DEVICE_FAILED' && dDev.stats().deviceFailed && health.status === 503 && healthBody.status === 'failed' &&
      chatAfter.status === 503 && chatBody.error?.code === 'device_failed',
      'a GPU that fails: the running request and every later one fail with DEVICE_FAILED, /health answers 503 failed', {
        trapped, failure: String(failure?.message), later: String(later?.code), health: healthBody, chat: chatBody,
      });
  }
} catch (error) {
  check(false, 'ran without an error', { error: String(error?.stack ?? error) });
} finally {
  await server?.close();
  await cpuServer?.close();
  for (const d of detectors) await d.dispose();
  dev?.dispose();
  merged?.dispose();
  tight?.dispose();
  cpu?.dispose();
  await rm(dir, { recursive: true, force: true });
}
finish('e2e', device);
