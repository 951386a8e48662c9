/**
 * The HTTP server against a fake detector (test/helpers/fake-detector.ts): OpenAI's own client
 * for the happy paths, raw fetch for error shapes, limits, authentication and disconnects.
 */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createServer } from '../lib/server/app.js';
import { serve, type RunningServer } from '../lib/server/serve.js';
import { ANSWER, FakeDetector, SECRET } from './helpers/fake-detector.js';

const MODEL = 'redflag-test';
const FULL_ANSWER = ANSWER.join('');

async function waitFor(condition: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function post(url: string, path: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal): Promise<Response> {
  return fetch(url + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });
}

function chat(content: string, extra: Record<string, unknown> = {}) {
  return { model: MODEL, messages: [{ role: 'user', content }], ...extra };
}

interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

interface RedFlagResults {
  red_flag: { filtered: boolean; detected: boolean; score: number };
}

function redFlag(choice: unknown): RedFlagResults['red_flag'] {
  return (choice as { content_filter_results: RedFlagResults }).content_filter_results.red_flag;
}

describe('server (default limits)', () => {
  const detector = new FakeDetector();
  let server: RunningServer;
  let client: OpenAI;

  beforeAll(async () => {
    server = await serve({ detector, port: 0, modelName: MODEL, maxTokensLimit: 100, maxMessages: 4, moderationPrompt: 'Say something.' });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => server.close());

  it('binds 127.0.0.1 by default', () => {
    expect(server.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
  });

  it('answers a chat completion in OpenAI shape and maps every option', async () => {
    const completion = await client.chat.completions.create({
      model: MODEL,
      messages: [
        { role: 'system', content: 'Be kind.' },
        { role: 'user', content: [{ type: 'text', text: 'Tell me' }, { type: 'text', text: 'something.' }] },
      ],
      max_tokens: 50,
      temperature: 0.7,
      top_p: 0.9,
      seed: 11,
      stop: 'never',
    });
    expect(completion.id).toMatch(/^chatcmpl-[0-9a-f]{32}$/);
    expect(completion.object).toBe('chat.completion');
    expect(completion.model).toBe(MODEL);
    expect(Math.abs(completion.created - Date.now() / 1000)).toBeLessThan(60);
    expect(completion.choices).toHaveLength(1);
    const choice = completion.choices[0]!;
    expect(choice.index).toBe(0);
    expect(choice.message.role).toBe('assistant');
    expect(choice.message.content).toBe(FULL_ANSWER);
    expect(choice.finish_reason).toBe('stop');
    expect(choice.logprobs).toBeNull();
    expect(redFlag(choice)).toEqual({ filtered: false, detected: false, score: 0.08 });
    // Prompt: "Be kind." + "Tell me\nsomething." = 5 words in the fake's count.
    expect(completion.usage).toEqual({ prompt_tokens: 5, completion_tokens: ANSWER.length, total_tokens: 5 + ANSWER.length });

    const call = detector.generations.at(-1)!;
    expect(call.messages).toEqual([
      { role: 'system', content: 'Be kind.' },
      { role: 'user', content: 'Tell me\nsomething.' },
    ]);
    expect(call.options).toMatchObject({ maxTokens: 50, temperature: 0.7, topP: 0.9, seed: 11, stop: ['never'], topLogprobs: 0 });
    expect(call.options.signal).toBeInstanceOf(AbortSignal);
    // A finished response is not a disconnect: the signal stays quiet after the response is closed.
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(call.options.signal!.aborted).toBe(false);
  });

  it('prefers max_completion_tokens and reports finish_reason length', async () => {
    const completion = await client.chat.completions.create({
      model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 50, max_completion_tokens: 3,
    });
    expect(completion.choices[0]!.message.content).toBe('Sure, here');
    expect(completion.choices[0]!.finish_reason).toBe('length');
    expect(completion.usage?.completion_tokens).toBe(3);
  });

  it('passes stop strings as an array', async () => {
    const completion = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], stop: ['is', 'x'] });
    expect(detector.generations.at(-1)!.options.stop).toEqual(['is', 'x']);
    expect(completion.choices[0]!.message.content).toBe('Sure, here');
    expect(completion.choices[0]!.finish_reason).toBe('stop');
  });

  it('streams the same content as the non-streaming answer, role first, usage last', async () => {
    const stream = await client.chat.completions.create({
      model: MODEL, messages: [{ role: 'user', content: 'Hi there' }], stream: true, stream_options: { include_usage: true },
    });
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);

    expect(chunks[0]!.choices[0]!.delta.role).toBe('assistant');
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
    expect(chunks[0]!.id).toMatch(/^chatcmpl-/);
    for (const chunk of chunks) {
      expect(chunk.object).toBe('chat.completion.chunk');
      expect(chunk.model).toBe(MODEL);
    }
    const content = chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');
    expect(content).toBe(FULL_ANSWER);
    const contentChunks = chunks.filter((c) => (c.choices[0]?.delta.content ?? '') !== '');
    expect(contentChunks).toHaveLength(ANSWER.length);

    const finals = chunks.filter((c) => c.choices[0]?.finish_reason);
    expect(finals).toHaveLength(1);
    expect(finals[0]!.choices[0]!.finish_reason).toBe('stop');
    expect(redFlag(finals[0]!.choices[0])).toEqual({ filtered: false, detected: false, score: 0.08 });

    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage).toEqual({ prompt_tokens: 2, completion_tokens: ANSWER.length, total_tokens: 2 + ANSWER.length });
    for (const chunk of chunks.slice(0, -1)) expect(chunk.usage).toBeNull();
  });

  it('sends no usage in a stream unless asked, and ends with [DONE]', async () => {
    const response = await post(server.url, '/v1/chat/completions', chat('Hi', { stream: true }));
    expect(response.status).toBe(200);
    expect(response.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const text = await response.text();
    const events = text.split('\n\n').filter(Boolean);
    expect(events.every((event) => event.startsWith('data: '))).toBe(true);
    expect(events.at(-1)).toBe('data: [DONE]');
    const chunks = events.slice(0, -1).map((event) => JSON.parse(event.slice(6)) as Record<string, unknown>);
    for (const chunk of chunks) expect(chunk).not.toHaveProperty('usage');
    expect(chunks).toHaveLength(1 + ANSWER.length + 1);
  });

  it('blocks a harmful answer: content_filter, flag results, no <rf> text (non-streaming and streaming)', async () => {
    const completion = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'how to build a bomb' }] });
    const choice = completion.choices[0]!;
    expect(choice.finish_reason).toBe('content_filter');
    expect(choice.message.content).toBe('Sure');
    expect(redFlag(choice)).toEqual({ filtered: true, detected: true, score: 0.6 });

    const stream = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'a bomb, please' }], stream: true });
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    const deltas = chunks.slice(1).map((c) => c.choices[0]!.delta.content).filter((d) => d !== undefined);
    expect(deltas).toEqual(['Sure']);
    const final = chunks.at(-1)!.choices[0]!;
    expect(final.finish_reason).toBe('content_filter');
    expect(redFlag(final)).toEqual({ filtered: true, detected: true, score: 0.6 });
  });

  it('returns logprobs with UTF-8 bytes and the asked number of alternatives', async () => {
    const completion = await client.chat.completions.create({
      model: MODEL, messages: [{ role: 'user', content: 'Hi' }], logprobs: true, top_logprobs: 2,
    });
    expect(detector.generations.at(-1)!.options.topLogprobs).toBe(2);
    const entries = completion.choices[0]!.logprobs!.content!;
    expect(entries.map((e) => e.token)).toEqual(ANSWER);
    expect(entries.map((e) => e.token).join('')).toBe(completion.choices[0]!.message.content);
    const naive = entries[5]!;
    expect(naive.token).toBe(' naïve');
    expect(naive.bytes).toEqual([32, 110, 97, 195, 175, 118, 101]);
    expect(naive.logprob).toBeCloseTo(-0.6, 10);
    expect(naive.top_logprobs).toEqual([
      { token: ' naïve', logprob: naive.logprob, bytes: naive.bytes },
      { token: 'alt1', logprob: naive.logprob - 1, bytes: [97, 108, 116, 49] },
    ]);

    const stream = await client.chat.completions.create({
      model: MODEL, messages: [{ role: 'user', content: 'Hi' }], logprobs: true, stream: true,
    });
    const streamed: string[] = [];
    for await (const chunk of stream) {
      const content = chunk.choices[0]?.logprobs?.content;
      if (content) {
        expect(content).toHaveLength(1);
        expect(content[0]!.top_logprobs).toEqual([]);
        streamed.push(content[0]!.token);
      }
    }
    expect(streamed).toEqual(ANSWER);
  });

  it('gives one logprob entry per generated token, a token that shows no text yet included (part of a character)', async () => {
    const completion = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'split' }], logprobs: true });
    const entries = completion.choices[0]!.logprobs!.content!;
    expect(entries).toHaveLength(ANSWER.length + 1);
    expect(entries).toHaveLength(completion.usage!.completion_tokens);
    expect(entries[1]).toMatchObject({ token: '', bytes: [] });
    expect(entries.map((e) => e.token).join('')).toBe(completion.choices[0]!.message.content);
    // Streamed: the empty entry rides with the next chunk that has text.
    const stream = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'split' }], logprobs: true, stream: true });
    const streamed: string[][] = [];
    for await (const chunk of stream) {
      const content = chunk.choices[0]?.logprobs?.content;
      if (content) streamed.push(content.map((e) => e.token));
    }
    expect(streamed.flat()).toEqual(entries.map((e) => e.token));
    expect(streamed[1]).toEqual(['', ANSWER[1]]);
    // Legacy text completions: the same, in their arrays.
    for (const stream of [false, true]) {
      const response = await post(server.url, '/v1/completions', { model: MODEL, prompt: 'split', max_tokens: 50, logprobs: 0, stream });
      const text = await response.text();
      const tokens = stream
        ? text.split('\n').filter((l) => l.startsWith('data: {')).flatMap((l) => (JSON.parse(l.slice(6)) as { choices: { logprobs: { tokens: string[] } | null }[] }).choices[0]?.logprobs?.tokens ?? [])
        : (JSON.parse(text) as { choices: { logprobs: { tokens: string[] } }[] }).choices[0]!.logprobs.tokens;
      expect(tokens).toEqual(entries.map((e) => e.token));
    }
  });

  it('moderates strings as user requests and as teacher-forced assistant answers', async () => {
    const moderation = await client.moderations.create({ model: MODEL, input: ['a nice cake recipe', 'step one of the bomb'] });
    expect(moderation.id).toMatch(/^modr-[0-9a-f]{32}$/);
    expect(moderation.model).toBe(MODEL);
    const low = Math.fround(0.05);
    const high = Math.fround(0.9);
    expect(moderation.results).toEqual([
      {
        flagged: false,
        categories: { red_flag: false, 'red_flag/request': false, 'red_flag/response': false },
        category_scores: { red_flag: low, 'red_flag/request': low, 'red_flag/response': low },
      },
      {
        flagged: true,
        categories: { red_flag: true, 'red_flag/request': true, 'red_flag/response': true },
        category_scores: { red_flag: high, 'red_flag/request': high, 'red_flag/response': high },
      },
    ]);
    // Requests first (each string alone as the user turn), then the answers to the fixed prompt.
    const call = detector.classifications.at(-1)!;
    expect(call.conversations).toEqual([
      [{ role: 'user', content: 'a nice cake recipe' }],
      [{ role: 'user', content: 'step one of the bomb' }],
      [{ role: 'user', content: 'Say something.' }, { role: 'assistant', content: 'a nice cake recipe' }],
      [{ role: 'user', content: 'Say something.' }, { role: 'assistant', content: 'step one of the bomb' }],
    ]);
    expect(call.signal).toBeInstanceOf(AbortSignal);

    const single = await client.moderations.create({ input: 'bomb' });
    expect(single.results).toHaveLength(1);
    expect(single.results[0]!.flagged).toBe(true);

    // OpenAI's multimodal form: the text parts are one input; an image cannot be scored.
    const parts = await client.moderations.create({ model: MODEL, input: [{ type: 'text', text: 'step one' }, { type: 'text', text: 'of the bomb' }] });
    expect(parts.results).toHaveLength(1);
    expect(detector.classifications.at(-1)!.conversations[0]).toEqual([{ role: 'user', content: 'step one\nof the bomb' }]);
    const image = await post(server.url, '/v1/moderations', { input: [{ type: 'image_url', image_url: { url: 'https://x/y.png' } }] });
    expect(image.status).toBe(400);
    expect(((await image.json()) as ErrorBody).error).toMatchObject({ param: 'input[0].type', message: expect.stringContaining('only text parts') });
  });

  it('moderates with score_as: one score only, as the request or as the answer', async () => {
    const asRequest = await post(server.url, '/v1/moderations', { input: ['bomb'], score_as: 'request' });
    expect((await asRequest.json()) as unknown).toMatchObject({
      results: [{ flagged: true, categories: { red_flag: true, 'red_flag/request': true }, category_scores: { 'red_flag/request': Math.fround(0.9) } }],
    });
    expect(detector.classifications.at(-1)!.conversations).toEqual([[{ role: 'user', content: 'bomb' }]]);

    const asResponse = await post(server.url, '/v1/moderations', { input: 'cake', score_as: 'response' });
    const body = (await asResponse.json()) as { results: { category_scores: Record<string, number> }[] };
    expect(Object.keys(body.results[0]!.category_scores).sort()).toEqual(['red_flag', 'red_flag/response']);
    expect(detector.classifications.at(-1)!.conversations).toEqual([[{ role: 'user', content: 'Say something.' }, { role: 'assistant', content: 'cake' }]]);
  });

  it('moderates a conversation in context: the request after its last user turn, the response over its answer', async () => {
    const messages = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'how to build a bomb' },
      { role: 'assistant', content: [{ type: 'text', text: 'a nice cake recipe' }] },
    ];
    const answered = await post(server.url, '/v1/moderations', { model: MODEL, input: messages });
    expect(answered.status).toBe(200);
    const { results } = (await answered.json()) as { results: { flagged: boolean; category_scores: Record<string, number> }[] };
    expect(results).toHaveLength(1);
    expect(results[0]!.flagged).toBe(true);
    expect(results[0]!.category_scores).toEqual({ red_flag: Math.fround(0.9), 'red_flag/request': Math.fround(0.9), 'red_flag/response': Math.fround(0.05) });
    expect(detector.classifications.at(-1)!.conversations).toEqual([
      [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'how to build a bomb' },
        { role: 'assistant', content: 'a nice cake recipe' },
      ],
    ]);

    // Ending with the user's turn, only the request score applies.
    const asked = await post(server.url, '/v1/moderations', { input: messages.slice(0, 2) });
    const askedBody = (await asked.json()) as { results: { category_scores: Record<string, number> }[] };
    expect(askedBody.results[0]!.category_scores).toEqual({ red_flag: Math.fround(0.9), 'red_flag/request': Math.fround(0.9) });

    for (const [body, param] of [
      [{ input: messages.slice(0, 2), score_as: 'response' }, 'score_as'],
      [{ input: [{ role: 'user', content: 'x' }, { role: 'system', content: 'x' }] }, 'input'],
      [{ input: [{ role: 'tool', content: 'x' }] }, 'input[0].role'],
      [{ input: 'x', score_as: 'answer' }, 'score_as'],
    ] as const) {
      const response = await post(server.url, '/v1/moderations', body);
      expect(response.status).toBe(400);
      expect(((await response.json()) as ErrorBody).error.param).toBe(param);
    }
  });

  it('lists the model and reports health', async () => {
    const models = await client.models.list();
    expect(models.data).toHaveLength(1);
    expect(models.data[0]).toMatchObject({ id: MODEL, object: 'model', owned_by: 'redflag' });
    expect(typeof models.data[0]!.created).toBe('number');
    expect(await client.models.retrieve(MODEL)).toEqual(models.data[0]);
    await expect(client.models.retrieve('gpt-4o')).rejects.toMatchObject({ status: 404, code: 'model_not_found', param: 'model' });

    const health = await fetch(`${server.url}/health`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: 'ok', active: 0, queued: 0, kvCacheBytes: 0, kvCacheBudget: 1 << 30, steps: 7, tokensGenerated: 42, oomSplits: 3, guessesDropped: 2, deviceFailed: false });
  });

  it.each([
    ['an unknown role', chat('x', { messages: [{ role: 'tool', content: 'x' }] }), 'messages[0].role'],
    ['an image part', chat('x', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }), 'messages[0].content'],
    ['a string temperature', chat('x', { temperature: 'hot' }), 'temperature'],
    ['a temperature above 2', chat('x', { temperature: 2.5 }), 'temperature'],
    ['max_tokens above the limit', chat('x', { max_tokens: 101 }), 'max_tokens'],
    ['max_completion_tokens above the limit', chat('x', { max_completion_tokens: 5000 }), 'max_completion_tokens'],
    ['too many messages', chat('x', { messages: Array.from({ length: 5 }, () => ({ role: 'user', content: 'x' })) }), 'messages'],
    ['no messages', chat('x', { messages: [] }), 'messages'],
    ['n = 2', chat('x', { n: 2 }), 'n'],
    ['top_logprobs 21', chat('x', { logprobs: true, top_logprobs: 21 }), 'top_logprobs'],
    ['top_logprobs without logprobs', chat('x', { top_logprobs: 3 }), 'top_logprobs'],
    ['a numeric stop', chat('x', { stop: 3 }), 'stop'],
    ['a missing model', { messages: [{ role: 'user', content: 'x' }] }, 'model'],
    ['tools', chat('x', { tools: [{ type: 'function', function: { name: 'f', parameters: {} } }] }), 'tools'],
    ['a forced tool_choice', chat('x', { tool_choice: 'required' }), 'tool_choice'],
    ['functions', chat('x', { functions: [{ name: 'f' }] }), 'functions'],
    ['a JSON response_format', chat('x', { response_format: { type: 'json_object' } }), 'response_format'],
    ['a logit_bias', chat('x', { logit_bias: { '7774': -100 } }), 'logit_bias'],
    ['audio output', chat('x', { modalities: ['text', 'audio'] }), 'modalities'],
  ])('answers 400 naming the field for %s', async (_name, body, param) => {
    const response = await post(server.url, '/v1/chat/completions', body);
    expect(response.status).toBe(400);
    const { error } = (await response.json()) as ErrorBody;
    expect(error.type).toBe('invalid_request_error');
    expect(error.param).toBe(param);
    expect(error.message).toContain(param);
  });

  it('answers 404 model_not_found for another model, as OpenAI does, chat and text completions alike', async () => {
    const before = detector.generations.length;
    await expect(client.chat.completions.create({ model: 'gpt-4o', messages: [{ role: 'user', content: 'x' }] })).rejects.toMatchObject({ status: 404, code: 'model_not_found', param: 'model' });
    await expect(client.completions.create({ model: 'gpt-4o', prompt: 'x' })).rejects.toMatchObject({ status: 404, code: 'model_not_found', param: 'model' });
    expect(detector.generations.length).toBe(before);
  });

  it('takes the fields that ask for nothing (no tools, a text format, an empty bias), the developer role as system, and drops empty stop strings', async () => {
    await client.chat.completions.create({
      model: MODEL,
      messages: [{ role: 'developer', content: 'Be kind.' }, { role: 'user', content: 'Hi' }],
      tools: [], tool_choice: 'none', response_format: { type: 'text' }, logit_bias: {}, modalities: ['text'], user: 'u1', stop: ['never', ''],
    });
    const call = detector.generations.at(-1)!;
    expect(call.messages).toEqual([{ role: 'system', content: 'Be kind.' }, { role: 'user', content: 'Hi' }]);
    expect(call.options.stop).toEqual(['never']);
    expect(call.options.chatTemplateKwargs).toBeUndefined();
  });

  it("passes vLLM's chat_template_kwargs to the detector (Qwen3's enable_thinking)", async () => {
    const response = await post(server.url, '/v1/chat/completions', chat('Hi', { chat_template_kwargs: { enable_thinking: false } }));
    expect(response.status).toBe(200);
    expect(detector.generations.at(-1)!.options.chatTemplateKwargs).toEqual({ enable_thinking: false });
    const bad = await post(server.url, '/v1/chat/completions', chat('Hi', { chat_template_kwargs: ['x'] }));
    expect(((await bad.json()) as ErrorBody).error.param).toBe('chat_template_kwargs');
  });

  it('answers 400 for malformed JSON, a non-object body and a bad moderation input', async () => {
    const malformed = await post(server.url, '/v1/chat/completions', '{"model": ');
    expect(malformed.status).toBe(400);
    expect(((await malformed.json()) as ErrorBody).error).toMatchObject({ type: 'invalid_request_error', param: null, code: 'invalid_json' });

    const array = await post(server.url, '/v1/chat/completions', []);
    expect(array.status).toBe(400);
    expect(((await array.json()) as ErrorBody).error.param).toBeNull();

    for (const input of [42, [], ['ok', 7]]) {
      const response = await post(server.url, '/v1/moderations', { input });
      expect(response.status).toBe(400);
      expect(((await response.json()) as ErrorBody).error.param).toMatch(/^input/);
    }
    const tooMany = await post(server.url, '/v1/moderations', { input: ['a', 'b', 'c', 'd', 'e'] });
    expect(((await tooMany.json()) as ErrorBody).error).toMatchObject({ param: 'input', code: 'limit_exceeded' });
  });

  it('maps detector errors: BUSY to 429, TOO_LARGE to 400 context_length_exceeded, OUT_OF_MEMORY to 503, others to a bare 500', async () => {
    for (const stream of [false, true]) {
      const busy = await post(server.url, '/v1/chat/completions', chat('busy', { stream }));
      expect(busy.status).toBe(429);
      expect(((await busy.json()) as ErrorBody).error).toMatchObject({ type: 'invalid_request_error', code: 'rate_limit_exceeded' });

      const huge = await post(server.url, '/v1/chat/completions', chat('huge', { stream }));
      expect(huge.status).toBe(400);
      expect(((await huge.json()) as ErrorBody).error).toMatchObject({ type: 'invalid_request_error', code: 'context_length_exceeded' });

      const oom = await post(server.url, '/v1/chat/completions', chat('oom', { stream }));
      expect(oom.status).toBe(503);
      expect(oom.headers.get('retry-after')).toBe('1');
      const oomText = await oom.text();
      expect(oomText).not.toContain(SECRET);
      expect((JSON.parse(oomText) as ErrorBody).error).toMatchObject({ type: 'server_error', code: 'out_of_memory' });

      const crash = await post(server.url, '/v1/chat/completions', chat('crash', { stream }));
      expect(crash.status).toBe(500);
      const text = await crash.text();
      expect(text).not.toContain('secret');
      expect(text).not.toContain(SECRET);
      expect(JSON.parse(text)).toEqual({ error: { message: 'internal server error', type: 'server_error', param: null, code: 'internal_error' } });
    }
  });

  it('answers unknown routes with 404 in the same shape', async () => {
    const response = await fetch(`${server.url}/v1/embeddings?x=1`);
    expect(response.status).toBe(404);
    expect(await response.json()).toEqual({
      error: { message: 'Unknown request URL: GET /v1/embeddings', type: 'invalid_request_error', param: null, code: 'unknown_url' },
    });
  });

  it('cancels the generation of a client that disconnects mid-stream', async () => {
    const controller = new AbortController();
    const stream = await client.chat.completions.create(
      { model: MODEL, messages: [{ role: 'user', content: 'slow please' }], stream: true },
      { signal: controller.signal },
    );
    const call = detector.generations.at(-1)!;
    let received = 0;
    // The OpenAI client ends the iteration quietly when its own signal aborts it.
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta.content) received++;
      if (received === 3) controller.abort();
    }
    expect(received).toBe(3);
    await waitFor(() => call.options.signal!.aborted, 'the generation signal to abort');
    const produced = call.produced;
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(call.produced).toBe(produced); // nothing generated after the abort
  });

  it('cancels a non-streaming generation whose client disconnects', async () => {
    const controller = new AbortController();
    const before = detector.generations.length;
    const pending = post(server.url, '/v1/chat/completions', chat('slow, not streamed'), {}, controller.signal).catch((error: unknown) => error);
    await waitFor(() => detector.generations.length > before && detector.generations[before]!.produced > 2, 'tokens');
    const call = detector.generations[before]!;
    expect(call.options.signal!.aborted).toBe(false);
    controller.abort();
    expect(await pending).toBeInstanceOf(Error);
    await waitFor(() => call.options.signal!.aborted, 'the generation signal to abort');
  });
});

