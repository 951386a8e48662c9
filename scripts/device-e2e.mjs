// The library end to end on one device against the CPU: `node scripts/device-e2e.mjs --device cuda`
// (the GPU machine's check, run by scripts/gpu-check.sh with a carried node and the production
// node_modules; it needs only dist/ and production dependencies). On a random-weight Llama with
// the packaged tokenizer and a red-flag token, f32 on both engines:
//   - logits of a prompt: relative L2 <= 1e-4 against the CPU;
//   - greedy generation of 4 prompts: the CPU's tokens;
//   - teacher-forced flag scores: within 1e-5;
//   - the detector with continuous batching (8 requests at once, mode flag): each answer equals
//     the CPU detector's, and its p(<rf>) within 1e-5;
//   - the OpenAI-compatible server over HTTP: chat completions (whole and streamed) equal the
//     detector's answer, and /v1/moderations' score within 1e-5 of the CPU's.
// Prints one JSON object; exits 1 when a check fails. `--device cpu` runs the harness against
// the CPU itself (how it is tested where no GPU is).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { addRedFlagToken, createDetector, loadModel, serve, writeRandomModel } from '../dist/index.js';
import { packagedTokenizer } from '../dist/train/pipeline.js';

const device = process.argv.includes('--device') ? process.argv[process.argv.indexOf('--device') + 1] : 'cuda';
const checks = [];
const check = (ok, what, detail = {}) => checks.push({ ok: Boolean(ok), what, ...detail });

function relL2(a, b) {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / (den || 1e-300));
}

async function answer(detector, messages, maxTokens) {
  const stream = detector.generate(messages, { maxTokens });
  const pRf = [];
  for await (const t of stream) pRf.push(t.pRf);
  return { ...(await stream.done), pRf };
}

const dir = await mkdtemp(join(tmpdir(), 'redflag-device-e2e-'));
let cpu;
let dev;
let server;
let cpuServer;
const detectors = [];
try {
  const tokenizer = await packagedTokenizer();
  await writeRandomModel(dir, {
    architecture: 'llama', vocabSize: 32000, hiddenSize: 128, intermediateSize: 256, numLayers: 2, numHeads: 4, numKvHeads: 2,
    seed: 5, bosTokenId: 1, eosTokenId: 2, tokenizer,
  }, { overwrite: true });
  cpu = await loadModel(dir, { threads: 2 });
  dev = await loadModel(dir, { device, dtype: 'f32', threads: 2 });
  for (const m of [cpu, dev]) await addRedFlagToken(m);
  check(dev.device.name === (device === 'cuda' ? 'cuda:0' : device), 'the model runs where it was asked to', { device: dev.device.name });

  const prompt = dev.tokenizer.encode('The river runs through a valley where birds sing and old stones keep the memory of rain');
  const e = relL2(await dev.logits(prompt), await cpu.logits(prompt));
  check(e <= 1e-4, 'logits equal the CPU engine', { relL2: e });

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
  const [sd, sc] = [await scores(dev), await scores(cpu)];
  const worst = Math.max(...Array.from(sd, (v, i) => Math.abs(v - sc[i])));
  check(worst <= 1e-5, 'teacher-forced p(<rf>) equals the CPU engine', { worstAbs: worst });

  const [dDev, dCpu] = [await createDetector({ model: dev, threshold: 1, mode: 'flag' }), await createDetector({ model: cpu, threshold: 1, mode: 'flag' })];
  detectors.push(dDev, dCpu);
  const questions = Array.from({ length: 8 }, (_, i) => [{ role: 'user', content: `Question ${i}: ${'why is the sky blue? '.repeat(1 + (i % 4))}` }]);
  const together = await Promise.all(questions.map((q) => answer(dDev, q, 16)));
  for (const [i, q] of questions.entries()) {
    const alone = await answer(dCpu, q, 16);
    const dp = Math.max(0, ...together[i].pRf.map((v, j) => Math.abs(v - (alone.pRf[j] ?? Infinity))));
    check(together[i].text === alone.text && dp <= 1e-5, `detector answer ${i} (batched) equals the CPU's alone`, { maxPRfDiff: dp });
  }

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
  check(Number.isFinite(modDev) && Math.abs(modDev - modCpu) <= 1e-5, "/v1/moderations scores as on the CPU", { device: modDev, cpu: modCpu });
} catch (error) {
  check(false, 'ran without an error', { error: String(error?.stack ?? error) });
} finally {
  await server?.close();
  await cpuServer?.close();
  for (const d of detectors) await d.dispose();
  dev?.dispose();
  cpu?.dispose();
  await rm(dir, { recursive: true, force: true });
}
const failed = checks.filter((c) => !c.ok);
console.log(JSON.stringify({ e2e: device, passed: checks.length - failed.length, failed: failed.length, checks }, null, 1));
process.exit(failed.length ? 1 : 0);
