/**
 * Turning conversations into token sequences for training, with an exact mask over the
 * response, truncation that keeps what matters, and insertion of the red-flag token.
 *
 * **Layout.** A conversation is encoded as `prompt ids ++ response ids ++ [end token]`:
 * - the prompt is every message before the response, rendered with the tokenizer's chat template
 *   and `addGenerationPrompt: true` (so it ends exactly where a model starts generating), encoded
 *   without adding special tokens (templates write their own BOS), as
 *   `tokenizer.encodeChat(...)` and transformers' `apply_chat_template(tokenize=True)` do;
 * - the response ids are the tokens that follow the prompt when `prompt text + response text` is
 *   encoded as one string (so a merge at the boundary comes out as the model would produce it,
 *   e.g. SentencePiece's `▁Sure` rather than `▁ ▁Sure`); when the prompt's ids are not a prefix
 *   of that joint encoding, the response is encoded on its own;
 * - the end token is, with a chat template, the special token it ends an assistant turn with
 *   (`tokenizer.turnEndTokenId`: Qwen's `<|im_end|>`, Llama-3's `<|eot_id|>`, also for a base model
 *   whose EOS is another), else the tokenizer's EOS (`endTokenId` overrides both); whatever text a
 *   template writes after it (a newline, the next turn) is never part of the response span.
 *
 * Rendering the whole conversation and searching for the response would be wrong for templates
 * that rewrite the last assistant turn (Qwen3 puts `<think>\n\n</think>\n\n` before it); the layout
 * above is what a model sees at inference: {@link encodePrompt} gives the same prompt ids, so
 * generation code should use it (with the same template variables, the tokenizer's
 * `chatTemplateKwargs` or a call's `chatTemplateExtra`: `{ enable_thinking: false }` for Qwen3
 * appends the empty think block to the prompt).
 *
 * **Special tokens in the text** are text: every message's content (the response's too) goes
 * through `tokenizer.escapeSpecialTokens`, so a message that spells `<|im_end|>` or `<rf>` is
 * read as those characters, never as the control token (transformers would parse them). The
 * template's own tokens are untouched. Training, evaluation and the detector read text alike.
 *
 * **Tokenizers without a chat template** (base models) use a plain format, also chosen with
 * `template: 'plain'`: the tokens the tokenizer's post-processor puts first (e.g. Llama's BOS),
 * then one line per message, `System: …`, `User: …`, `Assistant: …`, and the prompt ends with
 * `Assistant:`; the response follows after one space. Earlier assistant turns are written
 * without an end token. Example (Mistral): `<s>User: Hi\nAssistant: Hello!</s>`.
 *
 * @module
 */
import { RedflagError } from '../errors.js';
import type { Tokenizer } from '../model/tokenizer.js';
import { promptMessages, responseText, type Conversation, type Label, type Message } from './records.js';

/** How prompts are rendered: the chat template when there is one, or always the plain format. */
export type PromptTemplate = 'auto' | 'plain';

/** Options of {@link encodePrompt}. */
export interface PromptOptions {
  /** `auto` (default): the tokenizer's chat template, or the plain format when it has none. `plain`: always the plain format. */
  template?: PromptTemplate;
  /** Extra chat-template variables (e.g. `{ enable_thinking: false }`); ignored by the plain format. */
  chatTemplateExtra?: Record<string, unknown>;
}

/** Options of {@link encodeConversation}. */
export interface EncodeConversationOptions extends PromptOptions {
  /** The longest sequence to produce (integer ≥ 2). Default: no limit. */
  maxTokens?: number;
  /**
   * Which side gives way when the sequence is longer than `maxTokens`. Either way the prompt
   * loses tokens from its start (a leading BOS is kept) and the response from its end; the
   * side named here is cut first:
   * - `left` (default): the prompt is cut from the left, keeping the whole response, unless
   *   that would leave the prompt fewer than `floor(maxTokens / 4)` tokens; then the response's
   *   end is cut too.
   * - `right`: the response is cut from the right, keeping the whole prompt, unless that would
   *   leave the response fewer than `floor(maxTokens / 4)` tokens; then the prompt's start is
   *   cut too.
   */
  truncation?: 'left' | 'right';
  /** The id that ends the response. Default: the template's turn end, else the tokenizer's EOS (an error if it has neither). */
  endTokenId?: number;
}