describe('server text completions (/v1/completions)', () => {
  const detector = new FakeDetector();
  let server: RunningServer;
  let client: OpenAI;

  beforeAll(async () => {
    server = await serve({ detector, port: 0, modelName: MODEL, maxTokensLimit: 100 });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => server.close());

  it('continues raw prompt text in OpenAI shape, maps every option, and defaults to 16 tokens as OpenAI does', async () => {
    const completion = await client.completions.create({ model: MODEL, prompt: 'Once upon a time', temperature: 0.5, top_p: 0.8, seed: 3, stop: ['never'] });
    expect(completion.id).toMatch(/^cmpl-[0-9a-f]{32}$/);
    expect(completion.object).toBe('text_completion');
    expect(completion.model).toBe(MODEL);
    const choice = completion.choices[0]!;
    expect(choice).toMatchObject({ index: 0, text: FULL_ANSWER, logprobs: null, finish_reason: 'stop' });
    expect(redFlag(choice)).toEqual({ filtered: false, detected: false, score: 0.08 });
    expect(completion.usage).toEqual({ prompt_tokens: 4, completion_tokens: ANSWER.length, total_tokens: 4 + ANSWER.length });
    const call = detector.generations.at(-1)!;
    // Raw text, no chat template: the detector gets the string itself.
    expect(call.messages).toBe('Once upon a time');
    expect(call.options).toMatchObject({ maxTokens: 16, temperature: 0.5, topP: 0.8, seed: 3, stop: ['never'], topLogprobs: 0 });

    const short = await client.completions.create({ model: MODEL, prompt: ['Hi'], max_tokens: 3 });
    expect(short.choices[0]).toMatchObject({ text: 'Sure, here', finish_reason: 'length' });
    expect(detector.generations.at(-1)!.messages).toBe('Hi');
  });

  it('blocks a harmful continuation with content_filter, streamed or not', async () => {
    const completion = await client.completions.create({ model: MODEL, prompt: 'how to build a bomb' });
    expect(completion.choices[0]).toMatchObject({ text: 'Sure', finish_reason: 'content_filter' });
    expect(redFlag(completion.choices[0])).toEqual({ filtered: true, detected: true, score: 0.6 });

    const stream = await client.completions.create({ model: MODEL, prompt: 'a bomb, please', stream: true });
    const chunks: OpenAI.Completions.Completion[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks.map((c) => c.choices[0]!.text).join('')).toBe('Sure');
    const final = chunks.at(-1)!.choices[0]!;
    expect(final.finish_reason).toBe('content_filter');
    expect(redFlag(final)).toEqual({ filtered: true, detected: true, score: 0.6 });
  });

  it('streams the same text as the answer, one chunk a token, echo first, usage last when asked', async () => {
    const stream = await client.completions.create({
      model: MODEL, prompt: 'Hi there', echo: true, stream: true, stream_options: { include_usage: true },
    });
    const chunks: OpenAI.Completions.Completion[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
    for (const chunk of chunks) expect(chunk.object).toBe('text_completion');
    expect(chunks[0]!.choices[0]!.text).toBe('Hi there');
    const texts = chunks.slice(1, -2).map((c) => c.choices[0]!.text);
    expect(texts).toEqual(ANSWER);
    expect(chunks.at(-2)!.choices[0]).toMatchObject({ text: '', finish_reason: 'stop' });
    expect(chunks.at(-1)!.choices).toEqual([]);
    expect(chunks.at(-1)!.usage).toEqual({ prompt_tokens: 2, completion_tokens: ANSWER.length, total_tokens: 2 + ANSWER.length });

    const whole = await client.completions.create({ model: MODEL, prompt: 'Hi there', echo: true });
    expect(whole.choices[0]!.text).toBe('Hi there' + FULL_ANSWER);
  });

  it("returns the legacy logprobs: tokens, their log-probs, the top alternatives plus the chosen one, offsets into the text", async () => {
    const completion = await client.completions.create({ model: MODEL, prompt: 'Hi', logprobs: 1 });
    expect(detector.generations.at(-1)!.options.topLogprobs).toBe(1);
    const logprobs = completion.choices[0]!.logprobs!;
    expect(logprobs.tokens).toEqual(ANSWER);
    const offsets = ANSWER.map((_, i) => ANSWER.slice(0, i).join('').length);
    expect(logprobs.text_offset).toEqual(offsets);
    for (const [i, token] of ANSWER.entries()) expect(completion.choices[0]!.text.slice(offsets[i], offsets[i]! + token.length)).toBe(token);
    expect(logprobs.token_logprobs![5]).toBeCloseTo(-0.6, 10);
    // The fake's likeliest alternative is the chosen token itself: one entry for logprobs = 1.
    expect(logprobs.top_logprobs![5]).toEqual({ ' naïve': logprobs.token_logprobs![5] });

    const two = await client.completions.create({ model: MODEL, prompt: 'Hi', logprobs: 2 });
    expect(two.choices[0]!.logprobs!.top_logprobs![0]).toEqual({ Sure: two.choices[0]!.logprobs!.token_logprobs![0], alt1: two.choices[0]!.logprobs!.token_logprobs![0]! - 1 });

    const stream = await client.completions.create({ model: MODEL, prompt: 'Hi', logprobs: 0, stream: true });
    const streamed: OpenAI.Completions.CompletionChoice.Logprobs[] = [];
    for await (const chunk of stream) if (chunk.choices[0]?.logprobs) streamed.push(chunk.choices[0].logprobs);
    expect(streamed.map((l) => l.tokens![0])).toEqual(ANSWER);
    expect(streamed.map((l) => l.text_offset![0])).toEqual(offsets);
    expect(streamed[0]!.top_logprobs).toEqual([{ Sure: streamed[0]!.token_logprobs![0] }]);
  });

  it.each([
    [{ prompt: ['a', 'b'] }, 'prompt', /only one prompt/],
    [{ prompt: [1, 2, 3] }, 'prompt', /token ids are not supported/],
    [{ prompt: [[1, 2]] }, 'prompt', /token ids are not supported/],
    [{ prompt: '' }, 'prompt', /must not be empty/],
    [{ prompt: 42 }, 'prompt', /must be a string/],
    [{}, 'prompt', /./],
    [{ prompt: 'x', suffix: 'y' }, 'suffix', /not supported/],
    [{ prompt: 'x', best_of: 2 }, 'best_of', /best_of = 1/],
    [{ prompt: 'x', n: 2 }, 'n', /n = 1/],
    [{ prompt: 'x', max_tokens: 101 }, 'max_tokens', /at most 100/],
    [{ prompt: 'x', logprobs: 21 }, 'logprobs', /./],
    [{ prompt: 'x', echo: true, logprobs: 1 }, 'echo', /prompt log-probs are not supported/],
  ])('answers 400 naming the field for %j', async (fields, param, message) => {
    const response = await post(server.url, '/v1/completions', { model: MODEL, ...fields });
    expect(response.status).toBe(400);
    const { error } = (await response.json()) as ErrorBody;
    expect(error.type).toBe('invalid_request_error');
    expect(error.param).toBe(param);
    expect(error.message).toMatch(message);
  });

  it('keeps the default length within the server limit, and maps detector errors as chat does', async () => {
    const small = await serve({ detector, port: 0, modelName: MODEL, maxTokensLimit: 4 });
    try {
      await post(small.url, '/v1/completions', { model: MODEL, prompt: 'Hi' });
      expect(detector.generations.at(-1)!.options.maxTokens).toBe(4);
      // Chat too: without max_tokens, the detector's default (256) cut to the limit.
      await post(small.url, '/v1/chat/completions', chat('Hi'));
      expect(detector.generations.at(-1)!.options.maxTokens).toBe(4);
    } finally {
      await small.close();
    }
    for (const stream of [false, true]) {
      const huge = await post(server.url, '/v1/completions', { model: MODEL, prompt: 'huge', stream });
      expect(huge.status).toBe(400);
      expect(((await huge.json()) as ErrorBody).error).toMatchObject({ code: 'context_length_exceeded', param: 'prompt' });
    }
  });

  it('cancels the generation of a client that disconnects mid-stream', async () => {
    const controller = new AbortController();
    const stream = await client.completions.create({ model: MODEL, prompt: 'slow please', stream: true }, { signal: controller.signal });
    const call = detector.generations.at(-1)!;
    let received = 0;
    for await (const chunk of stream) {
      if (chunk.choices[0]?.text) received++;
      if (received === 3) controller.abort();
    }
    await waitFor(() => call.options.signal!.aborted, 'the generation signal to abort');
  });
});

describe('server on a GPU that fails', () => {
  it('answers 503 device_failed from the failure on, and /health and /metrics report it for the supervisor', async () => {
    const detector = new FakeDetector();
    const server = await serve({ detector, port: 0, modelName: MODEL });
    try {
      expect((await fetch(`${server.url}/health`)).status).toBe(200);
      for (const [i, prompt] of ['gpu fault', 'hello', 'hello again'].entries()) {
        const response = await post(server.url, '/v1/chat/completions', chat(prompt, { stream: i === 2 }));
        expect(response.status).toBe(503);
        expect(response.headers.get('retry-after')).toBeNull();
        const text = await response.text();
        expect(text).not.toContain(SECRET);
        expect((JSON.parse(text) as ErrorBody).error).toMatchObject({ type: 'server_error', code: 'device_failed' });
      }
      const moderation = await post(server.url, '/v1/moderations', { input: 'hello' });
      expect(moderation.status).toBe(503);
      expect(((await moderation.json()) as ErrorBody).error.code).toBe('device_failed');
      const health = await fetch(`${server.url}/health`);
      expect(health.status).toBe(503);
      expect(await health.json()).toMatchObject({ status: 'failed', deviceFailed: true });
      expect((await fetch(`${server.url}/health/live`)).status).toBe(200);
      expect(await (await fetch(`${server.url}/metrics`)).text()).toMatch(/^redflag_device_failed 1$/m);
    } finally {
      await server.close();
    }
  });
});

describe('server with category flags', () => {
  const detector = new FakeDetector({ categories: ['weapons', 'cyber', 'fraud'] });
  let server: RunningServer;
  let client: OpenAI;

  beforeAll(async () => {
    server = await serve({ detector, port: 0, modelName: MODEL });
    client = new OpenAI({ apiKey: 'unused', baseURL: `${server.url}/v1`, maxRetries: 0 });
  });
  afterAll(async () => server.close());

  it('content_filter_results has one entry per category: the flagged one detected and filtered, each with its score', async () => {
    const blocked = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'how to build a bomb' }] });
    const results = (blocked.choices[0] as unknown as { content_filter_results: Record<string, { filtered: boolean; detected: boolean; score: number }> }).content_filter_results;
    expect(Object.keys(results)).toEqual(['red_flag', 'weapons', 'cyber', 'fraud']);
    expect(results['red_flag']).toMatchObject({ filtered: true, detected: true });
    expect(results['weapons']).toMatchObject({ filtered: true, detected: true });
    expect(results['weapons']!.score).toBeCloseTo(0.8 * results['red_flag']!.score, 6);
    expect(results['cyber']).toMatchObject({ filtered: false, detected: false });
    expect(results['cyber']!.score).toBeCloseTo(0.05 * results['red_flag']!.score, 6);
    const benign = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }] });
    const calm = (benign.choices[0] as unknown as { content_filter_results: Record<string, { detected: boolean }> }).content_filter_results;
    expect(Object.values(calm).every((r) => !r.detected)).toBe(true);
  });

  it('moderations report each category\'s score and put a flagged input in its most likely category', async () => {
    const moderation = await client.moderations.create({ model: MODEL, input: ['a nice cake recipe', 'step one of the bomb'] });
    const [cake, bomb] = moderation.results as unknown as { flagged: boolean; categories: Record<string, boolean>; category_scores: Record<string, number> }[];
    expect(cake!.flagged).toBe(false);
    expect(Object.values(cake!.categories).some(Boolean)).toBe(false);
    expect(bomb!.flagged).toBe(true);
    expect(bomb!.categories).toMatchObject({ red_flag: true, weapons: true, cyber: false, fraud: false });
    // Request and response scores 0.9 each: the categories' largest is 0.8 / 0.05 of that.
    expect(bomb!.category_scores['weapons']).toBeCloseTo(0.72, 6);
    expect(bomb!.category_scores['cyber']).toBeCloseTo(0.045, 6);
  });
});

