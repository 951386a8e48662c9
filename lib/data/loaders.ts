/**
 * Loading labelled conversations from JSONL, JSON and CSV files.
 *
 * **Rows.** A JSON(L) row is either `{ "messages": [{ "role", "content" }, ...] }` or
 * `{ "prompt": ..., "response": ... }` (the names `instruction`/`goal` for the prompt and
 * `output`/`target`/`completion` for the response are recognized too; an optional `"system"`
 * string becomes a system message). A CSV file has a header row; well-known schemas are
 * recognized: AdvBench `goal,target` (prompt = goal, response = target), HarmBench `Behavior`
 * (prompt only; a non-empty `ContextString` is put before the behaviour as HarmBench does,
 * `context\n\n---\n\nbehavior`), and any file with `prompt`/`response` columns. Other names are
 * chosen with `promptColumn`, `responseColumn`, `labelColumn` and `categoryColumn` (these name
 * JSON fields too).
 *
 * **Labels.** The `label` option labels the whole file (row fields are then ignored); otherwise
 * each row needs a `label` or a `harmful` field (or the column `labelColumn` names). Harmful:
 * `"harmful"`, `"unsafe"`, `true`, `1`, `"true"`, `"yes"`, `"1"`; benign: `"benign"`, `"safe"`,
 * `"harmless"`, `false`, `0`, `"false"`, `"no"`, `"0"` (strings in any case).
 *
 * **Prompt-only data.** A row without a response is an error unless `allowPromptOnly: true`;
 * then it becomes a conversation ending with the user turn and marked `responseMissing: true`
 * (HarmBench, whose CSV has no response column, needs this option).
 *
 * **Errors.** A bad row throws a `RedflagError` (`INVALID_FILE`) whose message is
 * `file:line: reason` (the line the row starts on; the file as the caller spelled it), e.g.
 * `data.jsonl:3: field "response" is empty`. With `skipInvalid: true` such rows are skipped
 * and returned with their reason instead. Problems with the whole file (missing, empty,
 * unreadable CSV header, a JSON file that does not parse) always throw, naming the file.
 *
 * JSONL and CSV files are streamed (see {@link streamConversations}); JSON files are read whole.
 *
 * @module
 */
import { createReadStream } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { extname } from 'node:path';
import { createInterface } from 'node:readline';

import { CsvError, parse as parseCsv } from 'csv-parse';

import { RedflagError, quoteText } from '../errors.js';
import { jsonErrorOffset, lineAndColumn } from '../model/config.js';
import {
  checkMessages,
  jsonTypeName,
  parseLabel,
  recordError,
  RowProblem,
  type Conversation,
  type Label,
  type Message,
  type SkippedRow,
} from './records.js';

/** File formats the loaders read. */
export type DataFormat = 'jsonl' | 'json' | 'csv';

/** Options of {@link loadConversations} and {@link streamConversations}. */
export interface LoadOptions {
  /** The file's format. Default: from the extension (`.jsonl`/`.ndjson`, `.json`, `.csv`). */
  format?: DataFormat;
  /** Label every row of the file with this (row label fields are then ignored). */
  label?: Label;
  /** Skip bad rows (returned in `skipped`) instead of throwing. Default false. */
  skipInvalid?: boolean;
  /** Accept rows without a response as prompt-only conversations (`responseMissing: true`). Default false. */
  allowPromptOnly?: boolean;
  /** The prompt's CSV column or JSON field. Default: `prompt`, `goal`, `behavior`, `instruction` or `question` (CSV, any case); `prompt`, `instruction` or `goal` (JSON). */
  promptColumn?: string;
  /** The response's CSV column or JSON field. Default: `response`, `target`, `output`, `completion` or `answer` (CSV, any case); `response`, `output`, `target` or `completion` (JSON). */
  responseColumn?: string;
  /** The label's CSV column or JSON field. Default: `label`, else `harmful`. */
  labelColumn?: string;
  /** The category's CSV column or JSON field. Default: `category` (CSV, any case, or HarmBench's `SemanticCategory`). */
  categoryColumn?: string;
  /** JSON only: the dotted path of the array of rows inside a top-level object (e.g. `jailbreaks`). */
  recordsKey?: string;
  /** A system message put first in every conversation that has none. */
  systemPrompt?: string;
}

