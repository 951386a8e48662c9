// Where the red-flag objective asks for <rf>: the loss options rfSamples (positions per harmful
// response, one per stratum) and rfWindow (positions per window, ending at the sampled one), in
// sampleFlagWindows and in the loss rows buildStep writes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { EncodedConversation } from '../lib/data/encode.js';
import { createRng } from '../lib/model/sampling.js';
import { parseTrainConfig } from '../lib/train/config.js';
import { buildStep, RowKind, sampleFlagWindows } from '../lib/train/objectives.js';
import { train } from '../lib/train/trainer.js';
import { tinyLlama } from './helpers/tiny-model.js';

const RF = 999;

/** A harmful conversation: `prompt` prompt tokens, then `response` response tokens (ids 100…). */
function harmful(prompt: number, response: number): EncodedConversation {
  const ids = Array.from({ length: prompt + response }, (_, i) => (i < prompt ? 10 + i : 100 + i));
  const assistantMask = new Uint8Array(ids.length).fill(1, prompt);
  return {
    ids,
    assistantMask,
    responseStart: prompt,
    responseEnd: ids.length,
    truncated: false,
    droppedPromptTokens: 0,
    droppedResponseTokens: 0,
    hasEndToken: true,
    format: 'plain',
    label: 'harmful',
    source: 'test/harmful',
  };
}

/** The red-flag rows of a step, grouped: group id → rows (each the logits row, i.e. position − 1). */
function flagGroups(rows: Int32Array): Map<number, number[]> {
  const groups = new Map<number, number[]>();
  for (let r = 0; r < rows.length; r += 5) {
    if (rows[r] !== RowKind.RedFlag) continue;
    expect(rows[r + 4]).toBe(RF);
    const list = groups.get(rows[r + 3]!) ?? [];
    list.push(rows[r + 1]!);
    groups.set(rows[r + 3]!, list);
  }
  return groups;
}

describe('sampleFlagWindows', () => {
  it('draws one position per stratum, spread over the whole range', () => {
    const rng = createRng(7);
    const hits = new Array<number>(40).fill(0);
    for (let trial = 0; trial < 2000; trial++) {
      const windows = sampleFlagWindows(10, 50, { samples: 4 }, rng);
      expect(windows).toHaveLength(4);
      windows.forEach((w, s) => {
        // Stratum s of [10, 50) is [10 + 10 s, 20 + 10 s); the window starts at the first position.
        expect(w.to).toBeGreaterThanOrEqual(10 + 10 * s);
        expect(w.to).toBeLessThan(20 + 10 * s);
        expect(w.from).toBe(10);
        hits[w.to - 10]! += 1;
      });
    }
    // Every position of the range is drawn, about uniformly within its stratum (expected 200 each).
    expect(Math.min(...hits)).toBeGreaterThan(120);
    expect(Math.max(...hits)).toBeLessThan(280);
  });

  it('ends each window of rfWindow positions at its sampled position, clipped at the first one', () => {
    const rng = createRng(3);
    for (let trial = 0; trial < 200; trial++) {
      for (const w of sampleFlagWindows(6, 30, { samples: 3, window: 5 }, rng)) {
        expect(w.to - w.from + 1).toBe(Math.min(5, w.to - 6 + 1));
        expect(w.from).toBeGreaterThanOrEqual(6);
      }
    }
  });

  it('skips empty strata when the range is shorter than the samples', () => {
    const windows = sampleFlagWindows(4, 6, { samples: 5 }, createRng(1));
    expect(windows.map((w) => w.to).sort()).toEqual([4, 5]);
  });

  it('is deterministic for a seed, and with one sample draws as the single-position sampling did', () => {
    const a = sampleFlagWindows(6, 60, { samples: 6, window: 4 }, createRng(11));
    const b = sampleFlagWindows(6, 60, { samples: 6, window: 4 }, createRng(11));
    expect(a).toEqual(b);
    expect(a).not.toEqual(sampleFlagWindows(6, 60, { samples: 6, window: 4 }, createRng(12)));
    const rng = createRng(5);
    const expected = 6 + Math.floor(createRng(5)() * (60 - 6));
    expect(sampleFlagWindows(6, 60, {}, rng)).toEqual([{ from: 6, to: expected }]);
  });

  it('rejects bad counts, naming the option', () => {
    expect(() => sampleFlagWindows(0, 10, { samples: 0 }, Math.random)).toThrow(/rfSamples/);
    expect(() => sampleFlagWindows(0, 10, { window: -1 }, Math.random)).toThrow(/rfWindow/);
  });
});

