// The command line, run as a user would (through tsx, so no build step is needed).
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { execFile, spawn } from 'node:child_process';
import { cp, readFile, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { FIXTURES } from './helpers/fixtures.js';
import { tinyLlama } from './helpers/tiny-model.js';

const exec = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], {
      cwd: ROOT,
      timeout: 60_000,
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

const TEMPLATE = "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
let dir: string;
beforeAll(async () => {
  dir = await tinyLlama({}, TEMPLATE);
});
afterAll(async () => rm(dir, { recursive: true, force: true }));

describe('redflag CLI', () => {
  it('info --json describes a model', async () => {
    const { code, stdout } = await cli('info', '--model', join(FIXTURES, 'qwen2-bias'), '--json');
    expect(code).toBe(0);
    const info = JSON.parse(stdout);
    expect(info).toMatchObject({ architecture: 'Qwen2ForCausalLM', layers: 2, heads: 4, kvHeads: 2, tiedEmbeddings: true, tokenizer: null });
    // K and V of every layer in f32: 2 * layers * kvHeads * headDim * 4 bytes.
    expect(info.engine.kvBytesPerPosition).toBe(2 * info.layers * info.kvHeads * info.headDim * 4);
  });

  it('info prints a readable summary', async () => {
    const { code, stdout } = await cli('info', '--model', dir);
    expect(code).toBe(0);
    expect(stdout).toMatch(/LlamaForCausalLM/);
    expect(stdout).toMatch(/tokenizer: 32000 tokens, chat template/);
  });

  it('info --adapter says what an adapter adapts, at which ranks (PEFT\'s per-module forms included)', async () => {
    const { loadModel } = await import('../lib/model/model.js');
    const { loraSites, moduleLora, saveAdapter, selectModules } = await import('../lib/train/adapter.js');
    const fixture = join(FIXTURES, 'llama-gqa');
    const model = await loadModel(fixture, { threads: 1 });
    const config = model.config;
    model.dispose();
    const adapter = {
      rank: 4, alpha: 8, dropout: 0, rslora: false, targets: '.*\\.(q_proj|v_proj)', rankPattern: { v_proj: 2 },
      modules: [] as import('../lib/train/adapter.js').LoraModuleWeights[], redFlag: null, baseModel: '', config,
    };
    for (const { layer, site } of selectModules(config, adapter.targets, null)) {
      const { inFeatures, outFeatures } = loraSites(config).find((s) => s.site === site)!;
      const { rank } = moduleLora(adapter, layer, site);
      adapter.modules.push({ layer, site, inFeatures, outFeatures, A: new Float32Array(rank * inFeatures).fill(0.01), B: new Float32Array(outFeatures * rank).fill(0.01) });
    }
    const adapterDir = join(dir, 'pattern-adapter');
    await saveAdapter(adapterDir, adapter);

    const json = await cli('info', '--model', fixture, '--adapter', adapterDir, '--json');
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout).adapter).toMatchObject({
      dir: adapterDir, targets: adapter.targets, rankPattern: { v_proj: 2 }, exclude: null, layers: [0, 1], sites: ['self_attn.q_proj', 'self_attn.v_proj'],
      groups: [
        { rank: 4, alpha: 8, scale: 2, modules: ['0/self_attn.q_proj', '1/self_attn.q_proj'] },
        { rank: 2, alpha: 8, scale: 4, modules: ['0/self_attn.v_proj', '1/self_attn.v_proj'] },
      ],
      redFlag: null,
    });
    const text = await cli('info', '--model', fixture, '--adapter', adapterDir);
    expect(text.stdout).toMatch(/adapter .*pattern-adapter: LoRA on 4 modules \(layers 0, 1; self_attn\.q_proj, self_attn\.v_proj\), no <rf> rows\n/);
    expect(text.stdout).toMatch(/ {4}rank 2, alpha 8 \(scale 4\): 0\/self_attn\.v_proj, 1\/self_attn\.v_proj\n/);
    // An adapter for another model: the loader's error, naming the file.
    const other = await cli('info', '--model', join(FIXTURES, 'gpt2'), '--adapter', adapterDir);
    expect(other.code).toBe(1);
    expect(other.stderr).toMatch(/redflag: .*adapter_config\.json: "fan_in_fan_out"/);
  });

  it('merge writes the base with an adapter folded in: the logits of the adapter applied live; never over a model without --overwrite', async () => {
    const { loadModel } = await import('../lib/model/model.js');
    const { applyAdapter } = await import('../lib/train/export.js');
    const { loraSites, saveAdapter, selectModules } = await import('../lib/train/adapter.js');
    const fixture = join(FIXTURES, 'llama-gqa');
    const model = await loadModel(fixture, { threads: 1 });
    try {
      const config = model.config;
      const adapter = {
        rank: 2, alpha: 4, dropout: 0, rslora: false, targets: ['q_proj', 'down_proj'],
        modules: [] as import('../lib/train/adapter.js').LoraModuleWeights[], redFlag: null, baseModel: '', config,
      };
      let k = 0;
      const values = (n: number) => Float32Array.from({ length: n }, () => Math.sin(++k) * 0.05);
      for (const { layer, site } of selectModules(config, adapter.targets, null)) {
        const { inFeatures, outFeatures } = loraSites(config).find((s) => s.site === site)!;
        adapter.modules.push({ layer, site, inFeatures, outFeatures, A: values(2 * inFeatures), B: values(outFeatures * 2) });
      }
      const adapterDir = join(dir, 'merge-adapter');
      await saveAdapter(adapterDir, adapter);
      const out = join(dir, 'merged');
      const merged = await cli('merge', '--model', fixture, '--adapter', adapterDir, '--output', out);
      expect(merged.code).toBe(0);
      expect(merged.stderr).toMatch(/merged .*merge-adapter into .*llama-gqa: .*merged \([\d.]+ s\)/);

      const ids = [1, 5, 9, 2, 7];
      await applyAdapter(model, adapterDir);
      const want = await model.logits(ids);
      const folded = await loadModel(out, { threads: 1 });
      const got = await folded.logits(ids);
      folded.dispose();
      let num = 0, den = 0;
      for (let i = 0; i < want.length; i++) {
        num += (got[i]! - want[i]!) ** 2;
        den += want[i]! ** 2;
      }
      expect(Math.sqrt(num / den)).toBeLessThan(1e-5); // W + sBA formed once vs applied per call
      expect(Math.sqrt(num / den)).toBeGreaterThan(0); // and the adapter did change something

      const again = await cli('merge', '--model', fixture, '--adapter', adapterDir, '--output', out);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/redflag: .*merged is not empty; .*--overwrite/);
      expect((await cli('merge', '--model', fixture, '--adapter', adapterDir, '--output', out, '--overwrite')).code).toBe(0);
      const self = await cli('merge', '--model', fixture, '--adapter', adapterDir, '--output', `${fixture}/`, '--overwrite');
      expect(self.code).toBe(1);
      expect(self.stderr).toMatch(/would replace the base model it is made from/);
      // Through a link to it too (a copy of the fixture, so a failure cannot harm the fixture).
      const copy = join(dir, 'base-copy');
      await cp(fixture, copy, { recursive: true });
      await symlink(copy, join(dir, 'base-link'));
      const weights = await readFile(join(copy, 'model.safetensors'));
      const linked = await cli('merge', '--model', copy, '--adapter', adapterDir, '--output', join(dir, 'base-link'), '--overwrite');
      expect(linked.code).toBe(1);
      expect(linked.stderr).toMatch(/would replace the base model it is made from/);
      expect((await readFile(join(copy, 'model.safetensors'))).equals(weights)).toBe(true);
      // An output that is a file: one line, no stack trace.
      const file = await cli('merge', '--model', fixture, '--adapter', adapterDir, '--output', join(copy, 'config.json'));
      expect(file.code).toBe(1);
      expect(file.stderr).toMatch(/^redflag: EEXIST: file already exists, mkdir .*config\.json'\n$/);
    } finally {
      model.dispose();
    }
  });

  it('generate --chat streams text equal to the library’s greedy output', async () => {
    const { code, stdout, stderr } = await cli('generate', '--model', dir, '--prompt', 'Hello there', '--chat', '-n', '8');
    expect(code).toBe(0);
    expect(stderr).toMatch(/\[8 tokens, [\d.]+ tokens\/s/);
    const { loadModel } = await import('../lib/model/model.js');
    const model = await loadModel(dir);
    const ids = model.tokenizer!.encodeChat([{ role: 'user', content: 'Hello there' }], { addGenerationPrompt: true });
    let text = '';
    for await (const t of model.generate(ids, { maxTokens: 8 })) text += t.text;
    model.dispose();
    expect(stdout).toBe(text + '\n');
  });

  it('--chat-template-kwargs renders the template with them; a value that is not a JSON object is refused by name', async () => {
    const templated = await tinyLlama({}, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant{% if terse %} terse{% endif %}]{% endif %}");
    try {
      const { code, stdout } = await cli('generate', '--model', templated, '--prompt', 'Hello there', '--chat', '-n', '4', '--chat-template-kwargs', '{"terse": true}');
      expect(code).toBe(0);
      const { loadModel } = await import('../lib/model/model.js');
      const model = await loadModel(templated, { chatTemplateKwargs: { terse: true } });
      const ids = model.tokenizer!.encodeChat([{ role: 'user', content: 'Hello there' }], { addGenerationPrompt: true });
      expect(model.tokenizer!.decode(ids).endsWith('[assistant terse]')).toBe(true);
      let text = '';
      for await (const t of model.generate(ids, { maxTokens: 4 })) text += t.text;
      model.dispose();
      expect(stdout).toBe(text + '\n');
    } finally {
      await rm(templated, { recursive: true, force: true });
    }
    for (const bad of ['{"terse": tru', '[1]']) {
      const refused = await cli('generate', '--model', dir, '--prompt', 'x', '--chat', '--chat-template-kwargs', bad);
      expect(refused.code).not.toBe(0);
      expect(refused.stderr).toMatch(/--chat-template-kwargs/);
    }
    // The reports' escape hatch is a flag too.
    for (const command of ['eval', 'study']) expect((await cli(command, '--help')).stdout).toMatch(/--overwrite/);
  });

  it('generate piped into a reader that stops early ends quietly, exit code 0', async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'generate', '--model', dir, '--prompt', 'hi', '-n', '2000'], { cwd: ROOT });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    // Read the first bytes, then close the pipe, as `| head -c 20` does.
    await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
    child.stdout.destroy();
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    expect(stderr).not.toMatch(/EPIPE|Error/);
    expect(code).toBe(0);
  });

  it('fails with a clear message and exit code 1 on bad input', async () => {
    const missing = await cli('info', '--model', join(FIXTURES, 'no-such-model'));
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/redflag: .*no-such-model/);
    const noTokenizer = await cli('generate', '--model', join(FIXTURES, 'gpt2'), '--prompt', 'x');
    expect(noTokenizer.code).toBe(1);
    expect(noTokenizer.stderr).toMatch(/no tokenizer\.json/);
    const badFlag = await cli('generate', '--model', dir, '--prompt', 'x', '--temperature', '-2');
    expect(badFlag.code).not.toBe(0);
    expect(badFlag.stderr).toMatch(/temperature/);
    const topP = await cli('generate', '--model', dir, '--prompt', 'x', '--top-p', '0');
    expect(topP.stderr).toMatch(/top-p must be a number in \(0, 1\]/);
    const system = await cli('generate', '--model', dir, '--prompt', 'x', '--system', 'Be brief.');
    expect(system.code).toBe(1);
    expect(system.stderr).toMatch(/--system goes into the chat template: add --chat/);
  });

  it('serve answers over HTTP with the API key, refuses without it, and exits 0 on SIGINT', async () => {
    const { loadModel } = await import('../lib/model/model.js');
    const { addRedFlagToken } = await import('../lib/model/red-flag.js');
    const rfDir = `${dir}-rf`;
    const model = await loadModel(dir);
    await addRedFlagToken(model);
    await model.save(rfDir);
    model.dispose();
    const badKv = await cli('serve', '--model', rfDir, '--kv-cache-mb', 'lots');
    expect(badKv.code).not.toBe(0);
    expect(badKv.stderr).toMatch(/kv-cache-mb must be 'auto' or an integer/);
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'serve', '--model', rfDir, '--port', '0', '--threads', '1',
      '--kv-cache-mb', '64', '--max-batch', '4', '--max-step-tokens', '64', '--gpu-memory-fraction', '0.5', '--overlap-steps', '--served-model-name', 'x'], {
      cwd: ROOT,
      env: { ...process.env, REDFLAG_API_KEY: 'sk-cli' },
    });
    try {
      let out = '';
      const url = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no URL printed: ${out}`)), 60_000);
        child.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /at (http:\/\/127\.0\.0\.1:\d+)/.exec(out);
          if (m) {
            clearTimeout(timer);
            resolve(m[1]!);
          }
        });
        child.on('exit', (code) => reject(new Error(`serve exited with ${code}: ${out}`)));
      });
      expect((await fetch(`${url}/health`)).status).toBe(401);
      const health = await fetch(`${url}/health`, { headers: { authorization: 'Bearer sk-cli' } });
      expect(health.status).toBe(200);
      expect(await health.json()).toMatchObject({ status: 'ok', active: 0 });
      const metrics = await (await fetch(`${url}/metrics`, { headers: { authorization: 'Bearer sk-cli' } })).text();
      expect(metrics).toMatch(/^redflag_kv_cache_budget_bytes 67108864$/m);
      // --overlap-steps: the answer's steps overlap, and one guess past its end is dropped.
      const chat = await fetch(`${url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: 'Bearer sk-cli', 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'x', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 3 }),
      });
      expect(chat.status).toBe(200);
      await vi.waitFor(async () => {
        const m = await (await fetch(`${url}/metrics`, { headers: { authorization: 'Bearer sk-cli' } })).text();
        expect(m).toMatch(/^redflag_guesses_dropped_total 1$/m);
      });
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      child.kill('SIGINT');
      expect(await exited).toBe(0);
    } finally {
      child.kill('SIGKILL');
      await rm(rfDir, { recursive: true, force: true });
    }
  }, 90_000);
});
