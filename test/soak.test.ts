/**
 * A 30-second soak (bench/soak.ts, whose full run is `npm run bench -- soak`): 64 streaming and
 * non-streaming clients over loopback with disconnects and bad bodies mixed in. No unexpected
 * error (anything but the 4xx the bad bodies deserve), every completed greedy answer equal to the
 * same request's answer generated alone, and no memory growth after the warm-up.
 */
import { describe, expect, it } from 'vitest';

import { runSoak } from '../bench/soak.js';

describe('soak', () => {
  it('serves 64 clients for 30 s without unexpected errors, answer drift or memory growth', async () => {
    const report = await runSoak({ seconds: 30, clients: 64, seed: 7 });
    expect(report.errors.unexpected, report.errors.unexpectedExamples.join('\n')).toEqual({});
    // The mix did happen: completed answers of both kinds, disconnects and each kind of bad body.
    expect(report.requests).toMatchObject({ whole: expect.any(Number), streamed: expect.any(Number), disconnected: expect.any(Number) });
    expect(Object.keys(report.errors.expected).sort()).toEqual(['400 invalid', '400 malformed', '413 oversized']);
    expect(report.greedy.compared).toBeGreaterThan(100);
    expect(report.greedy.examples).toEqual([]);
    expect(report.greedy.mismatches).toBe(0);
    expect(report.ttftMs.p50).toBeGreaterThan(0);
    // Every KV cache made during the load was freed once it ended (a scheduler path that forgets
    // to dispose a sequence shows here; injecting a leak of 1 finish in 50 left 110 alive while
    // RSS moved by -0.6%).
    expect(report.memory.liveSequences).toBe(0);
    // Floors of once-a-second readings under load, right after the warm-up and at the end (see
    // bench/soak.ts), each after a GC. Live bytes (V8 heap + the C allocator's bytes in use) do
    // not move with fragmentation: 1.3% and 0.7% on two runs, so 5% means a leak. Resident
    // memory creeps while the allocator settles (-1% to +5.2% over 30 s, no leak), so it is only
    // a backstop against leaks outside both (15%), or the verdict where glibc's count is missing.
    const mem = JSON.stringify(report.memory);
    if (report.memory.liveGrowth !== null) expect(report.memory.liveGrowth, mem).toBeLessThan(0.05);
    expect(report.memory.rssGrowth, mem).toBeLessThan(0.15);
  }, 180_000);
});