/** A conversation as token ids, with the response located. */
export interface EncodedConversation {
  /** Prompt ids, then response ids ending with the end token (unless the response was cut). */
  ids: number[];
  /**
   * 1 on the response tokens (`responseStart` ≤ i < `responseEnd`, the end token included), 0
   * on the prompt. These are input positions: the logits row i − 1 predicts token i, so the
   * next-token loss on the response uses rows `responseStart − 1` … `responseEnd − 2`.
   */
  assistantMask: Uint8Array;
  /** Index of the first response token (= number of prompt tokens). */
  responseStart: number;
  /** One past the last response token (= `ids.length`). */
  responseEnd: number;
  /** Whether tokens were dropped to fit `maxTokens`. */
  truncated: boolean;
  /** Prompt tokens dropped from the start of the prompt. */
  droppedPromptTokens: number;
  /** Response tokens dropped from the end of the response (the end token among them, if any). */
  droppedResponseTokens: number;
  /** Whether the last id is the end token (false when the response was cut). */
  hasEndToken: boolean;
  /** The conversation's label. */
  label: Label;
  /** The conversation's source (`file:line`). */
  source: string;
  /** The conversation's category, when it has one. */
  category?: string;
  /** How the prompt was rendered. */
  format: 'chat-template' | 'plain';
  /**
   * The assistant turns before the response, as [start, end) token spans of `ids` (their
   * end-of-turn tokens included), where a multi-turn conversation has any left after truncation.
   */
  historySpans?: [number, number][];
}

/** An {@link EncodedConversation} with the red-flag token inserted by {@link insertRedFlag}. */
export interface RedFlagEncoded {
  /** The ids with `<rf>` at `rfIndex` (one longer than the original). */
  ids: number[];
  /** 1 on the response tokens, `<rf>` included. */
  assistantMask: Uint8Array;
  /** Index of the first response token (unchanged: `<rf>` is never before the response). */
  responseStart: number;
  /** One past the last response token (= `ids.length`). */
  responseEnd: number;
  /** Where `<rf>` is. The logits row `rfIndex − 1` is the one whose target is `<rf>`. */
  rfIndex: number;
  /** The `<rf>` id. */
  rfId: number;
  /** For each position, the index of the same token in the original ids; −1 at `rfIndex`. */
  originalIndex: Int32Array;
  /**
   * For each logits row j (which predicts `ids[j + 1]`), the row of the original sequence's
   * logits that predicts the same next token in the same context minus `<rf>`: j before the
   * flag, −1 for row `rfIndex − 1` (its target is `<rf>`, which the original never predicts),
   * and j − 1 from `rfIndex` on. A KL term between the flagged and the original sequence
   * compares row j here with row `referenceRow[j]` there, skipping −1. The last row (which
   * predicts nothing) maps to the original's last row.
   */
  referenceRow: Int32Array;
  /** The conversation's label. */
  label: Label;
  /** The conversation's source. */
  source: string;
}

/** The role names of the plain format. */
export const PLAIN_ROLE_NAMES: Readonly<Record<Message['role'], string>> = { system: 'System', user: 'User', assistant: 'Assistant' };

/** A prompt ready to encode: text, ids the post-processor adds first, the text between prompt and response. */
interface PreparedPrompt {
  text: string;
  prefixIds: number[];
  separator: string;
  format: 'chat-template' | 'plain';
}

/** The ids the tokenizer's post-processor puts before a text (e.g. BOS), found by encoding "a". */
function leadingSpecialIds(tokenizer: Tokenizer): number[] {
  const withSpecial = tokenizer.encode('a', { addSpecialTokens: true });
  const without = tokenizer.encode('a', { addSpecialTokens: false });
  const at = withSpecial.findIndex((_, start) => without.every((id, k) => withSpecial[start + k] === id));
  return at > 0 ? withSpecial.slice(0, at) : [];
}

/** Renders the plain format of {@link PLAIN_ROLE_NAMES} (see the module description). */
export function renderPlainPrompt(messages: readonly Message[]): string {
  const lines = messages.map((message) => `${PLAIN_ROLE_NAMES[message.role]}: ${message.content}`);
  lines.push(`${PLAIN_ROLE_NAMES.assistant}:`);
  return lines.join('\n');
}

