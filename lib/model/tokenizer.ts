/**
 * The tokenizer of a Hugging Face model directory (`tokenizer.json` + `tokenizer_config.json`),
 * built on `@huggingface/tokenizers`, with the chat-template rendering of transformers
 * (`@huggingface/jinja`), streaming decoding, and the edits redflag needs (adding or renaming
 * special tokens) saved back in the same two-file format transformers reads.
 *
 * @module
 */
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { Template } from '@huggingface/jinja';
import * as hfTokenizers from '@huggingface/tokenizers';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';

import { RedflagError } from '../errors.js';
import { readJsonFile } from './config.js';
import { writeFileAtomic } from './safetensors.js';

/** File names of a tokenizer, as transformers writes them. */
export const TOKENIZER_FILE = 'tokenizer.json';
/** See {@link TOKENIZER_FILE}. */
export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';
/** A chat template stored on its own (transformers ≥ 4.43 writes this; it wins over the config's). */
export const CHAT_TEMPLATE_FILE = 'chat_template.jinja';

/** One chat turn. Templates may read more fields (e.g. `tool_calls`), passed through as is. */
export interface ChatMessage {
  /** `system`, `user`, `assistant`, ... as the template expects. */
  role: string;
  /** The turn's text. */
  content: string;
  /** Extra fields some templates read. */
  [field: string]: unknown;
}

/** Options for {@link Tokenizer.encode}. */
export interface EncodeOptions {
  /** Add the tokens the tokenizer's post-processor adds (e.g. Llama's BOS). Default true. */
  addSpecialTokens?: boolean;
}

/** Options for {@link Tokenizer.decode}. */
export interface DecodeOptions {
  /** Drop special tokens (BOS, EOS, `<rf>`, ...). Default false. */
  skipSpecialTokens?: boolean;
  /**
   * Apply transformers' `clean_up_tokenization` (" ." → "." etc.). Default: the tokenizer
   * config's `clean_up_tokenization_spaces`, false when absent (the current transformers default).
   */
  cleanUpTokenizationSpaces?: boolean;
}

/** Options for {@link Tokenizer.applyChatTemplate}. */
export interface ChatTemplateOptions {
  /** Append the prompt that opens the assistant's turn. Default false. */
  addGenerationPrompt?: boolean;
  /** More template variables (e.g. `enable_thinking`, `tools`), as transformers' `**kwargs`. */
  extra?: Record<string, unknown>;
}

/** An entry of tokenizer.json's `added_tokens`. */
export interface AddedTokenEntry {
  /** Token id. */
  id: number;
  /** The exact text that maps to this id. */
  content: string;
  /** Whether it is special (skipped by `skipSpecialTokens`). */
  special: boolean;
  /** Match only as a whole word. */
  single_word?: boolean;
  /** Swallow whitespace on its left when matching. */
  lstrip?: boolean;
  /** Swallow whitespace on its right when matching. */
  rstrip?: boolean;
  /** Match against normalized text rather than the raw input. */
  normalized?: boolean;
}

type JsonObject = Record<string, unknown>;

/** Where a tokenizer came from, for error messages. */
interface Sources {
  tokenizerJson: string;
  tokenizerConfig: string;
  chatTemplate: string;
}

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Variables a template is rendered with that kwargs may not replace. */
const RESERVED_TEMPLATE_VARIABLES = ['messages', 'add_generation_prompt'];

/**
 * Checks chat-template kwargs: a JSON object (copied) whose values are JSON, not naming the
 * variables the render sets itself.
 * @internal
 */
export function checkChatTemplateKwargs(value: unknown, name: string): Record<string, unknown> {
  if (!isObject(value)) throw new RedflagError('INVALID_ARGUMENT', `${name} must be an object of template variables, e.g. {"enable_thinking": false}`);
  for (const key of Object.keys(value)) {
    if (RESERVED_TEMPLATE_VARIABLES.includes(key)) throw new RedflagError('INVALID_ARGUMENT', `${name}.${key} is set by the render itself`);
  }
  let copy: unknown;
  try {
    copy = JSON.parse(JSON.stringify(value));
  } catch (error) {
    throw new RedflagError('INVALID_ARGUMENT', `${name} must hold JSON values only (${(error as Error).message})`);
  }
  return copy as Record<string, unknown>;
}

/** A special-token field of tokenizer_config.json: a string, an AddedToken dict, or null. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (isObject(value) && typeof value['content'] === 'string') return value['content'];
  return null;
}

/** transformers' `clean_up_tokenization`, applied in the same order. */
export function cleanUpTokenization(text: string): string {
  return text
    .replaceAll(' .', '.')
    .replaceAll(' ?', '?')
    .replaceAll(' !', '!')
    .replaceAll(' ,', ',')
    .replaceAll(" ' ", "'")
    .replaceAll(" n't", "n't")
    .replaceAll(" 'm", "'m")
    .replaceAll(" 's", "'s")
    .replaceAll(" 've", "'ve")
    .replaceAll(" 're", "'re");
}

/** tokenizer.json model types @huggingface/tokenizers implements. */
const SUPPORTED_MODEL_TYPES = ['BPE', 'WordPiece', 'Unigram'];

/** Tokenizer classes whose fast version rebuilds its post-processor from add_bos_token/add_eos_token. */
const BOS_EOS_FLAG_CLASSES = /^(Llama|CodeLlama|Gemma)Tokenizer(Fast)?$/;

/** The parts of the library's BPE model that {@link accelerateLongWords} uses. */
interface BpeModel {
  merges: [string, string][];
  tokens_to_ids: Map<string, number>;
  end_of_word_suffix?: string | null;
  continuing_subword_suffix: string | null;
  ignore_merges: boolean;
  max_length_to_cache: number;
  encode(words: string[]): string[];
}

// The package's typings re-export its models with extensionless `export *`, which NodeNext
// resolution cannot follow, so the BPE class is typed here by hand.
const BpeClass = (hfTokenizers as unknown as { BPE?: abstract new (...args: never[]) => BpeModel }).BPE;

/** The word-start marker of SentencePiece-style BPE vocabularies. */
const WORD_MARKER = '▁';

/**
 * Speeds up BPE on very long pre-tokens (SentencePiece-style tokenizers have no pre-tokenizer,
 * so a whole paragraph is one "word" and BPE is quadratic-ish in it). Splitting before a `▁`
 * that no merge can join to the preceding character yields exactly the same tokens: a merge
 * that crossed the split would produce a token containing that character pair, and none does.
 */
