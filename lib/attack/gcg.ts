/**
 * Adaptive GCG (greedy coordinate gradient, Zou et al. 2023) against the red flag: a discrete
 * suffix appended to the harmful request, optimised so that the harmful answer stays likely AND
 * p(`<rf>`) stays low over it — an attacker who knows the detector. The objective is
 * {@link AttackModel.loss}'s: the answer's mean cross-entropy + λ·log p(`<rf>` at least once)
 * (with category flags, that term averaged over the flags), the same for ranking and scoring.
 *
 * Each step: the gradient of the objective with respect to the suffix tokens' one-hot vectors
 * (the input-embedding gradient times the embedding matrix) ranks, per position, the `topK`
 * tokens whose swap would lower it most; `candidates` suffixes, each with one position swapped
 * to one of its top tokens at random, are scored exactly (teacher-forced, batched); the best
 * replaces the suffix. A candidate whose text does not tokenise back to the same ids is dropped
 * (as llm-attacks does), so the final suffix works as plain text against the detector or the
 * server. Special tokens and `<rf>` are never proposed.
 * @module
 */
import { encodeConversation, type EncodedConversation } from '../data/encode.js';
import type { Message } from '../data/records.js';
import { RedflagError } from '../errors.js';
import { createRng } from '../model/sampling.js';
import type { AttackModel } from './gradient-model.js';

/** Options of {@link gcgAttack}. */
export interface GcgOptions {
  /** Suffix length in tokens. Default 20. */
  length?: number;
  /** Optimisation steps. Default 50. */
  steps?: number;
  /** Tokens kept per position from the gradient ranking. Default 64. */
  topK?: number;
  /** Candidate suffixes scored per step. Default 32. */
  candidates?: number;
  /** Weight of the red-flag term. Default 1. */
  lambda?: number;
  /** The initial suffix's text, repeated to `length` tokens. Default `'!'` (GCG's). */
  init?: string;
  /** Tokens of the prompt + suffix + answer at most. Default 512. */
  maxTokens?: number;
  seed?: number;
  signal?: AbortSignal;
  onStep?: (step: number, objective: number, maxPRf: number) => void;
}

/** The attack's outcome on one conversation. */
export interface GcgResult {
  /** The suffix, as token ids and as the text appended to the request (after a space). */
  suffixIds: number[];
  suffixText: string;
  /** Objective and largest p(`<rf>`) over the answer: with the initial suffix, and with the final one. */
  objectiveBefore: number;
  objectiveAfter: number;
  maxPRfBefore: number;
  maxPRfAfter: number;
  /** The messages with the suffix in the last user turn (the answer not included). */
  messages: Message[];
  steps: number;
}

interface Scored {
  ids: number[];
  objective: number;
  maxPRf: number;
}

/** The conversation with `suffix` appended to the last user turn, encoded; null when the suffix does not survive re-tokenisation. */
function place(model: AttackModel, prompt: readonly Message[], answer: string, suffix: readonly number[], maxTokens: number) {
  const tokenizer = model.model.tokenizer!;
  const text = tokenizer.decode(suffix);
  const messages = prompt.map((m) => ({ ...m }));
  const last = messages.at(-1)!;
  last.content = `${last.content} ${text}`;
  const e = encodeConversation(tokenizer, { messages: [...messages, { role: 'assistant', content: answer }], label: 'harmful', source: 'gcg' }, { maxTokens });
  if (e.truncated) return null;
  // The suffix's tokens must appear as they are, last occurrence inside the prompt.
  const n = suffix.length;
  for (let start = e.responseStart - n; start >= 0; start--) {
    let same = true;
    for (let i = 0; i < n && same; i++) same = e.ids[start + i] === suffix[i];
    if (same) return { encoded: e, start, text, messages };
  }
  return null;
}

type Placed = NonNullable<ReturnType<typeof place>>;

/**
 * The objective of encoded targets, {@link AttackModel.loss}'s (ce + λ·log P(flag at least
 * once), averaged over the flags with category flags), and their largest p(<rf>) (of any flag:
 * what the detector compares), from one batched teacher-forced pass.
 */
async function scoreAll(model: AttackModel, targets: { ids: number[]; responseStart: number; responseEnd: number }[], lambda: number, signal?: AbortSignal) {
  const m = model.model;
  const seqs = targets.map(() => m.newSequence());
  try {
    const { pRf, logprobs, pFlags } = await m.teacherForced(seqs, targets.map((t) => t.ids), { rfToken: model.rfToken, ...(signal ? { signal } : {}) });
    const K = pFlags ? model.flagIds.length : 1;
    const flagP = pFlags ?? pRf;
    let offset = 0;
    return targets.map((t) => {
      let ce = 0;
      const logNone = new Float64Array(K);
      let maxPRf = 0;
      for (let r = t.responseStart - 1; r < t.responseEnd - 1; r++) {
        ce -= logprobs[offset + r]!;
        for (let k = 0; k < K; k++) logNone[k]! += Math.log1p(-Math.min(flagP[(offset + r) * K + k]!, 1 - 1e-7));
        maxPRf = Math.max(maxPRf, pRf[offset + r]!);
      }
      offset += t.ids.length;
      const n = t.responseEnd - t.responseStart;
      let logAny = 0;
      for (const l of logNone) logAny += Math.log(Math.max(-Math.expm1(l), 1e-30)) / K;
      return { objective: ce / n + (model.rfToken >= 0 ? lambda * logAny : 0), maxPRf };
    });
  } finally {
    for (const s of seqs) s.dispose();
  }
}

