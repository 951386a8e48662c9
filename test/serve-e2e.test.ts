// The server with the real detector (a small random-weight Llama with <rf>) and the `openai`
// npm client on 127.0.0.1: streaming and not, moderation, cancellation by disconnect, and 32
// concurrent requests that each finish with what they give alone while the event loop stays
// responsive.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rm } from 'node:fs/promises';
import OpenAI from 'openai';

import { createDetector } from '../lib/detect/detector.js';
import type { Detector } from '../lib/detect/types.js';
import { loadModel, type Model } from '../lib/model/model.js';
import { addRedFlagToken } from '../lib/model/red-flag.js';
import { serve } from '../lib/server/serve.js';
import { tinyLlama } from './helpers/tiny-model.js';

let dir: string;
let model: Model;
let detector: Detector;
let server: { url: string; close(): Promise<void> };
let client: OpenAI;

beforeAll(async () => {
  dir = await tinyLlama();
  model = await loadModel(dir, { threads: 2 });
  await addRedFlagToken(model);
  // p(<rf>) of this random model is about 1/vocab: threshold 1e-3 never blocks here; the
  // moderation test lowers it per request through classify's scores instead.
  detector = await createDetector({ model, threshold: 1e-3, mode: 'block' });
  server = await serve({ detector, port: 0, modelName: 'tiny', apiKey: 'sk-test' });
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'sk-test', maxRetries: 0 });
});
afterAll(async () => {
  await server?.close();
  await detector?.dispose();
  model?.dispose();
  await rm(dir, { recursive: true, force: true });
});

const question = (i: number) => [{ role: 'user' as const, content: `Question ${i}: ${'why is the sky blue? '.repeat(1 + (i % 4))}` }];

