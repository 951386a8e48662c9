/**
 * The conversation records redflag trains and evaluates on, and the checks every loader and
 * generator applies to them: roles, order, non-empty text, labels.
 *
 * A {@link Conversation} is a chat whose **last assistant message is the response** being scored
 * or trained; everything before it is the prompt. A prompt-only record (for example a HarmBench
 * behaviour, which has no response) ends with a user message instead and carries
 * `responseMissing: true`; loaders produce such records only when asked to
 * (`allowPromptOnly: true`), and `encodeConversation` (encode.ts) refuses them.
 *
 * @module
 */
import { RedflagError, escapeControl, quoteText } from '../errors.js';

/** Roles a conversation may use. */
export type Role = 'system' | 'user' | 'assistant';

/** The roles, in the order they are listed in error messages. */
export const ROLES: readonly Role[] = ['system', 'user', 'assistant'];

/**
 * One turn of a conversation. (A type alias rather than an interface so that messages can be
 * passed straight to `Tokenizer.applyChatTemplate`, whose message type has an index signature.)
 */
export type Message = {
  /** Who speaks. */
  role: Role;
  /** The turn's text (never empty or only whitespace). */
  content: string;
};

/** Whether a conversation's response is harmful (the model should emit `<rf>`) or benign. */
export type Label = 'harmful' | 'benign';

/** A labelled chat; see the module description. */
export interface Conversation {
  /**
   * The turns: an optional system message, then user and assistant turns alternating, starting
   * with a user turn and ending with the assistant's response (or, when `responseMissing` is
   * true, with the last user turn).
   */
  messages: Message[];
  /** The class of the response (for prompt-only records: of the request). */
  label: Label;
  /**
   * Where the record came from, `file:line` (the line a row starts on), or a generator's
   * identifier such as `synthetic/train/cooking/p0r1/3`. Error messages about the record start
   * with it.
   */
  source: string;
  /** A category name when the data has one (e.g. HarmBench's `SemanticCategory`). */
  category?: string;
  /** True for a prompt-only record: the messages end with a user turn and there is no response. */
  responseMissing?: boolean;
  /**
   * The class of the request, where the data labels the response and the two differ: a refusal
   * to a harmful request is `label: 'benign'`, `promptLabel: 'harmful'` (JailbreakBench
   * artifacts, XSTest completions). Evaluation asks the request as a `promptLabel` prompt.
   */
  promptLabel?: Label;
}

/** A row a loader skipped (with `skipInvalid: true`) and why. */
export interface SkippedRow {
  /** `file:line` of the row. */
  source: string;
  /** The reason, as the error would have said it. */
  reason: string;
}

/**
 * The error for a bad record: `RedflagError` with code `INVALID_FILE` whose message is
 * `source: reason` and whose `file` is the source (`file:line`).
 */
export function recordError(source: string, reason: string, cause?: unknown): RedflagError {
  return new RedflagError('INVALID_FILE', reason, { file: source, cause });
}

/**
 * Thrown inside loaders for one bad row; carries the reason without the location (the loader
 * turns it into a `file:line: reason` RedflagError or a skipped row).
 * @internal
 */
export class RowProblem extends Error {
  /** Creates a problem with its reason (`field "x" is empty`, ...). */
  constructor(reason: string) {
    // Reasons quote file contents and are also reported for skipped rows: no raw control characters.
    super(escapeControl(reason));
    this.name = 'RowProblem';
  }
}

/** `typeof`, but naming arrays and null as JSON does. */
export function jsonTypeName(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return typeof value;
}

/**
 * Parses a label value: `"harmful"`, `"unsafe"`, `true`, `1`, `"true"`, `"yes"`, `"1"` mean
 * harmful; `"benign"`, `"safe"`, `"harmless"`, `false`, `0`, `"false"`, `"no"`, `"0"` mean benign
 * (strings compared without case or surrounding spaces). Anything else throws a
 * {@link RowProblem} naming `what` (e.g. `field "label"`).
 * @internal
 */
export function parseLabel(value: unknown, what: string): Label {
  if (value === true || value === 1) return 'harmful';
  if (value === false || value === 0) return 'benign';
  if (typeof value === 'string') {
    const text = value.trim().toLowerCase();
    if (['harmful', 'unsafe', 'true', 'yes', '1'].includes(text)) return 'harmful';
    if (['benign', 'safe', 'harmless', 'false', 'no', '0'].includes(text)) return 'benign';
  }
  const shown = typeof value === 'string' ? quoteText(value) : jsonTypeName(value) === 'number' ? String(value) : jsonTypeName(value);
  throw new RowProblem(`${what} must be "harmful" or "benign" (or a boolean), got ${shown}`);
}

/**
 * Options of {@link checkMessages}.
 * @internal
 */
export interface CheckMessagesOptions {
  /** Accept messages that end with a user turn (a prompt-only record). Default false. */
  allowPromptOnly?: boolean;
  /** The field name used in reasons. Default `messages`. */
  field?: string;
  /**
   * Roles in any order and empty contents, as chat APIs take them (two user turns in a row, a
   * second system message, a blocked answer's empty text in the history): the chat template
   * decides what it renders. A conversation is prompt-only unless it ends with an assistant
   * turn. Default false: training data's strict order.
   */
  anyOrder?: boolean;
}

/**
 * What {@link checkMessages} returns.
 * @internal
 */
export interface CheckedMessages {
  /** The messages, typed (extra fields dropped). */
  messages: Message[];
  /** True when they end with a user turn (a prompt-only record). */
  responseMissing: boolean;
}