function preparePrompt(tokenizer: Tokenizer, messages: readonly Message[], options: PromptOptions): PreparedPrompt {
  const template = options.template ?? 'auto';
  if (template !== 'auto' && template !== 'plain') throw new RedflagError('INVALID_ARGUMENT', `template must be 'auto' or 'plain', got ${JSON.stringify(template)}`);
  if (template === 'auto' && tokenizer.chatTemplate !== null) {
    const chatOptions = options.chatTemplateExtra === undefined ? { addGenerationPrompt: true } : { addGenerationPrompt: true, extra: options.chatTemplateExtra };
    const chat = messages.map((message) => ({ role: message.role, content: message.content }));
    return { text: tokenizer.applyChatTemplate(chat, chatOptions), prefixIds: [], separator: '', format: 'chat-template' };
  }
  return { text: renderPlainPrompt(messages), prefixIds: leadingSpecialIds(tokenizer), separator: ' ', format: 'plain' };
}

/**
 * The token spans [start, end) of the earlier assistant turns inside a prompt (`text`, whose
 * tokens are `promptIds`): each turn's content, found in the text after the turns before it,
 * plus the token after it (the template's end of turn). A cut whose text does not tokenise to a
 * prefix of the prompt's ids (a merge across it) is moved back over the whitespace before the
 * content, or the turn is left out: the spans never hold a token that is not the turn's.
 */
function assistantTurnSpans(tokenizer: Tokenizer, messages: readonly Message[], text: string, promptIds: readonly number[], prefix: number): [number, number][] {
  const spans: [number, number][] = [];
  const prefixTokens = (at: number): number | null => {
    const ids = tokenizer.encode(text.slice(0, at), { addSpecialTokens: false });
    return startsWith(promptIds, ids) ? ids.length : null;
  };
  let from = 0;
  for (const message of messages) {
    if (message.content === '') continue;
    const at = text.indexOf(message.content, from);
    if (at < 0) continue;
    // Every turn moves the search on, so a reply that repeats earlier user text ("Sure") is found in its own turn.
    from = at + message.content.length;
    if (message.role !== 'assistant') continue;
    let start: number | null = null;
    for (let cut = at; cut >= 0 && start === null && (cut === at || /\s/.test(text[cut]!)); cut--) start = prefixTokens(cut);
    const end = prefixTokens(from);
    if (start !== null && end !== null && end > start) spans.push([prefix + start, prefix + Math.min(end + 1, promptIds.length)]);
  }
  return spans;
}

/**
 * The prompt ids a model should be given to answer `messages` (all turns before the response):
 * exactly the prompt part of {@link encodeConversation}'s ids for the same options.
 */
export function encodePrompt(tokenizer: Tokenizer, messages: readonly Message[], options: PromptOptions = {}): number[] {
  const prepared = preparePrompt(tokenizer, asText(tokenizer, messages), options);
  return [...prepared.prefixIds, ...tokenizer.encode(prepared.text, { addSpecialTokens: false })];
}

/**
 * The whitespace a chat template writes between the generation prompt and the answer, as the
 * whole conversation renders: Llama-2's and Mistral's `[/INST]` are followed by `' ' + content`,
 * so the answer starts with `▁Sure`, as the model generates it after `[/INST]`, not with `Sure`.
 * Anything else there (Qwen3's think block), or a render that does not continue the prompt:
 * nothing.
 */
function templateSeparator(tokenizer: Tokenizer, messages: readonly Message[], response: string, promptText: string, options: PromptOptions): string {
  let full: string;
  try {
    const chat = [...messages, { role: 'assistant' as const, content: response }].map((m) => ({ role: m.role, content: m.content }));
    full = tokenizer.applyChatTemplate(chat, options.chatTemplateExtra === undefined ? { addGenerationPrompt: false } : { addGenerationPrompt: false, extra: options.chatTemplateExtra });
  } catch {
    return '';
  }
  if (!full.startsWith(promptText)) return '';
  const at = full.indexOf(response, promptText.length);
  const gap = at < 0 ? '' : full.slice(promptText.length, at);
  return /^[ \t]+$/.test(gap) ? gap : '';
}

