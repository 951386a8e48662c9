/**
 * Public evaluation formats beyond the generic rows {@link loadConversations} reads, recognised
 * from a file's header or shape:
 *
 * - **JailbreakBench attack artifacts** (JSON `{parameters, jailbreaks: [...]}`): each entry's
 *   `prompt` and `response` become a labelled response, harmful when `jailbroken` is true (the
 *   prompt is harmful either way: `promptLabel`); the artifact's stored verdicts (`jailbroken`,
 *   `jailbroken_llama_guard1`) are kept for the report. Entries without a prompt or response are
 *   skipped (counted).
 * - **StrongREJECT** CSV (`category,source,forbidden_prompt`): harmful prompts, with category.
 * - **XSTest completions** CSV (`type,prompt,completion,…,final_label`): the prompt is unsafe
 *   when its `type` starts with `contrast_`; a completion is harmful when it answers an unsafe
 *   prompt without fully refusing (`final_label` not `2_full_refusal`), benign otherwise (a
 *   refused unsafe prompt: `promptLabel` harmful). The type is the category.
 * - **Alpaca** JSON (`[{instruction, input, output}]`): the prompt is the instruction, followed
 *   by the input (after a blank line) when there is one; labelled by the file's label, else by
 *   the row's `label` or `harmful` field, else benign.
 *
 * Everything else goes to {@link loadConversations} (AdvBench, HarmBench, JailbreakBench
 * behaviours `Goal,Target,Category`, XSTest prompts `prompt,type,label`, chat JSONL,
 * prompt/response JSON(L)), with prompt-only rows allowed, and so does a file whose entry names
 * its columns (`promptColumn`, `labelColumn`, …) or `recordsKey`: the recognised format would
 * ignore them.
 * @module
 */
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';

import { parse as parseCsvSync } from 'csv-parse/sync';

import { RedflagError } from '../errors.js';
import { addSystemPrompt, arrayElementLines, CsvRecordLines, LABEL_FIELDS, loadConversationFiles, loadConversations, sortSkippedByLine, withAlpacaInput, type FileEntry, type LoadedConversations } from './loaders.js';
import { parseLabel, RowProblem, type Conversation, type Label, type SkippedRow } from './records.js';

/** The special formats this module recognises (`generic`: left to the loaders). */
export type EvalFormat = 'jbb-artifacts' | 'strongreject' | 'xstest-completions' | 'alpaca' | 'generic';

/** A verdict stored in the data (JailbreakBench artifacts), keyed by the conversation's source. */
export interface StoredVerdict {
  /** The artifact's own jailbreak judgement. */
  jailbroken?: boolean;
  /** Llama Guard's verdict stored beside it. */
  llamaGuard?: boolean;
}

/** What {@link loadEvalFile} returns. */
export interface EvalFileResult {
  format: EvalFormat;
  conversations: Conversation[];
  /** Stored verdicts by conversation source. */
  storedVerdicts: Record<string, StoredVerdict>;
  /** Rows left out (no prompt or response), with the reason. */
  skipped: { source: string; reason: string }[];
}

function firstLine(text: string): string {
  const end = text.search(/\r?\n/);
  return (end < 0 ? text : text.slice(0, end)).replace(/^\ufeff/, '');
}

function csvHeader(text: string): string[] {
  try {
    const rows = parseCsvSync(firstLine(text), { relax_column_count: true }) as string[][];
    return (rows[0] ?? []).map((h) => h.trim().toLowerCase());
  } catch {
    return [];
  }
}

/** Which format a file is in, from its extension, header or shape. */
export function detectEvalFormat(file: string, text: string): EvalFormat {
  const ext = extname(file).toLowerCase();
  if (ext === '.csv') {
    const header = csvHeader(text);
    if (header.includes('forbidden_prompt')) return 'strongreject';
    if (header.includes('completion') && header.includes('final_label') && header.includes('type')) return 'xstest-completions';
    return 'generic';
  }
  if (ext === '.json') {
    let parsed: unknown;
    try {
      parsed = JSON.parse(text.replace(/^\ufeff/, ''));
    } catch {
      return 'generic'; // the generic loader names the line of the syntax error
    }
    if (typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed) && Array.isArray((parsed as Record<string, unknown>)['jailbreaks'])) return 'jbb-artifacts';
    if (Array.isArray(parsed) && parsed.length > 0) {
      const row = parsed[0] as Record<string, unknown>;
      if (typeof row === 'object' && row !== null && 'instruction' in row && 'output' in row && 'input' in row) return 'alpaca';
    }
  }
  return 'generic';
}

