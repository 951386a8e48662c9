/**
 * Operating the server: Prometheus metrics, readiness (loading → ok) and liveness, one JSON log
 * line per request without content unless asked, graceful drain; and `redflag serve` draining on
 * SIGTERM and exiting 0. The HTTP layer runs on the fake detector (test/helpers/fake-detector.ts),
 * the CLI on a tiny random model.
 */
import { spawn } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import type { Detector } from '../lib/detect/types.js';
import { serve, type RunningServer } from '../lib/server/serve.js';
import { ANSWER, FakeDetector } from './helpers/fake-detector.js';
import { metricValue, parsePrometheus, scrape, type Sample } from './helpers/prometheus.js';
import { tinyLlama } from './helpers/tiny-model.js';

const MODEL = 'redflag-test';
const KEY = 'sk-ops';
const AUTH = { authorization: `Bearer ${KEY}` };
const CHAT = { route: '/v1/chat/completions', method: 'POST' };

const servers: RunningServer[] = [];
afterAll(async () => {
  for (const s of servers) await s.close();
});

async function start(options: Partial<Parameters<typeof serve>[0]> & { detector: Detector | PromiseLike<Detector> }): Promise<RunningServer> {
  const server = await serve({ port: 0, modelName: MODEL, ...options });
  servers.push(server);
  return server;
}

function chat(url: string, content: string, extra: Record<string, unknown> = {}, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content }], ...extra }),
  });
}