function accelerateLongWords(hf: HfTokenizer): void {
  const model: unknown = hf.model;
  if (BpeClass === undefined || !(model instanceof BpeClass)) return;
  // These options change tokens per word (suffixes, whole-word lookups): splitting would alter them.
  if (model.end_of_word_suffix || model.continuing_subword_suffix || model.ignore_merges) return;
  // Byte-level vocabularies spell "▁" as bytes; only SentencePiece-style ones have the marker.
  if (!model.tokens_to_ids.has(WORD_MARKER)) return;
  const joinsBeforeMarker = new Set<string>();
  for (const [left, right] of model.merges) {
    const merged = left + right;
    if (merged.indexOf(WORD_MARKER, 1) < 1) continue;
    const chars = Array.from(merged);
    for (let i = 1; i < chars.length; i++) if (chars[i] === WORD_MARKER) joinsBeforeMarker.add(chars[i - 1] as string);
  }
  const longWord = model.max_length_to_cache;
  const encode = model.encode.bind(model);
  model.encode = (words: string[]): string[] => {
    if (!words.some((word) => word.length > longWord)) return encode(words);
    const pieces: string[] = [];
    for (const word of words) {
      if (word.length <= longWord) {
        pieces.push(word);
        continue;
      }
      const chars = Array.from(word);
      let start = 0;
      for (let i = 1; i < chars.length; i++) {
        if (chars[i] === WORD_MARKER && !joinsBeforeMarker.has(chars[i - 1] as string)) {
          pieces.push(chars.slice(start, i).join(''));
          start = i;
        }
      }
      pieces.push(chars.slice(start).join(''));
    }
    return encode(pieces);
  };
}