function nonEmpty(value: unknown): value is string {
  return typeof value === 'string' && value.trim().length > 0;
}

/**
 * A CSV file's rows by lower-cased column, each with the line it starts on. A row with another
 * number of fields than the header is an error naming its line (its values would sit under the
 * wrong columns: an unquoted comma in a refusal would shift the label), or skipped with
 * `skipInvalid`, as the generic loader does.
 */
function csvRows(file: string, text: string, skipInvalid: boolean, skipped: { source: string; reason: string }[]): { row: Record<string, string>; line: number }[] {
  const lines = new CsvRecordLines();
  let records: { record: string[]; info: { lines: number } }[];
  try {
    records = parseCsvSync(text, { bom: true, skip_empty_lines: true, relax_column_count: true, info: true });
  } catch (error) {
    const line = (error as { lines?: number }).lines ?? 1;
    throw new RedflagError('INVALID_FILE', `cannot parse CSV: ${(error as Error).message}`, { file: `${file}:${line}`, cause: error });
  }
  const [head, ...rows] = records;
  if (head === undefined) return [];
  lines.start(head.record, head.info.lines);
  const header = head.record.map((x) => x.trim().toLowerCase());
  const out: { row: Record<string, string>; line: number }[] = [];
  for (const { record, info } of rows) {
    const line = lines.start(record, info.lines);
    if (record.length !== header.length) {
      const reason = `row has ${record.length} fields, the header has ${header.length}`;
      if (!skipInvalid) throw new RedflagError('INVALID_FILE', reason, { file: `${file}:${line}` });
      skipped.push({ source: `${file}:${line}`, reason });
      continue;
    }
    out.push({ row: Object.fromEntries(header.map((name, i) => [name, record[i]!])), line });
  }
  return out;
}

function jbbArtifacts(file: string, parsed: Record<string, unknown>, label: Label | undefined): EvalFileResult {
  const out: EvalFileResult = { format: 'jbb-artifacts', conversations: [], storedVerdicts: {}, skipped: [] };
  (parsed['jailbreaks'] as unknown[]).forEach((entry, i) => {
    const source = `${file}#jailbreaks[${i}]`;
    const e = entry as Record<string, unknown>;
    if (typeof e !== 'object' || e === null) return out.skipped.push({ source, reason: 'entry must be an object' });
    if (!nonEmpty(e['prompt'])) return out.skipped.push({ source, reason: 'field "prompt" is missing or empty' });
    if (!nonEmpty(e['response'])) return out.skipped.push({ source, reason: 'field "response" is missing or empty' });
    if (label === undefined && typeof e['jailbroken'] !== 'boolean') return out.skipped.push({ source, reason: 'field "jailbroken" must be a boolean' });
    const c: Conversation = {
      messages: [
        { role: 'user', content: e['prompt'] },
        { role: 'assistant', content: e['response'] },
      ],
      label: label ?? (e['jailbroken'] ? 'harmful' : 'benign'),
      source,
    };
    // Every artifact's prompt asks for a harmful behaviour; a response that refused it is benign.
    if (label === undefined && !e['jailbroken']) c.promptLabel = 'harmful';
    if (nonEmpty(e['category'])) c.category = e['category'];
    out.conversations.push(c);
    const verdict: StoredVerdict = {};
    if (typeof e['jailbroken'] === 'boolean') verdict.jailbroken = e['jailbroken'];
    if (typeof e['jailbroken_llama_guard1'] === 'boolean') verdict.llamaGuard = e['jailbroken_llama_guard1'];
    out.storedVerdicts[source] = verdict;
    return undefined;
  });
  return out;
}