async function waitFor(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Metric deltas between two scrapes. */
function delta(before: Sample[], after: Sample[], name: string, labels: Record<string, string> = {}): number {
  return metricValue(after, name, labels) - metricValue(before, name, labels);
}

/** Reads a streamed answer: its content, the SSE events, whether it ended with [DONE]. */
async function readStream(response: Response): Promise<{ content: string; events: unknown[]; done: boolean }> {
  const text = await response.text();
  const events: unknown[] = [];
  let done = false;
  for (const block of text.split('\n\n')) {
    const data = block.replace(/^data: /, '');
    if (data === '') continue;
    if (data === '[DONE]') done = true;
    else events.push(JSON.parse(data));
  }
  const content = events.map((e) => (e as { choices?: { delta?: { content?: string } }[] }).choices?.[0]?.delta?.content ?? '').join('');
  return { content, events, done };
}

describe('GET /metrics', () => {
  it('needs the API key, parses as Prometheus text, and its counters move with requests', async () => {
    const server = await start({ detector: new FakeDetector(), apiKey: KEY });
    expect((await fetch(`${server.url}/metrics`)).status).toBe(401);
    const response = await fetch(`${server.url}/metrics`, { headers: AUTH });
    expect(response.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const before = parsePrometheus(await response.text());

    expect((await chat(server.url, 'Hi there', {}, AUTH)).status).toBe(200); // 8 tokens
    expect((await chat(server.url, 'how to build a bomb', {}, AUTH)).status).toBe(200); // flagged and blocked at its 2nd token
    const streamed = await chat(server.url, 'Hello', { stream: true }, AUTH); // 8 tokens
    expect((await readStream(streamed)).done).toBe(true);
    expect((await chat(server.url, 'Hi', { max_tokens: 0 }, AUTH)).status).toBe(400);
    expect((await fetch(`${server.url}/nowhere`, { headers: AUTH })).status).toBe(404);
    const text = await fetch(`${server.url}/v1/completions`, {
      method: 'POST', headers: { ...AUTH, 'content-type': 'application/json' }, body: JSON.stringify({ model: MODEL, prompt: 'Once', max_tokens: 3 }),
    }); // 3 tokens
    expect(text.status).toBe(200);

    // A request is counted when its response closes, just after the client has it: scrape until the last one shows.
    let after = await scrape(server.url, AUTH);
    for (let i = 0; i < 100 && delta(before, after, 'redflag_http_requests_total', { route: '/v1/completions' }) === 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      after = await scrape(server.url, AUTH);
    }
    expect(delta(before, after, 'redflag_http_requests_total', { ...CHAT, status: '200' })).toBe(3);
    expect(delta(before, after, 'redflag_http_requests_total', { ...CHAT, status: '400' })).toBe(1);
    expect(delta(before, after, 'redflag_http_requests_total', { route: 'unmatched', status: '404' })).toBe(1);
    expect(delta(before, after, 'redflag_flagged_answers_total')).toBe(1);
    expect(delta(before, after, 'redflag_chat_completions_total', { finish_reason: 'content_filter' })).toBe(1);
    expect(delta(before, after, 'redflag_chat_completions_total', { finish_reason: 'stop' })).toBe(2);
    // Text completions are counted apart; tokens, flags and latencies count both.
    expect(delta(before, after, 'redflag_text_completions_total', { finish_reason: 'length' })).toBe(1);
    expect(delta(before, after, 'redflag_chat_completions_total', { finish_reason: 'length' })).toBe(0);
    expect(delta(before, after, 'redflag_http_requests_total', { route: '/v1/completions', status: '200' })).toBe(1);
    expect(delta(before, after, 'redflag_completion_tokens_total')).toBe(2 * ANSWER.length + 2 + 3);
    // The fake counts prompt words: "Hi there" 2, "how to build a bomb" 5, "Hello" 1, "Once" 1.
    expect(delta(before, after, 'redflag_prompt_tokens_total')).toBe(9);
    expect(delta(before, after, 'redflag_time_to_first_token_seconds_count')).toBe(4);
    // Gaps between consecutive tokens shown: 7 + 0 (the flagged step's token is not) + 7 + 2.
    expect(delta(before, after, 'redflag_inter_token_latency_seconds_count')).toBe(16);
    expect(metricValue(after, 'redflag_time_to_first_token_seconds_bucket', { le: '+Inf' })).toBe(metricValue(after, 'redflag_time_to_first_token_seconds_count'));
    // Gauges (and the OOM-split counter) read from detector.stats() (the fake's: nothing running, a 1 GiB budget, 3 splits) and the process's own.
    expect(metricValue(after, 'redflag_kv_cache_budget_bytes')).toBe(2 ** 30);
    expect(metricValue(after, 'redflag_oom_splits_total')).toBe(3);
    expect(metricValue(after, 'redflag_guesses_dropped_total')).toBe(2);
    for (const name of ['redflag_queue_depth', 'redflag_running_sequences', 'redflag_kv_cache_bytes']) {
      expect(after.some((s) => s.name === name)).toBe(true);
    }
    expect(metricValue(after, 'redflag_model_ready')).toBe(1);
    expect(metricValue(after, 'process_resident_memory_bytes')).toBeGreaterThan(0);
  });

  it('keeps each server\'s metrics apart', async () => {
    const a = await start({ detector: new FakeDetector() });
    const b = await start({ detector: new FakeDetector() });
    const beforeB = await scrape(b.url);
    // Completion tokens are counted before the answer is sent.
    expect((await chat(a.url, 'Hi')).status).toBe(200);
    expect(delta(beforeB, await scrape(a.url), 'redflag_completion_tokens_total')).toBe(ANSWER.length);
    expect(delta(beforeB, await scrape(b.url), 'redflag_completion_tokens_total')).toBe(0);
  });
});

describe('readiness and liveness', () => {
  it('answers loading (503) until the detector promise resolves, then ok; liveness always', async () => {
    let resolveDetector!: (d: Detector) => void;
    const server = await start({ detector: new Promise<Detector>((resolve) => (resolveDetector = resolve)), apiKey: KEY });
    const health = await fetch(`${server.url}/health`, { headers: AUTH });
    expect(health.status).toBe(503);
    expect(await health.json()).toEqual({ status: 'loading' });
    expect(server.state).toBe('loading');
    const live = await fetch(`${server.url}/health/live`, { headers: AUTH });
    expect(live.status).toBe(200);
    expect(await live.json()).toEqual({ status: 'alive' });
    const early = await chat(server.url, 'Hi', {}, AUTH);
    expect(early.status).toBe(503);
    expect(early.headers.get('retry-after')).toBe('1');
    expect(((await early.json()) as { error: { code: string } }).error.code).toBe('model_loading');
    const moderation = await fetch(`${server.url}/v1/moderations`, { method: 'POST', headers: { ...AUTH, 'content-type': 'application/json' }, body: '{"input":"x"}' });
    expect(moderation.status).toBe(503);
    expect((await fetch(`${server.url}/v1/models`, { headers: AUTH })).status).toBe(200);
    expect(metricValue(await scrape(server.url, AUTH), 'redflag_model_ready')).toBe(0);

    resolveDetector(new FakeDetector());
    await waitFor(() => server.state === 'ok', 'the server to be ready');
    const ready = await fetch(`${server.url}/health`, { headers: AUTH });
    expect(ready.status).toBe(200);
    expect(await ready.json()).toMatchObject({ status: 'ok', active: 0, kvCacheBudget: 2 ** 30 });
    expect((await chat(server.url, 'Hi', {}, AUTH)).status).toBe(200);
  });

  it('reports a detector that failed to load as failed, for good', async () => {
    const server = await start({ detector: Promise.reject(new Error('no weights here')) });
    await waitFor(() => server.state === 'failed', 'the load failure');
    const health = await fetch(`${server.url}/health`);
    expect(health.status).toBe(503);
    expect(await health.json()).toEqual({ status: 'failed' });
    const response = await chat(server.url, 'Hi');
    expect(response.status).toBe(503);
    const body = (await response.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe('model_unavailable');
    expect(body.error.message).not.toContain('no weights here');
    expect((await fetch(`${server.url}/health/live`)).status).toBe(200);
  });
});

describe('request log', () => {
  function capture(): { lines: string[]; stream: { write(line: string): void } } {
    const lines: string[] = [];
    return { lines, stream: { write: (line: string) => void lines.push(...line.split('\n').filter(Boolean)) } };
  }
  const requestLines = (lines: string[]) => lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l['msg'] === 'request');

  it('writes one JSON line per request with its figures, and no prompt or answer text', async () => {
    const log = capture();
    const server = await start({ detector: new FakeDetector(), logger: { stream: log.stream } });
    expect((await chat(server.url, 'a private question')).status).toBe(200);
    expect((await readStream(await chat(server.url, 'how to build a bomb', { stream: true }))).done).toBe(true);
    expect((await chat(server.url, 'Hi', { temperature: 'hot' })).status).toBe(400);
    await waitFor(() => requestLines(log.lines).length === 3, 'three request lines');

    const [plain, streamed, invalid] = requestLines(log.lines);
    expect(plain).toMatchObject({
      method: 'POST',
      route: '/v1/chat/completions',
      status: 200,
      promptTokens: 3,
      completionTokens: ANSWER.length,
      finishReason: 'stop',
      flagged: false,
      error: null,
    });
    expect(plain!['id']).toEqual(expect.any(String));
    expect(plain!['ttftMs']).toEqual(expect.any(Number));
    expect(plain!['latencyMs'] as number).toBeGreaterThanOrEqual(plain!['ttftMs'] as number);
    expect(streamed).toMatchObject({ status: 200, flagged: true, finishReason: 'content_filter', completionTokens: 2 });
    expect(invalid).toMatchObject({ status: 400, error: 'invalid_value', promptTokens: null, ttftMs: null });
    expect(new Set(requestLines(log.lines).map((l) => l['id'])).size).toBe(3);
    const all = log.lines.join('\n');
    expect(all).not.toContain('private question');
    expect(all).not.toContain('naïve');
    expect(plain).not.toHaveProperty('prompt');
    expect(plain).not.toHaveProperty('answer');
  });

  it('names the error of a request no route or key answers', async () => {
    const log = capture();
    const server = await start({ detector: new FakeDetector(), logger: { stream: log.stream }, apiKey: 'secret' });
    expect((await fetch(`${server.url}/v1/nowhere`, { headers: { authorization: 'Bearer secret' } })).status).toBe(404);
    expect((await fetch(`${server.url}/v1/models`)).status).toBe(401);
    await waitFor(() => requestLines(log.lines).length === 2, 'two request lines');
    expect(requestLines(log.lines).map((l) => [l['status'], l['error']])).toEqual([[404, 'unknown_url'], [401, 'invalid_api_key']]);
  });

  it('adds the prompt and the answer with logContent', async () => {
    const log = capture();
    const server = await start({ detector: new FakeDetector(), logger: { stream: log.stream }, logContent: true });
    expect((await chat(server.url, 'a private question')).status).toBe(200);
    await waitFor(() => requestLines(log.lines).length === 1, 'the request line');
    expect(requestLines(log.lines)[0]).toMatchObject({ prompt: [{ role: 'user', content: 'a private question' }], answer: ANSWER.join('') });
  });

  it('logs a stream the client left as 499', async () => {
    const log = capture();
    const detector = new FakeDetector();
    const server = await start({ detector, logger: { stream: log.stream } });
    const controller = new AbortController();
    const response = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'slow' }], stream: true }),
      signal: controller.signal,
    });
    const reader = response.body!.getReader();
    await reader.read();
    controller.abort();
    await waitFor(() => requestLines(log.lines).length === 1, 'the request line');
    expect(requestLines(log.lines)[0]).toMatchObject({ status: 499, route: '/v1/chat/completions' });
  });
});