describe('the server with the real detector', () => {
  it('answers as the detector does, streamed and not', async () => {
    const direct = detector.generate(question(0), { maxTokens: 12 });
    for await (const _ of direct);
    const expected = await direct.done;
    const completion = await client.chat.completions.create({ model: 'tiny', messages: question(0), max_tokens: 12, logprobs: true });
    const choice = completion.choices[0]!;
    expect(choice.message.content).toBe(expected.text);
    expect(choice.finish_reason).toBe(expected.finishReason);
    expect(completion.usage).toMatchObject({ prompt_tokens: expected.promptTokens, completion_tokens: expected.completionTokens });
    const filter = (choice as unknown as { content_filter_results: { red_flag: { filtered: boolean; detected: boolean; score: number } } })
      .content_filter_results.red_flag;
    expect(filter).toEqual({ filtered: false, detected: false, score: expect.closeTo(expected.maxPRf, 6) });
    expect(choice.logprobs!.content!.map((l) => l.token).join('')).toBe(expected.text);

    const stream = await client.chat.completions.create({ model: 'tiny', messages: question(0), max_tokens: 12, stream: true });
    let text = '';
    let finish: string | null = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    expect(text).toBe(expected.text);
    expect(finish).toBe(expected.finishReason);
  });

  it('continues raw text on /v1/completions as the detector does, with legacy logprobs', async () => {
    const prompt = 'The sky is blue because';
    const direct = detector.generate(prompt, { maxTokens: 10 });
    const tokens: string[] = [];
    for await (const t of direct) if (t.text !== '') tokens.push(t.text);
    const expected = await direct.done;
    const completion = await client.completions.create({ model: 'tiny', prompt, max_tokens: 10, logprobs: 2 });
    const choice = completion.choices[0]!;
    expect(choice.text).toBe(expected.text);
    expect(choice.finish_reason).toBe(expected.finishReason);
    expect(completion.usage).toMatchObject({ prompt_tokens: expected.promptTokens, completion_tokens: expected.completionTokens });
    expect(choice.logprobs!.tokens).toEqual(tokens);
    // Greedy: the chosen token is the likeliest, so it leads its alternatives.
    for (const [i, top] of choice.logprobs!.top_logprobs!.entries()) {
      expect(Object.keys(top).length).toBeGreaterThanOrEqual(1);
      expect(Math.max(...Object.values(top))).toBeCloseTo(choice.logprobs!.token_logprobs![i]!, 5);
    }
    const stream = await client.completions.create({ model: 'tiny', prompt, max_tokens: 10, stream: true });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.text ?? '';
    expect(text).toBe(expected.text);
  });

  it('blocks with content_filter when p(<rf>) reaches the threshold', async () => {
    // Per-request threshold is not an OpenAI field: a second detector with threshold 0 blocks at once.
    const strict = await createDetector({ model, threshold: 0, mode: 'block' });
    const s = await serve({ detector: strict, port: 0, modelName: 'strict' });
    try {
      const c = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'none', maxRetries: 0 });
      const r = await c.chat.completions.create({ model: 'strict', messages: question(1), max_tokens: 8 });
      expect(r.choices[0]!.finish_reason).toBe('content_filter');
      expect(r.choices[0]!.message.content).toBe('');
      expect((r.choices[0] as unknown as { content_filter_results: { red_flag: { filtered: boolean } } }).content_filter_results.red_flag.filtered).toBe(true);
    } finally {
      await s.close();
      await strict.dispose();
    }
  });

  it("refuses a client's chat_template_kwargs that set the tokenizer's variables, naming the field", async () => {
    const response = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: 'Bearer sk-test', 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny', messages: question(0), max_tokens: 2, chat_template_kwargs: { bos_token: '<rf>' } }),
    });
    expect(response.status).toBe(400);
    expect(((await response.json()) as { error: unknown }).error).toMatchObject({
      param: 'chat_template_kwargs',
      message: "chat_template_kwargs.bos_token is the tokenizer's, not a request's",
    });
  });

  it('scores moderation inputs as requests and as answers, teacher-forced', async () => {
    const inputs = ['A friendly answer about gardening.', 'Another text to score.'];
    const r = await client.moderations.create({ model: 'tiny', input: inputs });
    const asRequests = await detector.classify(inputs.map((t) => [{ role: 'user' as const, content: t }]));
    const asAnswers = await detector.classify(inputs.map((t) => [{ role: 'user' as const, content: 'Continue.' }, { role: 'assistant' as const, content: t }]));
    expect(r.results).toHaveLength(2);
    r.results.forEach((res, i) => {
      const scores = res.category_scores as unknown as Record<string, number>;
      // The request score is p(<rf>) before the answer's first token; the response score the
      // largest after each of its tokens.
      expect(asRequests[i]!.pRf).toHaveLength(1);
      expect(scores['red_flag/request']).toBeCloseTo(asRequests[i]!.pRf[0]!, 6);
      expect(scores['red_flag/response']).toBeCloseTo(Math.max(...asAnswers[i]!.pRf.slice(1)), 6);
      expect(scores['red_flag']).toBe(Math.max(scores['red_flag/request']!, scores['red_flag/response']!));
      expect(res.flagged).toBe(scores['red_flag']! >= detector.threshold);
    });
  });

  it('32 concurrent requests finish with the output each gives alone, and /health stays responsive', async () => {
    const alone: string[] = [];
    for (let i = 0; i < 4; i++) {
      const r = await client.chat.completions.create({ model: 'tiny', messages: question(i), max_tokens: 24 });
      alone.push(r.choices[0]!.message.content!);
    }
    let healthMs = 0;
    let healthChecks = 0;
    let running = true;
    const probe = (async () => {
      while (running) {
        const t0 = performance.now();
        const h = await fetch(`${server.url}/health`, { headers: { authorization: 'Bearer sk-test' } });
        expect(h.status).toBe(200);
        await h.json();
        healthMs = Math.max(healthMs, performance.now() - t0);
        healthChecks++;
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const results = await Promise.all(
      Array.from({ length: 32 }, (_, i) => client.chat.completions.create({ model: 'tiny', messages: question(i % 4), max_tokens: 24 })),
    );
    running = false;
    await probe;
    results.forEach((r, i) => expect(r.choices[0]!.message.content).toBe(alone[i % 4]));
    expect(healthChecks).toBeGreaterThan(1);
    // Health answers between decode steps: well under a second even with 32 generations running.
    expect(healthMs).toBeLessThan(1000);
    expect(detector.stats().active).toBe(0);
  });

  it('a client that disconnects cancels its generation', async () => {
    const before = detector.stats().tokensGenerated;
    const controller = new AbortController();
    const stream = await client.chat.completions.create(
      { model: 'tiny', messages: question(5), max_tokens: 4000, stream: true },
      { signal: controller.signal },
    );
    let chunks = 0;
    try {
      for await (const _ of stream) if (++chunks === 3) controller.abort();
    } catch {
      // The client reports the abort as an error or simply ends the stream; either is fine here.
    }
    // Chunks already buffered when the client aborted may still arrive.
    expect(chunks).toBeGreaterThanOrEqual(3);
    // The generation stops within a few steps and frees its KV cache, far short of 4000 tokens.
    const t0 = Date.now();
    while (detector.stats().active > 0 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 10));
    expect(detector.stats().active).toBe(0);
    expect(detector.stats().kvCacheBytes).toBe(0);
    expect(detector.stats().tokensGenerated - before).toBeLessThan(200);
  });

  it('a non-streaming client that disconnects cancels its generation too', async () => {
    const before = detector.stats().tokensGenerated;
    const controller = new AbortController();
    const request = client.chat.completions.create({ model: 'tiny', messages: question(6), max_tokens: 4000 }, { signal: controller.signal });
    while (detector.stats().tokensGenerated - before < 20) await new Promise((r) => setTimeout(r, 5));
    controller.abort();
    await expect(request).rejects.toThrow();
    const t0 = Date.now();
    while (detector.stats().active > 0 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 10));
    expect(detector.stats().active).toBe(0);
    expect(detector.stats().tokensGenerated - before).toBeLessThan(1000);
  });
});