/** A pattern matching any of `tokens`, longest first (null when there are none). */
function specialTokensPattern(tokens: readonly string[]): RegExp | null {
  const kept = [...new Set(tokens.filter((t) => t.length > 0))].sort((a, b) => b.length - a.length);
  return kept.length === 0 ? null : new RegExp(kept.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|'), 'gu');
}

/** The parts of the library's BPE model that {@link fastLongWordBpe} uses. */
interface BpeWordModel extends BpeModel {
  bpe(token: string): string[];
}

/**
 * Replaces the library's BPE of one long pre-token (a run of spaces, one long "word": as long as
 * a request's body allows) by the same algorithm without its per-step allocations: the library
 * takes some 20 µs a character there, so a 1 MB request held the event loop for 20 s. Merges
 * go lowest rank first, ties to the leftmost pair, as the library's (and transformers') BPE; a
 * queued pair still stands when both its symbols are unchanged (a symbol only grows). Short
 * pre-tokens keep the library's path and its cache.
 */
function fastLongWordBpe(hf: HfTokenizer): void {
  const model: unknown = hf.model;
  if (BpeClass === undefined || !(model instanceof BpeClass) || typeof (model as Partial<BpeWordModel>).bpe !== 'function') return;
  const m = model as BpeWordModel;
  // Suffixes change the word's symbols before and after merging: left to the library.
  if (m.end_of_word_suffix || m.continuing_subword_suffix) return;
  const ranks = new Map<string, Map<string, number>>();
  m.merges.forEach(([left, right], rank) => {
    let byRight = ranks.get(left);
    if (byRight === undefined) ranks.set(left, (byRight = new Map()));
    byRight.set(right, rank); // a merge listed twice: the later rank, as the library keeps it
  });
  const original = m.bpe.bind(m);
  const longWord = m.max_length_to_cache;
  m.bpe = (token: string): string[] => {
    if (token.length < longWord) return original(token);
    const sym = Array.from(token);
    const n = sym.length;
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    for (let i = 0; i < n; i++) (next[i] = i + 1), (prev[i] = i - 1);
    next[n - 1] = -1;
    // A binary heap of candidate merges: (rank, left position), with the symbols they join.
    const heapRank: number[] = [];
    const heapPos: number[] = [];
    const heapLeft: string[] = [];
    const heapRight: string[] = [];
    const before = (a: number, b: number) => heapRank[a]! < heapRank[b]! || (heapRank[a] === heapRank[b] && heapPos[a]! < heapPos[b]!);
    const swap = (a: number, b: number) => {
      [heapRank[a], heapRank[b]] = [heapRank[b]!, heapRank[a]!];
      [heapPos[a], heapPos[b]] = [heapPos[b]!, heapPos[a]!];
      [heapLeft[a], heapLeft[b]] = [heapLeft[b]!, heapLeft[a]!];
      [heapRight[a], heapRight[b]] = [heapRight[b]!, heapRight[a]!];
    };
    const push = (i: number) => {
      const j = next[i]!;
      if (j < 0) return;
      const rank = ranks.get(sym[i]!)?.get(sym[j]!);
      if (rank === undefined) return;
      let k = heapRank.length;
      heapRank.push(rank), heapPos.push(i), heapLeft.push(sym[i]!), heapRight.push(sym[j]!);
      while (k > 0) {
        const parent = (k - 1) >> 1;
        if (!before(k, parent)) break;
        swap(k, parent);
        k = parent;
      }
    };
    const pop = () => {
      const last = heapRank.length - 1;
      swap(0, last);
      const top = { pos: heapPos.pop()!, left: heapLeft.pop()!, right: heapRight.pop()! };
      heapRank.pop();
      for (let k = 0; ; ) {
        const l = 2 * k + 1;
        if (l >= heapRank.length) break;
        const c = l + 1 < heapRank.length && before(l + 1, l) ? l + 1 : l;
        if (!before(c, k)) break;
        swap(c, k);
        k = c;
      }
      return top;
    };
    for (let i = 0; i + 1 < n; i++) push(i);
    while (heapRank.length > 0) {
      const { pos: i, left, right } = pop();
      const j = next[i]!;
      if (sym[i] !== left || j < 0 || sym[j] !== right) continue; // a symbol it joins has changed
      sym[i] = left + right;
      sym[j] = '';
      const k = next[j]!;
      next[i] = k;
      if (k >= 0) prev[k] = i;
      if (prev[i]! >= 0) push(prev[i]!);
      push(i);
    }
    const out: string[] = [];
    for (let i = 0; i >= 0; i = next[i]!) out.push(sym[i]!);
    return out;
  };
}

/** special_tokens_map.json: the special tokens transformers' save_pretrained writes beside the config. */
const SPECIAL_TOKENS_MAP_FILE = 'special_tokens_map.json';
const SPECIAL_TOKEN_KEYS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token', 'additional_special_tokens'];
/** The other variables a render takes from the tokenizer (or sets): a client's kwargs may not name them. */
const TOKENIZER_TEMPLATE_VARIABLES = ['tools', 'documents', 'raise_exception', 'strftime_now'];

/**
 * The special tokens transformers' tokenizer classes set when the files name none (their
 * `__init__` defaults), by tokenizer_class, else by config.json's model_type (AutoTokenizer's
 * choice): openai-community/gpt2's tokenizer_config.json is `{"model_max_length": 1024}`.
 */
const CLASS_DEFAULTS: { classes: RegExp; modelTypes: string[]; tokens: Record<string, string> }[] = [
  { classes: /^GPT2Tokenizer(Fast)?$/, modelTypes: ['gpt2'], tokens: { bos_token: '<|endoftext|>', eos_token: '<|endoftext|>', unk_token: '<|endoftext|>' } },
  { classes: /^(Llama|CodeLlama)Tokenizer(Fast)?$/, modelTypes: ['llama', 'mistral'], tokens: { bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>' } },
  { classes: /^Qwen2Tokenizer(Fast)?$/, modelTypes: ['qwen2', 'qwen3'], tokens: { eos_token: '<|endoftext|>', unk_token: '<|endoftext|>', pad_token: '<|endoftext|>' } },
];

/** `config` with its class's default special tokens where it names none (and the vocabulary has them). */
function withClassDefaults(config: JsonObject, modelType: string | undefined, json: unknown): JsonObject {
  const tokenizerClass = typeof config['tokenizer_class'] === 'string' ? config['tokenizer_class'] : undefined;
  const entry = CLASS_DEFAULTS.find((d) => (tokenizerClass !== undefined ? d.classes.test(tokenizerClass) : modelType !== undefined && d.modelTypes.includes(modelType)));
  if (entry === undefined || !isObject(json)) return config;
  const model = isObject(json['model']) ? json['model'] : {};
  const vocab = isObject(model['vocab']) ? model['vocab'] : {};
  const added = Array.isArray(json['added_tokens']) ? json['added_tokens'] : [];
  const known = (token: string) => token in vocab || added.some((t: unknown) => isObject(t) && t['content'] === token);
  const out = { ...config };
  for (const [key, token] of Object.entries(entry.tokens)) if (!(key in out) && known(token)) out[key] = token;
  return out;
}

/**
 * A Hugging Face tokenizer. Build with {@link Tokenizer.fromDir} or {@link Tokenizer.fromObjects}.
 *
 * Encoding and decoding follow transformers' fast tokenizers; the files it saves are the same
 * two files with only the edits made through this class.
 */
export class Tokenizer {
  #json: JsonObject;
  #config: JsonObject;
  #chatTemplate: string | null;
  #chatTemplateFromFile: boolean;
  #compiledTemplate: Template | null = null;
  readonly #sources: Sources;
  #hf!: HfTokenizer;
  #specialIds = new Set<number>();
  #skipContents = new Set<string>();
  /** {@link Tokenizer.turnEndTokenId}, once read (undefined: not yet). */
  #turnEnd: number | null | undefined;
  #chatTemplateKwargs: Record<string, unknown> = {};
  #revision = 0;
  /** {@link Tokenizer.escapeSpecialTokens}'s pattern for the special tokens (built on first use; null: none). */
  #specialPattern: RegExp | null | undefined;
  #vocabSize = 0;

  private constructor(json: JsonObject, config: JsonObject, chatTemplate: string | null, templateFromFile: boolean, sources: Sources) {
    this.#json = json;
    this.#config = config;
    this.#chatTemplate = chatTemplate;
    this.#chatTemplateFromFile = templateFromFile;
    this.#sources = sources;
    this.#rebuild();
  }

  /**
   * Loads `tokenizer.json` and `tokenizer_config.json` (optional) from a model directory, and
   * `chat_template.jinja` when present. Resolves to null when there is no tokenizer.json.
   */
  static async fromDir(dir: string): Promise<Tokenizer | null> {
    const sources: Sources = {
      tokenizerJson: join(dir, TOKENIZER_FILE),
      tokenizerConfig: join(dir, TOKENIZER_CONFIG_FILE),
      chatTemplate: join(dir, CHAT_TEMPLATE_FILE),
    };
    const json = await readJsonFile(sources.tokenizerJson, { optional: true });
    if (json === undefined) return null;
    let config = (await readJsonFile(sources.tokenizerConfig, { optional: true })) ?? {};
    // special_tokens_map.json's tokens win over the config's, as in transformers' from_pretrained;
    // then the tokenizer class's defaults fill in what neither names (GPT-2's configs name none).
    const map = await readJsonFile(join(dir, SPECIAL_TOKENS_MAP_FILE), { optional: true });
    if (isObject(config) && isObject(map)) config = { ...config, ...Object.fromEntries(Object.entries(map).filter(([key]) => SPECIAL_TOKEN_KEYS.includes(key))) };
    const modelConfig = await readJsonFile(join(dir, 'config.json'), { optional: true }).catch(() => undefined);
    if (isObject(config)) config = withClassDefaults(config, isObject(modelConfig) && typeof modelConfig['model_type'] === 'string' ? modelConfig['model_type'] : undefined, json);
    const template = await readFile(sources.chatTemplate, 'utf8').catch((error: unknown) => {
      if ((error as { code?: unknown }).code === 'ENOENT') return null;
      throw new RedflagError('INVALID_FILE', `cannot read (${String(error)})`, { file: sources.chatTemplate, cause: error });
    });
    return Tokenizer.#create(json, config, template, template !== null, sources);
  }

  /**
   * Builds a tokenizer from parsed tokenizer.json and tokenizer_config.json objects (copied, so
   * later edits do not touch the caller's objects). `chatTemplate` overrides the config's.
   */
  static fromObjects(tokenizerJson: unknown, tokenizerConfig: unknown = {}, options: { chatTemplate?: string | null } = {}): Tokenizer {
    const sources: Sources = { tokenizerJson: TOKENIZER_FILE, tokenizerConfig: TOKENIZER_CONFIG_FILE, chatTemplate: CHAT_TEMPLATE_FILE };
    return Tokenizer.#create(structuredClone(tokenizerJson), structuredClone(tokenizerConfig), options.chatTemplate ?? null, false, sources);
  }

  static #create(json: unknown, config: unknown, templateOverride: string | null, templateFromFile: boolean, sources: Sources): Tokenizer {
    if (!isObject(json)) throw new RedflagError('INVALID_FILE', 'must contain a JSON object', { file: sources.tokenizerJson });
    const model = json['model'];
    if (!isObject(model)) throw new RedflagError('INVALID_FILE', 'field "model" must be an object', { file: sources.tokenizerJson });
    // The library silently treats an unknown model type as a plain vocabulary lookup; refuse instead.
    if (model['type'] !== undefined && !SUPPORTED_MODEL_TYPES.includes(model['type'] as string)) {
      throw new RedflagError('UNSUPPORTED', `field "model.type" is ${JSON.stringify(model['type'])}; supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`, {
        file: sources.tokenizerJson,
      });
    }
    if (!isObject(model['vocab']) && !Array.isArray(model['vocab'])) {
      throw new RedflagError('INVALID_FILE', 'field "model.vocab" must be an object (BPE, WordPiece) or an array (Unigram)', { file: sources.tokenizerJson });
    }
    if (!isObject(config)) throw new RedflagError('INVALID_FILE', 'must contain a JSON object', { file: sources.tokenizerConfig });
    const added = json['added_tokens'] ?? [];
    if (!Array.isArray(added)) throw new RedflagError('INVALID_FILE', 'field "added_tokens" must be an array', { file: sources.tokenizerJson });
    added.forEach((entry: unknown, index) => {
      if (!isObject(entry) || typeof entry['content'] !== 'string' || !Number.isSafeInteger(entry['id']) || (entry['id'] as number) < 0) {
        throw new RedflagError('INVALID_FILE', `field "added_tokens[${index}]" must be { id: non-negative integer, content: string, ... }`, {
          file: sources.tokenizerJson,
        });
      }
    });
    json['added_tokens'] = added;
    const template = templateOverride ?? Tokenizer.#templateFromConfig(config, sources);
    return new Tokenizer(json, config, template, templateFromFile, sources);
  }

  /** The config's chat template: a string, or the "default" of a list of named templates. */
  static #templateFromConfig(config: JsonObject, sources: Sources): string | null {
    const value = config['chat_template'];
    if (value === undefined || value === null) return null;
    if (typeof value === 'string') return value;
    const named = Array.isArray(value)
      ? value.map((entry: unknown) => (isObject(entry) ? [entry['name'], entry['template']] : [undefined, undefined]))
      : isObject(value)
        ? Object.entries(value)
        : null;
    if (named === null) {
      throw new RedflagError('INVALID_FILE', 'field "chat_template" must be a string or a list of { name, template }', { file: sources.tokenizerConfig });
    }
    const chosen = named.find(([name]) => name === 'default');
    // transformers refuses to pick among named templates without a default; so does redflag,
    // rather than fall back to a plain prompt format the model was never trained on.
    if (chosen === undefined && named.length > 0) {
      throw new RedflagError('INVALID_FILE', `field "chat_template" names templates ${named.map(([name]) => JSON.stringify(name)).join(', ')} but none "default", the one redflag uses: add it, or put the template to use in ${CHAT_TEMPLATE_FILE}`, {
        file: sources.tokenizerConfig,
      });
    }
    if (chosen !== undefined && typeof chosen[1] !== 'string') {
      throw new RedflagError('INVALID_FILE', 'field "chat_template": the "default" template must be a string', { file: sources.tokenizerConfig });
    }
    return (chosen?.[1] as string | undefined) ?? null;
  }

  /** Counts changes to what encoding gives (edits, kwargs): a copy made at one revision is stale at the next. */
  get revision(): number {
    return this.#revision;
  }

  /** Rebuilds the underlying tokenizer and the derived tables after a change to the files. */
  #rebuild(): void {
    this.#revision++;
    const json = this.#json;
    const runtime: JsonObject = {
      normalizer: null,
      pre_tokenizer: null,
      post_processor: null,
      decoder: null,
      ...json,
    };
    const postProcessor = this.#bosEosPostProcessor();
    if (postProcessor !== undefined) runtime['post_processor'] = postProcessor;
    try {
      this.#hf = new HfTokenizer(runtime, this.#config);
    } catch (error) {
      throw new RedflagError('INVALID_FILE', `unsupported or malformed tokenizer (${(error as Error).message})`, {
        file: this.#sources.tokenizerJson,
        cause: error,
      });
    }
    accelerateLongWords(this.#hf);
    fastLongWordBpe(this.#hf);

    const added = this.addedTokens();
    this.#specialIds = new Set(added.filter((t) => t.special).map((t) => t.id));
    // Like transformers' skip_special_tokens: special added tokens plus additional_special_tokens.
    this.#skipContents = new Set(added.filter((t) => t.special).map((t) => t.content));
    this.#specialPattern = undefined;
    this.#turnEnd = undefined;
    const extra = this.#config['additional_special_tokens'];
    if (Array.isArray(extra)) for (const token of extra) if (tokenContent(token) !== null) this.#skipContents.add(tokenContent(token) as string);
    let maxId = -1;
    for (const id of this.#modelVocab().values()) if (id > maxId) maxId = id;
    for (const token of added) if (token.id > maxId) maxId = token.id;
    this.#vocabSize = maxId + 1;
  }

  /**
   * transformers' LlamaTokenizerFast (and CodeLlama, Gemma) regenerate the post-processor from
   * add_bos_token / add_eos_token (defaults true / false), ignoring the one in tokenizer.json;
   * this returns that regenerated post-processor, or undefined for other classes.
   */
  #bosEosPostProcessor(): JsonObject | undefined {
    const tokenizerClass = this.#config['tokenizer_class'];
    if (typeof tokenizerClass !== 'string' || !BOS_EOS_FLAG_CLASSES.test(tokenizerClass)) return undefined;
    const addBos = this.#config['add_bos_token'] ?? true;
    const addEos = this.#config['add_eos_token'] ?? false;
    const bos = tokenContent(this.#config['bos_token']);
    const eos = tokenContent(this.#config['eos_token']);
    const fail = (flag: string, token: string): RedflagError =>
      new RedflagError('INVALID_FILE', `field "${flag}" is true but "${token}" is not set`, { file: this.#sources.tokenizerConfig });
    if (addBos === true && bos === null) throw fail('add_bos_token', 'bos_token');
    if (addEos === true && eos === null) throw fail('add_eos_token', 'eos_token');
    const special = (token: string | null, typeId: number): JsonObject[] => (token === null ? [] : [{ SpecialToken: { id: token, type_id: typeId } }]);
    const bosItems = (typeId: number): JsonObject[] => (addBos === true ? special(bos, typeId) : []);
    const eosItems = (typeId: number): JsonObject[] => (addEos === true ? special(eos, typeId) : []);
    return {
      type: 'TemplateProcessing',
      single: [...bosItems(0), { Sequence: { id: 'A', type_id: 0 } }, ...eosItems(0)],
      pair: [...bosItems(0), { Sequence: { id: 'A', type_id: 0 } }, ...eosItems(0), ...bosItems(1), { Sequence: { id: 'B', type_id: 1 } }, ...eosItems(1)],
      special_tokens: {},
    };
  }

  /** The model's own vocabulary (without added tokens): token → id. */
  #modelVocab(): Map<string, number> {
    const model = this.#json['model'] as JsonObject;
    const vocab = model['vocab'];
    const map = new Map<string, number>();
    if (Array.isArray(vocab)) {
      // Unigram: [[piece, score], ...], the index is the id.
      vocab.forEach((entry: unknown, id) => {
        if (Array.isArray(entry) && typeof entry[0] === 'string') map.set(entry[0], id);
      });
    } else if (isObject(vocab)) {
      for (const [token, id] of Object.entries(vocab)) if (typeof id === 'number') map.set(token, id);
    }
    return map;
  }

  #addedEntries(): JsonObject[] {
    return this.#json['added_tokens'] as JsonObject[];
  }

  // -------------------------------------------------------------------------------------------
  // Vocabulary
  // -------------------------------------------------------------------------------------------

  /** Number of ids: the largest id of the model vocabulary or the added tokens, plus one. */
  get vocabSize(): number {
    return this.#vocabSize;
  }

  /** Ids of the special added tokens, ascending. */
  get specialTokenIds(): number[] {
    return [...this.#specialIds].sort((a, b) => a - b);
  }

  /** The added tokens (tokenizer.json's `added_tokens`), ascending by id. */
  addedTokens(): AddedTokenEntry[] {
    return this.#addedEntries()
      .map((entry) => ({
        id: entry['id'] as number,
        content: entry['content'] as string,
        special: entry['special'] === true,
        single_word: entry['single_word'] === true,
        lstrip: entry['lstrip'] === true,
        rstrip: entry['rstrip'] === true,
        normalized: entry['normalized'] === true,
      }))
      .sort((a, b) => a.id - b.id);
  }

  /** Whether `id` is a special token. */
  isSpecialId(id: number): boolean {
    return this.#specialIds.has(id);
  }

  /** The id of a token string (added or in the model vocabulary). */
  tokenToId(token: string): number | undefined {
    return this.#hf.token_to_id(token);
  }

  /** The token string of an id. */
  idToToken(id: number): string | undefined {
    return Number.isSafeInteger(id) && id >= 0 ? this.#hf.id_to_token(id) : undefined;
  }

  /**
   * The special-token strings tokenizer_config.json names (bos_token, eos_token, unk_token,
   * pad_token, sep_token, cls_token, mask_token), as transformers' `special_tokens_map`.
   */
  get specialTokensMap(): Record<string, string> {
    const map: Record<string, string> = {};
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token']) {
      const content = tokenContent(this.#config[key]);
      if (content !== null) map[key] = content;
    }
    return map;
  }

  /** tokenizer_config.json's `bos_token`, or null. */
  get bosToken(): string | null {
    return tokenContent(this.#config['bos_token']);
  }

  /** Id of {@link Tokenizer.bosToken}, or null. */
  get bosTokenId(): number | null {
    return this.bosToken === null ? null : (this.tokenToId(this.bosToken) ?? null);
  }

  /** tokenizer_config.json's `eos_token`, or null. */
  get eosToken(): string | null {
    return tokenContent(this.#config['eos_token']);
  }

  /** Id of {@link Tokenizer.eosToken}, or null. */
  get eosTokenId(): number | null {
    return this.eosToken === null ? null : (this.tokenToId(this.eosToken) ?? null);
  }

  /** tokenizer_config.json's `pad_token`, or null. */
  get padToken(): string | null {
    return tokenContent(this.#config['pad_token']);
  }

  /** Id of {@link Tokenizer.padToken}, or null. */
  get padTokenId(): number | null {
    return this.padToken === null ? null : (this.tokenToId(this.padToken) ?? null);
  }

  // -------------------------------------------------------------------------------------------
  // Encoding and decoding
  // -------------------------------------------------------------------------------------------

  /**
   * `text` with every special token it spells (special added tokens, and added tokens named in
   * additional_special_tokens; or only `tokens`) broken by a zero-width space (U+200B) after its
   * first character, so that {@link Tokenizer.encode} reads those characters as text and never
   * as the control token. For text from someone else: a message that spells `<|im_end|>` would
   * otherwise close its turn and forge the next, and one that spells `<rf>` would put the flag
   * token itself in the model's context (transformers parses them alike: transformers#29279).
   */
  escapeSpecialTokens(text: string, tokens?: readonly string[]): string {
    const pattern = tokens === undefined ? (this.#specialPattern ??= specialTokensPattern(this.addedTokens().map((t) => t.content).filter((c) => this.#skipContents.has(c)))) : specialTokensPattern(tokens);
    if (pattern === null) return text;
    return text.replace(pattern, (token) => {
      const first = String.fromCodePoint(token.codePointAt(0)!);
      return `${first}\u200b${token.slice(first.length)}`;
    });
  }

  /** Text → token ids. Added/special tokens written in the text become their ids. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new RedflagError('INVALID_ARGUMENT', `encode expects a string, got ${typeof text}`);
    const ids: unknown[] = this.#hf.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
    // An unknown piece with no unk token maps to undefined inside the library; the Rust tokenizer drops it.
    return ids.filter((id): id is number => typeof id === 'number');
  }

  /**
   * Token ids → text. Ids outside the vocabulary are dropped (as transformers' fast tokenizers
   * do), so decoding a model's padding-row ids cannot fail.
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const kept = this.#keptIds(ids, options.skipSpecialTokens ?? false);
    const text = this.#rawDecode(kept);
    return (options.cleanUpTokenizationSpaces ?? this.cleansUpTokenizationSpaces) ? cleanUpTokenization(text) : text;
  }

  /** Whether {@link Tokenizer.decode} applies clean_up_tokenization by default. */
  get cleansUpTokenizationSpaces(): boolean {
    return this.#config['clean_up_tokenization_spaces'] === true;
  }

  /** Ids that survive decoding: valid, in the vocabulary, and not skipped special tokens. */
  #keptIds(ids: readonly number[], skipSpecialTokens: boolean): number[] {
    if (!Array.isArray(ids)) throw new RedflagError('INVALID_ARGUMENT', 'decode expects an array of token ids');
    const kept: number[] = [];
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
        throw new RedflagError('INVALID_ARGUMENT', `token id at index ${i} must be a non-negative integer, got ${String(id)}`);
      }
      const token = this.#hf.id_to_token(id);
      if (token === undefined) continue;
      if (skipSpecialTokens && this.#skipContents.has(token)) continue;
      kept.push(id);
    }
    return kept;
  }

  /** Decoder output for already-filtered ids, without clean-up (the library rejects empty input). */
  #rawDecode(ids: readonly number[]): string {
    if (ids.length === 0) return '';
    return this.#hf.decode(ids as number[], { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  /** @internal Used by {@link IncrementalDecoder}: decoder output for ids it already filtered, without clean-up. */
  _decodeForStreaming(ids: readonly number[]): string {
    return this.#rawDecode(ids);
  }

  /** @internal Used by {@link IncrementalDecoder}: whether an id is dropped from output. */
  _dropsFromOutput(id: number, skipSpecialTokens: boolean): boolean {
    return this.#keptIds([id], skipSpecialTokens).length === 0;
  }

  // -------------------------------------------------------------------------------------------
  // Chat templates
  // -------------------------------------------------------------------------------------------

  /** The chat template (from chat_template.jinja, else tokenizer_config.json), or null. */
  get chatTemplate(): string | null {
    return this.#chatTemplate;
  }

  #template(): Template {
    if (this.#chatTemplate === null) {
      throw new RedflagError('INVALID_ARGUMENT', 'this tokenizer has no chat template (no "chat_template" field and no chat_template.jinja)', {
        file: this.#sources.tokenizerConfig,
      });
    }
    if (this.#compiledTemplate === null) {
      try {
        this.#compiledTemplate = new Template(this.#chatTemplate);
      } catch (error) {
        const where = this.#chatTemplateFromFile ? { file: this.#sources.chatTemplate } : { file: this.#sources.tokenizerConfig };
        const field = this.#chatTemplateFromFile ? 'chat template' : 'field "chat_template"';
        throw new RedflagError('INVALID_FILE', `${field} does not parse: ${(error as Error).message}`, { ...where, cause: error });
      }
    }
    return this.#compiledTemplate;
  }

  /**
   * Template variables every render gets, under a render's own `extra` (transformers'
   * `chat_template_kwargs`; e.g. Qwen3's `{ enable_thinking: false }`, which opens each answer
   * with an empty think block). Training, evaluation, the detector and the server all render
   * through here, so one setting keeps the prompts a model is trained on and served with alike.
   * Set it with `loadModel`'s `chatTemplateKwargs`; an adapter trained with some brings them.
   */
  get chatTemplateKwargs(): Readonly<Record<string, unknown>> {
    return this.#chatTemplateKwargs;
  }

  set chatTemplateKwargs(value: Readonly<Record<string, unknown>>) {
    const kwargs = checkChatTemplateKwargs(value, 'chatTemplateKwargs');
    // The same kwargs again (every applyAdapter sets them) change nothing: no new revision.
    if (JSON.stringify(kwargs) === JSON.stringify(this.#chatTemplateKwargs)) return;
    this.#chatTemplateKwargs = kwargs;
    this.#turnEnd = undefined;
    this.#revision++;
  }

  /**
   * A client's template kwargs (a request's, untrusted), checked as {@link checkChatTemplateKwargs}
   * and read as text as messages are: no key may replace a variable the render takes from the
   * tokenizer (`bos_token`, ..., `tools`; a client setting `bos_token` to `<rf>` would put the
   * flag into the context), none may change one of {@link Tokenizer.chatTemplateKwargs} (the
   * prompts an adapter was trained on), and every string in them, keys of nested objects
   * included, has its special tokens escaped (a template may print one).
   */
  clientTemplateKwargs(value: unknown, name: string): Record<string, unknown> {
    const kwargs = checkChatTemplateKwargs(value, name);
    for (const key of Object.keys(kwargs)) {
      if (SPECIAL_TOKEN_KEYS.includes(key) || TOKENIZER_TEMPLATE_VARIABLES.includes(key)) throw new RedflagError('INVALID_ARGUMENT', `${name}.${key} is the tokenizer's, not a request's`);
      // The model's own kwargs (its adapter's: the prompts it was trained on) are not a client's to
      // change: a detector trained without thinking, asked to think, reads prompts it never saw.
      const own = this.#chatTemplateKwargs[key];
      if (own !== undefined && JSON.stringify(own) !== JSON.stringify(kwargs[key])) {
        throw new RedflagError('INVALID_ARGUMENT', `${name}.${key} is set by the model (${JSON.stringify(own)}): a request may not change it`);
      }
    }
    // Keys too: a template may print a dict's items.
    const escape = (v: unknown): unknown =>
      typeof v === 'string' ? this.escapeSpecialTokens(v) : Array.isArray(v) ? v.map(escape) : isObject(v) ? Object.fromEntries(Object.entries(v).map(([k, x]) => [this.escapeSpecialTokens(k), escape(x)])) : v;
    return escape(kwargs) as Record<string, unknown>;
  }

  /**
   * Renders a conversation with the chat template, passing the variables transformers passes:
   * `messages`, `add_generation_prompt`, `tools` and `documents` (none unless given in `extra`),
   * the special-token strings (`bos_token`, `eos_token`, ...), `additional_special_tokens`,
   * `raise_exception`, `strftime_now`, then {@link Tokenizer.chatTemplateKwargs}, then `extra`.
   */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    if (!Array.isArray(messages)) throw new RedflagError('INVALID_ARGUMENT', 'messages must be an array of { role, content }');
    messages.forEach((message, index) => {
      if (!isObject(message) || typeof message.role !== 'string') {
        throw new RedflagError('INVALID_ARGUMENT', `messages[${index}] must be an object with a string "role"`);
      }
    });
    const template = this.#template();
    const variables: Record<string, unknown> = { ...this.specialTokensMap };
    const extraSpecial = this.#config['additional_special_tokens'];
    if (Array.isArray(extraSpecial)) variables['additional_special_tokens'] = extraSpecial.map(tokenContent).filter((t) => t !== null);
    // transformers passes tools=None and documents=None when there are none; templates test `is none`.
    Object.assign(variables, { tools: null, documents: null }, this.#chatTemplateKwargs, options.extra ?? {}, {
      messages: structuredClone(messages),
      add_generation_prompt: options.addGenerationPrompt ?? false,
    });
    try {
      return template.render(variables);
    } catch (error) {
      throw new RedflagError('INVALID_ARGUMENT', `the chat template rejected the conversation: ${(error as Error).message}`, { cause: error });
    }
  }

  /**
   * The special token the chat template ends an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
   * `<end_of_turn>`, `</s>`), read from a probe conversation's render: the first thing after the
   * answer but whitespace. Null without a template, or where the answer is followed by anything
   * else. A base model that ships an instruct template (Qwen2.5's `<|endoftext|>` EOS, ChatML's
   * `<|im_end|>` turns) ends its answers with this one, not the EOS.
   */
  get turnEndTokenId(): number | null {
    if (this.#turnEnd !== undefined) return this.#turnEnd;
    this.#turnEnd = null;
    if (this.#chatTemplate === null) return null;
    const answer = 'Sure, here it is.';
    let render: string;
    try {
      render = this.applyChatTemplate([{ role: 'user', content: 'Hello?' }, { role: 'assistant', content: answer }]);
    } catch {
      return null;
    }
    const at = render.lastIndexOf(answer);
    if (at < 0) return null;
    const tail = render.slice(at + answer.length).trimStart();
    const special = this.addedTokens().filter((t) => this.#skipContents.has(t.content) && tail.startsWith(t.content));
    special.sort((a, b) => b.content.length - a.content.length);
    this.#turnEnd = special[0]?.id ?? null;
    return this.#turnEnd;
  }

  /**
   * Renders and encodes a conversation. Like transformers' `apply_chat_template(tokenize=True)`,
   * the rendered text is encoded without adding special tokens: templates write their own BOS.
   */
  encodeChat(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  // -------------------------------------------------------------------------------------------
  // Editing
  // -------------------------------------------------------------------------------------------

  /**
   * Makes `content` a special token and returns its id. An existing added token is reused (and
   * marked special); a string already in the model vocabulary keeps its id; anything else gets
   * a new id equal to the current {@link Tokenizer.vocabSize}. Both files are updated:
   * tokenizer.json's `added_tokens` and tokenizer_config.json's `added_tokens_decoder` (and
   * `additional_special_tokens`), as transformers' `add_special_tokens` would.
   */
  addSpecialToken(content: string): number {
    if (typeof content !== 'string' || content.length === 0) {
      throw new RedflagError('INVALID_ARGUMENT', 'a special token must be a non-empty string');
    }
    const entries = this.#addedEntries();
    const existing = entries.find((entry) => entry['content'] === content);
    let id: number;
    if (existing !== undefined) {
      id = existing['id'] as number;
      if (existing['special'] === true) return id;
      existing['special'] = true;
      existing['normalized'] = false;
    } else {
      id = this.#modelVocab().get(content) ?? this.#vocabSize;
      entries.push({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
      entries.sort((a, b) => (a['id'] as number) - (b['id'] as number));
    }
    this.#recordSpecialInConfig(id, content, null);
    this.#rebuild();
    return id;
  }

  /**
   * Gives the added token `id` a new content (e.g. turning an unused reserved token into
   * `<rf>`), keeping its id, in both files. The vocabulary size does not change; the old string
   * is no longer a token and would be tokenized as ordinary text.
   */
  renameSpecialToken(id: number, content: string): void {
    if (typeof content !== 'string' || content.length === 0) throw new RedflagError('INVALID_ARGUMENT', 'a special token must be a non-empty string');
    const entry = this.#addedEntries().find((candidate) => candidate['id'] === id);
    if (entry === undefined) throw new RedflagError('INVALID_ARGUMENT', `id ${id} is not an added token, so it cannot be renamed`);
    const old = entry['content'] as string;
    if (old === content) return;
    const clash = this.tokenToId(content);
    if (clash !== undefined) throw new RedflagError('INVALID_ARGUMENT', `cannot rename token ${id} to ${JSON.stringify(content)}: that is already token ${clash}`);
    entry['content'] = content;
    entry['special'] = true;
    entry['normalized'] = false;
    const vocab = (this.#json['model'] as JsonObject)['vocab'];
    if (isObject(vocab) && vocab[old] === id) {
      delete vocab[old];
      vocab[content] = id;
    }
    this.#recordSpecialInConfig(id, content, old);
    this.#rebuild();
  }

  /** Mirrors a special token in tokenizer_config.json (added_tokens_decoder, additional_special_tokens). */
  #recordSpecialInConfig(id: number, content: string, replaces: string | null): void {
    const decoder = isObject(this.#config['added_tokens_decoder']) ? this.#config['added_tokens_decoder'] : {};
    this.#config['added_tokens_decoder'] = decoder;
    const previous = isObject(decoder[String(id)]) ? (decoder[String(id)] as JsonObject) : {};
    decoder[String(id)] = { lstrip: false, normalized: false, rstrip: false, single_word: false, ...previous, content, special: true };
    const additional = Array.isArray(this.#config['additional_special_tokens']) ? (this.#config['additional_special_tokens'] as unknown[]) : [];
    const withoutOld = replaces === null ? additional : additional.filter((token) => tokenContent(token) !== replaces);
    if (!withoutOld.some((token) => tokenContent(token) === content)) withoutOld.push(content);
    this.#config['additional_special_tokens'] = withoutOld;
  }

  /**
   * Copies of the two files' contents, with every edit applied. A chat template that came from
   * chat_template.jinja is written into the config's `chat_template` when it has none, so the
   * pair of files is self-contained.
   */
  toFiles(): { tokenizerJson: Record<string, unknown>; tokenizerConfig: Record<string, unknown> } {
    const tokenizerConfig = structuredClone(this.#config);
    if (this.#chatTemplate !== null && tokenizerConfig['chat_template'] === undefined) tokenizerConfig['chat_template'] = this.#chatTemplate;
    return { tokenizerJson: structuredClone(this.#json), tokenizerConfig };
  }

  /**
   * Writes tokenizer.json and tokenizer_config.json into `dir` (created if needed), each
   * atomically, and chat_template.jinja when the template came from one (it wins over the
   * config's on loading, as in transformers; one left from another tokenizer is removed).
   * Without `overwrite: true`, nothing is written if any of the three already exists.
   */
  async save(dir: string, options: { overwrite?: boolean } = {}): Promise<void> {
    const overwrite = options.overwrite ?? false;
    await mkdir(dir, { recursive: true });
    const templateFile = join(dir, CHAT_TEMPLATE_FILE);
    const targets = [join(dir, TOKENIZER_FILE), join(dir, TOKENIZER_CONFIG_FILE), templateFile];
    if (!overwrite) {
      for (const target of targets) {
        const present = await stat(target).then(
          () => true,
          () => false,
        );
        if (present) throw new RedflagError('INVALID_ARGUMENT', 'refusing to overwrite an existing file (pass overwrite: true to replace it)', { file: target });
      }
    }
    const { tokenizerJson, tokenizerConfig } = this.toFiles();
    const encoder = new TextEncoder();
    const [jsonPath, configPath] = targets as [string, string];
    await writeFileAtomic(jsonPath, [encoder.encode(JSON.stringify(tokenizerJson, null, 2))], { overwrite });
    await writeFileAtomic(configPath, [encoder.encode(`${JSON.stringify(tokenizerConfig, null, 2)}\n`)], { overwrite });
    if (this.#chatTemplateFromFile && this.#chatTemplate !== null) await writeFileAtomic(templateFile, [encoder.encode(this.#chatTemplate)], { overwrite });
    else await rm(templateFile, { force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming decode
// ---------------------------------------------------------------------------------------------

/** Characters that occur in clean_up_tokenization's patterns; any other character is a safe cut. */
const CLEANUP_PATTERN_CHARS = new Set([' ', '.', '?', '!', ',', "'", 'n', 't', 'm', 's', 'v', 'e', 'r']);

/**
 * Turns a stream of generated ids into text that is safe to show as it arrives. Text is held
 * back while it ends in an incomplete UTF-8 sequence (byte-level or byte-fallback pieces of one
 * character), so everything returned by {@link IncrementalDecoder.push} plus
 * {@link IncrementalDecoder.flush} concatenates exactly to `tokenizer.decode(allIds, options)`.
 *
 * Each push decodes only a small window of recent ids (as text-generation-inference does), so
 * streaming costs O(1) per token rather than re-decoding everything.
 */
export class IncrementalDecoder {
  readonly #tokenizer: Tokenizer;
  readonly #skipSpecialTokens: boolean;
  readonly #cleanUp: boolean;
  /** Ids that reach the output (skipped special tokens never enter). */
  readonly #ids: number[] = [];
  readonly #allIds: number[] = [];
  /** Start of the window whose text was already emitted up to #readOffset. */
  #prefixOffset = 0;
  #readOffset = 0;
  #prefixText = '';
  /** Raw text decoded but held back because clean-up could still change it. */
  #pendingRaw = '';
  #emitted = '';
  #finished = false;

  /** Starts a stream; `options` are those the final text should match in {@link Tokenizer.decode}. */
  constructor(tokenizer: Tokenizer, options: Omit<DecodeOptions, 'cleanUpTokenizationSpaces'> & { cleanUpTokenizationSpaces?: boolean } = {}) {
    this.#tokenizer = tokenizer;
    this.#skipSpecialTokens = options.skipSpecialTokens ?? false;
    this.#cleanUp = options.cleanUpTokenizationSpaces ?? tokenizer.cleansUpTokenizationSpaces;
  }

  /** Everything emitted so far. */
  get text(): string {
    return this.#emitted;
  }

  /**
   * Whether text of the ids pushed so far is held back ({@link flush} would return it): a
   * character whose bytes are incomplete, or the end of the text that clean-up could still change.
   */
  get holding(): boolean {
    return this.#pendingRaw !== '' || this.#readOffset < this.#ids.length;
  }

  /**
   * The text `id` would add after the ids pushed so far (before clean-up and without holding
   * back an incomplete character): how an alternative to the next token reads in context, with
   * the leading space a token alone loses in `decode([id])`. Changes nothing.
   */
  textOf(id: number): string {
    if (this.#tokenizer._dropsFromOutput(id, this.#skipSpecialTokens)) return '';
    const window = this.#ids.slice(this.#prefixOffset);
    const before = this.#tokenizer._decodeForStreaming(window);
    const after = this.#tokenizer._decodeForStreaming([...window, id]);
    return after.startsWith(before) ? after.slice(before.length) : this.#tokenizer.decode([id]);
  }

  /** Adds one generated id; returns the newly printable text (often '', never a broken character). */
  push(id: number): string {
    if (!Number.isSafeInteger(id) || id < 0) throw new RedflagError('INVALID_ARGUMENT', `token id must be a non-negative integer, got ${String(id)}`);
    if (this.#finished) throw new RedflagError('INVALID_ARGUMENT', 'push after flush: start a new IncrementalDecoder for a new stream');
    this.#allIds.push(id);
    if (this.#tokenizer._dropsFromOutput(id, this.#skipSpecialTokens)) return '';
    this.#ids.push(id);
    const text = this.#tokenizer._decodeForStreaming(this.#ids.slice(this.#prefixOffset));
    // A trailing U+FFFD means the last character's bytes are not complete yet.
    if (text.length <= this.#prefixText.length || text.endsWith('\uFFFD') || !text.startsWith(this.#prefixText)) return '';
    const delta = text.slice(this.#prefixText.length);
    this.#prefixOffset = this.#readOffset;
    this.#readOffset = this.#ids.length;
    this.#prefixText = this.#tokenizer._decodeForStreaming(this.#ids.slice(this.#prefixOffset, this.#readOffset));
    return this.#emit(delta);
  }

  /**
   * Ends the stream; returns whatever was held back (a trailing incomplete character comes out
   * as U+FFFD, as in {@link Tokenizer.decode}). Pushing after this is an error.
   */
  flush(): string {
    if (this.#finished) return '';
    this.#finished = true;
    const full = this.#tokenizer.decode(this.#allIds, { skipSpecialTokens: this.#skipSpecialTokens, cleanUpTokenizationSpaces: this.#cleanUp });
    const rest = full.startsWith(this.#emitted) ? full.slice(this.#emitted.length) : '';
    this.#emitted += rest;
    this.#pendingRaw = '';
    return rest;
  }

  #emit(raw: string): string {
    if (!this.#cleanUp) {
      this.#emitted += raw;
      return raw;
    }
    // clean_up_tokenization never changes text across a character that none of its patterns
    // contain, so everything up to the last such character is final.
    this.#pendingRaw += raw;
    let cut = this.#pendingRaw.length;
    while (cut > 0 && CLEANUP_PATTERN_CHARS.has(this.#pendingRaw[cut - 1] as string)) cut--;
    if (cut === 0) return '';
    const ready = cleanUpTokenization(this.#pendingRaw.slice(0, cut));
    this.#pendingRaw = this.#pendingRaw.slice(cut);
    this.#emitted += ready;
    return ready;
  }
}