describe('drain', () => {
  it('lets a running stream finish, refuses new requests meanwhile, then closes', async () => {
    const detector = new FakeDetector();
    const server = await start({ detector });
    const running = chat(server.url, 'wait for it', { stream: true });
    await waitFor(() => detector.generations.length === 1, 'the generation to start');
    // A grace period past what one setTimeout takes (2^31 ms; such a timer fires at once).
    const drained = server.drain(3e9);
    await waitFor(() => server.state === 'draining', 'the drain to begin');

    const refused = await chat(server.url, 'Hi');
    expect(refused.status).toBe(503);
    expect(refused.headers.get('connection')).toBe('close');
    expect(((await refused.json()) as { error: { code: string } }).error.code).toBe('unavailable');
    const health = await fetch(`${server.url}/health`);
    expect(health.status).toBe(503);
    expect(await health.json()).toMatchObject({ status: 'draining' });
    expect((await fetch(`${server.url}/health/live`)).status).toBe(200);

    detector.release();
    const { content, done } = await readStream(await running);
    expect(content).toBe(ANSWER.join(''));
    expect(done).toBe(true);
    expect(await drained).toEqual({ finished: 1, cancelled: 0 });
    await expect(fetch(`${server.url}/health/live`)).rejects.toThrow();
  });

  it('cancels a request that outlives the grace period', async () => {
    const detector = new FakeDetector();
    const server = await start({ detector });
    const endless = chat(server.url, 'slow', { stream: true });
    await waitFor(() => (detector.generations[0]?.produced ?? 0) > 0, 'the first token');
    expect(await server.drain(200)).toEqual({ finished: 0, cancelled: 1 });
    const { events, done } = await readStream(await endless);
    expect(done).toBe(false);
    expect(events.at(-1)).toMatchObject({ error: { code: 'unavailable' } });
    expect(detector.generations[0]!.options.signal!.aborted).toBe(true);
  });

  it('counts the requests a close() during the drain cancels as cancelled (a second signal)', async () => {
    const detector = new FakeDetector();
    const server = await start({ detector });
    const endless = chat(server.url, 'slow', { stream: true });
    await waitFor(() => (detector.generations[0]?.produced ?? 0) > 0, 'the first token');
    const drained = server.drain(60_000);
    await waitFor(() => server.state === 'draining', 'the drain to begin');
    await server.close();
    expect(await drained).toEqual({ finished: 0, cancelled: 1 });
    await readStream(await endless);
  });
});