/** Options of {@link streamConversations}: {@link LoadOptions} plus a callback for skipped rows. */
export interface StreamOptions extends LoadOptions {
  /** Called for each skipped row (only with `skipInvalid: true`). */
  onSkip?: (row: SkippedRow) => void;
}

/** What {@link loadConversations} returns. */
export interface LoadResult {
  /** The file, as given. */
  file: string;
  /** The format it was read as. */
  format: DataFormat;
  /** The conversations, in file order. */
  conversations: Conversation[];
  /** Rows skipped with `skipInvalid: true`, in file order. */
  skipped: SkippedRow[];
}

/** One file for {@link loadConversationFiles}: its path and its own options. */
export interface FileEntry extends LoadOptions {
  /** The file. */
  file: string;
}

/** What {@link loadConversationFiles} returns. */
export interface LoadedConversations {
  /** Every file's conversations, in order. */
  conversations: Conversation[];
  /** Every file's skipped rows, in order. */
  skipped: SkippedRow[];
}

/** The CSV columns a file was read with (null: absent). */
export interface CsvColumns {
  /** The prompt column. */
  prompt: string;
  /** The response column, or null for prompt-only data. */
  response: string | null;
  /** The label column (null: the `label` option, or none). */
  label: string | null;
  /** The category column. */
  category: string | null;
  /** HarmBench's context column, put before the prompt when non-empty. */
  context: string | null;
}

const JSON_PROMPT_FIELDS = ['prompt', 'instruction', 'goal'];
const JSON_RESPONSE_FIELDS = ['response', 'output', 'target', 'completion'];
/** @internal */
export const LABEL_FIELDS = ['label', 'harmful'] as const;
const CSV_PROMPT_COLUMNS = ['prompt', 'goal', 'behavior', 'instruction', 'question'];
const CSV_RESPONSE_COLUMNS = ['response', 'target', 'output', 'completion', 'answer'];
const CSV_CATEGORY_COLUMNS = ['category', 'semanticcategory'];

/** The format of a file from its extension; throws for an unknown extension. */
export function detectFormat(file: string): DataFormat {
  const ext = extname(file).toLowerCase();
  if (ext === '.jsonl' || ext === '.ndjson') return 'jsonl';
  if (ext === '.json') return 'json';
  if (ext === '.csv') return 'csv';
  throw new RedflagError('INVALID_ARGUMENT', `cannot tell the format from the extension "${ext}"; pass format: 'jsonl', 'json' or 'csv'`, { file });
}

/**
 * Reads every conversation of a file. See the module description for rows, labels and errors.
 *
 * @example
 * const { conversations, skipped } = await loadConversations('advbench.csv', { label: 'harmful', skipInvalid: true });
 */
export async function loadConversations(file: string, options: LoadOptions = {}): Promise<LoadResult> {
  const format = options.format ?? detectFormat(file);
  const skipped: SkippedRow[] = [];
  const conversations: Conversation[] = [];
  for await (const conversation of streamConversations(file, { ...options, format, onSkip: (row) => skipped.push(row) })) {
    conversations.push(conversation);
  }
  // csv-parse reports a row it cannot parse ahead of the rows before it that it still holds.
  sortSkippedByLine(skipped);
  return { file, format, conversations, skipped };
}

/**
 * Puts skipped rows (sources `file:line`) in file order, in place.
 * @internal
 */
export function sortSkippedByLine(skipped: SkippedRow[]): void {
  const line = (row: SkippedRow) => Number(/:(\d+)$/.exec(row.source)?.[1] ?? 0);
  skipped.sort((a, b) => line(a) - line(b));
}

/**
 * Loads several files (each with its own options) and concatenates them, in order.
 * `skipped` collects every file's skipped rows.
 */