/**
 * Every token for each of `length` positions from `start`, best swap first by the one-hot
 * gradient: d objective / d onehot[t][v] = E[v] · g[t], most negative first (banned tokens
 * last). GCG keeps the top of each list.
 * @internal
 */
export async function swapRanking(
  model: AttackModel,
  target: { ids: number[]; responseStart: number; responseEnd: number },
  start: number,
  length: number,
  lambda: number,
  banned: ReadonlySet<number>,
  signal?: AbortSignal,
): Promise<number[][]> {
  const V = model.model.vocabSize;
  const H = model.hidden;
  const table = model.embeddingTable();
  const tableRows = table.length / H;
  const { grad } = await model.loss(target, new Float32Array(target.ids.length * H), lambda, signal);
  const ranking: number[][] = [];
  for (let t = 0; t < length; t++) {
    const g = grad.subarray((start + t) * H, (start + t + 1) * H);
    const scores = new Float32Array(V).fill(Infinity);
    for (let v = 0; v < Math.min(V, tableRows); v++) {
      let s = 0;
      const row = v * H;
      for (let i = 0; i < H; i++) s += table[row + i]! * g[i]!;
      scores[v] = banned.has(v) ? Infinity : s;
    }
    ranking.push(Array.from({ length: V }, (_, v) => v).sort((a, b) => scores[a]! - scores[b]!));
  }
  return ranking;
}

/**
 * The exact objective of each target, batched (as GCG scores its candidates).
 * @internal
 */
export async function scoreTargets(model: AttackModel, targets: { ids: number[]; responseStart: number; responseEnd: number }[], lambda: number): Promise<number[]> {
  return (await scoreAll(model, targets, lambda)).map((s) => s.objective);
}

/** Runs adaptive GCG on one harmful conversation: `prompt` (ending with the user's request) and the harmful `answer` to keep likely. */
export async function gcgAttack(model: AttackModel, prompt: readonly Message[], answer: string, options: GcgOptions = {}): Promise<GcgResult> {
  const tokenizer = model.model.tokenizer;
  if (!tokenizer) throw new RedflagError('INVALID_ARGUMENT', 'GCG needs the model\'s tokenizer');
  if (prompt.at(-1)?.role !== 'user') throw new RedflagError('INVALID_ARGUMENT', 'GCG: the prompt must end with the user\'s request');
  const length = options.length ?? 20;
  const steps = options.steps ?? 50;
  const topK = options.topK ?? 64;
  const candidates = options.candidates ?? 32;
  const lambda = options.lambda ?? 1;
  const maxTokens = options.maxTokens ?? 512;
  const rng = createRng(options.seed ?? 0);
  // Never propose special tokens (they do not survive as text) nor a flag token.
  const banned = new Set<number>([...tokenizer.specialTokenIds, ...model.flagIds]);

  const initIds = tokenizer.encode(options.init ?? '!', { addSpecialTokens: false });
  if (initIds.length === 0) throw new RedflagError('INVALID_ARGUMENT', 'GCG: the initial suffix text encodes to no tokens');
  let suffix = Array.from({ length }, (_, i) => initIds[i % initIds.length]!);
  const first = place(model, prompt, answer, suffix, maxTokens);
  if (!first) throw new RedflagError('INVALID_ARGUMENT', 'GCG: the initial suffix does not survive tokenisation in this prompt (try another init) or the conversation is over maxTokens');
  let placed: Placed = first;
  const target = (e: EncodedConversation) => ({ ids: e.ids, responseStart: e.responseStart, responseEnd: e.responseEnd });
  const [initial] = await scoreAll(model, [target(placed.encoded)], lambda, options.signal);
  let current: Scored & { start: number } = { ids: suffix, ...initial!, start: placed.start };
  const before = { ...current };
  // GCG moves to the best candidate of each step even when it is worse; report the best seen.
  let bestSeen = { ...current, placed };

  for (let step = 0; step < steps; step++) {
    // 1. The topK tokens per suffix position by the one-hot gradient.
    const top = (await swapRanking(model, target(placed.encoded), current.start, length, lambda, banned, options.signal)).map((order) => order.slice(0, topK));
    // 2. Candidates: one random position swapped to one of its top tokens.
    const proposals: { ids: number[]; placed: Placed }[] = [];
    for (let c = 0; c < candidates; c++) {
      const ids = current.ids.slice();
      const t = Math.floor(rng() * length);
      ids[t] = top[t]![Math.floor(rng() * topK)]!;
      const p = place(model, prompt, answer, ids, maxTokens);
      if (p) proposals.push({ ids, placed: p });
    }
    if (proposals.length === 0) continue;
    // 3. Exact scores, batched; the best candidate replaces the suffix.
    const scored = await scoreAll(model, proposals.map((p) => target(p.placed.encoded)), lambda, options.signal);
    let best = 0;
    for (let i = 1; i < scored.length; i++) if (scored[i]!.objective < scored[best]!.objective) best = i;
    current = { ids: proposals[best]!.ids, ...scored[best]!, start: proposals[best]!.placed.start };
    placed = proposals[best]!.placed;
    suffix = current.ids;
    if (current.objective < bestSeen.objective) bestSeen = { ...current, placed };
    options.onStep?.(step + 1, current.objective, current.maxPRf);
  }
  return {
    suffixIds: bestSeen.ids,
    suffixText: bestSeen.placed.text,
    objectiveBefore: before.objective,
    objectiveAfter: bestSeen.objective,
    maxPRfBefore: before.maxPRf,
    maxPRfAfter: bestSeen.maxPRf,
    messages: bestSeen.placed.messages,
    steps,
  };
}