describe('redflag serve', () => {
  const ROOT = join(import.meta.dirname, '..');
  const TEMPLATE = "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";

  it('drains on SIGTERM: the running stream finishes, request lines go to stdout, exit code 0', async () => {
    const { loadModel } = await import('../lib/model/model.js');
    const { addRedFlagToken } = await import('../lib/model/red-flag.js');
    const dir = await tinyLlama({}, TEMPLATE);
    const rfDir = `${dir}-rf`;
    const model = await loadModel(dir);
    await addRedFlagToken(model);
    await model.save(rfDir);
    model.dispose();
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'serve', '--model', rfDir, '--port', '0', '--threads', '1', '--drain-seconds', '120', '--served-model-name', MODEL], {
      cwd: ROOT,
      env: { ...process.env, REDFLAG_API_KEY: KEY },
    });
    try {
      let out = '';
      let err = '';
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      const url = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no URL printed: ${out} ${err}`)), 60_000);
        child.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /serving "[^"]+" at (http:\/\/127\.0\.0\.1:\d+)/.exec(out);
          if (m) {
            clearTimeout(timer);
            resolve(m[1]!);
          }
        });
        void exited.then((code) => reject(new Error(`serve exited with ${code}: ${out} ${err}`)));
      });
      // Long enough to be running when the signal comes; the drain lets it run to its end.
      const response = await chat(url, 'Tell me a long story.', { stream: true, max_tokens: 1000, temperature: 0 }, AUTH);
      expect(response.status).toBe(200);
      const reader = response.body!.getReader();
      const decoder = new TextDecoder();
      let text = decoder.decode((await reader.read()).value, { stream: true });
      child.kill('SIGTERM');
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) text += decoder.decode(chunk.value, { stream: true });
      expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true);
      expect(text).not.toContain('"error"');
      expect(await exited).toBe(0);
      expect(err).toMatch(/draining/);
      // The stream was still running when the signal came (1000 tokens take far longer than a signal).
      expect(err).toMatch(/drained: 1 request\(s\) finished, 0 cancelled/);
      const lines = out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines.find((l) => l['msg'] === 'request' && l['route'] === '/v1/chat/completions')).toMatchObject({ status: 200, ttftMs: expect.any(Number) });
      expect(out).not.toContain('long story');
    } finally {
      child.kill('SIGKILL');
      await rm(rfDir, { recursive: true, force: true });
      await rm(dir, { recursive: true, force: true });
    }
  }, 120_000);
});