export async function loadConversationFiles(entries: readonly FileEntry[]): Promise<LoadedConversations> {
  const conversations: Conversation[] = [];
  const skipped: SkippedRow[] = [];
  for (const { file, ...options } of entries) {
    const result = await loadConversations(file, options);
    for (const conversation of result.conversations) conversations.push(conversation);
    for (const row of result.skipped) skipped.push(row);
  }
  return { conversations, skipped };
}

/**
 * Yields a file's conversations one at a time; JSONL is read line by line and CSV record by
 * record, so memory does not grow with the file. Skipped rows go to `onSkip`.
 */
export async function* streamConversations(file: string, options: StreamOptions = {}): AsyncGenerator<Conversation, void, undefined> {
  if (typeof file !== 'string' || file.length === 0) throw new RedflagError('INVALID_ARGUMENT', 'file must be a non-empty path');
  checkOptions(options);
  const format = options.format ?? detectFormat(file);
  await checkReadable(file);
  if (format === 'jsonl') yield* streamJsonl(file, options);
  else if (format === 'json') yield* readJsonArray(file, options);
  else yield* streamCsv(file, options);
}

function checkOptions(options: StreamOptions): void {
  if (options.format !== undefined && !['jsonl', 'json', 'csv'].includes(options.format)) {
    throw new RedflagError('INVALID_ARGUMENT', `format must be 'jsonl', 'json' or 'csv', got ${JSON.stringify(options.format)}`);
  }
  if (options.label !== undefined && options.label !== 'harmful' && options.label !== 'benign') {
    throw new RedflagError('INVALID_ARGUMENT', `label must be 'harmful' or 'benign', got ${JSON.stringify(options.label)}`);
  }
  for (const key of ['promptColumn', 'responseColumn', 'labelColumn', 'categoryColumn', 'recordsKey', 'systemPrompt'] as const) {
    const value = options[key];
    if (value !== undefined && (typeof value !== 'string' || value.trim().length === 0)) {
      throw new RedflagError('INVALID_ARGUMENT', `option ${key} must be a non-empty string`);
    }
  }
}

async function checkReadable(file: string): Promise<void> {
  try {
    const info = await stat(file);
    if (info.isDirectory()) throw new RedflagError('INVALID_FILE', 'is a directory, not a data file', { file });
  } catch (error) {
    if (error instanceof RedflagError) throw error;
    const code = (error as { code?: unknown }).code;
    if (code === 'ENOENT') throw new RedflagError('NOT_FOUND', 'file not found', { file, cause: error });
    throw new RedflagError('INVALID_FILE', `cannot read (${String(code ?? error)})`, { file, cause: error });
  }
}

/** Runs `build` for one row: a {@link RowProblem} becomes an error or a skipped row. */
function guardRow(source: string, options: StreamOptions, build: () => Conversation): Conversation | null {
  try {
    return build();
  } catch (error) {
    if (!(error instanceof RowProblem)) throw error;
    if (options.skipInvalid) {
      options.onSkip?.({ source, reason: error.message });
      return null;
    }
    throw recordError(source, error.message, error);
  }
}

/** Finishes a conversation: system prompt, label, category. */
function finish(messages: Message[], responseMissing: boolean, label: Label, source: string, category: string | undefined, options: LoadOptions): Conversation {
  addSystemPrompt(messages, options.systemPrompt);
  const conversation: Conversation = { messages, label, source };
  if (category !== undefined) conversation.category = category;
  if (responseMissing) conversation.responseMissing = true;
  return conversation;
}

/**
 * Puts a system prompt first unless the conversation has its own, in place.
 * @internal
 */
export function addSystemPrompt(messages: Message[], systemPrompt: string | undefined): void {
  if (systemPrompt !== undefined && messages[0]?.role !== 'system') messages.unshift({ role: 'system', content: systemPrompt });
}

// ---------------------------------------------------------------------------------------------
// JSON rows (JSONL and JSON arrays)
// ---------------------------------------------------------------------------------------------