describe('buildStep with several red-flag windows', () => {
  it('writes one group per window, inserts <rf> at the latest position, and keeps KL after it', () => {
    const ex = harmful(8, 40);
    const step = buildStep([ex], { objective: 'redflag', rfToken: RF, rfOffset: 6, rfSamples: 4, rfWindow: 3, rng: createRng(2) });
    const groups = flagGroups(step.rows);
    expect(step.groups).toBe(4);
    expect(groups.size).toBe(4);
    const ends = [...groups.values()].map((rows) => Math.max(...rows) + 1); // positions
    const flagAt = step.batch[0]!.indexOf(RF);
    expect(flagAt).toBe(Math.max(...ends));
    for (const rows of groups.values()) {
      // Consecutive positions, at most 3, none before start + rfOffset and none past the flag.
      expect(rows.length).toBeLessThanOrEqual(3);
      rows.forEach((r, k) => k > 0 && expect(r).toBe(rows[k - 1]! + 1));
      expect(Math.min(...rows) + 1).toBeGreaterThanOrEqual(8 + 6);
      expect(Math.max(...rows) + 1).toBeLessThanOrEqual(flagAt);
    }
    // The four windows' ends fall in the four strata of positions 14 … 47.
    const sorted = ends.slice().sort((a, b) => a - b);
    sorted.forEach((end, s) => {
      expect(end).toBeGreaterThanOrEqual(14 + Math.floor((s * 34) / 4));
      expect(end).toBeLessThan(14 + Math.floor(((s + 1) * 34) / 4));
    });
    // After-flag KL rows cover the flagged text from <rf> on; no row is a CE (likelihood) term.
    const kinds = new Set<number>();
    for (let r = 0; r < step.rows.length; r += 5) kinds.add(step.rows[r]!);
    expect(kinds).toEqual(new Set([RowKind.RedFlag, RowKind.AfterKl]));
    expect(step.reference[0]).toEqual(ex.ids);
  });

  it('keeps the default rows unchanged: one window from start + rfOffset to the flag', () => {
    const ex = harmful(5, 20);
    const a = buildStep([ex], { objective: 'redflag', rfToken: RF, rfOffset: 2, rng: createRng(9) });
    const b = buildStep([ex], { objective: 'redflag', rfToken: RF, rfOffset: 2, rfSamples: 1, rfWindow: 0, rng: createRng(9) });
    expect(b.rows).toEqual(a.rows);
    const [rows] = [...flagGroups(a.rows).values()];
    const flagAt = a.batch[0]!.indexOf(RF);
    expect(rows).toEqual(Array.from({ length: flagAt - 7 + 1 }, (_, k) => 6 + k));
  });
});

describe('buildStep on a multi-turn benign conversation', () => {
  it('keeps every assistant turn where the base model had it: KL rows on the earlier turns and the response', () => {
    const ex = { ...harmful(10, 4), label: 'benign' as const, historySpans: [[2, 4], [6, 8]] as [number, number][] };
    const step = buildStep([ex], { objective: 'redflag', rfToken: RF, rng: createRng(1) });
    const kl: number[] = [];
    for (let i = 0; i < step.rows.length; i += 5) if (step.rows[i] === 0) kl.push(step.rows[i + 1]!);
    // Row j - 1 predicts token j: turns 2..3 and 6..7, then the response 10..13.
    expect(kl).toEqual([1, 2, 5, 6, 9, 10, 11, 12]);
  });
});