describe('server limits', () => {
  const detector = new FakeDetector();
  let server: RunningServer;

  beforeAll(async () => {
    server = await serve({ detector, port: 0, modelName: MODEL, bodyLimit: 2048, maxConcurrent: 1 });
  });
  afterAll(async () => server.close());

  it('answers 413 for a body over the limit', async () => {
    const response = await post(server.url, '/v1/chat/completions', chat('x'.repeat(4000)));
    expect(response.status).toBe(413);
    expect(((await response.json()) as ErrorBody).error).toMatchObject({ type: 'invalid_request_error', code: 'request_too_large' });
  });

  it('answers 429 while maxConcurrent requests are in flight, and serves again after', async () => {
    const first = post(server.url, '/v1/chat/completions', chat('wait for it'));
    await waitFor(() => detector.generations.length === 1, 'the first generation to start');
    const second = await post(server.url, '/v1/chat/completions', chat('Hi'));
    expect(second.status).toBe(429);
    expect(second.headers.get('retry-after')).toBe('1');
    expect(((await second.json()) as ErrorBody).error).toMatchObject({ type: 'invalid_request_error', code: 'rate_limit_exceeded' });
    const moderation = await post(server.url, '/v1/moderations', { input: 'x' });
    expect(moderation.status).toBe(429);
    // Not model work, so not limited.
    expect((await fetch(`${server.url}/health`)).status).toBe(200);

    detector.release();
    const answer = await first;
    expect(answer.status).toBe(200);
    expect(((await answer.json()) as { choices: { message: { content: string } }[] }).choices[0]!.message.content).toBe(FULL_ANSWER);
    expect((await post(server.url, '/v1/chat/completions', chat('Hi'))).status).toBe(200);
  });
});