function stringField(row: Record<string, unknown>, name: string): string {
  const value = row[name];
  if (typeof value !== 'string') throw new RowProblem(`field "${name}" must be a string, got ${jsonTypeName(value)}`);
  if (value.trim().length === 0) throw new RowProblem(`field "${name}" is empty`);
  return value;
}

/**
 * An Alpaca-style row's prompt: its `instruction`, then its `input` after a blank line when the
 * row has one (dropping the input would train or score another question).
 * @internal
 */
export function withAlpacaInput(row: Record<string, unknown>, promptField: string, prompt: string): string {
  if (promptField !== 'instruction' || row['input'] === undefined || row['input'] === null || row['input'] === '') return prompt;
  if (typeof row['input'] !== 'string') throw new RowProblem(`field "input" must be a string, got ${jsonTypeName(row['input'])}`);
  return row['input'].trim().length > 0 ? `${prompt}\n\n${row['input']}` : prompt;
}

/**
 * A self-instruct seed task (`{instruction, instances: [{input, output}, …]}`, Alpaca's seed
 * set) as an Alpaca row: its first instance's input and output, which the instruction needs
 * (its input is the text the instruction is about). Other rows come back as they are.
 */
function withFirstInstance(record: Record<string, unknown>): Record<string, unknown> {
  const instances = record['instances'];
  if (!Array.isArray(instances) || record['input'] !== undefined || record['output'] !== undefined) return record;
  const first: unknown = instances[0];
  if (typeof first !== 'object' || first === null || Array.isArray(first)) throw new RowProblem('field "instances" must hold objects with "input" and "output"');
  const { input, output } = first as Record<string, unknown>;
  return { ...record, input, output };
}

/** Turns one parsed JSON row into a conversation, or throws a {@link RowProblem}. */
function jsonRowToConversation(row: unknown, source: string, options: LoadOptions): Conversation {
  if (typeof row !== 'object' || row === null || Array.isArray(row)) throw new RowProblem(`row must be a JSON object, got ${jsonTypeName(row)}`);
  const record = withFirstInstance(row as Record<string, unknown>);
  const has = (name: string): boolean => record[name] !== undefined && record[name] !== null;

  let messages: Message[];
  let responseMissing = false;
  const promptField = options.promptColumn ?? JSON_PROMPT_FIELDS.find(has);
  if (record['messages'] !== undefined && options.promptColumn === undefined) {
    if (promptField !== undefined) throw new RowProblem(`row has both "messages" and "${promptField}"; use one form`);
    if (has('system')) throw new RowProblem('row has both "messages" and "system"; put the system message first in "messages"');
    ({ messages, responseMissing } = checkMessages(record['messages'], { allowPromptOnly: options.allowPromptOnly ?? false }));
  } else {
    if (promptField === undefined || !has(promptField)) {
      throw new RowProblem(options.promptColumn !== undefined ? `missing field "${options.promptColumn}"` : 'missing field "prompt" (or "messages")');
    }
    messages = [];
    if (has('system')) messages.push({ role: 'system', content: stringField(record, 'system') });
    messages.push({ role: 'user', content: withAlpacaInput(record, promptField, stringField(record, promptField)) });
    const responseField = options.responseColumn ?? JSON_RESPONSE_FIELDS.find(has);
    if (responseField !== undefined && has(responseField)) {
      messages.push({ role: 'assistant', content: stringField(record, responseField) });
    } else if (options.allowPromptOnly) {
      responseMissing = true;
    } else {
      const name = options.responseColumn ?? 'response';
      throw new RowProblem(`missing field "${name}" (pass allowPromptOnly: true for prompt-only data)`);
    }
  }

  let label: Label;
  if (options.label !== undefined) {
    label = options.label;
  } else {
    const labelField = options.labelColumn ?? LABEL_FIELDS.find(has);
    if (options.labelColumn === undefined && LABEL_FIELDS.every(has) && parseLabel(record[LABEL_FIELDS[0]], `field "${LABEL_FIELDS[0]}"`) !== parseLabel(record[LABEL_FIELDS[1]], `field "${LABEL_FIELDS[1]}"`)) {
      throw new RowProblem(`fields "${LABEL_FIELDS[0]}" and "${LABEL_FIELDS[1]}" disagree`);
    }
    if (labelField === undefined || !has(labelField)) {
      throw new RowProblem(
        options.labelColumn !== undefined
          ? `missing field "${options.labelColumn}"`
          : 'missing label: no "label" or "harmful" field (or pass label: \'harmful\' | \'benign\' for the whole file)',
      );
    }
    label = parseLabel(record[labelField], `field "${labelField}"`);
  }

  const categoryField = options.categoryColumn ?? 'category';
  let category: string | undefined;
  if (has(categoryField)) {
    const value = record[categoryField];
    if (typeof value !== 'string') throw new RowProblem(`field "${categoryField}" must be a string, got ${jsonTypeName(value)}`);
    if (value.trim().length > 0) category = value;
  }
  return finish(messages, responseMissing, label, source, category, options);
}