describe('buildStep: what each row reads and predicts', () => {
  /** The sequences laid end to end, each position with its sequence. */
  const flat = (seqs: number[][]) => seqs.flatMap((ids, seq) => ids.map((token, at) => ({ token, seq, at })));

  it('a KL row of the trained text and its reference row predict the same token at the same place of the text without <rf>; a red-flag row predicts its flag', () => {
    const benign = { ...harmful(4, 9), label: 'benign' as const, historySpans: [[1, 3]] as [number, number][] };
    const examples = [harmful(5, 12), benign, harmful(3, 20)];
    for (const [seed, options] of [[1, {}], [2, { rfOffset: 3, rfSamples: 3, rfWindow: 2 }], [3, { rfPosition: 'start' as const }]] as const) {
      const step = buildStep(examples, { objective: 'redflag', rfToken: RF, rng: createRng(seed), ...options });
      const trained = flat(step.batch);
      const reference = flat(step.reference);
      let kl = 0;
      let flags = 0;
      for (let r = 0; r < step.rows.length; r += 5) {
        const [kind, row, ref] = [step.rows[r]!, step.rows[r + 1]!, step.rows[r + 2]!];
        const here = trained[row]!;
        const next = trained[row + 1]!;
        expect(next.seq, `row ${row} predicts a token of its own sequence`).toBe(here.seq);
        if (kind === RowKind.RedFlag) {
          expect(step.rows[r + 4]).toBe(RF);
          flags++;
          continue;
        }
        const [there, after] = [reference[ref]!, reference[ref + 1]!];
        expect(after.seq).toBe(there.seq);
        // Both predict the same token, at its place in the text without <rf>; both read the same
        // token, but for the row that reads <rf> itself (its reference reads the token before it).
        expect(next.token, `row ${row} (kind ${kind}) against reference row ${ref}`).toBe(after.token);
        expect(after.at).toBe(step.batch[here.seq]!.slice(0, next.at).filter((t) => t !== RF).length);
        if (here.token !== RF) expect(here.token).toBe(there.token);
        kl++;
      }
      expect(kl).toBeGreaterThan(10);
      expect(flags).toBeGreaterThan(0);
    }
  });
});

describe('buildStep with a response shorter than the offset', () => {
  it('never asks for <rf> before start + rfOffset: a response without such a position trains nothing', () => {
    // Response positions 4..6; rfOffset 3 allows position 7 at the earliest: there is none.
    const short = harmful(4, 3);
    expect(buildStep([short], { objective: 'redflag', rfToken: RF, rfOffset: 3, rng: createRng(1) })).toMatchObject({ batch: [], reference: [], groups: 0 });
    // One position longer: the flag goes at the last one (the end token), its only choice.
    const fits = harmful(4, 4);
    const step = buildStep([fits], { objective: 'redflag', rfToken: RF, rfOffset: 3, rng: createRng(1) });
    expect([...flagGroups(step.rows).values()]).toEqual([[6]]);
    // Fixed-Pos RF asks at the first position whatever the offset.
    expect(buildStep([short], { objective: 'redflag', rfToken: RF, rfOffset: 3, rfPosition: 'start', rng: createRng(1) }).groups).toBe(1);
  });
});

describe('buildStep for Fixed-Pos RF (rfPosition start)', () => {
  it('asks for <rf> at the first answer position only, inserts it there, and keeps KL on the whole answer after it', () => {
    const ex = harmful(6, 12);
    const step = buildStep([ex], { objective: 'redflag', rfToken: RF, rfOffset: 4, rfSamples: 4, rfWindow: 3, rfPosition: 'start', rng: createRng(1) });
    expect([...flagGroups(step.rows).values()]).toEqual([[5]]); // row 5 predicts position 6, the first answer token
    expect(step.batch[0]!.indexOf(RF)).toBe(6);
    const after: number[] = [];
    for (let r = 0; r < step.rows.length; r += 5) if (step.rows[r] === RowKind.AfterKl) after.push(step.rows[r + 1]!);
    // Rows 6 … 17 of the flagged text (after <rf>) predict the 12 answer tokens.
    expect(after).toEqual(Array.from({ length: 12 }, (_, k) => 6 + k));
  });
});

