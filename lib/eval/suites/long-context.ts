/**
 * The long-context attack: K benign exchanges (user request and answer, from the benign data)
 * come before the harmful request, and the model answers greedily. Flagged, refused and
 * defended (either) rates against K. A conversation that would not leave room for the answer in
 * the model's positions is left out at that K (counted).
 * @module
 */
import { RedflagError } from '../../errors.js';
import { promptMessages, responseText, type Message } from '../../data/records.js';
import type { Estimate } from '../stats.js';
import type { SeriesPoint, Suite } from '../types.js';
import { cachedGenerations, itemName, promptIdsOf, rate, verdictOf, withResponses, type GenerationUnit } from './common.js';

export interface LongContextPoint {
  k: number;
  n: number;
  skipped: number;
  meanPromptTokens: number;
  flagRate: Estimate;
  refusalRate: Estimate;
  defendedRate: Estimate;
  asr: Estimate;
}

export interface LongContextResult {
  points: LongContextPoint[];
  flagSeries: SeriesPoint[];
  defendedSeries: SeriesPoint[];
}

export const longContextSuite: Suite<LongContextResult> = {
  name: 'long-context',
  description: 'K benign exchanges before the harmful request; greedy answer flagged / refused against K',
  units: ({ data, settings }) => data.harmful.length * settings.contextK.length,
  check({ data, settings }) {
    if (Math.max(0, ...settings.contextK) > 0 && withResponses(data.benign).length === 0) {
      throw new RedflagError('INVALID_ARGUMENT', 'the long-context suite needs benign conversations with responses (--benign) for the exchanges before the request');
    }
  },
  async run(ctx) {
    const { settings, data } = ctx;
    longContextSuite.check!(ctx);
    const benign = withResponses(data.benign);
    const maxK = Math.max(0, ...settings.contextK);
    const room = ctx.variant.model.config.maxPositions - settings.maxTokens;
    const units: (GenerationUnit & { k: number; conv: number; tokens: number })[] = [];
    const skipped = new Map<number, number>();
    for (const k of settings.contextK) {
      data.harmful.forEach((c, i) => {
        const history: Message[] = [];
        // Exchanges rotate through the benign data, different ones for each request.
        for (let j = 0; j < k; j++) {
          const b = benign[(i * maxK + j) % benign.length]!;
          const user = promptMessages(b).filter((m) => m.role !== 'system');
          history.push(...user.slice(-1), { role: 'assistant', content: responseText(b)! });
        }
        const request = promptMessages(c);
        const system = request[0]?.role === 'system' ? [request[0]] : [];
        const messages = [...system, ...history, ...request.filter((m) => m.role !== 'system')];
        const prompt = promptIdsOf(ctx.variant, messages);
        if (prompt.length > room) {
          skipped.set(k, (skipped.get(k) ?? 0) + 1);
          return;
        }
        units.push({ item: `K${k}/${itemName(i, c)}`, request: { prompt, pick: { temperature: 0 } }, k, conv: i, tokens: prompt.length });
      });
    }
    const total = units.length;
    const gens = await cachedGenerations(ctx, units, { onChunk: (n) => ctx.progress(n, total) });
    const points: LongContextPoint[] = [];
    for (const k of settings.contextK) {
      const idx = units.map((u, i) => (u.k === k ? i : -1)).filter((i) => i >= 0);
      const verdicts = await Promise.all(idx.map((i) => verdictOf(ctx, gens[i]!, data.harmful[units[i]!.conv]!)));
      points.push({
        k,
        n: idx.length,
        skipped: skipped.get(k) ?? 0,
        meanPromptTokens: idx.length ? idx.reduce((s, i) => s + units[i]!.tokens, 0) / idx.length : 0,
        flagRate: rate(verdicts.map((v) => v.flagged)),
        refusalRate: rate(verdicts.map((v) => v.refused)),
        defendedRate: rate(verdicts.map((v) => v.flagged || v.refused)),
        asr: rate(verdicts.map((v) => v.broken)),
      });
    }
    return {
      points,
      flagSeries: points.map((p) => ({ x: p.k, y: p.flagRate.value })),
      defendedSeries: points.map((p) => ({ x: p.k, y: p.defendedRate.value })),
    };
  },
  summarize(r) {
    const values = r.points.filter((p) => p.n > 0).map((p) => p.defendedRate.value);
    return { headline: { longContextMinDefended: values.length ? Math.min(...values) : null } };
  },
};