/** V8's JSON.parse message, on one line and not too long. */
function briefJsonMessage(error: unknown): string {
  const message = (error as Error).message.replace(/\s+/g, ' ');
  return message.length > 120 ? `${message.slice(0, 117)}...` : message;
}

async function* streamJsonl(file: string, options: StreamOptions): AsyncGenerator<Conversation, void, undefined> {
  const input = createReadStream(file, { encoding: 'utf8' });
  const lines = createInterface({ input, crlfDelay: Infinity });
  let lineNumber = 0;
  let rows = 0;
  try {
    for await (const rawLine of lines) {
      lineNumber++;
      const line = lineNumber === 1 && rawLine.charCodeAt(0) === 0xfeff ? rawLine.slice(1) : rawLine;
      if (line.trim().length === 0) continue;
      rows++;
      const source = `${file}:${lineNumber}`;
      const conversation = guardRow(source, options, () => {
        let row: unknown;
        try {
          row = JSON.parse(line);
        } catch (error) {
          throw new RowProblem(`invalid JSON: ${briefJsonMessage(error)}`);
        }
        return jsonRowToConversation(row, source, options);
      });
      if (conversation !== null) yield conversation;
    }
  } catch (error) {
    if (error instanceof RedflagError) throw error;
    throw new RedflagError('INVALID_FILE', `cannot read (${String((error as { code?: unknown }).code ?? error)})`, { file, cause: error });
  } finally {
    lines.close();
    input.destroy();
  }
  if (rows === 0) throw new RedflagError('INVALID_FILE', 'is empty (no rows)', { file });
}

async function* readJsonArray(file: string, options: StreamOptions): AsyncGenerator<Conversation, void, undefined> {
  let text = await readFile(file, 'utf8');
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  if (text.trim().length === 0) throw new RedflagError('INVALID_FILE', 'is empty (no rows)', { file });
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    const { line } = lineAndColumn(text, jsonErrorOffset(text));
    throw recordError(`${file}:${line}`, `invalid JSON: ${briefJsonMessage(error)}`, error);
  }
  const path = options.recordsKey === undefined ? [] : options.recordsKey.split('.');
  let rows: unknown = parsed;
  for (let i = 0; i < path.length; i++) {
    if (typeof rows !== 'object' || rows === null || Array.isArray(rows)) {
      throw new RedflagError('INVALID_FILE', `expected an object holding "${path.slice(i).join('.')}", got ${jsonTypeName(rows)}`, { file });
    }
    rows = (rows as Record<string, unknown>)[path[i] as string];
  }
  if (!Array.isArray(rows)) {
    const what = path.length === 0 ? 'the file' : `field "${path.join('.')}"`;
    const hint = path.length === 0 ? ' (pass recordsKey for an array inside an object)' : '';
    throw new RedflagError('INVALID_FILE', `${what} must be a JSON array of rows, got ${jsonTypeName(rows)}${hint}`, { file });
  }
  if (rows.length === 0) throw new RedflagError('INVALID_FILE', 'is empty (no rows)', { file });
  const lines = arrayElementLines(text, path);
  for (let index = 0; index < rows.length; index++) {
    const source = `${file}:${lines[index] ?? 1}`;
    const conversation = guardRow(source, options, () => jsonRowToConversation(rows[index], source, options));
    if (conversation !== null) yield conversation;
  }
}