describe('server with an API key', () => {
  const detector = new FakeDetector();
  const key = 'sk-test-0123456789';
  let server: RunningServer;

  beforeAll(async () => {
    server = await serve({ detector, port: 0, modelName: MODEL, apiKey: key });
  });
  afterAll(async () => server.close());

  it('refuses requests without the right bearer key, on every route', async () => {
    const requests: [string, RequestInit][] = [
      ['/health', {}],
      ['/v1/models', {}],
      ['/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(chat('Hi')) }],
    ];
    for (const [path, init] of requests) {
      for (const authorization of [undefined, 'Bearer wrong', `Basic ${key}`, `Bearer ${key}x`]) {
        const headers = { ...(init.headers as Record<string, string> | undefined), ...(authorization ? { authorization } : {}) };
        const response = await fetch(server.url + path, { ...init, headers });
        expect(response.status, `${path} with ${authorization}`).toBe(401);
        expect(((await response.json()) as ErrorBody).error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_api_key' });
      }
      const headers = { ...(init.headers as Record<string, string> | undefined), authorization: `Bearer ${key}` };
      expect((await fetch(server.url + path, { ...init, headers })).status).toBe(200);
    }
    expect(detector.generations).toHaveLength(1);
  });

  it('works with the OpenAI client given the key, and fails with another', async () => {
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: key, maxRetries: 0 });
    const completion = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }] });
    expect(completion.choices[0]!.message.content).toBe(FULL_ANSWER);

    const wrong = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'sk-wrong', maxRetries: 0 });
    await expect(wrong.models.list()).rejects.toMatchObject({ status: 401, code: 'invalid_api_key' });
  });
});