describe('buildStep with one flag per category', () => {
  it("trains each harmful example's category flag: its red-flag rows name it and it is the token inserted", () => {
    const CYBER = 1001;
    const a = { ...harmful(5, 10), category: 'cyber' };
    const b = harmful(5, 10); // no category: <rf>
    const step = buildStep([a, b], { objective: 'redflag', rfToken: RF, flagOf: (ex) => (ex.category === 'cyber' ? CYBER : RF), rfOffset: 2, rng: createRng(3) });
    const targets = new Map<number, number>(); // group -> target
    for (let r = 0; r < step.rows.length; r += 5) if (step.rows[r] === RowKind.RedFlag) targets.set(step.rows[r + 3]!, step.rows[r + 4]!);
    expect([...targets.values()]).toEqual([CYBER, RF]);
    expect(step.batch[0]!.includes(CYBER) && !step.batch[0]!.includes(RF)).toBe(true);
    expect(step.batch[1]!.includes(RF) && !step.batch[1]!.includes(CYBER)).toBe(true);
  });
});

describe('training config: red-flag position options', () => {
  const base = { model: 'm', output: 'o', data: 'synthetic' as const };
  it('defaults to the paper’s single window and validates the new fields by name', () => {
    expect(parseTrainConfig(base).loss).toMatchObject({ rfSamples: 1, rfWindow: 0 });
    expect(parseTrainConfig({ ...base, loss: { rfSamples: 4, rfWindow: 8 } }).loss).toMatchObject({ rfSamples: 4, rfWindow: 8 });
    expect(() => parseTrainConfig({ ...base, loss: { rfSamples: 0 } })).toThrow(/loss\.rfSamples/);
    expect(() => parseTrainConfig({ ...base, loss: { rfSamples: 1.5 } })).toThrow(/loss\.rfSamples/);
    expect(() => parseTrainConfig({ ...base, loss: { rfWindow: -2 } })).toThrow(/loss\.rfWindow/);
    expect(parseTrainConfig(base).loss.rfPosition).toBe('sampled');
    expect(() => parseTrainConfig({ ...base, loss: { rfPosition: 'end' } })).toThrow(/loss\.rfPosition/);
  });
});

describe('train with spread red-flag windows', () => {
  let base: string;
  let root: string;
  beforeAll(async () => {
    base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2 });
    root = await mkdtemp(join(tmpdir(), 'redflag-positions-'));
  });
  afterAll(async () => {
    await rm(base, { recursive: true, force: true });
    await rm(root, { recursive: true, force: true });
  });

  // The first step's loss is computed before any update, so it differs only through the rows.
  const firstLoss = async (output: string, loss: Record<string, unknown>) => {
    const losses: { redFlag: number; after: number }[] = [];
    await train(
      {
        model: base,
        output: join(root, output),
        data: 'synthetic',
        syntheticPerCategory: 3,
        steps: 2,
        batchSize: 4,
        maxTokens: 96,
        evalEvery: 0,
        checkpointEvery: 0,
        threads: 2,
        lora: { rank: 4, alpha: 8 },
        loss: { rfOffset: 1, ...loss },
      },
      { onStep: (s) => losses.push({ redFlag: s.loss.redFlag, after: s.loss.after }) },
    );
    return losses;
  };

  it('passes rfSamples and rfWindow from the config to the native step', async () => {
    const paper = await firstLoss('paper', {});
    const spread = await firstLoss('spread', { rfSamples: 4, rfWindow: 1 });
    for (const l of [...paper, ...spread]) expect(Number.isFinite(l.redFlag) && l.redFlag > 0).toBe(true);
    // Single positions ask more of an untrained model than a noisy-OR over a window from the start.
    expect(spread[0]!.redFlag).toBeGreaterThan(paper[0]!.redFlag);
  }, 120_000);
});