/**
 * Lines on which the elements of the array at `path` (object keys from the top) start, in a
 * text that is valid JSON.
 */
export function arrayElementLines(text: string, path: readonly string[]): number[] {
  interface Frame {
    object: boolean;
    /** Keys from the top to this container; null once an array lies on the way. */
    path: string[] | null;
    target: boolean;
    key: string | null;
    expectKey: boolean;
  }
  const lines: number[] = [];
  const stack: Frame[] = [];
  let line = 1;
  const isTarget = (keys: string[] | null): boolean => keys !== null && keys.length === path.length && keys.every((key, i) => key === path[i]);
  const childPath = (parent: Frame | undefined): string[] | null => {
    if (parent === undefined) return [];
    if (!parent.object || parent.path === null || parent.key === null) return null;
    return [...parent.path, parent.key];
  };
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x0a) {
      line++;
      continue;
    }
    if (c === 0x20 || c === 0x09 || c === 0x0d || c === 0x3a /* : */) continue;
    const top = stack[stack.length - 1];
    if (c === 0x2c /* , */) {
      if (top?.object) top.expectKey = true;
      continue;
    }
    if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      stack.pop();
      continue;
    }
    // A key, or the start of a value.
    if (c === 0x22 /* " */) {
      let j = i + 1;
      while (text.charCodeAt(j) !== 0x22) j += text.charCodeAt(j) === 0x5c ? 2 : 1;
      if (top?.object && top.expectKey) {
        top.key = JSON.parse(text.slice(i, j + 1)) as string;
        top.expectKey = false;
        i = j;
        continue;
      }
      if (top?.target) lines.push(line);
      i = j;
      continue;
    }
    if (top?.target) lines.push(line);
    if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      const keys = childPath(top);
      stack.push({ object: c === 0x7b, path: keys, target: c === 0x5b && isTarget(keys), key: null, expectKey: c === 0x7b });
      continue;
    }
    // A number or literal: skip to its end.
    while (i + 1 < text.length && /[^\s,\]}]/.test(text[i + 1] as string)) i++;
  }
  return lines;
}

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

/** Finds a column: the exact name, else a case-insensitive match. */
function findColumn(header: readonly string[], name: string): number {
  const exact = header.indexOf(name);
  if (exact >= 0) return exact;
  const lower = name.toLowerCase();
  return header.findIndex((column) => column.trim().toLowerCase() === lower);
}

function firstColumn(header: readonly string[], candidates: readonly string[]): number {
  for (const candidate of candidates) {
    const index = findColumn(header, candidate);
    if (index >= 0) return index;
  }
  return -1;
}

interface ResolvedColumns {
  prompt: number;
  response: number;
  label: number;
  category: number;
  context: number;
}