/** Messages whose special-token strings are text (see the module description). */
function asText(tokenizer: Tokenizer, messages: readonly Message[]): Message[] {
  return messages.map((m) => ({ ...m, content: tokenizer.escapeSpecialTokens(m.content) }));
}

function startsWith(ids: readonly number[], prefix: readonly number[]): boolean {
  if (prefix.length > ids.length) return false;
  for (let i = 0; i < prefix.length; i++) if (ids[i] !== prefix[i]) return false;
  return true;
}

function checkTokenId(value: unknown, name: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new RedflagError('INVALID_ARGUMENT', `${name} must be a non-negative integer, got ${String(value)}`);
  }
  return value;
}

/**
 * Encodes a conversation for training (see the module description for the layout). Throws for
 * a prompt-only conversation (`responseMissing`), naming its source.
 */
export function encodeConversation(tokenizer: Tokenizer, conversation: Conversation, options: EncodeConversationOptions = {}): EncodedConversation {
  const source = conversation.source;
  const original = responseText(conversation);
  if (original === null) throw new RedflagError('INVALID_ARGUMENT', 'has no response (a prompt-only record cannot be encoded for training)', { file: source });
  const truncation = options.truncation ?? 'left';
  if (truncation !== 'left' && truncation !== 'right') throw new RedflagError('INVALID_ARGUMENT', `truncation must be 'left' or 'right', got ${JSON.stringify(truncation)}`);
  const maxTokens = options.maxTokens ?? Infinity;
  if (maxTokens !== Infinity && (!Number.isSafeInteger(maxTokens) || maxTokens < 2)) {
    throw new RedflagError('INVALID_ARGUMENT', `maxTokens must be an integer ≥ 2, got ${String(options.maxTokens)}`);
  }
  const response = tokenizer.escapeSpecialTokens(original);
  const messages = asText(tokenizer, promptMessages(conversation));
  const prepared = preparePrompt(tokenizer, messages, options);
  const endId = options.endTokenId ?? (prepared.format === 'chat-template' ? tokenizer.turnEndTokenId : null) ?? tokenizer.eosTokenId;
  if (endId === null) throw new RedflagError('INVALID_ARGUMENT', 'the tokenizer has no eos_token; pass endTokenId');
  checkTokenId(endId, 'endTokenId');

  const textIds = tokenizer.encode(prepared.text, { addSpecialTokens: false });
  const turns = messages.some((m) => m.role === 'assistant') ? assistantTurnSpans(tokenizer, messages, prepared.text, textIds, prepared.prefixIds.length) : [];
  if (prepared.format === 'chat-template') prepared.separator = templateSeparator(tokenizer, messages, response, prepared.text, options);
  const joint = tokenizer.encode(prepared.text + prepared.separator + response, { addSpecialTokens: false });
  // An empty answer (a blocked one in a chat history) is no tokens, not the separator's space.
  const responseIds = response === '' ? [] : startsWith(joint, textIds) && joint.length > textIds.length ? joint.slice(textIds.length) : tokenizer.encode(prepared.separator + response, { addSpecialTokens: false });
  responseIds.push(endId);
  let prompt = [...prepared.prefixIds, ...textIds];

  // Truncation.
  const total = prompt.length + responseIds.length;
  let keepPrompt = prompt.length;
  let keepResponse = responseIds.length;
  if (total > maxTokens) {
    const reserve = Math.floor(maxTokens / 4);
    if (truncation === 'left') {
      keepResponse = Math.min(responseIds.length, maxTokens - Math.min(prompt.length, reserve));
      keepPrompt = maxTokens - keepResponse;
    } else {
      keepPrompt = Math.min(prompt.length, maxTokens - Math.min(responseIds.length, reserve));
      keepResponse = maxTokens - keepPrompt;
    }
  }
  const droppedPromptTokens = prompt.length - keepPrompt;
  const droppedResponseTokens = responseIds.length - keepResponse;
  if (droppedPromptTokens > 0) {
    const bos = tokenizer.bosTokenId;
    const keepsBos = keepPrompt > 0 && bos !== null && prompt[0] === bos;
    prompt = keepsBos ? [bos, ...prompt.slice(prompt.length - (keepPrompt - 1))] : prompt.slice(prompt.length - keepPrompt);
  }
  const kept = responseIds.slice(0, keepResponse);
  const ids = [...prompt, ...kept];
  // The earlier assistant turns where they are after truncation (a dropped part is gone).
  const keptBos = droppedPromptTokens > 0 && prompt[0] === tokenizer.bosTokenId && keepPrompt > 0 ? 1 : 0;
  const historySpans: [number, number][] = [];
  for (const [a, b] of turns) {
    const from = Math.max(a - droppedPromptTokens, keptBos);
    const to = Math.min(b - droppedPromptTokens, prompt.length);
    if (to > from) historySpans.push([from, to]);
  }
  const assistantMask = new Uint8Array(ids.length);
  assistantMask.fill(1, prompt.length);
  const encoded: EncodedConversation = {
    ids,
    assistantMask,
    responseStart: prompt.length,
    responseEnd: ids.length,
    truncated: droppedPromptTokens + droppedResponseTokens > 0,
    droppedPromptTokens,
    droppedResponseTokens,
    hasEndToken: droppedResponseTokens === 0,
    label: conversation.label,
    source,
    format: prepared.format,
  };
  if (historySpans.length > 0) encoded.historySpans = historySpans;
  if (conversation.category !== undefined) encoded.category = conversation.category;
  return encoded;
}

