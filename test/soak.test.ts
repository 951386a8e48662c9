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
    // Floors of once-a-second RSS readings under load, right after the warm-up and at the end
    // (see bench/soak.ts). With a GC before each reading (--expose-gc, or V8's flag set at run
    // time, which the soak does itself) garbage not yet collected cannot pass for growth: 5%.
    // Without one, uncollected garbage moves the floor by itself; 15% then still catches a leak
    // of any size that matters over 30 s.
    const bound = report.memory.gc ? 0.05 : 0.15;
    expect(report.memory.rssGrowth, JSON.stringify(report.memory)).toBeLessThan(bound);
  }, 180_000);
});