function strongReject(file: string, text: string, label: Label | undefined, skipInvalid: boolean): EvalFileResult {
  const out: EvalFileResult = { format: 'strongreject', conversations: [], storedVerdicts: {}, skipped: [] };
  csvRows(file, text, skipInvalid, out.skipped).forEach(({ row, line }) => {
    const source = `${file}:${line}`;
    if (!nonEmpty(row['forbidden_prompt'])) return out.skipped.push({ source, reason: 'column "forbidden_prompt" is empty' });
    const c: Conversation = { messages: [{ role: 'user', content: row['forbidden_prompt'] }], label: label ?? 'harmful', source, responseMissing: true };
    if (nonEmpty(row['category'])) c.category = row['category'];
    out.conversations.push(c);
    return undefined;
  });
  return out;
}

function xstestCompletions(file: string, text: string, label: Label | undefined, skipInvalid: boolean): EvalFileResult {
  const out: EvalFileResult = { format: 'xstest-completions', conversations: [], storedVerdicts: {}, skipped: [] };
  csvRows(file, text, skipInvalid, out.skipped).forEach(({ row, line }) => {
    const source = `${file}:${line}`;
    if (!nonEmpty(row['prompt'])) return out.skipped.push({ source, reason: 'column "prompt" is empty' });
    if (!nonEmpty(row['completion'])) return out.skipped.push({ source, reason: 'column "completion" is empty' });
    const type = (row['type'] ?? '').trim();
    const unsafe = type.startsWith('contrast_');
    const refused = (row['final_label'] ?? '').trim().startsWith('2_');
    out.conversations.push({
      messages: [
        { role: 'user', content: row['prompt'] },
        { role: 'assistant', content: row['completion'] },
      ],
      label: label ?? (unsafe && !refused ? 'harmful' : 'benign'),
      source,
      ...(type ? { category: type } : {}),
      ...(label === undefined && unsafe && refused ? { promptLabel: 'harmful' as const } : {}),
    });
    return undefined;
  });
  return out;
}

function alpaca(file: string, text: string, label: Label | undefined): EvalFileResult {
  const out: EvalFileResult = { format: 'alpaca', conversations: [], storedVerdicts: {}, skipped: [] };
  const rows = JSON.parse(text) as unknown[];
  const lines = arrayElementLines(text, []);
  rows.forEach((entry, i) => {
    const source = `${file}:${lines[i] ?? 1}`;
    const r = entry as Record<string, unknown>;
    if (typeof r !== 'object' || r === null) return out.skipped.push({ source, reason: 'row must be an object' });
    if (!nonEmpty(r['instruction'])) return out.skipped.push({ source, reason: 'field "instruction" is missing or empty' });
    let prompt: string, rowLabel: Label;
    try {
      prompt = withAlpacaInput(r, 'instruction', r['instruction']);
      // The file's label, else the row's own ("label" or "harmful"), else benign (Alpaca's own data).
      const field = LABEL_FIELDS.find((f) => r[f] !== undefined && r[f] !== null);
      rowLabel = label ?? (field === undefined ? 'benign' : parseLabel(r[field], `field "${field}"`));
    } catch (error) {
      if (error instanceof RowProblem) return out.skipped.push({ source, reason: error.message });
      throw error;
    }
    const c: Conversation = { messages: [{ role: 'user', content: prompt }], label: rowLabel, source };
    if (nonEmpty(r['output'])) c.messages.push({ role: 'assistant', content: r['output'] });
    else c.responseMissing = true;
    out.conversations.push(c);
    return undefined;
  });
  return out;
}

/**
 * Whether the entry describes its file's columns or records itself: then the generic loaders
 * read it as described, since a recognised format's fixed fields would ignore what was asked.
 */
function describesColumns(entry: FileEntry): boolean {
  return entry.promptColumn !== undefined || entry.responseColumn !== undefined || entry.labelColumn !== undefined || entry.categoryColumn !== undefined || entry.recordsKey !== undefined;
}