/**
 * The same sequence with the red-flag token `rfId` inserted before response token `position`
 * (0 = before the first response token; at most the response length − 1, so `<rf>` always
 * precedes a response token). Returns the new ids and mask plus the index maps a loss needs to
 * compare positions after the flag with the unflagged sequence (see {@link RedFlagEncoded}).
 */
export function insertRedFlag(encoded: EncodedConversation, position: number, rfId: number): RedFlagEncoded {
  checkTokenId(rfId, 'rfId');
  const length = encoded.responseEnd - encoded.responseStart;
  if (!Number.isSafeInteger(position) || position < 0 || position >= length) {
    throw new RedflagError('INVALID_ARGUMENT', `red-flag position must be an integer in [0, ${length - 1}] (the response has ${length} tokens), got ${String(position)}`, {
      file: encoded.source,
    });
  }
  const rfIndex = encoded.responseStart + position;
  const n = encoded.ids.length + 1;
  const ids = [...encoded.ids.slice(0, rfIndex), rfId, ...encoded.ids.slice(rfIndex)];
  const assistantMask = new Uint8Array(n);
  assistantMask.fill(1, encoded.responseStart);
  const originalIndex = new Int32Array(n);
  const referenceRow = new Int32Array(n);
  for (let j = 0; j < n; j++) {
    originalIndex[j] = j < rfIndex ? j : j === rfIndex ? -1 : j - 1;
    referenceRow[j] = j < rfIndex - 1 ? j : j === rfIndex - 1 ? -1 : j - 1;
  }
  return {
    ids,
    assistantMask,
    responseStart: encoded.responseStart,
    responseEnd: n,
    rfIndex,
    rfId,
    originalIndex,
    referenceRow,
    label: encoded.label,
    source: encoded.source,
  };
}

/** A conversation as a detector scores it (see {@link encodeForScoring}). */
export interface ScoringInput {
  /** The ids to feed: the prompt and the response, without the response's end token. */
  ids: number[];
  /** Where the response starts (the prompt's length). */
  responseStart: number;
  /** The response's tokens (0 for a prompt-only conversation). */
  responseLength: number;
}

/**
 * Encodes a conversation for teacher-forced scoring: p(`<rf>`) before each response token and
 * right after the response, not past its end token. A prompt-only conversation (`responseMissing`)
 * is its prompt, scored once where the answer would start.
 */
export function encodeForScoring(tokenizer: Tokenizer, messages: readonly Message[], responseMissing: boolean, source: string): ScoringInput {
  if (responseMissing) {
    const ids = encodePrompt(tokenizer, messages);
    return { ids, responseStart: ids.length, responseLength: 0 };
  }
  const e = encodeConversation(tokenizer, { messages: [...messages], label: 'benign', source });
  const responseLength = e.responseEnd - e.responseStart - (e.hasEndToken ? 1 : 0);
  return { ids: e.ids.slice(0, e.responseStart + responseLength), responseStart: e.responseStart, responseLength };
}