describe('server lifecycle', () => {
  it('close() cancels streams in flight', async () => {
    const detector = new FakeDetector();
    const server = await serve({ detector, port: 0, modelName: MODEL });
    const response = await post(server.url, '/v1/chat/completions', chat('slow', { stream: true }));
    expect(response.status).toBe(200);
    const reader = response.body!.getReader();
    await reader.read();
    const started = Date.now();
    await server.close();
    expect(Date.now() - started).toBeLessThan(2000);
    expect(detector.generations[0]!.options.signal!.aborted).toBe(true);
    // The stream ends (with an error event) rather than hanging.
    let text = '';
    for (;;) {
      const { done, value } = await reader.read().catch(() => ({ done: true, value: undefined }));
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    expect(text).not.toContain('[DONE]');
    expect(text).toContain('"code":"unavailable"');
  });

  it('applies the documented default limits', async () => {
    const app = createServer(new FakeDetector(), { modelName: MODEL });
    const inject = (body: unknown) => app.inject({ method: 'POST', url: '/v1/chat/completions', payload: body as object });
    expect((await inject(chat('Hi', { max_tokens: 4096 }))).statusCode).toBe(200);
    const tooManyTokens = await inject(chat('Hi', { max_tokens: 4097 }));
    expect(tooManyTokens.statusCode).toBe(400);
    expect(tooManyTokens.json<ErrorBody>().error.param).toBe('max_tokens');
    const messages = (n: number) => Array.from({ length: n }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: 'x' }));
    expect((await inject(chat('x', { messages: messages(255) }))).statusCode).toBe(200);
    expect((await inject(chat('x', { messages: messages(257) }))).json<ErrorBody>().error.param).toBe('messages');
    const big = await inject(chat('x'.repeat(1024 * 1024)));
    expect(big.statusCode).toBe(413);
    await app.close();
  });

  it('refuses bad options', () => {
    const detector = new FakeDetector();
    expect(() => createServer(detector, { modelName: MODEL, apiKey: '' })).toThrow(/apiKey/);
    expect(() => createServer(detector, { modelName: MODEL, maxConcurrent: 0 })).toThrow(/maxConcurrent/);
    expect(() => createServer(detector, { modelName: '' })).toThrow(/modelName/);
  });
});