/** Chooses the columns of a CSV header (throws naming the file when one is missing). */
function resolveCsvColumns(header: readonly string[], file: string, options: LoadOptions): ResolvedColumns {
  const shown = header.map((name) => quoteText(name, 40)).join(', ');
  const explicit = (name: string | undefined, option: string): number => {
    if (name === undefined) return -1;
    const index = findColumn(header, name);
    if (index < 0) throw new RedflagError('INVALID_FILE', `no column "${name}" (option ${option}); the header has ${shown}`, { file });
    return index;
  };
  const prompt = options.promptColumn !== undefined ? explicit(options.promptColumn, 'promptColumn') : firstColumn(header, CSV_PROMPT_COLUMNS);
  if (prompt < 0) throw new RedflagError('INVALID_FILE', `no prompt column (looked for ${CSV_PROMPT_COLUMNS.join(', ')}; pass promptColumn); the header has ${shown}`, { file });
  const response = options.responseColumn !== undefined ? explicit(options.responseColumn, 'responseColumn') : firstColumn(header, CSV_RESPONSE_COLUMNS);
  if (response < 0 && !options.allowPromptOnly) {
    throw new RedflagError(
      'INVALID_FILE',
      `no response column (looked for ${CSV_RESPONSE_COLUMNS.join(', ')}; pass responseColumn, or allowPromptOnly: true for prompt-only data); the header has ${shown}`,
      { file },
    );
  }
  let label = -1;
  if (options.label === undefined) {
    label = options.labelColumn !== undefined ? explicit(options.labelColumn, 'labelColumn') : firstColumn(header, LABEL_FIELDS);
    if (label < 0) {
      throw new RedflagError('INVALID_FILE', `no label column (looked for ${LABEL_FIELDS.join(', ')}; pass labelColumn, or label: 'harmful' | 'benign' for the whole file); the header has ${shown}`, {
        file,
      });
    }
  }
  const category = options.categoryColumn !== undefined ? explicit(options.categoryColumn, 'categoryColumn') : firstColumn(header, CSV_CATEGORY_COLUMNS);
  // HarmBench's contextual behaviours: the context goes before the behaviour.
  const context = header[prompt]?.trim().toLowerCase() === 'behavior' ? findColumn(header, 'ContextString') : -1;
  return { prompt, response, label, category, context };
}

/** The columns {@link loadConversations} would use for a CSV header (for reports and checks). */
export function csvColumnsFor(header: readonly string[], options: LoadOptions = {}, file = 'CSV'): CsvColumns {
  const columns = resolveCsvColumns(header, file, options);
  const name = (index: number): string | null => (index < 0 ? null : (header[index] as string));
  return { prompt: header[columns.prompt] as string, response: name(columns.response), label: name(columns.label), category: name(columns.category), context: name(columns.context) };
}

/**
 * The line each CSV record starts on, from csv-parse's `info.lines` (the line a record ends on),
 * which counts a CRLF inside a quoted field as two lines: every such pair so far is taken off,
 * then the record's own line breaks. Feed it every record, in order.
 * @internal
 */
export class CsvRecordLines {
  /** Lines csv-parse counted too many so far. */
  #extra = 0;

  /** The line the record with these fields starts on; `lines` is its `info.lines`. */
  start(fields: readonly string[], lines: number): number {
    let breaks = 0;
    for (const field of fields) {
      for (let i = 0; i < field.length; i++) {
        const c = field.charCodeAt(i);
        if (c === 0x0a) breaks++;
        else if (c === 0x0d && field.charCodeAt(i + 1) !== 0x0a) breaks++;
        else if (c === 0x0d) this.#extra++;
      }
    }
    return lines - this.#extra - breaks;
  }