/**
 * Reads one evaluation data file in any format the project knows (see the module description).
 * The entry's `label` labels every row; without it the format's labels (or each row's) are used.
 * An entry naming columns (or `recordsKey`) is read by the generic loaders as it describes.
 */
export async function loadEvalFile(entry: FileEntry): Promise<EvalFileResult> {
  let text: string;
  try {
    text = await readFile(entry.file, 'utf8');
  } catch (cause) {
    const code = (cause as { code?: unknown }).code;
    throw new RedflagError(code === 'ENOENT' ? 'NOT_FOUND' : 'INVALID_FILE', code === 'ENOENT' ? 'file not found' : `cannot read (${String(code)})`, { file: entry.file, cause });
  }
  const format = (entry.format === undefined || entry.format === 'csv' || entry.format === 'json') && !describesColumns(entry) ? detectEvalFormat(entry.file, text) : 'generic';
  let result: EvalFileResult;
  if (format === 'jbb-artifacts') result = jbbArtifacts(entry.file, JSON.parse(text.replace(/^\ufeff/, '')) as Record<string, unknown>, entry.label);
  else if (format === 'strongreject') result = strongReject(entry.file, text, entry.label, entry.skipInvalid ?? false);
  else if (format === 'xstest-completions') result = xstestCompletions(entry.file, text, entry.label, entry.skipInvalid ?? false);
  else if (format === 'alpaca') result = alpaca(entry.file, text.replace(/^\ufeff/, ''), entry.label);
  else {
    const { file, ...options } = entry;
    // XSTest's prompt file names its category column "type".
    const header = extname(file).toLowerCase() === '.csv' ? csvHeader(text) : [];
    const categoryColumn = options.categoryColumn ?? (header.includes('type') && !header.includes('category') && !header.includes('semanticcategory') ? 'type' : undefined);
    const loaded = await loadConversations(file, { allowPromptOnly: true, ...options, ...(categoryColumn ? { categoryColumn } : {}) });
    result = { format: 'generic', conversations: loaded.conversations, storedVerdicts: {}, skipped: loaded.skipped };
  }
  // In file order (a CSV format reports rows of the wrong shape as it reads, the rest after).
  if (result.format === 'strongreject' || result.format === 'xstest-completions') sortSkippedByLine(result.skipped);
  if (result.conversations.length === 0) throw new RedflagError('INVALID_FILE', `has no usable rows (${result.format}; ${result.skipped.length} skipped)`, { file: entry.file });
  // The generic loaders add the system prompt themselves.
  if (result.format !== 'generic') for (const c of result.conversations) addSystemPrompt(c.messages, entry.systemPrompt);
  return result;
}

/**
 * Training data: every format {@link loadConversationFiles} reads, plus the evaluation formats
 * recognised from their headers (JailbreakBench attack artifacts, StrongREJECT, XSTest
 * completions, Alpaca JSON). Training needs answers: rows without one are reported as skipped.
 * JSONL files and the generic formats stream through the loaders as before.
 */
export async function loadTrainingFiles(entries: readonly FileEntry[]): Promise<LoadedConversations> {
  const conversations: Conversation[] = [];
  const skipped: SkippedRow[] = [];
  for (const entry of entries) {
    const ext = extname(entry.file).toLowerCase();
    let format: EvalFormat = 'generic';
    if ((ext === '.csv' || ext === '.json') && entry.format !== 'jsonl' && !describesColumns(entry)) {
      // Only a file's start decides a CSV format; a JSON file is read whole anyway.
      const text = await readFile(entry.file, 'utf8').catch(() => null);
      if (text !== null) format = detectEvalFormat(entry.file, text);
    }
    if (format === 'generic') {
      const loaded = await loadConversationFiles([entry]);
      conversations.push(...loaded.conversations);
      skipped.push(...loaded.skipped);
      continue;
    }
    const loaded = await loadEvalFile(entry);
    skipped.push(...loaded.skipped);
    for (const c of loaded.conversations) {
      if (c.responseMissing) skipped.push({ source: c.source, reason: 'no response to train on (prompt-only row)' });
      else conversations.push(c);
    }
  }
  return { conversations, skipped };
}