/**
 * Checks a `messages` value and returns it as typed messages plus whether the response is
 * missing. Rules: a non-empty array of `{ role, content }` objects; roles are `system`, `user`
 * or `assistant`; content is a non-empty string; a system message may only come first; then
 * user and assistant alternate starting with user; the last message is the assistant's
 * response (a user turn last is accepted only with `allowPromptOnly`). Extra fields are dropped.
 * Throws a {@link RowProblem} naming the offending element (loaders add `file:line`).
 * @internal
 */
export function checkMessages(value: unknown, options: CheckMessagesOptions = {}): CheckedMessages {
  const fieldName = options.field ?? 'messages';
  const field = `field "${fieldName}"`;
  const name = (index: number, key?: string): string => `field "${fieldName}[${index}]${key === undefined ? '' : `.${key}`}"`;
  if (!Array.isArray(value)) throw new RowProblem(`${field} must be an array, got ${jsonTypeName(value)}`);
  if (value.length === 0) throw new RowProblem(`${field} is empty`);
  const messages: Message[] = [];
  value.forEach((entry: unknown, index) => {
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
      throw new RowProblem(`${name(index)} must be an object { role, content }, got ${jsonTypeName(entry)}`);
    }
    const record = entry as Record<string, unknown>;
    const role = record['role'];
    const content = record['content'];
    if (role === undefined) throw new RowProblem(`missing ${name(index, 'role')}`);
    if (typeof role !== 'string') throw new RowProblem(`${name(index, 'role')} must be a string, got ${jsonTypeName(role)}`);
    if (!(ROLES as readonly string[]).includes(role)) {
      throw new RowProblem(`${name(index, 'role')} is ${quoteText(role)}; expected "system", "user" or "assistant"`);
    }
    if (content === undefined) throw new RowProblem(`missing ${name(index, 'content')}`);
    if (typeof content !== 'string') throw new RowProblem(`${name(index, 'content')} must be a string, got ${jsonTypeName(content)}`);
    if (content.trim().length === 0 && !options.anyOrder) throw new RowProblem(`${name(index, 'content')} is empty`);
    messages.push({ role: role as Role, content });
  });
  if (options.anyOrder) {
    const responseMissing = messages[messages.length - 1]!.role !== 'assistant';
    if (responseMissing && !(options.allowPromptOnly ?? false)) throw new RowProblem(`${field} must end with the assistant's response`);
    return { messages, responseMissing };
  }
  // Order: [system] user assistant user assistant ... (ending with assistant, or user when prompt-only).
  let expected: Role = 'user';
  messages.forEach((message, index) => {
    if (index === 0 && message.role === 'system') return;
    if (message.role !== expected) {
      const after = index === 0 ? 'first' : `after "${messages[index - 1]?.role ?? ''}"`;
      throw new RowProblem(`${name(index, 'role')}: roles out of order (expected "${expected}" ${after}, got "${message.role}")`);
    }
    expected = expected === 'user' ? 'assistant' : 'user';
  });
  const last = messages[messages.length - 1] as Message;
  if (last.role === 'system') throw new RowProblem(`${field} has no user turn`);
  const responseMissing = last.role === 'user';
  if (responseMissing && !(options.allowPromptOnly ?? false)) {
    throw new RowProblem(`${field} must end with the assistant's response, but ends with a user turn (pass allowPromptOnly: true for prompt-only data)`);
  }
  return { messages, responseMissing };
}

/**
 * Checks a whole conversation (as built by hand or by a generator) and returns it unchanged.
 * Throws a `RedflagError` (`INVALID_ARGUMENT`) that starts with the conversation's source.
 */
export function validateConversation(conversation: Conversation, options: { allowPromptOnly?: boolean } = {}): Conversation {
  const source = typeof conversation?.source === 'string' && conversation.source.length > 0 ? conversation.source : 'conversation';
  try {
    if (typeof conversation !== 'object' || conversation === null) throw new RowProblem(`must be an object, got ${jsonTypeName(conversation)}`);
    if (conversation.label !== 'harmful' && conversation.label !== 'benign') {
      throw new RowProblem(`field "label" must be "harmful" or "benign", got ${quoteText(String(conversation.label))}`);
    }
    const { responseMissing } = checkMessages(conversation.messages, { allowPromptOnly: true });
    if (responseMissing !== (conversation.responseMissing === true)) {
      throw new RowProblem(
        responseMissing ? 'ends with a user turn but is not marked responseMissing' : 'is marked responseMissing but ends with an assistant turn',
      );
    }
    if (responseMissing && !(options.allowPromptOnly ?? false)) throw new RowProblem('has no response (it is a prompt-only record)');
  } catch (error) {
    if (error instanceof RowProblem) throw new RedflagError('INVALID_ARGUMENT', error.message, { file: source });
    throw error;
  }
  return conversation;
}

/** The messages before the response (all of them for a prompt-only record). */
export function promptMessages(conversation: Conversation): Message[] {
  return conversation.responseMissing ? conversation.messages.slice() : conversation.messages.slice(0, -1);
}

/** The response text (the last assistant message), or null for a prompt-only record. */
export function responseText(conversation: Conversation): string | null {
  if (conversation.responseMissing) return null;
  const last = conversation.messages[conversation.messages.length - 1];
  return last?.role === 'assistant' ? last.content : null;
}

/** A copy of the conversation whose response is replaced by `response` (e.g. a refusal). */
export function withResponse(conversation: Conversation, response: string, source?: string): Conversation {
  const copy: Conversation = {
    messages: [...promptMessages(conversation), { role: 'assistant', content: response }],
    label: conversation.label,
    source: source ?? conversation.source,
  };
  if (conversation.category !== undefined) copy.category = conversation.category;
  return copy;
}