  /** A line csv-parse reported (an error's), corrected by the pairs seen so far. */
  correct(lines: number): number {
    return Math.max(1, lines - this.#extra);
  }
}

interface CsvRecord {
  record: string[];
  info: { lines: number };
}

async function* streamCsv(file: string, options: StreamOptions): AsyncGenerator<Conversation, void, undefined> {
  const skipInvalid = options.skipInvalid ?? false;
  let header: string[] | null = null;
  let headerError: { lines?: number; message: string } | undefined;
  let columns: ResolvedColumns | null = null;
  let rows = 0;
  const recordLines = new CsvRecordLines();
  const input = createReadStream(file);
  const parser = parseCsv({
    bom: true,
    info: true,
    relax_column_count: true,
    skip_empty_lines: true,
    skip_records_with_error: skipInvalid,
  });
  // The line the last complete record ended on: a quote never closed opened after it.
  let lastEnd = 0;
  let unclosed: { lines?: number; message: string } | undefined;
  if (skipInvalid) {
    parser.on('skip', (error: { code?: string; lines?: number; message: string } | undefined) => {
      if (error === undefined) return;
      // A broken header is never skipped: the next record would silently become the header.
      if (parser.info.records === 0) headerError ??= error;
      // Nor a quote never closed: it swallowed every line after it, which one skip would hide.
      else if (error.code === 'CSV_QUOTE_NOT_CLOSED') unclosed ??= error;
      else options.onSkip?.({ source: `${file}:${recordLines.correct(error.lines ?? 1)}`, reason: `cannot parse CSV: ${error.message}` });
    });
  }
  const unclosedError = (cause?: unknown) =>
    recordError(`${file}:${lastEnd + 1}`, `cannot parse CSV: a quoted field that opens on or after this line is never closed, so every line after it would be one field`, cause);
  input.on('error', (error) => parser.destroy(error));
  input.pipe(parser);

  try {
    for await (const item of parser as AsyncIterable<CsvRecord>) {
      const fields = item.record;
      const line = recordLines.start(fields, item.info.lines);
      lastEnd = recordLines.correct(item.info.lines);
      if (headerError !== undefined) throw recordError(`${file}:${headerError.lines ?? 1}`, `cannot read the CSV header: ${headerError.message}`);
      if (header === null) {
        header = fields;
        columns = resolveCsvColumns(header, file, options);
        continue;
      }
      rows++;
      const source = `${file}:${line}`;
      const conversation = guardRow(source, options, () => csvRowToConversation(fields, header as string[], columns as ResolvedColumns, source, options));
      if (conversation !== null) yield conversation;
    }
  } catch (error) {
    if (error instanceof RedflagError) throw error;
    const parseError = error as { code?: unknown; lines?: unknown; message?: unknown };
    if (error instanceof CsvError && parseError.code === 'CSV_QUOTE_NOT_CLOSED' && parser.info.records > 0) throw unclosedError(error);
    if (error instanceof CsvError) {
      const line = recordLines.correct(typeof parseError.lines === 'number' ? parseError.lines : 1);
      const what = parser.info.records === 0 ? 'cannot read the CSV header' : 'cannot parse CSV';
      throw recordError(`${file}:${line}`, `${what}: ${String(parseError.message)}`, error);
    }
    throw new RedflagError('INVALID_FILE', `cannot read (${String(parseError.code ?? error)})`, { file, cause: error });
  } finally {
    input.destroy();
  }
  if (headerError !== undefined) throw recordError(`${file}:${headerError.lines ?? 1}`, `cannot read the CSV header: ${headerError.message}`);
  if (unclosed !== undefined) throw unclosedError();
  if (header === null) throw new RedflagError('INVALID_FILE', 'is empty (no header row)', { file });
  if (rows === 0) throw new RedflagError('INVALID_FILE', 'has a header but no rows', { file });
}

function csvRowToConversation(fields: readonly string[], header: readonly string[], columns: ResolvedColumns, source: string, options: LoadOptions): Conversation {
  if (fields.length !== header.length) throw new RowProblem(`row has ${fields.length} fields, the header has ${header.length}`);
  const cell = (index: number): string => fields[index] as string;
  const name = (index: number): string => header[index] as string;
  const behavior = cell(columns.prompt);
  if (behavior.trim().length === 0) throw new RowProblem(`column "${name(columns.prompt)}" is empty`);
  const context = columns.context >= 0 ? cell(columns.context) : '';
  const prompt = context.trim().length > 0 ? `${context}\n\n---\n\n${behavior}` : behavior;
  const messages: Message[] = [{ role: 'user', content: prompt }];
  let responseMissing = false;
  const response = columns.response >= 0 ? cell(columns.response) : '';
  if (response.trim().length > 0) {
    messages.push({ role: 'assistant', content: response });
  } else if (options.allowPromptOnly) {
    responseMissing = true;
  } else {
    throw new RowProblem(`column "${name(columns.response)}" is empty`);
  }
  const label = options.label ?? parseLabel(cell(columns.label), `column "${name(columns.label)}"`);
  const categoryText = columns.category >= 0 ? cell(columns.category).trim() : '';
  return finish(messages, responseMissing, label, source, categoryText.length > 0 ? categoryText : undefined, options);
}
